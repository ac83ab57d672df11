"""The enclave process: the daemon that owns one emulated enclave, as nitro-cli's does on Nitro.

Started by the launcher, it detaches (double fork, new session) and prints its PID. It then
serves the enclave's NSM on ``<run dir>/nsm.sock`` and runs the sandbox under
``unshare --pid --mount --uts --ipc --net --fork --kill-child``; the sandbox dies with it
(PR_SET_PDEATHSIG), so no enclave runs without its owner. When the enclave's command exits, the
enclave ends: the record is removed and the run directory cleaned, so describe-enclaves no longer
lists it. SIGTERM (terminate-enclave) stops the sandbox the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from pathlib import Path

from enclave_runtime.emulator import launcher
from enclave_runtime.emulator.ca import EmulatorCA
from enclave_runtime.emulator.nsm_device import NsmDevice, NsmServer, boot_pcrs
from enclave_runtime.emulator.sandbox import SandboxSpec
from enclave_runtime.emulator.state import EmulatorState
from enclave_runtime.formats.pcr import Measurements

PR_SET_PDEATHSIG = 1
UNSHARE = ("unshare", "--pid", "--mount", "--uts", "--ipc", "--net", "--fork", "--kill-child")


def _die_with_parent() -> None:
    """Runs in the sandbox's unshare between fork and exec: follow the enclave process in death."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def detach() -> None:
    """Double fork into a new session; the first parent prints the daemon's PID and exits."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            print(pipe.read().strip(), flush=True)
        os._exit(0)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.write(write_end, str(os.getpid()).encode())
    os.close(write_end)


def redirect_output(log_path: Path) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(devnull)


def start_nsm(root: Path, run_dir: Path, enclave_id: str, debug_mode: bool) -> NsmServer:
    state = EmulatorState(root)
    record = state.get(enclave_id)
    if record is None:
        raise RuntimeError(f"no state record for {enclave_id}")
    measurements = Measurements.from_nitro_cli(record.measurements)
    device = NsmDevice(
        module_id=enclave_id,
        registers=boot_pcrs(measurements, state.instance_id(), debug_mode),
        ca=EmulatorCA(root / "ca"),
    )
    return NsmServer(device, run_dir / "nsm.sock")


def start_sandbox(spec_path: Path, console: Path | None) -> subprocess.Popen[bytes]:
    output = open(console, "ab") if console else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            [*UNSHARE, sys.executable, "-m", "enclave_runtime.emulator.sandbox", str(spec_path)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads exist yet at this point
        )
    finally:
        if console:
            output.close()  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enclave_process")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--enclave-id", required=True)
    parser.add_argument("--debug-mode", action="store_true")
    args = parser.parse_args(argv)

    detach()
    run_dir: Path = args.run_dir
    redirect_output(run_dir / launcher.PROCESS_LOG)
    spec_path = run_dir / launcher.SPEC_FILE
    spec = SandboxSpec.load(spec_path)
    nsm = start_nsm(args.root, run_dir, args.enclave_id, args.debug_mode)
    sandbox = start_sandbox(spec_path, run_dir / launcher.CONSOLE_FILE if args.debug_mode else None)
    (run_dir / launcher.SANDBOX_PID_FILE).write_text(str(sandbox.pid))
    terminated = []

    def stop(_signum: int, _frame: object) -> None:
        terminated.append(True)
        sandbox.kill()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    nsm.start()
    status = sandbox.wait()
    nsm.close()
    (run_dir / launcher.SANDBOX_PID_FILE).unlink(missing_ok=True)
    print(f"enclave {spec.enclave_id}: sandbox ended with status {status}", flush=True)
    if not terminated:  # the enclave's command ended: the enclave is gone, as on Nitro
        EmulatorState(args.root).remove(args.enclave_id)
    launcher.cleanup_paths(args.root, run_dir, spec.cid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
