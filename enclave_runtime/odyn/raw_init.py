"""``odyn --init``: odyn as PID 1 of an EIF that does not use AWS's bootstrap ``init``.

An EIF's kernel starts ``/init`` of the merged ramdisks with nothing prepared: no /proc, no /dev,
no NSM driver, and the parent waiting for the boot heartbeat. AWS's init does that work before it
starts the image's command; in raw-init mode odyn does it itself, then supervises as usual.

When the supervisor ends, a real enclave's init powers the enclave off (PID 1 must not exit:
the kernel would panic). Under the emulator the same process is PID 1 of a PID namespace only,
so it just exits with the status and the namespace ends with it. Nothing here runs unless the
process is PID 1, so a mistaken ``odyn --init`` on a host never mounts or powers off anything.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.vsock_ports import HEARTBEAT, HEARTBEAT_PORT, PARENT_CID
from enclave_runtime.transport import vsock
from enclave_runtime.transport.nsm import DEFAULT_NSM_PATH

LOG = logging.getLogger("odyn")

HEARTBEAT_TIMEOUT = 20.0
NSM_MODULE = "/nsm.ko"
INIT_PATH = "/sbin:/usr/sbin:/bin:/usr/bin"  # AWS's init uses this PATH for the command

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_MOVE = 0x2000
RB_POWER_OFF = 0x4321FEDC
SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273}
_FLAG_OPTIONS = ((MS_NOSUID, "nosuid"), (MS_NODEV, "nodev"), (MS_NOEXEC, "noexec"))


class RawInitError(EnclaveOpsError):
    """The enclave could not be brought up; odyn publishes nothing and ends the enclave."""


@dataclass(frozen=True)
class PseudoMount:
    target: str
    fstype: str
    flags: int
    options: str = ""


# In mount order: /dev before its submounts. The top-level ones move into --rootfs.
PSEUDO_FILESYSTEMS = (
    PseudoMount("/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    PseudoMount("/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    PseudoMount("/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    PseudoMount("/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666,mode=0620"),
    PseudoMount("/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    PseudoMount("/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    PseudoMount("/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)
TOP_LEVEL_MOUNTS = ("/proc", "/sys", "/dev", "/run", "/tmp")


@dataclass(frozen=True)
class InitOptions:
    rootfs: Path | None = None
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    nsm_module: str = NSM_MODULE
    nsm_path: str = DEFAULT_NSM_PATH


def is_emulated() -> bool:
    """Under nitro-emu the fabric variables are set; on Nitro they never are."""
    return bool(os.environ.get(vsock.ENV_ROOT))


def require_pid_1(action: str) -> None:
    pid = os.getpid()
    if pid != 1:
        raise RawInitError(
            f"refusing to {action}: odyn --init must be the enclave's PID 1 (this is PID {pid}); "
            "use --init only as the /init of a raw-init EIF, and plain odyn everywhere else"
        )


def prepare(options: InitOptions) -> None:
    """Everything between the kernel starting /init and the supervisor starting."""
    require_pid_1("prepare the enclave")
    os.environ.setdefault("PATH", INIT_PATH)
    mount_pseudo_filesystems()
    load_nsm_module(options.nsm_module, options.nsm_path)
    send_heartbeat(options.heartbeat_timeout)
    if options.rootfs is not None:
        enter_rootfs(options.rootfs)


def mounts_to_make(is_mounted: Callable[[str], bool] = os.path.ismount) -> list[PseudoMount]:
    """The pseudo-filesystems not mounted yet (the emulator, or a kernel, may provide some)."""
    return [entry for entry in PSEUDO_FILESYSTEMS if not is_mounted(entry.target)]


def mount_pseudo_filesystems() -> None:
    for entry in mounts_to_make():
        os.makedirs(entry.target, mode=0o755, exist_ok=True)
        try:
            _mount(entry.fstype, entry.target, entry.fstype, entry.flags, entry.options)
        except OSError as err:
            if entry.fstype == "devtmpfs" and err.errno == errno.EBUSY:
                continue  # the kernel mounted it already (CONFIG_DEVTMPFS_MOUNT)
            raise RawInitError(f"cannot mount {entry.fstype} on {entry.target}: {err}") from err
        LOG.debug("mounted %s on %s", entry.fstype, entry.target)


def load_nsm_module(module: str = NSM_MODULE, nsm_path: str = DEFAULT_NSM_PATH) -> bool:
    """Load the NSM driver when the EIF carries it and no NSM exists yet; True if loaded.

    Under the emulator the NSM is already there (a socket) and a module must never reach the
    host's kernel, so nothing is loaded.
    """
    if is_emulated() or os.path.exists(nsm_path) or not os.path.exists(module):
        return False
    finit_module = _finit_module(module)
    try:
        fd = os.open(module, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise RawInitError(f"cannot open the NSM driver {module}: {err.strerror}") from err
    try:
        finit_module(fd)
    except OSError as err:
        if err.errno != errno.EEXIST:
            raise RawInitError(f"cannot load the NSM driver {module}: {err.strerror}") from err
    finally:
        os.close(fd)
    LOG.info("loaded the NSM driver from %s", module)
    return True


def send_heartbeat(timeout: float = HEARTBEAT_TIMEOUT) -> None:
    """Tell the parent the enclave booted: 0xB7 to (3, 9000), echoed back, as AWS's init does."""
    try:
        with vsock.connect(PARENT_CID, HEARTBEAT_PORT, timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(HEARTBEAT)
            answer = conn.recv(1)
    except OSError as err:
        raise RawInitError(
            f"cannot send the boot heartbeat to vsock ({PARENT_CID}, {HEARTBEAT_PORT}): {err}; "
            "the parent (nitro-cli run-enclave or nitro-emu) must be waiting for it"
        ) from err
    if answer != HEARTBEAT:
        raise RawInitError(
            f"the parent answered the boot heartbeat with {answer!r} instead of {HEARTBEAT!r}"
        )
    LOG.debug("boot heartbeat acknowledged")


def enter_rootfs(rootfs: Path) -> None:
    """Move the pseudo-filesystems into ``rootfs`` and chroot there."""
    if not rootfs.is_dir():
        raise RawInitError(f"--rootfs {rootfs} is not a directory in the enclave's ramdisks")
    for target in TOP_LEVEL_MOUNTS:
        inside = rootfs / target.lstrip("/")
        inside.mkdir(mode=0o755, parents=True, exist_ok=True)
        if os.path.ismount(target):
            try:
                _mount(target, str(inside), "", MS_MOVE, "")
            except OSError as err:
                raise RawInitError(f"cannot move {target} into {rootfs}: {err}") from err
    os.chroot(rootfs)
    os.chdir("/")


def finish(status: int) -> int:
    """After the supervisor: power a real enclave off; elsewhere return the exit status."""
    if os.getpid() != 1 or is_emulated() or not _is_char_device(DEFAULT_NSM_PATH):
        return status
    LOG.info("the primary service ended with status %d; powering the enclave off", status)
    power_off()
    return status


def power_off() -> None:
    """sync, then reboot(RB_POWER_OFF): what a Nitro enclave's PID 1 does to end the enclave."""
    require_pid_1("power off")
    if is_emulated():
        raise RawInitError("refusing to power off under nitro-emu: the host would be next")
    os.sync()
    libc = _libc()
    if libc is None:
        raise RawInitError("cannot power off: this Python has no ctypes to call reboot(2)")
    if libc.reboot(RB_POWER_OFF) != 0:
        raise RawInitError(f"reboot(RB_POWER_OFF) failed: errno {_errno()}")


# --------------------------------------------------------------------------------------------
# System calls: ctypes where the Python has it, else the mount(8) program; no ctypes, no modules.


def _libc() -> Any:
    try:
        import ctypes  # noqa: PLC0415 - optional: Debian's python3-minimal lacks it
        import ctypes.util  # noqa: PLC0415
    except ImportError:
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _errno() -> int:
    import ctypes  # noqa: PLC0415 - only reached when _libc() found ctypes

    return ctypes.get_errno()


def _mount(source: str, target: str, fstype: str, flags: int, options: str) -> None:
    libc = _libc()
    if libc is None:
        _mount_with_program(source, target, fstype, flags, options)
        return
    result = libc.mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode() or None,
        flags,
        options.encode() or None,
    )
    if result != 0:
        code = _errno()
        raise OSError(code, os.strerror(code))


def _mount_with_program(source: str, target: str, fstype: str, flags: int, options: str) -> None:
    program = shutil.which("mount", path=INIT_PATH)
    if program is None:
        raise RawInitError(
            "cannot mount: this Python has no ctypes and the ramdisk has no mount program; "
            "add python3's ctypes (libpython3-stdlib) or util-linux/busybox mount to the EIF"
        )
    if flags & MS_MOVE:
        command = [program, "--move", source, target]
    else:
        words = [name for bit, name in _FLAG_OPTIONS if flags & bit]
        words += [options] if options else []
        command = [program, "-t", fstype, "-o", ",".join(words) or "defaults", source, target]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        code = errno.EBUSY if "busy" in result.stderr.lower() else errno.EIO
        raise OSError(code, result.stderr.strip() or f"{command[0]} exited {result.returncode}")


def _finit_module(module: str) -> Callable[[int], None]:
    libc = _libc()
    if libc is None:
        raise RawInitError(
            f"cannot load the NSM driver {module}: this Python has no ctypes to call "
            "finit_module(2); add python3's ctypes (libpython3-stdlib) to the EIF, or load "
            "nsm.ko before odyn starts"
        )
    number = SYS_FINIT_MODULE.get(platform.machine())
    if number is None:
        raise RawInitError(f"cannot load kernel modules on {platform.machine()}")

    def finit_module(fd: int) -> None:
        if libc.syscall(number, fd, b"", 0) != 0:
            code = _errno()
            raise OSError(code, os.strerror(code))

    return finit_module


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False
