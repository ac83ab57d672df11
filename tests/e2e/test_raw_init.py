"""A raw-init EIF on nitro-emu: odyn --init is the EIF's /init, PID 1 of the enclave.

The EIF is built without the AWS layout (no cmd, env or rootfs/): ramdisk 1 holds /dev and the
/init script, ramdisk 2 the base image's file system with the runtime at its top. Needs root
(namespaces, mounts) and Docker (the base image); CI has both.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.build.eif_builder import find_blobs
from enclave_runtime.build.runtime_bundle import bundle_runtime
from enclave_runtime.formats import cpio
from enclave_runtime.formats.eif import build_eif
from enclave_runtime.formats.vsock_ports import STATUS_PORT
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.unit.odyn_support import MINIMAL_MANIFEST

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

NITRO_EMU = str(Path(sys.executable).parent / "nitro-emu")
APP_EXIT = 3
INIT_SCRIPT = f"""#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONPATH=/opt/enclave-runtime/lib
exec python3 -m enclave_runtime.odyn.cli --init --config-dir /etc/enclaver -- \\
    sh -c 'sleep 4; exit {APP_EXIT}'
"""


@dataclass
class Emulator:
    root: Path
    env: dict[str, str]

    def json(self, *args: str) -> Any:
        result = subprocess.run(
            [NITRO_EMU, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"nitro-emu {' '.join(args)} failed:\n{result.stderr}"
        return json.loads(result.stdout)

    def leftovers(self) -> list[str]:
        found = [str(p) for p in (self.root / "enclaves").glob("*.json")]
        found += [str(p) for p in (self.root / "run").glob("*")]
        found += [str(p) for p in (self.root / "vsock").glob("*") if p.name != "3"]
        mounts = Path("/proc/mounts").read_text()
        return found + [line for line in mounts.splitlines() if str(self.root) in line]


def _export_image(image: str, target: Path) -> None:
    """The image's file system as a directory, as `docker export` flattens it."""
    container = subprocess.run(
        ["docker", "create", image, "true"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        target.mkdir()
        export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(target)], stdin=export.stdout, check=True)
        assert export.wait() == 0
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)


def _bootstrap_ramdisk(work: Path) -> Path:
    """dev/ and the /init script; no nsm.ko, so no module can reach the host's kernel."""
    tree = work / "ramdisk1"
    (tree / "dev").mkdir(parents=True)
    init = tree / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    return _archive(tree, work / "ramdisk1.cpio")


def _root_ramdisk(work: Path, base_image: str) -> Path:
    tree = work / "ramdisk2"
    _export_image(base_image, tree)
    bundle_runtime(tree / "opt" / "enclave-runtime" / "lib")
    (tree / "etc" / "enclaver").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "enclaver" / "enclaver.yaml").write_text(MINIMAL_MANIFEST)
    return _archive(tree, work / "ramdisk2.cpio")


def _archive(tree: Path, output: Path) -> Path:
    with output.open("wb") as out:
        cpio.archive_directory(tree, out, prefix="")
    return output


@pytest.fixture(scope="module")
def raw_init_eif(base_image: str) -> Iterator[tuple[Path, Emulator]]:
    work = Path(tempfile.mkdtemp(prefix="rinit", dir="/tmp"))  # short: Unix socket paths
    blobs = find_blobs()
    eif = work / "raw-init.eif"
    build_eif(
        blobs.kernel,
        blobs.read_cmdline(),
        [_bootstrap_ramdisk(work), _root_ramdisk(work, base_image)],
        eif,
    )
    root = work / "emu"
    allocator = work / "allocator.yaml"
    allocator.write_text("---\nmemory_mib: 2048\ncpu_count: 2\n")
    env = dict(os.environ, NITRO_EMU_ROOT=str(root), NITRO_EMU_ALLOCATOR=str(allocator))
    emulator = Emulator(root, env)
    yield eif, emulator
    subprocess.run(
        [NITRO_EMU, "terminate-enclave", "--all"], env=env, capture_output=True, check=False
    )
    shutil.rmtree(work, ignore_errors=True)


def _status_connection(root: Path, cid: int, timeout: float = 15.0) -> socket.socket:
    fabric = EmulatedFabric(root)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fabric.connect(cid, STATUS_PORT, timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _read_statuses(conn: socket.socket) -> Iterator[dict[str, Any]]:
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            yield json.loads(line)


def test_odyn_as_pid_1_boots_supervises_and_ends_the_enclave(
    raw_init_eif: tuple[Path, Emulator],
) -> None:
    eif, emulator = raw_init_eif
    started = emulator.json(
        "run-enclave", "--eif-path", str(eif), "--memory", "1024", "--cpu-count", "1"
    )
    # run-enclave returned: the heartbeat came, and only odyn sends it on this layout.
    (described,) = emulator.json("describe-enclaves")
    assert described["State"] == "RUNNING"
    assert described["EnclaveID"] == started["EnclaveID"]

    conn = _status_connection(emulator.root, started["EnclaveCID"])
    conn.settimeout(30)
    statuses = _read_statuses(conn)
    assert next(statuses) == {"status": "running"}
    assert next(statuses) == {"status": "exited", "code": APP_EXIT}

    deadline = time.monotonic() + 20
    while emulator.json("describe-enclaves") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert emulator.json("describe-enclaves") == []
    deadline = time.monotonic() + 5
    while emulator.leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert emulator.leftovers() == []
