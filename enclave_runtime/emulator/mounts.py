"""System calls of the emulator's sandbox (host-only: the emulator's Python has ctypes).

mount(2), pivot_root(2) and umount2(2) build the enclave's root; prctl(2) narrows what the
enclave's processes may do (docs/emulator.md, "Sandbox").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterable
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_REMOUNT = 0x20
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]


def mount(
    source: str, target: str | os.PathLike[str], fstype: str = "", flags: int = 0, data: str = ""
) -> None:
    """Mount or raise OSError naming the target, as mount(8) would report it."""
    result = _libc.mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode() or None,
        flags,
        data.encode() or None,
    )
    _check(result, f"mount {fstype or source} on {os.fspath(target)}")


def bind(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    mount(os.fspath(source), target, flags=MS_BIND)


def bind_read_only(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """A bind mount nobody below it may write to, create in or unlink from."""
    bind(source, target)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    mount("none", target, flags=flags)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def pivot_into(new_root: Path) -> None:
    """Make ``new_root`` (a mount point) this mount namespace's root and detach the old root.

    The old root stays reachable from no path afterwards, unlike chroot(2)'s.
    """
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(0, f"pivot_root: no syscall number known for {platform.machine()}")
    os.chdir(new_root)
    _check(_libc.syscall(number, b".", b"."), f"pivot_root into {new_root}")  # old root on top
    _check(_libc.umount2(b".", MNT_DETACH), "umount2 of the old root")
    os.chdir("/")


def restrict_capabilities(keep: Iterable[int]) -> None:
    """Drop every capability not in ``keep`` from the bounding set and set no_new_privs.

    After execve(2) a root process holds only its bounding set, and no set-uid or file
    capability can add to it.
    """
    kept = set(keep)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last + 1):
        if capability not in kept:
            result = _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)
            _check(result, f"drop capability {capability}")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
