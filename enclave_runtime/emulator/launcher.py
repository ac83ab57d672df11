"""Start, stop and clean up emulated enclaves: what the Nitro hypervisor does for nitro-cli.

``launch`` unpacks the EIF's ramdisks (cached by digest), starts a daemon "enclave process" that
owns the enclave (it serves the emulated NSM and runs the sandbox), and returns once the enclave's
init has sent the boot heartbeat to (3, 9000), as nitro-cli's run-enclave does. The enclave
process is detached from the caller (double fork), so an enclave outlives the CLI that started it
and is never left a zombie of a long-lived caller.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from enclave_runtime.emulator.sandbox import SandboxSpec
from enclave_runtime.emulator.state import EnclaveRecord
from enclave_runtime.formats import cpio
from enclave_runtime.formats import nitro_cli_errors as errors
from enclave_runtime.formats.eif import EifImage
from enclave_runtime.formats.vsock_ports import HEARTBEAT, HEARTBEAT_PORT, PARENT_CID
from enclave_runtime.transport.vsock import EmulatedFabric

TERMINATE_GRACE = 10.0
SPEC_FILE = "sandbox.json"
SANDBOX_PID_FILE = "sandbox.pid"
CONSOLE_FILE = "console.log"
PROCESS_LOG = "enclave-process.log"


@dataclass(frozen=True)
class LaunchRequest:
    root: Path
    record: EnclaveRecord
    image: EifImage  # already read and CRC-checked by run-enclave
    debug_mode: bool
    heartbeat_timeout: float


def console_log_path(root: Path, record: EnclaveRecord) -> Path:
    return Path(record.run_dir) / CONSOLE_FILE


def launch(request: LaunchRequest) -> int:
    """Boot the enclave; return the PID of its enclave process once the heartbeat arrived."""
    record = request.record
    run_dir = Path(record.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    image = request.image
    spec = SandboxSpec(
        enclave_id=record.enclave_id,
        cid=record.enclave_cid,
        lowerdirs=[
            str(unpack_ramdisk(request.root, image, index))
            for index in range(len(image.ramdisk_sections()))
        ],
        upperdir=str(run_dir / "upper"),
        workdir=str(run_dir / "work"),
        merged=str(run_dir / "merged"),
        fabric_root=str(request.root),
        nsm_socket=str(run_dir / "nsm.sock"),
        heartbeat_timeout=request.heartbeat_timeout,
    )
    spec.save(run_dir / SPEC_FILE)
    if request.debug_mode:
        console_log_path(request.root, record).touch()
    pid = None
    try:
        with heartbeat_listener(request.root) as listener:
            pid = start_enclave_process(request.root, record, request.debug_mode)
            await_heartbeat(request.root, listener, pid, request.heartbeat_timeout)
    except BaseException:
        if pid is not None:
            stop_process(pid)
        cleanup(record)
        raise
    return pid


def unpack_ramdisk(root: Path, image: EifImage, index: int) -> Path:
    """Ramdisk ``index`` unpacked under ``root/cache/ramdisks/``, once per content.

    The key is the image's PCR0 and the ramdisk's position: PCR0 measures every ramdisk in order,
    so it names their content without hashing the bytes again. The cache is the host's, so it
    holds nothing an EIF could use there (docs/emulator.md, "Sandbox"): its directories are 0700,
    owners are the archive's shifted into the enclaves' unprivileged id range, set-uid/set-gid
    bits are dropped and device nodes left out (the sandbox gives each enclave its own /dev).
    """
    section = image.ramdisk_sections()[index]
    key = f"{image.measurements.pcr0.hex()}-{index}"
    cache = private_directory(private_directory(root / "cache") / "ramdisks")
    target = cache / key
    if target.is_dir():
        return target
    staging = cache / f".{key}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    try:
        with image.open_section(section) as data:
            # The archive's owners, unshifted: without a user namespace the enclave's app user
            # must own its files as the image says. Set-id bits and device nodes are dropped,
            # and the 0700 cache keeps host users out (docs/security.md, "Emulator sandbox").
            cpio.extract(data, staging, owner_offset=0, skip_devices=True)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # another launch may have filled the cache meanwhile
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def private_directory(path: Path) -> Path:
    """``path`` as a directory only its owner (the emulator) may enter, whatever it was before."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


@contextmanager
def heartbeat_listener(root: Path) -> Iterator[socket.socket]:
    """Hold (3, 9000) for one boot at a time, as the port is the parent's alone."""
    fabric = EmulatedFabric(root, PARENT_CID)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "heartbeat.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        listener = fabric.listen(HEARTBEAT_PORT)
        try:
            yield listener
        finally:
            listener.close()
            fabric.socket_path(PARENT_CID, HEARTBEAT_PORT).unlink(missing_ok=True)


def start_enclave_process(root: Path, record: EnclaveRecord, debug_mode: bool) -> int:
    """Start the detached enclave process; return its PID (it is not our child)."""
    command = [
        sys.executable,
        "-m",
        "enclave_runtime.emulator.enclave_process",
        "--root",
        str(root),
        "--run-dir",
        str(record.run_dir),
        "--enclave-id",
        record.enclave_id,
    ]
    if debug_mode:
        command.append("--debug-mode")
    starter = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=60
    )
    if starter.returncode != 0 or not starter.stdout.strip().isdigit():
        raise errors.enclave_boot_failure(
            f"the enclave process did not start: {starter.stderr.strip() or starter.stdout}"
        )
    return int(starter.stdout.strip())


def await_heartbeat(root: Path, listener: socket.socket, pid: int, timeout: float) -> None:
    """Accept the enclave's 0xB7 and echo it; E36 if it does not come in time."""
    fabric = EmulatedFabric(root, PARENT_CID)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.enclave_boot_failure(f"no boot heartbeat within {timeout:g} s")
        if not _process_alive(pid):
            raise errors.enclave_boot_failure("the enclave stopped before it sent its heartbeat")
        readable, _, _ = select.select([listener], [], [], min(remaining, 0.2))
        if not readable:
            continue
        conn, _peer = fabric.accept(listener)
        with conn:
            conn.settimeout(max(remaining, 1.0))
            if conn.recv(1) == HEARTBEAT:
                conn.sendall(HEARTBEAT)
                return


def terminate(root: Path, record: EnclaveRecord) -> None:
    """Stop the enclave: the enclave process ends the sandbox; force it after a grace period."""
    stop_process(record.process_id)
    cleanup(record)


def stop_process(pid: int) -> None:
    """SIGTERM, then SIGKILL after the grace period."""
    if not _process_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_GRACE
    while _process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _process_alive(pid):
        os.kill(pid, signal.SIGKILL)


def cleanup(record: EnclaveRecord) -> None:
    """Remove what an enclave leaves behind (the prune hook of the CLI, and after terminate)."""
    run_dir = Path(record.run_dir)
    emulator_root = run_dir.parent.parent  # state.py lays run directories out as <root>/run/<slot>
    cleanup_paths(emulator_root, run_dir, record.enclave_cid)


def cleanup_paths(root: Path, run_dir: Path, cid: int) -> None:
    """Kill the sandbox if it still runs, then remove its fabric listeners and run directory.

    The sandbox's mounts live in its own mount namespace and vanish with it, so killing it is
    enough; files are removed only after that.
    """
    kill_sandbox(run_dir)
    shutil.rmtree(root / "vsock" / str(cid), ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)


def kill_sandbox(run_dir: Path) -> None:
    try:
        pid = int((run_dir / SANDBOX_PID_FILE).read_text())
    except (OSError, ValueError):
        return
    if not _runs_sandbox_of(pid, run_dir):
        return  # gone, and the PID may already belong to someone else
    try:
        os.kill(pid, signal.SIGKILL)  # unshare --kill-child takes the whole PID namespace down
    except ProcessLookupError:
        return
    deadline = time.monotonic() + TERMINATE_GRACE
    while _process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _runs_sandbox_of(pid: int, run_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return os.fsencode(run_dir / SPEC_FILE) in cmdline.split(b"\0")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"
