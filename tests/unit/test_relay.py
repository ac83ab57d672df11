"""The relay under the proxies: real loopback connections through :func:`relay`.

A test server accepts a client, connects to an "app" and relays the two asyncio streams, as the
ingress and egress proxies do; the client and the app are blocking sockets in threads. Two plain
sockets are detached from their streams and go through the socket pump, so these tests pin what
the proxies rely on: every byte in order, half-closes, idle and reset endings, bytes a stream had
already buffered, back-pressure from a slow reader, and no descriptor left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from enclave_runtime.transport.relay import (
    READ_SIZE,
    Connections,
    RelayResult,
    SocketEndpoint,
    StreamEndpoint,
    open_tcp,
    relay,
)
from tests.tls_support import write_self_signed
from tests.unit.odyn_support import in_executor, run_async

App = Callable[[socket.socket], None]


# --- the app: a blocking TCP server that runs one function per connection ------------------------


@contextlib.contextmanager
def _app(serve: App) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stopping = threading.Event()

    def accept_loop() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except socket.timeout:
                continue
            connection.settimeout(20)
            threading.Thread(target=_serve_and_close, args=(serve, connection), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stopping.set()
        thread.join(5)
        listener.close()


def _serve_and_close(serve: App, connection: socket.socket) -> None:
    with connection, contextlib.suppress(OSError):
        serve(connection)


def _receive_all(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _echo_until_eof(connection: socket.socket) -> None:
    while data := connection.recv(65536):
        connection.sendall(data)


# --- the relaying server -------------------------------------------------------------------------


@dataclass
class _Relay:
    port: int
    results: list[RelayResult] = field(default_factory=list)


@contextlib.asynccontextmanager
async def _relay_to(app_port: int, idle_timeout: float | None = None) -> AsyncIterator[_Relay]:
    """client -> this server -> the app, relayed as two asyncio stream pairs."""
    connections = Connections("test relay")
    state = _Relay(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def work() -> None:
            upstream = StreamEndpoint(*await asyncio.open_connection("127.0.0.1", app_port))
            result = await relay(StreamEndpoint(reader, writer), upstream, idle_timeout)
            state.results.append(result)

        await connections.serve(work(), writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = int(server.sockets[0].getsockname()[1])
    try:
        yield state
    finally:
        server.close()
        await connections.close()
        await server.wait_closed()


def _client(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20)


async def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


# --- bytes ---------------------------------------------------------------------------------------


def test_bulk_bytes_cross_both_ways_at_once_intact() -> None:
    """32 MiB each way at the same time: the two pumps share one read buffer per thread."""
    size = 32 * 1024 * 1024
    upload, download = os.urandom(size), os.urandom(size)
    seen_by_app: list[bytes] = []

    def app(connection: socket.socket) -> None:
        sender = threading.Thread(target=connection.sendall, args=(download,))
        sender.start()
        seen_by_app.append(_receive_all(connection))
        sender.join()
        connection.shutdown(socket.SHUT_WR)

    def client(port: int) -> bytes:
        with _client(port) as connection:
            sender = threading.Thread(target=_send_and_half_close, args=(connection, upload))
            sender.start()
            received = _receive_all(connection)
            sender.join()
            return received

    async def run() -> tuple[bytes, list[RelayResult]]:
        with _app(app) as app_port:
            async with _relay_to(app_port) as server:
                received = await in_executor(client, server.port)
                await _eventually(lambda: bool(server.results))
                return received, server.results

    received, results = run_async(run())
    assert hashlib.sha256(received).digest() == hashlib.sha256(download).digest()
    assert hashlib.sha256(seen_by_app[0]).digest() == hashlib.sha256(upload).digest()
    assert results == [RelayResult(size, size, "eof")]


def _send_and_half_close(connection: socket.socket, data: bytes) -> None:
    connection.sendall(data)
    connection.shutdown(socket.SHUT_WR)


def test_a_slow_reader_holds_the_sender_back_and_loses_nothing() -> None:
    """The app reads nothing for a while: the relay must wait for it, not drop or reorder."""
    size = 24 * 1024 * 1024
    payload = os.urandom(size)
    digest: list[bytes] = []

    def slow_app(connection: socket.socket) -> None:
        time.sleep(0.5)  # the client's bytes pile up in the relay's sockets
        total = hashlib.sha256()
        while chunk := connection.recv(4096):  # small reads: the relay keeps waiting on us
            total.update(chunk)
        digest.append(total.digest())
        connection.sendall(b"done")

    def client(port: int) -> bytes:
        with _client(port) as connection:
            _send_and_half_close(connection, payload)
            return _receive_all(connection)

    async def run() -> bytes:
        with _app(slow_app) as app_port:
            async with _relay_to(app_port) as server:
                return await in_executor(client, server.port)

    assert run_async(run()) == b"done"
    assert digest == [hashlib.sha256(payload).digest()]


def test_a_half_close_reaches_the_app_which_can_still_answer() -> None:
    def app(connection: socket.socket) -> None:
        request = _receive_all(connection)  # until the client's half-close
        connection.sendall(b"got %d bytes" % len(request))

    def client(port: int) -> bytes:
        with _client(port) as connection:
            _send_and_half_close(connection, b"x" * 1000)
            return _receive_all(connection)

    async def run() -> tuple[bytes, list[RelayResult]]:
        with _app(app) as app_port:
            async with _relay_to(app_port) as server:
                answer = await in_executor(client, server.port)
                await _eventually(lambda: bool(server.results))
                return answer, server.results

    answer, results = run_async(run())
    assert answer == b"got 1000 bytes"
    assert results == [RelayResult(1000, 14, "eof")]


def test_bytes_a_stream_had_already_buffered_are_relayed_first() -> None:
    """A proxy reads a head through the stream (the vsock preamble, a CONNECT) and relays the
    rest: bytes the client sent in the same write must not be lost in the stream's buffer."""
    received: list[bytes] = []

    def app(connection: socket.socket) -> None:
        received.append(_receive_all(connection))
        connection.sendall(b"bye")

    async def run(app_port: int) -> bytes:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()  # the head; the body behind it is now in the stream's buffer
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")  # not drained
            upstream = StreamEndpoint(*await asyncio.open_connection("127.0.0.1", app_port))
            await relay(StreamEndpoint(reader, writer), upstream)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await in_executor(_send_head_and_body, port)

    with _app(app) as app_port:
        answer = run_async(run(app_port))
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\nbye"
    assert received == [b"body sent with the head" * 100]


def _send_head_and_body(port: int) -> bytes:
    with _client(port) as connection:
        connection.sendall(b"CONNECT app:1 HTTP/1.1\n" + b"body sent with the head" * 100)
        connection.shutdown(socket.SHUT_WR)
        return _receive_all(connection)


def test_detach_hands_over_buffered_bytes_and_flushes_pending_writes() -> None:
    async def run() -> tuple[bytes, bytes, bytes]:
        detached: list[SocketEndpoint] = []
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(4)
            writer.write(b"written to the stream;")
            detached.append(await StreamEndpoint(reader, writer).detach())
            done.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            writer.write(b"headpayload")
            await done.wait()
            endpoint = detached[0]
            first = endpoint.take_received()
            endpoint.write(b"then the socket")
            await endpoint.drain()
            endpoint.write_eof()
            to_client = await reader.read()
            writer.write_eof()
            after = await endpoint.read()
            endpoint.close()
            writer.close()
            return first, to_client, after

    first, to_client, after = run_async(run())
    assert first == b"payload"
    assert to_client == b"written to the stream;then the socket"
    assert after == b""  # the client's EOF, through the detached socket


# --- endings -------------------------------------------------------------------------------------


def test_an_idle_relay_is_closed_and_says_so() -> None:
    def client(port: int) -> tuple[bytes, float]:
        with _client(port) as connection:
            connection.sendall(b"ping")
            started = time.monotonic()
            echoed = connection.recv(4)
            tail = _receive_all(connection)  # blocks until the relay gives up
            return echoed + tail, time.monotonic() - started

    async def run() -> tuple[tuple[bytes, float], list[RelayResult]]:
        with _app(_echo_until_eof) as app_port:
            async with _relay_to(app_port, idle_timeout=0.3) as server:
                outcome = await in_executor(client, server.port)
                await _eventually(lambda: bool(server.results))
                return outcome, server.results

    (data, waited), results = run_async(run())
    assert data == b"ping"
    assert 0.2 < waited < 5
    assert [result.ended for result in results] == ["idle"]


def test_a_reset_by_the_app_ends_the_relay_and_closes_the_client() -> None:
    def resetting_app(connection: socket.socket) -> None:
        connection.recv(5)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def client(port: int) -> bytes:
        with _client(port) as connection:
            connection.sendall(b"hello")
            try:
                return _receive_all(connection)
            except ConnectionResetError:
                return b"reset"

    async def run() -> tuple[bytes, list[RelayResult]]:
        with _app(resetting_app) as app_port:
            async with _relay_to(app_port) as server:
                outcome = await in_executor(client, server.port)
                await _eventually(lambda: bool(server.results))
                return outcome, server.results

    outcome, results = run_async(run())
    assert outcome in (b"", b"reset")
    assert [result.ended for result in results] == ["error"]


def test_closing_the_server_ends_relays_in_flight() -> None:
    def client(port: int) -> bytes:
        with _client(port) as connection:
            connection.sendall(b"ping")
            return connection.recv(4) + _receive_all(connection)

    async def run() -> bytes:
        with _app(_echo_until_eof) as app_port:
            async with _relay_to(app_port) as server:
                pending = asyncio.ensure_future(in_executor(client, server.port))
                await asyncio.sleep(0.3)
            return await pending  # the relay was cancelled: the client sees its EOF

    assert run_async(run()) == b"ping"


def test_closing_the_server_mid_transfer_stops_cleanly() -> None:
    """Relays cancelled while bytes stream both ways: the event loop reports no error."""
    stop = threading.Event()

    def streaming_client(port: int) -> None:
        with _client(port) as connection:
            drain = threading.Thread(target=_receive_until_closed, args=(connection,))
            drain.start()
            chunk = os.urandom(READ_SIZE)
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    connection.sendall(chunk)
            drain.join(10)

    async def run() -> list[dict[str, object]]:
        reported: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _, context: reported.append(context)
        )
        with _app(_echo_until_eof) as app_port:
            async with _relay_to(app_port) as server:
                clients = [in_executor(streaming_client, server.port) for _ in range(4)]
                running = asyncio.gather(*clients)
                await asyncio.sleep(0.5)
            stop.set()
            await running
        return reported

    assert run_async(run()) == []


def _receive_until_closed(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        _receive_all(connection)


def test_relays_leave_no_descriptor_behind() -> None:
    """Ended by EOF, by the idle timeout and by a reset: the process's descriptors are back."""

    def resetting_app(connection: socket.socket) -> None:
        connection.recv(1)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def clients(port: int, count: int) -> None:
        """``count`` connections open at once, each sends a byte, then each is read to its end."""
        connections = [_client(port) for _ in range(count)]
        for connection in connections:
            connection.sendall(b"x")
        for connection in connections:
            with connection, contextlib.suppress(ConnectionResetError):
                _receive_all(connection)

    async def run() -> tuple[int, int, int]:
        with _app(_echo_until_eof) as echo_port, _app(resetting_app) as reset_port:
            async with (
                _relay_to(echo_port, idle_timeout=0.2) as idle,
                _relay_to(reset_port) as reset,
            ):
                before = len(os.listdir("/proc/self/fd"))
                await asyncio.gather(
                    in_executor(clients, idle.port, 50), in_executor(clients, reset.port, 50)
                )
                await _eventually(lambda: len(idle.results) + len(reset.results) == 100)
                await _eventually(lambda: len(os.listdir("/proc/self/fd")) <= before)
                return before, len(os.listdir("/proc/self/fd")), len(idle.results)

    before, after, idle_count = run_async(run())
    assert idle_count == 50
    assert after <= before


# --- connecting and mixing -----------------------------------------------------------------------


def test_open_tcp_connects_by_address_or_name_and_refuses_clearly() -> None:
    async def run() -> tuple[bytes, bytes, type[BaseException]]:
        with _app(_echo_until_eof) as port:
            answers = []
            for host in ("127.0.0.1", "localhost"):
                endpoint = await open_tcp(host, port)
                endpoint.write(b"hi")
                await endpoint.drain()
                answers.append(await endpoint.read())
                endpoint.close()
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed_port = unused.getsockname()[1]
        try:
            await open_tcp("127.0.0.1", closed_port)
        except OSError as err:
            return answers[0], answers[1], type(err)
        raise AssertionError("connected to a closed port")

    by_address, by_name, refusal = run_async(run())
    assert by_address == by_name == b"hi"
    assert issubclass(refusal, ConnectionRefusedError)


def test_a_tls_stream_and_a_socket_are_relayed_by_the_stream_pump(tmp_path: Path) -> None:
    """A TLS stream keeps its transport (it cannot be detached): with a socket endpoint on the
    other side, the stream pump drives the socket through its read/write interface."""
    server_context, client_context = _tls_contexts(tmp_path)
    payload = os.urandom(3 * READ_SIZE + 17)

    def client(port: int) -> bytes:
        with _client(port) as raw, client_context.wrap_socket(raw) as connection:
            connection.sendall(payload)
            received = b""
            while len(received) < len(payload):
                received += connection.recv(1 << 20)
            return received

    async def run(app_port: int) -> tuple[bytes, list[RelayResult]]:
        results = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            app = await open_tcp("127.0.0.1", app_port)
            results.append(await relay(StreamEndpoint(reader, writer), app))

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
        async with server:
            received = await in_executor(client, server.sockets[0].getsockname()[1])
            await _eventually(lambda: bool(results))
        return received, results

    with _app(_echo_until_eof) as app_port:
        received, results = run_async(run(app_port))
    assert received == payload
    assert results[0].a_to_b == len(payload) and results[0].b_to_a == len(payload)


def _tls_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    write_self_signed(cert_path, key_path, "relay.test")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.load_verify_locations(cert_path)
    return server_context, client_context
