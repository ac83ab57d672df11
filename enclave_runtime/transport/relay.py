"""Byte relays between two connections, for the ingress and egress proxies on both sides.

A relay copies each direction independently, so a half-close on one side (EOF) reaches the other
as a half-close while the opposite direction keeps flowing, as with a TCP or vsock socket. A
relay that sees no bytes in either direction for ``idle_timeout`` seconds closes both sides;
so does a reset on either side.

When both sides are plain sockets (not TLS), :func:`relay` takes them away from their asyncio
streams and copies with the socket pump: each read lands in one preallocated buffer per thread
and is sent on before anything else runs, so bulk bytes are copied once in user space and an
idle connection holds no buffer at all. Only what a socket does not accept at once is copied out
of that buffer. This pump moves about three times the bytes of the stream pump on loopback
(``bench/ingress.py``); TLS, and the HTTP exchanges of the egress proxy, keep the stream pump.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

# One read of the stream pump (a new bytes object each), and the first read of the socket pump.
READ_SIZE = 256 * 1024
# The largest read of the socket pump, into its per-thread buffer: few system calls per byte.
SOCKET_READ_SIZE = 1024 * 1024
# SO_SNDBUF for the emulated fabric's Unix sockets. The default (net.core.wmem_default, about
# 200 KiB) lets a sender queue so little that the relays stall on each other: 1 MiB gives ~30 %
# more throughput through the fabric. vsock sizes its buffers with its own options (unmeasured).
FABRIC_SEND_BUFFER = 1024 * 1024
# Listen backlog for relaying servers: a burst of connections waits in the kernel's queue
# instead of being refused (asyncio's default is 100).
BACKLOG = 1024
# Per listener, unless the manifest says otherwise (docs/networking.md, "Connection caps"): 260
# idle connections once exhausted odyn's 256 descriptors; each relayed connection holds two.
DEFAULT_MAX_CONNECTIONS = 100
# Seconds without a byte either way before a relayed connection is closed.
DEFAULT_IDLE_TIMEOUT = 300.0
# One refusal line at most per this many seconds and listener; the others are counted into it.
REFUSAL_LOG_INTERVAL = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListenerLimits:
    """What one relaying listener allows: concurrent connections and idle seconds."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT

    @classmethod
    def of(cls, max_connections: int | None, idle_timeout: float | None) -> ListenerLimits:
        """The manifest's values, each defaulting when absent."""
        return cls(
            DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections,
            DEFAULT_IDLE_TIMEOUT if idle_timeout is None else float(idle_timeout),
        )


class RefusalLog:
    """Logs refused connections at most once per ``interval`` seconds, with the count since."""

    def __init__(
        self,
        logger: logging.Logger,
        label: str,
        interval: float = REFUSAL_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._label = label
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def refused(self, reason: str) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return
        more = f" (and {self._suppressed} more since the last report)" if self._suppressed else ""
        self._logger.warning("%s: refused a connection: %s%s", self._label, reason, more)
        self._last, self._suppressed = now, 0


class Endpoint(Protocol):
    """One side of a relay: bytes in, bytes out, half-close, close."""

    async def read(self) -> bytes:
        """The next bytes; ``b""`` once the peer has finished sending."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None:
        """Tell the peer nothing more will be sent (half-close)."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class StreamEndpoint:
    """An asyncio stream pair as a relay endpoint."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(READ_SIZE)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer.can_write_eof() and not self.writer.is_closing():
            self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    def detachable(self) -> bool:
        """Whether the stream runs straight on an open socket, which :meth:`detach` can take."""
        connection = self.writer.get_extra_info("socket")
        return (
            connection is not None
            and connection.type == socket.SOCK_STREAM
            and self.writer.get_extra_info("sslcontext") is None
            and not self.writer.is_closing()
        )

    async def detach(self) -> SocketEndpoint:
        """Take the connection away from its asyncio transport, for the socket pump.

        What was written to the stream is sent first; what the stream had already received (a
        ClientHello behind the vsock preamble, bytes pipelined after a CONNECT) is the first
        thing read from the returned endpoint. The stream is closed; the connection is not.
        Raises :class:`OSError` when the connection was lost or cannot be duplicated.
        """
        transport = self.writer.transport
        transport.pause_reading()
        transport.set_write_buffer_limits(high=0)  # so drain() returns only once all is sent
        await self.writer.drain()
        # The stream gets nothing more: ending it lets read() return what it holds at once.
        self.reader.feed_eof()
        received = await self.reader.read()
        connection = self.writer.get_extra_info("socket").dup()
        transport.abort()  # closes the transport's descriptor only: the duplicate stays open
        return SocketEndpoint(connection, received)


class SocketEndpoint:
    """A connected stream socket that the relay owns outright, with no asyncio transport.

    ``received`` is data its previous owner already read from the connection: it comes first.
    """

    def __init__(self, connection: socket.socket, received: bytes = b"") -> None:
        if connection.getblocking():
            connection.setblocking(False)
        if connection.family == socket.AF_UNIX:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FABRIC_SEND_BUFFER)
        self.socket = connection
        self._received = received
        self._unsent = bytearray()

    def take_received(self) -> bytes:
        """The bytes received before this endpoint owned the connection, once."""
        received, self._received = self._received, b""
        return received

    async def read(self) -> bytes:
        received = self.take_received()
        if received:
            return received
        return await asyncio.get_running_loop().sock_recv(self.socket, READ_SIZE)

    def write(self, data: bytes) -> None:
        self._unsent += data

    async def drain(self) -> None:
        if self._unsent:
            data, self._unsent = bytes(self._unsent), bytearray()
            await asyncio.get_running_loop().sock_sendall(self.socket, data)

    def write_eof(self) -> None:
        """Half-close; as :func:`pump` does, call it after :meth:`drain`, not with bytes unsent."""
        self.socket.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.socket.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for: :meth:`close` closed the socket."""


async def open_tcp(host: str, port: int) -> SocketEndpoint:
    """A TCP connection to ``host``:``port`` as a :class:`SocketEndpoint`, with no stream to
    detach it from: each address in turn, with TCP_NODELAY, as ``asyncio.open_connection``."""
    loop = asyncio.get_running_loop()
    try:  # an address needs no resolver thread
        addresses = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    failure: OSError | None = None
    for family, kind, proto, _, address in addresses:
        connection = socket.socket(family, kind, proto)
        try:
            connection.setblocking(False)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(connection, address)
        except OSError as err:
            connection.close()
            failure = err
            continue
        except BaseException:
            connection.close()
            raise
        return SocketEndpoint(connection)
    assert failure is not None  # getaddrinfo() raises rather than return no address
    raise failure


class Activity:
    """When bytes last moved, for idle timeouts shared by several pumps."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last


@dataclass(frozen=True)
class RelayResult:
    """Bytes moved each way, and why the relay ended: ``eof``, ``idle`` or ``error``."""

    a_to_b: int
    b_to_a: int
    ended: str


async def pump(source: Endpoint, sink: Endpoint, activity: Activity) -> int:
    """Copy ``source`` to ``sink`` until EOF, then half-close ``sink``; returns the byte count."""
    if isinstance(source, SocketEndpoint) and isinstance(sink, SocketEndpoint):
        return await _pump_sockets(source, sink, activity)
    total = 0
    while True:
        data = await source.read()
        if not data:
            sink.write_eof()
            return total
        activity.touch()
        sink.write(data)
        await sink.drain()
        total += len(data)


async def _pump_sockets(source: SocketEndpoint, sink: SocketEndpoint, activity: Activity) -> int:
    return await _SocketPump(source, sink, activity).run()


class _SocketPump:
    """:func:`pump` between two sockets, driven by event-loop callbacks instead of a task.

    Each time ``source`` is readable, one read fills this thread's buffer and is sent on at
    once: no task switch, future or copy per chunk. What ``sink`` does not take at once is
    copied out, because the next read of any pump reuses the buffer, and the pump then waits
    for ``sink`` to be writable instead of reading on: that is the back-pressure. Reads start
    at :data:`READ_SIZE` and double up to :data:`SOCKET_READ_SIZE` while ``sink`` takes whole
    reads, so a slow sink costs at most one small copy. One read per callback lets every
    connection of the loop take its turn.
    """

    def __init__(self, source: SocketEndpoint, sink: SocketEndpoint, activity: Activity) -> None:
        self._loop = asyncio.get_running_loop()
        self._source = source.socket
        self._sink = sink.socket
        self._source_fd = source.socket.fileno()
        self._sink_fd = sink.socket.fileno()
        self._activity = activity
        self._buffer = _read_buffer()
        self._unsent = memoryview(source.take_received())
        self._total = len(self._unsent)
        self._read_size = READ_SIZE
        self._reading = self._writing = False
        self._finished: asyncio.Future[int] = self._loop.create_future()

    async def run(self) -> int:
        """The byte count once ``source`` ended and ``sink`` was half-closed."""
        if self._unsent:
            self._activity.touch()
            self._start_writing()
        else:
            self._start_reading()
        try:
            return await self._finished
        finally:
            self._stop()

    def _on_readable(self) -> None:
        try:
            count = self._source.recv_into(self._buffer, self._read_size)
        except BlockingIOError:
            return
        except OSError as err:
            self._finish(err)
            return
        if not count:
            self._half_close_sink()
            return
        self._activity.touch()
        self._total += count
        data = self._buffer[:count]
        try:
            sent = self._sink.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as err:
            self._finish(err)
            return
        if sent < count:
            self._unsent = memoryview(bytes(data[sent:]))
            self._read_size = READ_SIZE
            self._stop_reading()
            self._start_writing()
        elif count == self._read_size:
            self._read_size = min(2 * count, SOCKET_READ_SIZE)

    def _on_writable(self) -> None:
        try:
            sent = self._sink.send(self._unsent)
        except BlockingIOError:
            return
        except OSError as err:
            self._finish(err)
            return
        self._activity.touch()  # a slow reader that keeps reading is not idle
        self._unsent = self._unsent[sent:]
        if not self._unsent:
            self._stop_writing()
            self._start_reading()

    def _half_close_sink(self) -> None:
        try:
            self._sink.shutdown(socket.SHUT_WR)
        except OSError as err:
            self._finish(err)
            return
        self._finish(None)

    def _finish(self, error: OSError | None) -> None:
        self._stop()  # at once: a level-triggered descriptor would call back until run() resumes
        if self._finished.done():  # cancelled: run() has not yet resumed to unregister
            return
        if error is not None:
            self._finished.set_exception(error)
        else:
            self._finished.set_result(self._total)

    def _start_reading(self) -> None:
        self._loop.add_reader(self._source_fd, self._on_readable)
        self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._source_fd)
            self._reading = False

    def _start_writing(self) -> None:
        self._loop.add_writer(self._sink_fd, self._on_writable)
        self._writing = True

    def _stop_writing(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._sink_fd)
            self._writing = False

    def _stop(self) -> None:
        self._stop_reading()
        self._stop_writing()


_per_thread = threading.local()


def _read_buffer() -> memoryview:
    """This thread's read buffer, shared by every socket pump of its event loop."""
    buffer = getattr(_per_thread, "buffer", None)
    if buffer is None:
        buffer = _per_thread.buffer = memoryview(bytearray(SOCKET_READ_SIZE))
    return buffer


async def supervise(
    tasks: Collection[asyncio.Task[Any]],
    activity: Activity,
    idle_timeout: float | None,
    required: Collection[asyncio.Task[Any]] | None = None,
) -> str:
    """Wait until every ``required`` task (default: all) is done, and cancel the rest.

    Ends early, cancelling everything, when a task fails or nothing moved for ``idle_timeout``.
    Returns ``eof``, ``idle`` or ``error``; the tasks' exceptions are consumed.
    """
    needed = set(tasks if required is None else required)
    pending = set(tasks)
    ended = "eof"
    try:
        while needed & pending:
            timeout = None if idle_timeout is None else max(0.0, idle_timeout - activity.idle_for())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if any(not task.cancelled() and task.exception() is not None for task in done):
                ended = "error"
                break
            if idle_timeout is not None and not done and activity.idle_for() >= idle_timeout:
                ended = "idle"
                break
    finally:
        await cancel_all(pending)
    return ended


async def cancel_all(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them, swallowing what they raise."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def relay(a: Endpoint, b: Endpoint, idle_timeout: float | None = None) -> RelayResult:
    """Copy both ways until both sides finished sending, one fails, or the relay is idle.

    Two plain socket streams are detached and relayed by the socket pump (module docstring).
    Both endpoints are closed when it returns (or is cancelled).
    """
    endpoints = (a, b)
    try:
        endpoints = await _for_socket_pump(a, b)
        return await _relay_both_ways(*endpoints, idle_timeout)
    except OSError as err:
        log.debug("relay: cannot take the connections from their streams: %s", err)
        return RelayResult(0, 0, "error")
    finally:
        await close_all(endpoints)


async def _relay_both_ways(a: Endpoint, b: Endpoint, idle_timeout: float | None) -> RelayResult:
    activity = Activity()
    forward = _task(pump(a, b, activity))
    backward = _task(pump(b, a, activity))
    ended = await supervise((forward, backward), activity, idle_timeout)
    return RelayResult(_count(forward), _count(backward), ended)


async def _for_socket_pump(a: Endpoint, b: Endpoint) -> tuple[Endpoint, Endpoint]:
    """Both endpoints as sockets if both are or can be detached from their streams; else as
    they are (a socket endpoint then serves the stream pump)."""
    if not (_socket_or_detachable(a) and _socket_or_detachable(b)):
        return a, b
    first = await _detached(a)
    try:
        second = await _detached(b)
    except BaseException:
        first.close()
        raise
    return first, second


async def _detached(endpoint: Endpoint) -> SocketEndpoint:
    if isinstance(endpoint, StreamEndpoint):
        return await endpoint.detach()
    assert isinstance(endpoint, SocketEndpoint)
    return endpoint


def _socket_or_detachable(endpoint: Endpoint) -> bool:
    return isinstance(endpoint, SocketEndpoint) or (
        isinstance(endpoint, StreamEndpoint) and endpoint.detachable()
    )


async def close_all(endpoints: Collection[Endpoint]) -> None:
    for endpoint in endpoints:
        endpoint.close()
    for endpoint in endpoints:
        await endpoint.wait_closed()


class Connections:
    """The tasks serving a server's connections, so that closing the server can end them all."""

    def __init__(self, label: str, limit: int | None = None) -> None:
        self.label = label
        self.limit = limit
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refusals = RefusalLog(log, label)

    async def serve(self, work: Awaitable[None], writer: asyncio.StreamWriter) -> None:
        """Run ``work`` for one connection and close the connection when it ends, however.

        Beyond ``limit`` connections the new one is closed at once (``work`` never runs) and
        the refusal is logged, rate-limited.
        """
        task = asyncio.current_task()
        assert task is not None
        if self.limit is not None and len(self._tasks) >= self.limit:
            self._refusals.refused(f"{self.limit} connections already (the cap)")
            writer.transport.abort()
            if asyncio.iscoroutine(work):
                work.close()
            return
        self._tasks.add(task)
        try:
            await work
        except asyncio.CancelledError:
            # close() cancelled it. The task is the top of its connection: ending normally keeps
            # asyncio's stream callback (Python 3.9-3.11) from logging the cancellation as an error.
            pass
        except OSError as err:
            log.info("%s: connection ended: %s", self.label, err)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def close(self) -> None:
        await cancel_all(list(self._tasks))

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)


def _task(coroutine: Coroutine[Any, Any, int]) -> asyncio.Task[int]:
    return asyncio.get_running_loop().create_task(coroutine)


def _count(task: asyncio.Task[int]) -> int:
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()
    return 0


__all__ = [
    "BACKLOG",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "FABRIC_SEND_BUFFER",
    "READ_SIZE",
    "SOCKET_READ_SIZE",
    "Activity",
    "Connections",
    "Endpoint",
    "ListenerLimits",
    "RefusalLog",
    "RelayResult",
    "SocketEndpoint",
    "StreamEndpoint",
    "cancel_all",
    "close_all",
    "open_tcp",
    "pump",
    "relay",
    "supervise",
]
