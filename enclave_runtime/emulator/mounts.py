"""mount(2) for the emulator's sandbox (host-only: the emulator's Python has ctypes)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

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
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or source} on {os.fspath(target)}: {os.strerror(err)}")


def bind(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    mount(os.fspath(source), target, flags=MS_BIND)
