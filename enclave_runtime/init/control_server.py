"""The init control server: the control protocol on a Unix socket and on vsock (docs/init.md).

One request per connection: the server reads until a newline, a half-close, or (for
enclave-init's initctl, which sends one JSON value and then waits) a complete JSON value, answers
with one JSON line and closes. Whatever a peer sends, the server answers with an ``Error``
response or closes the connection; it never stops serving:

- on vsock, a peer whose CID is not in the allow list, or (by default) whose source port is not
  privileged, is closed without an answer;
- a request over :data:`MAX_REQUEST_SIZE`, not sent within the request timeout, malformed or of
  an unknown variant gets an ``Error`` with ``kind`` ``InvalidRequest`` or ``Unsupported``;
- a controller failure is an ``Error`` with the controller's message (``Internal`` for a bug,
  which is logged with its traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Callable

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.init_errors import (
    InitError,
    InternalError,
    InvalidRequestError,
    ServerBusyError,
    UnsupportedError,
)
from enclave_runtime.formats.init_protocol import (
    MAX_REQUEST_SIZE,
    ErrorResponse,
    InitProtocolError,
    PongResponse,
    ReloadChanges,
    Request,
    RequestKind,
    Response,
    ServiceListResponse,
    ServiceLogsResponse,
    ServiceStatusResponse,
    SuccessResponse,
    SystemStatusResponse,
    UnsupportedRequestError,
    decode_request,
    encode_response,
)
from enclave_runtime.formats.manifest import (
    DEFAULT_ALLOWED_CIDS,
    DEFAULT_CONTROL_SOCKET,
    Control,
)
from enclave_runtime.formats.vsock_ports import INIT_CONTROL_PORT, PRIVILEGED_PORT_LIMIT
from enclave_runtime.init.controller import ServiceController
from enclave_runtime.transport import vsock

LOG = logging.getLogger("odyn")

# Concurrent connections over both transports; beyond this a client is told the server is busy.
DEFAULT_MAX_CLIENTS = 32
# A client has this long to send its request; a silent peer cannot hold a connection slot.
DEFAULT_REQUEST_TIMEOUT = 10.0
# After answering, a peer that is still sending gets this long to stop before the close, so the
# close does not reset the connection before the peer has read the answer.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1024 * 1024
_READ_CHUNK = 4096
# How many times a request without newline or half-close is tried as complete JSON; enclave-init's
# initctl sends its request in one write, so the first try succeeds.
_MAX_EARLY_PARSES = 8
_CLOSE_GRACE = 2.0


class ControlServerError(EnclaveOpsError):
    """The control socket cannot be set up."""


class ControlServer:
    """Serves a :class:`ServiceController` on a Unix socket and/or a vsock port."""

    def __init__(
        self,
        controller: ServiceController,
        unix_socket: str | os.PathLike[str] | None = DEFAULT_CONTROL_SOCKET,
        vsock_port: int | None = INIT_CONTROL_PORT,
        allowed_cids: Iterable[int] = DEFAULT_ALLOWED_CIDS,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        require_privileged_port: bool = True,
    ) -> None:
        self.controller = controller
        self.require_privileged_port = require_privileged_port
        self.unix_socket = None if unix_socket is None else Path(unix_socket)
        self.vsock_port = vsock_port
        self.allowed_cids = frozenset(allowed_cids)
        self.max_clients = max_clients
        self.request_timeout = request_timeout
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    @classmethod
    def from_manifest(cls, controller: ServiceController, control: Control) -> ControlServer:
        """The server the manifest's ``control:`` section describes."""
        return cls(
            controller,
            control.unix_socket,
            control.vsock_port,
            control.allowed_cids,
            require_privileged_port=control.require_privileged_port,
        )

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        """Listen on the Unix socket (mode 0600) and the vsock port; raise ControlServerError."""
        try:
            if self.unix_socket is not None:
                listener = _bind_private_unix_socket(self.unix_socket)
                self._servers.append(
                    await asyncio.start_unix_server(self._on_unix_connect, sock=listener)
                )
                LOG.info("init control: listening on %s", self.unix_socket)
            if self.vsock_port is not None:
                self._servers.append(
                    await vsock.start_server(self._on_vsock_connect, self.vsock_port)
                )
                LOG.info(
                    "init control: listening on vsock port %d for CIDs %s",
                    self.vsock_port,
                    sorted(self.allowed_cids),
                )
        except OSError as err:
            await self.close()
            raise ControlServerError(
                f"cannot serve the init control protocol: {err}; check control.unix_socket and "
                "control.vsock_port in the manifest"
            ) from err

    async def close(self) -> None:
        """Stop listening; connections in progress get a short grace period to be answered."""
        self._closing = True
        for server in self._servers:
            server.close()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=_CLOSE_GRACE)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.unix_socket is not None:
            _remove_own_socket(self.unix_socket)

    async def handle(self, request: Request) -> Response:
        """Carry out one request; every failure becomes an ``Error`` response."""
        try:
            return await self._dispatch(request)
        except InitError as err:
            return _error_response(err)
        except Exception:
            LOG.exception("init control: %s failed", request.kind.value)
            return _error_response(
                InternalError(
                    f"{request.kind.value} failed unexpectedly inside the init; odyn's log has "
                    "the details"
                )
            )

    async def _dispatch(self, request: Request) -> Response:
        handler = _HANDLERS[request.kind]
        return await handler(self.controller, request)

    async def _on_unix_connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._serve_connection(reader, writer, "unix socket client")

    async def _on_vsock_connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: vsock.VsockAddress
    ) -> None:
        if peer.cid not in self.allowed_cids:
            LOG.warning("init control: refusing %s: CID %d is not allowed", peer, peer.cid)
            writer.transport.abort()
            return
        if self.require_privileged_port and peer.port >= PRIVILEGED_PORT_LIMIT:
            # Every process on a Nitro parent is CID 3; only root (CAP_NET_BIND_SERVICE) can
            # bind a source port below 1024 (docs/init.md, "Who may control the init").
            LOG.warning(
                "init control: refusing %s: source port %d is not privileged (below %d); "
                "connect as root, or set control.require_privileged_port: false",
                peer,
                peer.port,
                PRIVILEGED_PORT_LIMIT,
            )
            writer.transport.abort()
            return
        await self._serve_connection(reader, writer, str(peer))

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:
            writer.transport.abort()
            return
        self._connections.add(task)
        try:
            await self._answer(reader, writer, peer)
        except (ConnectionError, OSError) as err:
            LOG.debug("init control: %s went away: %s", peer, err)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        if len(self._connections) > self.max_clients:
            LOG.warning("init control: %s refused: %d clients already", peer, self.max_clients)
            response: Response = _error_response(
                ServerBusyError(
                    f"the init control server is busy ({self.max_clients} connections); retry"
                )
            )
        else:
            response = await self._response_to(reader)
        writer.write(encode_response(response))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await _linger(reader)

    async def _response_to(self, reader: asyncio.StreamReader) -> Response:
        try:
            data = await asyncio.wait_for(_read_request(reader), self.request_timeout)
            request = decode_request(data)
        except asyncio.TimeoutError:
            return _error_response(
                InvalidRequestError(
                    f"no complete request within {self.request_timeout:g} s: send one JSON "
                    "request ended by a newline"
                )
            )
        except UnsupportedRequestError as err:
            return _error_response(UnsupportedError(str(err)))
        except InitProtocolError as err:
            return _error_response(InvalidRequestError(f"invalid request: {err}"))
        return await self.handle(request)


async def _ping(_controller: ServiceController, _request: Request) -> Response:
    return PongResponse()


async def _list(controller: ServiceController, _request: Request) -> Response:
    return ServiceListResponse(tuple(await controller.list_services()))


async def _status(controller: ServiceController, request: Request) -> Response:
    return ServiceStatusResponse(await controller.service_status(_name(request)))


async def _start(controller: ServiceController, request: Request) -> Response:
    name = _name(request)
    return SuccessResponse(f"Service '{name}' started", await controller.start(name))


async def _stop(controller: ServiceController, request: Request) -> Response:
    name = _name(request)
    return SuccessResponse(f"Service '{name}' stopped", await controller.stop(name))


async def _restart(controller: ServiceController, request: Request) -> Response:
    name = _name(request)
    return SuccessResponse(f"Service '{name}' restarted", await controller.restart(name))


async def _enable(controller: ServiceController, request: Request) -> Response:
    name = _name(request)
    info = await controller.enable(name, now=request.now)
    started = " and started" if request.now else ""
    return SuccessResponse(f"Service '{name}' enabled{started}", info)


async def _disable(controller: ServiceController, request: Request) -> Response:
    name = _name(request)
    return SuccessResponse(f"Service '{name}' disabled", await controller.disable(name))


async def _logs(controller: ServiceController, request: Request) -> Response:
    return ServiceLogsResponse(tuple(await controller.logs(_name(request), request.lines or 0)))


async def _logs_clear(controller: ServiceController, request: Request) -> Response:
    name = _name(request)
    await controller.clear_logs(name)
    return SuccessResponse(f"Logs cleared for service '{name}'")


async def _system_status(controller: ServiceController, _request: Request) -> Response:
    return SystemStatusResponse(await controller.system_status())


async def _reload(controller: ServiceController, _request: Request) -> Response:
    changes = await controller.reload()
    return SuccessResponse(_reload_message(changes), changes=changes)


async def _shutdown(controller: ServiceController, _request: Request) -> Response:
    await controller.shutdown()
    return SuccessResponse("System shutdown initiated")


_HANDLERS: dict[RequestKind, Callable[[ServiceController, Request], Awaitable[Response]]] = {
    RequestKind.PING: _ping,
    RequestKind.LIST_SERVICES: _list,
    RequestKind.SERVICE_STATUS: _status,
    RequestKind.SERVICE_START: _start,
    RequestKind.SERVICE_STOP: _stop,
    RequestKind.SERVICE_RESTART: _restart,
    RequestKind.SERVICE_ENABLE: _enable,
    RequestKind.SERVICE_DISABLE: _disable,
    RequestKind.SERVICE_LOGS: _logs,
    RequestKind.SERVICE_LOGS_CLEAR: _logs_clear,
    RequestKind.SYSTEM_STATUS: _system_status,
    RequestKind.SYSTEM_RELOAD: _reload,
    RequestKind.SYSTEM_SHUTDOWN: _shutdown,
}


def _name(request: Request) -> str:
    """The service name; decode_request guarantees one for every Service* request."""
    return request.name or ""


def _reload_message(changes: ReloadChanges) -> str:
    parts = [
        f"{label} {', '.join(names)}"
        for label, names in (
            ("added", changes.added),
            ("removed", changes.removed),
            ("restarted", changes.restarted),
        )
        if names
    ]
    return "System reloaded: " + ("; ".join(parts) if parts else "no changes")


class _OversizedRequest(InitProtocolError):
    pass


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """The request's bytes: up to a newline, the half-close, or the end of one JSON value."""
    buffer = bytearray()
    early_parses = 0
    while True:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            return bytes(buffer)
        newline = chunk.find(b"\n")
        if newline >= 0:
            buffer += chunk[:newline]
            _check_size(buffer)
            return bytes(buffer)
        buffer += chunk
        _check_size(buffer)
        if early_parses < _MAX_EARLY_PARSES and buffer.rstrip()[-1:] in (b'"', b"}"):
            early_parses += 1
            if _is_complete_json(buffer):
                return bytes(buffer)


def _check_size(buffer: bytearray) -> None:
    if len(buffer) > MAX_REQUEST_SIZE:
        raise _OversizedRequest(
            f"request is larger than {MAX_REQUEST_SIZE} bytes; a control request is one short "
            "JSON value"
        )


def _is_complete_json(buffer: bytearray) -> bool:
    try:
        json.loads(buffer)
    except (ValueError, RecursionError):
        return False
    return True


async def _linger(reader: asyncio.StreamReader) -> None:
    """Drop what the peer still sends (bounded), so closing does not reset the connection."""
    received = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _LINGER_SECONDS
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
        while received < _LINGER_BYTES:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            chunk = await asyncio.wait_for(reader.read(_READ_CHUNK), remaining)
            if not chunk:
                return
            received += len(chunk)


def _error_response(err: InitError) -> ErrorResponse:
    return ErrorResponse(str(err), err.kind)


def _bind_private_unix_socket(path: Path) -> socket.socket:
    """A listening socket at ``path`` that only its owner (root) can connect to.

    The umask is narrowed around bind, so the socket is never reachable with wider permissions
    (a chmod after bind leaves a window).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        previous = os.umask(0o177)
        try:
            listener.bind(os.fsencode(path))
        finally:
            os.umask(previous)
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by an earlier run; refuse to replace a live one or another file."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlServerError(
            f"{path} exists and is not a socket; remove it or set control.unix_socket to "
            "another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fsencode(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
    else:
        raise ControlServerError(
            f"{path} is in use by another running init; stop it or set control.unix_socket "
            "to another path"
        )
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _remove_own_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
