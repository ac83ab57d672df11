"""KMS with attestation end to end: a boto3 app in an emulated enclave, odyn's KMS proxy, the
sleeve's egress broker, and `nitro-emu aws-services` (IMDS, KMS) with a key whose policy came from
playbooks/kms-key.yml (the kms_attestation_statement filter). Needs root and Docker; CI has both.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
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
from importlib import util
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.host.runtime_bundle import bundle_runtime
from tests.ansible.playbook_runner import run_playbook
from tests.kms_support import boto_client, imds_credentials

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

BIN = Path(sys.executable).parent
IMAGE_DIR = Path(__file__).parent / "images" / "hello-kms"
IMAGE = "enclaveops-test/hello-kms"
SECRET = b"the enclave's secret"
APP_PACKAGES = ("boto3", "s3transfer")  # the app's own dependencies beyond the runtime's


@dataclass
class World:
    root: Path
    env: dict[str, str]
    manifest: Path
    eifs: dict[str, Path]
    pcr0: dict[str, str]
    blob: bytes
    key_arn: str
    services: subprocess.Popen[str]


def _run(command: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _start_services(env: dict[str, str], root: Path) -> tuple[subprocess.Popen[str], dict]:
    services = subprocess.Popen(
        [str(BIN / "nitro-emu"), "aws-services"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    endpoints = root / "aws" / "endpoints.json"
    deadline = time.monotonic() + 30
    while not endpoints.is_file():
        assert services.poll() is None and time.monotonic() < deadline, "aws-services did not start"
        time.sleep(0.1)
    return services, json.loads(endpoints.read_text())


def _context(work: Path, root: Path) -> Path:
    context = work / "context"
    shutil.copytree(IMAGE_DIR, context)
    config = context / "config"
    config.mkdir()
    shutil.copy(IMAGE_DIR / "enclaver.yaml", config / "enclaver.yaml")
    shutil.copy(root / "aws" / "ca.pem", config / "aws-ca.pem")
    bundle_runtime(context / "lib")
    for name in APP_PACKAGES:
        spec = util.find_spec(name)
        assert spec is not None and spec.origin is not None
        shutil.copytree(Path(spec.origin).parent, context / "lib" / name)
    return context


def _build(context: Path, variant: str, base_image: str, work: Path, env: dict[str, str]) -> Any:
    tag = f"{IMAGE}:{variant}"
    args = ["--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", f"VARIANT={variant}"]
    _run(["docker", "build", "-q", *args, "-t", tag, str(context)])
    eif = work / f"hello-kms-{variant}.eif"
    out = _run(
        [str(BIN / "nitro-emu"), "build-enclave", "--docker-uri", tag, "--output-file", str(eif)],
        env,
    )
    return eif, json.loads(out)["Measurements"]


@pytest.fixture(scope="module")
def world(base_image: str) -> Iterator[World]:
    work = Path(tempfile.mkdtemp(prefix="kms", dir="/tmp"))  # short: Unix socket paths
    root = work / "emu"
    allocator = work / "allocator.yaml"
    allocator.write_text("---\nmemory_mib: 4096\ncpu_count: 2\n")
    env = dict(os.environ, NITRO_EMU_ROOT=str(root), NITRO_EMU_ALLOCATOR=str(allocator))
    services, endpoints = _start_services(env, root)
    try:
        context = _context(work, root)
        built = {v: _build(context, v, base_image, work, env) for v in ("a", "b")}
        measurements = work / "measurements-a.json"
        measurements.write_text(json.dumps(built["a"][1]))
        creds = imds_credentials(endpoints["imds_port"])
        applied = run_playbook(
            "kms-key.yml",
            "-e",
            json.dumps(
                {
                    "kms_measurements_file": str(measurements),
                    "kms_principal": "arn:aws:iam::111122223333:role/nitro-emu-parent",
                    "kms_admin": "arn:aws:iam::111122223333:root",
                    "kms_endpoint_url": f"https://127.0.0.1:{endpoints['kms_port']}",
                    "kms_ca_bundle": endpoints["ca"],
                    **{f"kms_{k}": v for k, v in creds.items()},
                }
            ),
            timeout=300,
        )
        assert applied.returncode == 0, applied.output[-3000:]
        client = boto_client(
            f"https://127.0.0.1:{endpoints['kms_port']}",
            verify=endpoints["ca"],
            credentials={
                "aws_access_key_id": creds["access_key"],
                "aws_secret_access_key": creds["secret_key"],
                "aws_session_token": creds["session_token"],
            },
        )
        encrypted = client.encrypt(KeyId="alias/enclave-secrets", Plaintext=SECRET)
        yield World(
            root,
            env,
            context / "config" / "enclaver.yaml",
            {v: eif for v, (eif, _) in built.items()},
            {v: m["PCR0"] for v, (_, m) in built.items()},
            encrypted["CiphertextBlob"],
            encrypted["KeyId"],
            services,
        )
    finally:
        subprocess.run(
            [str(BIN / "nitro-emu"), "terminate-enclave", "--all"],
            env=env,
            capture_output=True,
            check=False,
        )
        services.send_signal(signal.SIGTERM)
        services.wait(30)
        for variant in ("a", "b"):
            subprocess.run(
                ["docker", "rmi", "-f", f"{IMAGE}:{variant}"], capture_output=True, check=False
            )
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Sleeve:
    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    def get(self, path: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=60) as response:
            return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _collect(sleeve: Sleeve) -> None:
    assert sleeve.process.stdout is not None
    for line in sleeve.process.stdout:
        sleeve.lines.append(line.rstrip("\n"))


@contextlib.contextmanager
def _sleeve(world: World, variant: str, *extra: str) -> Iterator[Sleeve]:
    port = _free_port()
    command = [
        str(BIN / "sleeve"),
        "--eif-file",
        str(world.eifs[variant]),
        "--manifest-file",
        str(world.manifest),
        "--nitro-cli",
        str(BIN / "nitro-emu"),
        "--ingress-host",
        "127.0.0.1",
        "--port-map",
        f"8080:{port}",
        *extra,
    ]
    process = subprocess.Popen(
        command, env=world.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sleeve = Sleeve(process, port)
    threading.Thread(target=_collect, args=(sleeve,), daemon=True).start()
    deadline = time.monotonic() + 90
    while True:
        try:
            if sleeve.get("/") == {"hello": "kms"}:
                break
        except (OSError, urllib.error.URLError, ValueError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "the app never answered:\n" + "\n".join(sleeve.lines)
                ) from None
            time.sleep(0.3)
    try:
        yield sleeve
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def _decrypt(sleeve: Sleeve, world: World) -> dict[str, Any]:
    blob = urllib.parse.quote(base64.b64encode(world.blob).decode())
    return sleeve.get(f"/decrypt?blob={blob}")


def test_the_pinned_build_decrypts_and_generates(world: World) -> None:
    with _sleeve(world, "a") as sleeve:
        assert base64.b64decode(_decrypt(sleeve, world)["Plaintext"]) == SECRET
        data_key = sleeve.get("/generate-data-key?key=" + urllib.parse.quote(world.key_arn))
        assert len(base64.b64decode(data_key["Plaintext"])) == 32
        assert data_key["Plaintext"] == data_key["Decrypted"]
        assert len(base64.b64decode(sleeve.get("/generate-random")["Plaintext"])) == 32


def test_a_build_with_one_changed_byte_gets_access_denied(world: World) -> None:
    assert world.pcr0["a"] != world.pcr0["b"]
    with _sleeve(world, "b") as sleeve:
        assert _decrypt(sleeve, world) == {"Error": "AccessDeniedException"}


def test_a_debug_mode_enclave_gets_access_denied(world: World) -> None:
    with _sleeve(world, "a", "--debug-mode") as sleeve:
        assert _decrypt(sleeve, world) == {"Error": "AccessDeniedException"}
