"""vsock: one API over real AF_VSOCK (on Nitro) and the nitro-emu fabric (everywhere else).

The backend is chosen per call from the environment (docs/vsock.md):

- ``NITRO_EMU_ROOT`` set: the emulated fabric. A listener on (cid, port) is the Unix socket
  ``$NITRO_EMU_ROOT/vsock/<cid>/<port>``; a connector first sends a 12-byte preamble with its own
  (cid, port), so the listener learns its peer as AF_VSOCK tells it. The process's CID comes from
  ``NITRO_EMU_CID``; without it the process is the parent (CID 3). CID 2, the host, is an alias of
  the parent because enclaver dials 2.
- otherwise real AF_VSOCK, but only on a Nitro parent (``/dev/nitro_enclaves`` exists) or inside a
  Nitro enclave (``/dev/nsm`` is a character device). Anywhere else vsock leads outside this
  machine, so the transport refuses with :class:`VsockUnavailableError`.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import random
import socket
import stat
import struct
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.vsock_ports import (
    HOST_CID,
    PARENT_CID,
    PRIVILEGED_PORT_LIMIT,
    PRIVILEGED_SOURCE_PORTS,
)

VMADDR_CID_ANY = 0xFFFFFFFF
ENV_ROOT = "NITRO_EMU_ROOT"
ENV_CID = "NITRO_EMU_CID"

PREAMBLE = struct.Struct("<4sII")
PREAMBLE_MAGIC = b"VSK1"
PREAMBLE_TIMEOUT = 5.0
EPHEMERAL_PORTS = (49152, 0xFFFFFFFE)
UNIX_PATH_MAX = 107


class VsockError(EnclaveOpsError):
    """A vsock address or environment that cannot be used."""


class VsockUnavailableError(VsockError):
    """Neither a Nitro host nor the emulator: vsock would lead outside this machine."""


@dataclass(frozen=True)
class VsockAddress:
    cid: int
    port: int

    def __str__(self) -> str:
        return f"vsock({self.cid}:{self.port})"


ConnectionHandler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, VsockAddress], Awaitable[None]
]


class Backend(Protocol):
    def local_cid(self) -> int: ...

    def listen(self, port: int, cid: int = VMADDR_CID_ANY, backlog: int = 128) -> socket.socket: ...

    def accept(self, listener: socket.socket) -> tuple[socket.socket, VsockAddress]: ...

    def connect(
        self, cid: int, port: int, timeout: float | None = None, local_port: int | None = None
    ) -> socket.socket: ...

    async def start_server(
        self, handler: ConnectionHandler, port: int, cid: int = VMADDR_CID_ANY, backlog: int = 128
    ) -> asyncio.AbstractServer: ...

    async def open_connection(
        self, cid: int, port: int, local_port: int | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


def _check_port(port: int) -> None:
    if not 0 <= port < 0xFFFFFFFF:
        raise VsockError(f"vsock port {port} is out of range (0..4294967294)")


class EmulatedFabric:
    """The nitro-emu fabric: Unix sockets under ``root/vsock/<cid>/<port>``."""

    def __init__(self, root: Path, cid: int = PARENT_CID) -> None:
        self.root = Path(root)
        self.cid = cid

    def local_cid(self) -> int:
        return self.cid

    def socket_path(self, cid: int, port: int) -> Path:
        _check_port(port)
        path = self.root / "vsock" / str(PARENT_CID if cid == HOST_CID else cid) / str(port)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise VsockError(
                f"emulated vsock path {path} is longer than a Unix socket allows "
                f"({UNIX_PATH_MAX} bytes); use a shorter {ENV_ROOT}"
            )
        return path

    def _own_path(self, port: int, cid: int) -> Path:
        own = {self.cid, VMADDR_CID_ANY} | ({HOST_CID} if self.cid == PARENT_CID else set())
        if cid not in own:
            raise VsockError(
                f"cannot listen on {VsockAddress(cid, port)}: this process is CID {self.cid}"
            )
        return self.socket_path(self.cid, port)

    def listen(self, port: int, cid: int = VMADDR_CID_ANY, backlog: int = 128) -> socket.socket:
        path = self._own_path(port, cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.fsencode(path))
            listener.listen(backlog)
        except OSError:
            listener.close()
            raise
        return listener

    def accept(self, listener: socket.socket) -> tuple[socket.socket, VsockAddress]:
        """Accept the next connector that sends a valid preamble; others are dropped."""
        while True:
            conn, _ = listener.accept()
            try:
                conn.settimeout(PREAMBLE_TIMEOUT)
                peer = _parse_preamble(_recv_exactly(conn, PREAMBLE.size))
                conn.settimeout(listener.gettimeout())
                return conn, peer
            except (OSError, VsockError):
                conn.close()

    def connect(
        self, cid: int, port: int, timeout: float | None = None, local_port: int | None = None
    ) -> socket.socket:
        path = self.socket_path(cid, port)
        if local_port is not None and local_port < PRIVILEGED_PORT_LIMIT:
            _require_bind_service_capability(local_port)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(timeout)
            _connect_unix(conn, path, VsockAddress(cid, port))
            conn.sendall(self._preamble(local_port))
        except OSError:
            conn.close()
            raise
        return conn

    async def start_server(
        self, handler: ConnectionHandler, port: int, cid: int = VMADDR_CID_ANY, backlog: int = 128
    ) -> asyncio.AbstractServer:
        listener = self.listen(port, cid, backlog)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                raw = await asyncio.wait_for(reader.readexactly(PREAMBLE.size), PREAMBLE_TIMEOUT)
                peer = _parse_preamble(raw)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, VsockError):
                writer.close()
                return
            await handler(reader, writer, peer)

        return await asyncio.start_unix_server(on_connect, sock=listener)

    async def open_connection(
        self, cid: int, port: int, local_port: int | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = self.socket_path(cid, port)
        if local_port is not None and local_port < PRIVILEGED_PORT_LIMIT:
            _require_bind_service_capability(local_port)
        try:
            reader, writer = await asyncio.open_unix_connection(os.fsencode(path))
        except FileNotFoundError as err:
            raise _refused(VsockAddress(cid, port)) from err
        writer.write(self._preamble(local_port))
        return reader, writer

    def _preamble(self, local_port: int | None = None) -> bytes:
        port = random.randint(*EPHEMERAL_PORTS) if local_port is None else local_port
        return PREAMBLE.pack(PREAMBLE_MAGIC, self.cid, port)


class RealVsock:
    """AF_VSOCK, used only on a Nitro parent or inside a Nitro enclave."""

    def local_cid(self) -> int:
        get_local_cid = 0x7B9
        with open("/dev/vsock", "rb") as dev:
            buf = fcntl.ioctl(dev, get_local_cid, b"\0" * 4)
        return int(struct.unpack("I", buf)[0])

    def listen(self, port: int, cid: int = VMADDR_CID_ANY, backlog: int = 128) -> socket.socket:
        _check_port(port)
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            listener.bind((cid, port))
            listener.listen(backlog)
        except OSError:
            listener.close()
            raise
        return listener

    def accept(self, listener: socket.socket) -> tuple[socket.socket, VsockAddress]:
        conn, (cid, port) = listener.accept()
        return conn, VsockAddress(cid, port)

    def connect(
        self, cid: int, port: int, timeout: float | None = None, local_port: int | None = None
    ) -> socket.socket:
        _check_port(port)
        conn = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            conn.settimeout(timeout)
            if local_port is not None:
                conn.bind((VMADDR_CID_ANY, local_port))
            conn.connect((cid, port))
        except OSError:
            conn.close()
            raise
        return conn

    async def start_server(
        self, handler: ConnectionHandler, port: int, cid: int = VMADDR_CID_ANY, backlog: int = 128
    ) -> asyncio.AbstractServer:
        listener = self.listen(port, cid, backlog)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer_cid, peer_port = writer.get_extra_info("peername")
            await handler(reader, writer, VsockAddress(peer_cid, peer_port))

        return await asyncio.start_server(on_connect, sock=listener)

    async def open_connection(
        self, cid: int, port: int, local_port: int | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        _check_port(port)
        conn = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        conn.setblocking(False)
        try:
            if local_port is not None:
                conn.bind((VMADDR_CID_ANY, local_port))
            await asyncio.get_running_loop().sock_connect(conn, (cid, port))
        except OSError:
            conn.close()
            raise
        return await asyncio.open_connection(sock=conn)


def backend() -> Backend:
    """The backend this process must use, from its environment (see the module docstring)."""
    root = os.environ.get(ENV_ROOT)
    if root:
        return EmulatedFabric(Path(root), _cid_from_environment())
    if os.path.exists("/dev/nitro_enclaves") or _is_char_device("/dev/nsm"):
        return RealVsock()
    raise VsockUnavailableError(
        "vsock is not available: this is neither a Nitro parent instance (/dev/nitro_enclaves) "
        f"nor a Nitro enclave (/dev/nsm); set {ENV_ROOT} to use the nitro-emu fabric"
    )


def listen(port: int, cid: int = VMADDR_CID_ANY, backlog: int = 128) -> socket.socket:
    return backend().listen(port, cid, backlog)


def accept(listener: socket.socket) -> tuple[socket.socket, VsockAddress]:
    return backend().accept(listener)


def connect_privileged(
    fabric: Backend, cid: int, port: int, timeout: float | None = None
) -> socket.socket:
    """Connect from a source port below 1024, which only a process with CAP_NET_BIND_SERVICE
    can bind: the init control server's proof that the peer is root on the parent (docs/init.md).

    Raises PermissionError when this process may not bind one.
    """
    for local_port in PRIVILEGED_SOURCE_PORTS:
        try:
            return fabric.connect(cid, port, timeout, local_port=local_port)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "every privileged vsock source port (512-1023) is in use")


def _require_bind_service_capability(local_port: int) -> None:
    """The emulated fabric's stand-in for the kernel's check on binding a port below 1024."""
    if not _has_effective_capability(_CAP_NET_BIND_SERVICE):
        raise PermissionError(
            errno.EACCES, f"binding vsock source port {local_port} needs CAP_NET_BIND_SERVICE"
        )


_CAP_NET_BIND_SERVICE = 10


def _has_effective_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def connect(cid: int, port: int, timeout: float | None = None) -> socket.socket:
    return backend().connect(cid, port, timeout)


def local_cid() -> int:
    return backend().local_cid()


async def start_server(
    handler: ConnectionHandler, port: int, cid: int = VMADDR_CID_ANY, backlog: int = 128
) -> asyncio.AbstractServer:
    """Serve ``handler(reader, writer, peer)`` for each connection to (cid, port)."""
    return await backend().start_server(handler, port, cid, backlog)


async def open_connection(cid: int, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await backend().open_connection(cid, port)


def _cid_from_environment() -> int:
    raw = os.environ.get(ENV_CID)
    if raw is None:
        return PARENT_CID
    try:
        cid = int(raw)
    except ValueError:
        cid = -1
    if not 2 <= cid < VMADDR_CID_ANY:
        raise VsockError(f"{ENV_CID}={raw!r} is not a CID (an integer from 2 to 4294967294)")
    return cid


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _refused(address: VsockAddress) -> ConnectionRefusedError:
    return ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens on {address}")


def _connect_unix(conn: socket.socket, path: Path, address: VsockAddress) -> None:
    try:
        conn.connect(os.fsencode(path))
    except FileNotFoundError as err:
        raise _refused(address) from err


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead listener; refuse if a live one answers."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fsencode(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    except OSError:
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"address in use: {path} has a live listener")


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise VsockError("connection closed before the vsock preamble")
        data += chunk
    return bytes(data)


def _parse_preamble(raw: bytes) -> VsockAddress:
    magic, cid, port = PREAMBLE.unpack(raw)
    if magic != PREAMBLE_MAGIC:
        raise VsockError("not a nitro-emu vsock connection (bad preamble)")
    return VsockAddress(cid, port)


__all__ = [
    "ENV_CID",
    "ENV_ROOT",
    "VMADDR_CID_ANY",
    "Backend",
    "EmulatedFabric",
    "RealVsock",
    "VsockAddress",
    "VsockError",
    "VsockUnavailableError",
    "accept",
    "backend",
    "connect",
    "listen",
    "local_cid",
    "open_connection",
    "start_server",
]
