"""odyn inside the emulator, driven by the sleeve: ingress (plain and TLS), egress, the API, logs,
attestation, exit codes and signals, end to end. Needs root and Docker; CI has both.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave_runtime.build.runtime_bundle import bundle_runtime
from enclave_runtime.formats.attestation import load_root_certificate, verify_attestation_document
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.tls_support import write_self_signed

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

BIN = Path(sys.executable).parent
IMAGE_DIR = Path(__file__).parent / "images" / "hello-odyn"
IMAGE = "enclaveops-test/hello-odyn:latest"
INGRESS_PORTS = (8080, 8443, 9101)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _self_signed(directory: Path) -> Path:
    return write_self_signed(directory / "cert.pem", directory / "key.pem", "localhost")


@dataclass
class Built:
    eif: Path
    manifest: Path
    measurements: Measurements
    tls_cert: Path
    root: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def built(base_image: str) -> Iterator[Built]:
    work = Path(tempfile.mkdtemp(prefix="odyn", dir="/tmp"))  # short: Unix socket paths
    context = work / "context"
    shutil.copytree(IMAGE_DIR, context)
    config = context / "config"
    config.mkdir()
    shutil.copy(IMAGE_DIR / "enclaver.yaml", config / "enclaver.yaml")
    tls_cert = _self_signed(config / "tls" / "server" / "8443")
    bundle_runtime(context / "lib")
    build_arg = f"BASE_IMAGE={base_image}"
    subprocess.run(
        ["docker", "build", "-q", "--build-arg", build_arg, "-t", IMAGE, str(context)],
        check=True,
        capture_output=True,
    )
    root = work / "emu"
    allocator = work / "allocator.yaml"
    allocator.write_text("---\nmemory_mib: 2048\ncpu_count: 2\n")
    env = dict(os.environ, NITRO_EMU_ROOT=str(root), NITRO_EMU_ALLOCATOR=str(allocator))
    eif = work / "hello-odyn.eif"
    result = subprocess.run(
        [str(BIN / "nitro-emu"), "build-enclave", "--docker-uri", IMAGE, "--output-file", str(eif)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    measurements = Measurements.from_nitro_cli(json.loads(result.stdout)["Measurements"])
    yield Built(eif, config / "enclaver.yaml", measurements, tls_cert, root, env)
    subprocess.run(
        [str(BIN / "nitro-emu"), "terminate-enclave", "--all"],
        env=env,
        check=False,
        capture_output=True,
    )
    subprocess.run(["docker", "rmi", "-f", IMAGE], check=False, capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


@dataclass
class Sleeve:
    process: subprocess.Popen[str]
    ports: dict[int, int]
    cid: int = 0
    lines: list[str] = field(default_factory=list)

    def url(self, port: int, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def get(self, port: int, path: str) -> Any:
        with urllib.request.urlopen(self.url(port, path), timeout=30) as response:
            return response.read()

    def fetch(self, url: str) -> dict[str, Any]:
        return json.loads(self.get(8080, "/fetch?" + urllib.parse.urlencode({"url": url})))

    def post(self, port: int, path: str, document: dict[str, Any]) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.url(port, path), data=json.dumps(document).encode(), method="POST"
        )
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)


def _enclave_cids(built: Built) -> set[int]:
    described = subprocess.run(
        [str(BIN / "nitro-emu"), "describe-enclaves"],
        env=built.env,
        check=True,
        capture_output=True,
        text=True,
    )
    return {enclave["EnclaveCID"] for enclave in json.loads(described.stdout)}


def _start_sleeve(built: Built) -> Sleeve:
    before = _enclave_cids(built)
    ports = {port: _free_port() for port in INGRESS_PORTS}
    command = [
        str(BIN / "sleeve"),
        "--eif-file",
        str(built.eif),
        "--manifest-file",
        str(built.manifest),
        "--nitro-cli",
        str(BIN / "nitro-emu"),
        "--ingress-host",
        "127.0.0.1",
        *[arg for port, host in ports.items() for arg in ("--port-map", f"{port}:{host}")],
    ]
    process = subprocess.Popen(
        command, env=built.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sleeve = Sleeve(process, ports)
    threading.Thread(target=_collect, args=(sleeve,), daemon=True).start()
    deadline = time.monotonic() + 60
    while True:
        try:
            if sleeve.get(8080, "/") == b"hello from the enclave\n":
                break
        except (OSError, urllib.error.URLError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "the app never answered:\n" + "\n".join(sleeve.lines)
                ) from None
            time.sleep(0.2)
    (sleeve.cid,) = _enclave_cids(built) - before
    return sleeve


def _collect(sleeve: Sleeve) -> None:
    assert sleeve.process.stdout is not None
    for line in sleeve.process.stdout:
        sleeve.lines.append(line.rstrip("\n"))


def _stop(sleeve: Sleeve) -> None:
    if sleeve.process.poll() is None:
        sleeve.process.send_signal(signal.SIGTERM)
        sleeve.process.wait(60)


@pytest.fixture
def other_parent(built: Built) -> Iterator[Built]:
    """The same image on a second emulated parent: one egress broker per parent, as on Nitro."""
    root = Path(tempfile.mkdtemp(prefix="par", dir="/tmp"))
    env = dict(built.env, NITRO_EMU_ROOT=str(root))
    yield dataclasses.replace(built, root=root, env=env)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sleeve(built: Built) -> Iterator[Sleeve]:
    running = _start_sleeve(built)
    yield running
    _stop(running)


class _Upstream(BaseHTTPRequestHandler):
    hits: list[str]

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = b"upstream ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on the parent: 127.0.0.2 (allowed) and 127.0.0.1 (denied), same port."""
    port = _free_port()
    hits: list[str] = []
    handler = type("Handler", (_Upstream,), {"hits": hits})
    servers = [
        ThreadingHTTPServer((address, port), handler) for address in ("127.0.0.2", "127.0.0.1")
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield str(port), hits
    for server in servers:
        server.shutdown()
        server.server_close()


def test_ingress_reaches_the_app(sleeve: Sleeve) -> None:
    assert sleeve.get(8080, "/") == b"hello from the enclave\n"


def test_tls_ingress_is_terminated_inside_the_enclave(sleeve: Sleeve, built: Built) -> None:
    context = ssl.create_default_context(cafile=str(built.tls_cert))
    raw = socket.create_connection(("127.0.0.1", sleeve.ports[8443]), timeout=30)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200")
    assert answer.endswith(b"hello from the enclave\n")


def test_egress_reaches_an_allowed_loopback_server(
    sleeve: Sleeve, upstream: tuple[str, list[str]]
) -> None:
    port, hits = upstream
    assert sleeve.fetch(f"http://127.0.0.2:{port}/allowed") == {
        "status": 200,
        "body": "upstream ok",
    }
    assert hits == ["/allowed"]


def test_egress_to_a_name_not_allowed_is_403(sleeve: Sleeve) -> None:
    assert sleeve.fetch("http://example.invalid/")["status"] == 403


def test_a_hostname_that_resolves_to_a_denied_address_is_403(
    sleeve: Sleeve, upstream: tuple[str, list[str]]
) -> None:
    port, hits = upstream
    # "host" is allowed by name but reaches the parent's 127.0.0.1, which the policy denies.
    assert sleeve.fetch(f"http://host:{port}/smuggled")["status"] == 403
    assert hits == []


def test_aux_api_attestation_verifies_with_the_built_pcrs(sleeve: Sleeve, built: Built) -> None:
    nonce = os.urandom(32)
    status, document = sleeve.post(
        9101, "/v1/attestation", {"nonce": base64.b64encode(nonce).decode()}
    )
    assert status == 200
    root = load_root_certificate((built.root / "ca" / "root.pem").read_bytes())
    verified = verify_attestation_document(
        document, root=root, expected_pcrs=built.measurements.as_pcrs(), expected_nonce=nonce
    )
    enclave_key = json.loads(sleeve.get(9101, "/v1/encryption/public_key"))["public_key_der"]
    assert verified.document.public_key == bytes.fromhex(enclave_key.removeprefix("0x"))


def _encrypt_for(
    enclave_der: bytes, plaintext: bytes
) -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes]:
    """The client side of the scheme, from its specification (docs/api.md)."""
    enclave_key = serialization.load_der_public_key(enclave_der)
    assert isinstance(enclave_key, ec.EllipticCurvePublicKey)
    client = ec.generate_private_key(ec.SECP384R1())
    shared = client.exchange(ec.ECDH(), enclave_key)
    points = sorted(
        key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        for key in (client.public_key(), enclave_key)
    )
    nonce = os.urandom(12)
    key = HKDF(
        hashes.SHA256(), 32, salt=points[0] + points[1] + nonce, info=b"enclaver-ecdh-aes256gcm-v1"
    ).derive(shared)
    return client, nonce, AESGCM(key).encrypt(nonce, plaintext, None)


def test_encryption_round_trip_and_replay_refusal(sleeve: Sleeve) -> None:
    enclave_der = bytes.fromhex(
        json.loads(sleeve.get(9101, "/v1/encryption/public_key"))["public_key_der"][2:]
    )
    client, nonce, ciphertext = _encrypt_for(enclave_der, b"secret for the enclave")
    client_der = client.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    request = {
        "nonce": "0x" + nonce.hex(),
        "client_public_key": "0x" + client_der.hex(),
        "encrypted_data": "0x" + ciphertext.hex(),
    }
    status, body = sleeve.post(8080, "/api/v1/encryption/decrypt", request)
    assert (status, json.loads(body)) == (200, {"plaintext": "secret for the enclave"})
    replayed, _ = sleeve.post(8080, "/api/v1/encryption/decrypt", request)
    assert 400 <= replayed < 500


def test_app_logs_reach_the_sleeves_stdout_with_the_backlog(sleeve: Sleeve) -> None:
    sleeve.get(8080, "/")
    deadline = time.monotonic() + 10
    while not any('"GET / HTTP/1.1" 200' in line for line in sleeve.lines[-20:]):
        assert time.monotonic() < deadline, sleeve.lines
        time.sleep(0.1)
    assert any(line.startswith("app: starting") for line in sleeve.lines)  # before it connected


def test_odyn_survives_malformed_input_on_every_port(sleeve: Sleeve, built: Built) -> None:
    fabric = EmulatedFabric(built.root)
    for port in (17000, 17001, *INGRESS_PORTS):
        with fabric.connect(sleeve.cid, port, timeout=10) as conn:
            conn.sendall(b"\x16\x03\x01\xff\xff" + os.urandom(512) + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", sleeve.ports[9101]), timeout=10) as raw:
        raw.sendall(b"POST /v1/attestation HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n")
    assert sleeve.get(8080, "/") == b"hello from the enclave\n"
    assert json.loads(sleeve.get(9101, "/v1/eth/address"))["address"].startswith("0x")


def test_the_host_controls_enclave_services_with_initctl_over_vsock(
    sleeve: Sleeve, built: Built
) -> None:
    def initctl(*args: str, cid: str = "3") -> subprocess.CompletedProcess[str]:
        env = dict(built.env, NITRO_EMU_CID=cid)  # the caller's own CID on the fabric
        return subprocess.run(
            [str(BIN / "initctl"), "--protocol", "vsock", "--vsock-cid", str(sleeve.cid), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    listed = initctl("--json", "list")
    assert listed.returncode == 0, listed.stderr
    assert "ticker" in listed.stdout
    assert initctl("stop", "ticker").returncode == 0
    stopped = json.loads(initctl("--json", "status", "ticker").stdout)
    assert (stopped["active"], stopped["pid"]) == (False, None)
    assert initctl("start", "ticker").returncode == 0
    assert json.loads(initctl("--json", "status", "ticker").stdout)["active"] is True
    assert initctl("ping", cid="42").returncode != 0  # not in control.allowed_cids
    assert any(line.startswith("[ticker] tick") for line in sleeve.lines)  # in the app log


def test_the_sleeve_exits_with_the_apps_code_and_leaves_no_enclave(other_parent: Built) -> None:
    own = _start_sleeve(other_parent)
    try:
        assert own.get(8080, "/exit?code=7") == b"bye\n"
        assert own.wait() == 7
    finally:
        _stop(own)
    assert _enclave_cids(other_parent) == set()


def test_sigterm_stops_the_enclave_and_exits_109(other_parent: Built) -> None:
    own = _start_sleeve(other_parent)
    own.process.send_signal(signal.SIGTERM)
    assert own.wait() == 109
    assert _enclave_cids(other_parent) == set()
