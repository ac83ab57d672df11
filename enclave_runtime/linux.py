"""Linux system calls that the enclave side and the emulator's sandbox both need.

Only the standard library: inside an enclave the runtime may have no ``ctypes``, so interface
flags are set with ``fcntl.ioctl`` on a socket, as ``ip link set lo up`` does.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFREQ = struct.Struct("16sH14x")


def interface_flags(name: str = "lo") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = IFREQ.pack(name.encode(), 0)
        return int(IFREQ.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1])


def bring_interface_up(name: str = "lo") -> None:
    """Set IFF_UP on ``name``; an enclave starts with its loopback down."""
    flags = interface_flags(name)
    if flags & IFF_UP:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCSIFFLAGS, IFREQ.pack(name.encode(), flags | IFF_UP | IFF_RUNNING))
