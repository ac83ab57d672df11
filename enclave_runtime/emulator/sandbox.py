"""The enclave's PID 1 in the emulator: what AWS's bootstrap ``init`` does, in namespaces.

Started by the enclave process as ``unshare --pid --mount --uts --ipc --net --fork --kill-child
python -m enclave_runtime.emulator.sandbox SPEC.json``, so it is PID 1 of a fresh PID namespace
with private mounts and a network namespace that has only ``lo``. Like AWS's init it then

1. stacks the unpacked ramdisks (overlayfs: the cache stays read-only, writes go to the enclave's
   own upper directory), brings ``lo`` up and sets the hostname;
2. sends the boot heartbeat ``0xB7`` to the parent on vsock (3, 9000) and waits for the echo;
3. reads ``/cmd`` and ``/env`` (one entry per line), prepares ``/rootfs`` (proc, sysfs, a private
   ``/dev`` with the usual nodes, devpts, tmpfs on /run, /tmp and /dev/shm) and chroots into it;
4. starts ``cmd`` with exactly ``env`` (plus the fabric variables), resolving the program with
   ``PATH=/sbin:/usr/sbin:/bin:/usr/bin`` as AWS's init does, in its own session;
5. reaps every process until ``cmd`` ends, and exits with its status (128 + signal if killed),
   which ends the namespace and with it every process of the enclave.

A raw-init EIF (no ``/cmd`` but an executable ``/init`` at the top of the ramdisks, e.g. one
whose ``/init`` runs ``odyn --init``) boots as a kernel would boot it: after step 1 the sandbox
gives it a private ``/dev`` and a ``/run`` holding the fabric, chroots into the merged ramdisks
themselves and execs ``/init`` as PID 1; that init mounts the rest and sends the heartbeat.

Emulator additions, visible to the enclave: ``/dev/nsm`` is the emulated NSM's Unix socket, the
vsock fabric is mounted at ``/run/nitro-emu/vsock``, and ``NITRO_EMU_ROOT``/``NITRO_EMU_CID`` are
added to the environment so the runtime finds them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from enclave_runtime.emulator import mounts
from enclave_runtime.formats.vsock_ports import HEARTBEAT, HEARTBEAT_PORT, PARENT_CID
from enclave_runtime.linux import bring_interface_up
from enclave_runtime.transport.vsock import ENV_CID, ENV_ROOT, EmulatedFabric

AWS_INIT_PATH = "/sbin:/usr/sbin:/bin:/usr/bin"
FABRIC_MOUNT = "/run/nitro-emu"
RAW_INIT = "init"
KERNEL_INIT_ENV = {"HOME": "/", "TERM": "linux"}  # what the kernel gives /init
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_SYMLINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
NOSUID_NODEV_NOEXEC = mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC


@dataclass(frozen=True)
class SandboxSpec:
    """Everything the sandbox needs, written by the launcher as JSON beside the enclave."""

    enclave_id: str
    cid: int
    lowerdirs: list[str]  # unpacked ramdisks, first ramdisk first (overlay order is reversed)
    upperdir: str
    workdir: str
    merged: str
    fabric_root: str  # the emulator root on the host: its vsock/ is the fabric
    nsm_socket: str
    heartbeat_timeout: float = 20.0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> SandboxSpec:
        return cls(**json.loads(path.read_text()))


def read_config_lines(path: Path) -> list[str]:
    """AWS's init format for /cmd and /env: one entry per line, the final newline optional."""
    return path.read_text().splitlines() if path.exists() else []


def stack_ramdisks(spec: SandboxSpec) -> Path:
    for directory in (spec.upperdir, spec.workdir, spec.merged):
        Path(directory).mkdir(parents=True, exist_ok=True)
    lower = ":".join(reversed(spec.lowerdirs))  # later ramdisks overwrite earlier ones
    options = f"lowerdir={lower},upperdir={spec.upperdir},workdir={spec.workdir}"
    mounts.mount("overlay", spec.merged, "overlay", 0, options)
    return Path(spec.merged)


def send_heartbeat(spec: SandboxSpec) -> None:
    fabric = EmulatedFabric(Path(spec.fabric_root), spec.cid)
    with fabric.connect(PARENT_CID, HEARTBEAT_PORT, timeout=spec.heartbeat_timeout) as conn:
        conn.sendall(HEARTBEAT)
        if conn.recv(1) != HEARTBEAT:
            raise RuntimeError("the parent did not echo the boot heartbeat")


def prepare_rootfs(rootfs: Path, spec: SandboxSpec) -> None:
    for name in ("proc", "sys", "dev", "run", "tmp"):
        (rootfs / name).mkdir(mode=0o755, exist_ok=True)
    mounts.mount("proc", rootfs / "proc", "proc", NOSUID_NODEV_NOEXEC)
    mounts.mount("sysfs", rootfs / "sys", "sysfs", NOSUID_NODEV_NOEXEC | mounts.MS_RDONLY)
    mounts.mount("tmpfs", rootfs / "run", "tmpfs", NOSUID_NODEV_NOEXEC, "mode=0755")
    mounts.mount("tmpfs", rootfs / "tmp", "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV)
    prepare_dev(rootfs / "dev", spec)
    mount_fabric(rootfs, spec)


def is_raw_init(root: Path) -> bool:
    """No AWS layout (``/cmd``) but an executable ``/init`` of the image's own."""
    init = root / RAW_INIT
    return not (root / "cmd").exists() and init.is_file() and os.access(init, os.X_OK)


def mount_fabric(root: Path, spec: SandboxSpec) -> None:
    fabric = root / FABRIC_MOUNT.lstrip("/") / "vsock"
    fabric.mkdir(parents=True)
    mounts.bind(Path(spec.fabric_root) / "vsock", fabric)


def boot_raw_init(root: Path, spec: SandboxSpec) -> None:
    """Exec the image's ``/init`` as PID 1, chrooted into the merged ramdisks; never returns.

    Only what the host must provide is prepared: a private ``/dev`` (a devtmpfs would expose the
    host's disks) with the NSM socket, and ``/run`` holding the fabric. The init finds both
    mounted and leaves them; it mounts /proc, /sys and /tmp and sends the heartbeat itself.
    """
    (root / "dev").mkdir(mode=0o755, exist_ok=True)
    (root / "run").mkdir(mode=0o755, exist_ok=True)
    prepare_dev(root / "dev", spec)
    mounts.mount("tmpfs", root / "run", "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=0755")
    mount_fabric(root, spec)
    os.chroot(root)
    os.chdir("/")
    env = enclave_environment([f"{key}={value}" for key, value in KERNEL_INIT_ENV.items()], spec)
    os.execve(f"/{RAW_INIT}", [f"/{RAW_INIT}"], env)


def prepare_dev(dev: Path, spec: SandboxSpec) -> None:
    """A private /dev: the harmless host nodes, the NSM socket, devpts and shm; no host disks."""
    mounts.mount("tmpfs", dev, "tmpfs", mounts.MS_NOSUID | mounts.MS_NOEXEC, "mode=0755")
    for name in DEVICE_NODES:
        (dev / name).touch()
        mounts.bind(f"/dev/{name}", dev / name)
    (dev / "nsm").touch()
    mounts.bind(spec.nsm_socket, dev / "nsm")
    for name in ("pts", "shm"):
        (dev / name).mkdir()
    mounts.mount(
        "devpts",
        dev / "pts",
        "devpts",
        mounts.MS_NOSUID | mounts.MS_NOEXEC,
        "newinstance,ptmxmode=0666",
    )
    mounts.mount("shm", dev / "shm", "tmpfs", NOSUID_NODEV_NOEXEC)
    for name, target in DEV_SYMLINKS.items():
        (dev / name).symlink_to(target)


def enclave_environment(env_lines: list[str], spec: SandboxSpec) -> dict[str, str]:
    env = dict(line.split("=", 1) for line in env_lines if "=" in line)
    env[ENV_ROOT] = FABRIC_MOUNT
    env[ENV_CID] = str(spec.cid)
    return env


def start_command(cmd: list[str], env: dict[str, str]) -> int:
    """Fork the enclave's command in its own session, as AWS's init launches it."""
    program = cmd[0] if "/" in cmd[0] else shutil.which(cmd[0], path=AWS_INIT_PATH)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if program is None:
                raise FileNotFoundError(f"{cmd[0]}: not found in {AWS_INIT_PATH}")
            os.execve(program, cmd, env)
        except OSError as err:
            print(f"init: cannot start {cmd[0]}: {err}", file=sys.stderr, flush=True)
        os._exit(127)
    return pid


def reap_until(main_pid: int) -> int:
    """Reap every child (PID 1's duty); return the exit status of ``main_pid``."""
    while True:
        pid, status = os.wait()
        if pid == main_pid:
            return os.waitstatus_to_exitcode(status)


def exit_code(status: int) -> int:
    return 128 - status if status < 0 else status


def run(spec: SandboxSpec) -> int:
    merged = stack_ramdisks(spec)
    socket.sethostname(spec.enclave_id[-15:])  # a short, unique name, as an enclave's hostname
    if is_raw_init(merged):
        boot_raw_init(merged, spec)  # lo stays down, as the kernel leaves it for /init
    bring_interface_up("lo")
    send_heartbeat(spec)
    cmd = read_config_lines(merged / "cmd") or ["sh"]
    env = enclave_environment(read_config_lines(merged / "env"), spec)
    rootfs = merged / "rootfs"
    prepare_rootfs(rootfs, spec)
    os.chroot(rootfs)
    os.chdir("/")
    return exit_code(reap_until(start_command(cmd, env)))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m enclave_runtime.emulator.sandbox SPEC.json", file=sys.stderr)
        return 2
    try:
        return run(SandboxSpec.load(Path(args[0])))
    except (OSError, RuntimeError, ValueError) as err:
        print(f"init: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
