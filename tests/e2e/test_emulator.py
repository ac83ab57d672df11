"""nitro-emu end to end: build an EIF from a local image, run it, reach it, attest it, end it.

Needs root (namespaces, mounts) and Docker (the image); CI has both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from enclave_runtime.formats.attestation import (
    AttestationError,
    load_root_certificate,
    verify_attestation_document,
)
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

NITRO_EMU = str(Path(sys.executable).parent / "nitro-emu")
PROBE_DIR = Path(__file__).parent / "images" / "probe"
PROBE_IMAGE = "enclaveops-test/probe:latest"
PROBE_PORT = 5000
ALLOCATOR = "---\nmemory_mib: 2048\ncpu_count: 2\n"


@dataclass
class Emulator:
    root: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [NITRO_EMU, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"nitro-emu {' '.join(args)} failed:\n{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args).stdout)

    def ask(self, cid: int, command: str, timeout: float = 20.0) -> bytes:
        """One request to the probe inside the enclave, retrying until it listens."""
        fabric = EmulatedFabric(self.root)
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = fabric.connect(cid, PROBE_PORT, timeout=10)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with conn:
            conn.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def leftovers(self) -> list[str]:
        """Everything an ended enclave must not leave: records, run dirs, listeners, mounts."""
        found = [str(p) for p in (self.root / "enclaves").glob("*.json")]
        found += [str(p) for p in (self.root / "run").glob("*")]
        found += [str(p) for p in (self.root / "vsock").glob("*") if p.name != "3"]
        mounts = Path("/proc/mounts").read_text()
        found += [line for line in mounts.splitlines() if str(self.root) in line]
        return found


def _running(pid: int) -> bool:
    """Alive and not a zombie: an exited enclave process waits for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _image_context(target: Path) -> Path:
    shutil.copytree(PROBE_DIR, target)
    lib = target / "lib"
    shutil.copytree(
        REPO_ROOT / "enclave_runtime",
        lib / "enclave_runtime",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(
        Path(cbor2.__file__).parent, lib / "cbor2", ignore=shutil.ignore_patterns("__pycache__")
    )
    return target


@pytest.fixture(scope="module")
def probe_image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    context = _image_context(tmp_path_factory.mktemp("probe") / "context")
    build_arg = f"BASE_IMAGE={base_image}"
    subprocess.run(
        ["docker", "build", "-q", "--build-arg", build_arg, "-t", PROBE_IMAGE, str(context)],
        check=True,
        capture_output=True,
    )
    yield PROBE_IMAGE
    subprocess.run(["docker", "rmi", "-f", PROBE_IMAGE], check=False, capture_output=True)


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    root = Path(tempfile.mkdtemp(prefix="emu", dir="/tmp"))  # short: Unix socket paths
    allocator = root / "allocator.yaml"
    allocator.write_text(ALLOCATOR)
    env = dict(os.environ, NITRO_EMU_ROOT=str(root), NITRO_EMU_ALLOCATOR=str(allocator))
    emu = Emulator(root, env)
    yield emu
    emu.run("terminate-enclave", "--all", check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def probe_eif(emulator: Emulator, probe_image: str) -> tuple[Path, Measurements]:
    eif = emulator.root / "probe.eif"
    built = emulator.json("build-enclave", "--docker-uri", probe_image, "--output-file", str(eif))
    return eif, Measurements.from_nitro_cli(built["Measurements"])


@pytest.fixture
def enclave(emulator: Emulator, probe_eif: tuple[Path, Measurements]) -> Iterator[Any]:
    eif, _ = probe_eif
    run = emulator.json(
        "run-enclave", "--eif-path", str(eif), "--memory", "1024", "--cpu-count", "1"
    )
    yield run
    emulator.run("terminate-enclave", "--enclave-id", run["EnclaveID"], check=False)


def test_a_running_enclave_is_described_with_its_eif_measurements(
    emulator: Emulator, probe_eif: tuple[Path, Measurements], enclave: dict
) -> None:
    _, measurements = probe_eif
    (described,) = emulator.json("describe-enclaves")
    assert described["EnclaveID"] == enclave["EnclaveID"]
    assert described["State"] == "RUNNING"
    assert described["EnclaveCID"] == enclave["EnclaveCID"] >= 16
    assert described["Measurements"] == measurements.to_nitro_cli()


def test_the_host_reaches_a_service_inside_over_the_fabric(
    emulator: Emulator, enclave: dict
) -> None:
    hello = json.loads(emulator.ask(enclave["EnclaveCID"], "hello"))
    assert hello["peer_cid"] == 3  # the listener inside sees the parent
    assert hello["cid"] == enclave["EnclaveCID"]
    assert hello["pid"] > 1  # init is PID 1 of the enclave's own PID namespace


def test_an_enclave_has_no_network_but_loopback(emulator: Emulator, enclave: dict) -> None:
    assert json.loads(emulator.ask(enclave["EnclaveCID"], "ifaces")) == ["lo"]


def test_attestation_from_inside_verifies_with_the_emulator_root_and_eif_pcrs(
    emulator: Emulator, probe_eif: tuple[Path, Measurements], enclave: dict
) -> None:
    _, measurements = probe_eif
    nonce = os.urandom(32)
    document = emulator.ask(enclave["EnclaveCID"], f"attest {nonce.hex()}")
    root = load_root_certificate((emulator.root / "ca" / "root.pem").read_bytes())
    verified = verify_attestation_document(
        document, root=root, expected_pcrs=measurements.as_pcrs(), expected_nonce=nonce
    )
    assert verified.document.module_id == enclave["EnclaveID"]
    assert verified.document.user_data == b"probe"
    with pytest.raises(AttestationError, match="pinned root"):
        verify_attestation_document(document)  # the AWS root: an emulator is no Nitro host


def test_when_the_command_exits_the_enclave_ends_and_leaves_nothing(
    emulator: Emulator, probe_eif: tuple[Path, Measurements]
) -> None:
    eif, _ = probe_eif
    run = emulator.json(
        "run-enclave", "--eif-path", str(eif), "--memory", "1024", "--cpu-count", "1"
    )
    assert emulator.ask(run["EnclaveCID"], "exit 3") == b"bye"
    deadline = time.monotonic() + 20
    while emulator.json("describe-enclaves") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert emulator.json("describe-enclaves") == []
    assert emulator.leftovers() == []


def test_terminate_leaves_nothing_behind(
    emulator: Emulator, probe_eif: tuple[Path, Measurements]
) -> None:
    eif, _ = probe_eif
    run = emulator.json(
        "run-enclave", "--eif-path", str(eif), "--memory", "1024", "--cpu-count", "2"
    )
    emulator.ask(run["EnclaveCID"], "hello")
    terminated = emulator.json("terminate-enclave", "--enclave-id", run["EnclaveID"])
    assert terminated == {"EnclaveName": "probe", "EnclaveID": run["EnclaveID"], "Terminated": True}
    assert emulator.leftovers() == []
    assert not _running(run["ProcessID"])


def test_a_crashed_enclave_process_is_cleaned_by_the_next_command(
    emulator: Emulator, probe_eif: tuple[Path, Measurements]
) -> None:
    eif, _ = probe_eif
    run = emulator.json(
        "run-enclave", "--eif-path", str(eif), "--memory", "1024", "--cpu-count", "1"
    )
    os.kill(run["ProcessID"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _running(run["ProcessID"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emulator.json("describe-enclaves") == []  # prunes the dead record, kills the sandbox
    assert emulator.leftovers() == []


def test_debug_mode_exposes_the_console_and_zero_pcrs(
    emulator: Emulator, probe_eif: tuple[Path, Measurements]
) -> None:
    eif, _ = probe_eif
    run = emulator.json(
        "run-enclave",
        "--eif-path",
        str(eif),
        "--memory",
        "1024",
        "--cpu-count",
        "1",
        "--debug-mode",
    )
    try:
        emulator.ask(run["EnclaveCID"], "hello")
        console = emulator.run(
            "console", "--enclave-id", run["EnclaveID"], "--disconnect-timeout", "1"
        )
        assert "probe: listening on vsock port 5000" in console.stdout
        document = emulator.ask(run["EnclaveCID"], f"attest {'00' * 8}")
        root = load_root_certificate((emulator.root / "ca" / "root.pem").read_bytes())
        pcrs = verify_attestation_document(document, root=root).document.pcrs
        assert [pcrs[i] for i in (0, 1, 2)] == [bytes(48)] * 3
    finally:
        emulator.run("terminate-enclave", "--enclave-id", run["EnclaveID"], check=False)


def test_console_of_a_production_enclave_is_refused_with_e44(
    emulator: Emulator, enclave: dict
) -> None:
    result = emulator.run("console", "--enclave-id", enclave["EnclaveID"], check=False)
    assert result.returncode == 44
    assert "[ E44 ]" in result.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--memory", "64", "--cpu-count", "1"), "E26"),  # below 4 x the EIF's size
        (("--memory", "4096", "--cpu-count", "1"), "E27"),  # more than the pool's 2048 MiB
        (("--memory", "1024", "--cpu-count", "8"), "E22"),  # more CPUs than the pool's 2
    ],
)
def test_resource_errors_match_nitro_cli(
    emulator: Emulator, probe_eif: tuple[Path, Measurements], args: tuple[str, ...], code: str
) -> None:
    eif, _ = probe_eif
    result = emulator.run("run-enclave", "--eif-path", str(eif), *args, check=False)
    assert f"[ {code} ]" in result.stderr
    assert result.returncode == 39  # nitro-cli relays enclave-process errors as E39
    assert emulator.json("describe-enclaves") == []
    assert emulator.leftovers() == []


def test_no_heartbeat_in_time_is_e36_and_leaves_nothing(
    emulator: Emulator, probe_eif: tuple[Path, Measurements]
) -> None:
    eif, _ = probe_eif
    env = dict(emulator.env, NITRO_EMU_BOOT_TIMEOUT="0.001")
    result = subprocess.run(
        [NITRO_EMU, "run-enclave", "--eif-path", str(eif), "--memory", "1024", "--cpu-count", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "[ E36 ]" in result.stderr
    assert result.returncode == 39
    assert emulator.leftovers() == []
