"""Ingress end to end: a real client -> host TCP listener -> emulated vsock -> odyn -> the app.

The "app" listens on 127.0.0.1:P; odyn's ingress listens on vsock port P of an enclave CID on a
temporary emulated fabric; the host listener takes any free TCP port and relays to (CID, P).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.formats.manifest import Ingress, Tls
from enclave_runtime.host.ingress_proxy import IngressProxy, IngressProxyError, start_ingress_proxy
from enclave_runtime.odyn.ingress import IngressError, IngressServers, start_ingress, tls_files
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.tls_support import write_self_signed
from tests.unit.odyn_support import in_executor, run_async

ENCLAVE_CID = 16
TLS = Tls(key_file="key.pem", cert_file="cert.pem")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"app saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@contextlib.contextmanager
def _http_app(port: int) -> Iterator[None]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _App)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.asynccontextmanager
async def _ingress(
    root: Path, config_dir: Path, entries: list[Ingress], idle_timeout: float | None = None
) -> AsyncIterator[tuple[IngressServers, IngressProxy]]:
    servers = await start_ingress(
        entries,
        config_dir,
        backend=EmulatedFabric(root, ENCLAVE_CID),
        idle_timeout=idle_timeout,
    )
    ports = [entry.listen_port for entry in entries]
    proxy = await start_ingress_proxy(
        ENCLAVE_CID,
        ports,
        bind_host="127.0.0.1",
        host_ports=dict.fromkeys(ports, 0),
        backend=EmulatedFabric(root, 3),
    )
    try:
        yield servers, proxy
    finally:
        await proxy.close()
        await servers.close()


def _write_certificate(config_dir: Path, port: int, name: str = "app.test") -> Path:
    return write_self_signed(*tls_files(config_dir, port), name)


def _get(port: int, path: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("app.test", port, timeout=10, context=context)
        conn.sock = None
        conn._create_connection = _to_loopback  # type: ignore[attr-defined]
    conn.request("GET", path)
    response = conn.getresponse()
    result = response.status, response.read()
    conn.close()
    return result


def _to_loopback(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
    """Connect "app.test" to loopback, so the certificate's name is checked for real."""
    return socket.create_connection(("127.0.0.1", address[1]), *args, **kwargs)


def test_a_real_client_reaches_the_app_through_plain_ingress(
    fabric_root: Path, tmp_path: Path
) -> None:
    port = _free_port()
    with _http_app(port):

        async def run() -> tuple[int, bytes]:
            async with _ingress(fabric_root, tmp_path, [Ingress(port)]) as (_, proxy):
                return await in_executor(_get, proxy.bound[port], "/hello")

        assert run_async(run()) == (200, b"app saw /hello")


def test_tls_is_terminated_inside_the_enclave(fabric_root: Path, tmp_path: Path) -> None:
    port = _free_port()
    cert = _write_certificate(tmp_path, port)
    context = ssl.create_default_context(cafile=str(cert))
    with _http_app(port):

        async def run() -> list[tuple[int, bytes]]:
            async with _ingress(fabric_root, tmp_path, [Ingress(port, TLS)]) as (_, proxy):
                host_port = proxy.bound[port]
                return [await in_executor(_get, host_port, f"/tls/{i}", context) for i in range(3)]

        assert run_async(run()) == [(200, b"app saw /tls/%d" % i) for i in range(3)]


async def _answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()
    writer.write(b"app got %d bytes" % len(data))
    await writer.drain()
    writer.close()


def _send_then_half_close(port: int, size: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"z" * size)
        conn.shutdown(socket.SHUT_WR)
        return _read_all(conn)


def _read_all(conn: socket.socket) -> bytes:
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    return answer


def _tls_send_then_half_close(port: int, size: int, context: ssl.SSLContext) -> bytes:
    """TLS's half-close: close_notify then SHUT_WR, and keep reading (ssl.SSLSocket cannot)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="app.test")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:

        def receive() -> bool:
            data = conn.recv(65536)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()
            return bool(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                conn.sendall(outgoing.read())
                receive()
        tls.write(b"z" * size)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()  # sends close_notify; the answer has not come yet
        conn.sendall(outgoing.read())
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                if not receive():
                    return answer
            except ssl.SSLZeroReturnError:
                return answer


def test_a_half_close_reaches_the_app_which_can_still_answer(
    fabric_root: Path, tmp_path: Path
) -> None:
    plain_port, tls_port = _free_port(), _free_port()
    cert = _write_certificate(tmp_path, tls_port)
    context = ssl.create_default_context(cafile=str(cert))

    async def run() -> tuple[bytes, bytes]:
        plain_app = await asyncio.start_server(_answer_after_eof, "127.0.0.1", plain_port)
        tls_app = await asyncio.start_server(_answer_after_eof, "127.0.0.1", tls_port)
        entries = [Ingress(plain_port), Ingress(tls_port, TLS)]
        async with plain_app, tls_app, _ingress(fabric_root, tmp_path, entries) as (_, proxy):
            plain = await in_executor(_send_then_half_close, proxy.bound[plain_port], 300_000)
            tls = await in_executor(
                _tls_send_then_half_close, proxy.bound[tls_port], 300_000, context
            )
            return plain, tls

    assert run_async(run()) == (b"app got 300000 bytes", b"app got 300000 bytes")


def test_a_client_is_disconnected_when_the_app_is_not_listening(
    fabric_root: Path, tmp_path: Path
) -> None:
    port = _free_port()

    def client(host_port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as conn:
            return conn.recv(100)

    async def run() -> bytes:
        async with _ingress(fabric_root, tmp_path, [Ingress(port)]) as (_, proxy):
            return await in_executor(client, proxy.bound[port])

    assert run_async(run()) == b""


def test_an_idle_connection_is_closed(fabric_root: Path, tmp_path: Path) -> None:
    port = _free_port()

    def client(host_port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as conn:
            return conn.recv(100)

    async def run() -> bytes:
        app = await asyncio.start_server(_answer_after_eof, "127.0.0.1", port)
        async with app, _ingress(fabric_root, tmp_path, [Ingress(port)], 0.3) as (_, proxy):
            return await in_executor(client, proxy.bound[port])

    assert run_async(run()) == b""


def test_a_failed_tls_handshake_does_not_reach_the_app(fabric_root: Path, tmp_path: Path) -> None:
    port = _free_port()
    _write_certificate(tmp_path, port)
    accepted = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(True)
        writer.close()

    def client(host_port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: plain-text-to-a-tls-port\r\n\r\n")
            return conn.recv(100)

    async def run() -> bytes:
        server = await asyncio.start_server(app, "127.0.0.1", port)
        async with server, _ingress(fabric_root, tmp_path, [Ingress(port, TLS)]) as (_, proxy):
            return await in_executor(client, proxy.bound[port])

    assert run_async(run()) == b""
    assert accepted == []


def test_missing_tls_files_are_a_clear_error(fabric_root: Path, tmp_path: Path) -> None:
    port = _free_port()
    cert, key = tls_files(tmp_path, port)

    async def run() -> None:
        await start_ingress(
            [Ingress(port, TLS)], tmp_path, backend=EmulatedFabric(fabric_root, ENCLAVE_CID)
        )

    with pytest.raises(IngressError) as caught:
        run_async(run())
    message = str(caught.value)
    assert f"ingress port {port} has tls set but {cert} and {key} are missing" in message
    assert "rebuild the image" in message
    assert not (fabric_root / "vsock" / str(ENCLAVE_CID) / str(port)).exists()


def test_an_unusable_key_is_a_clear_error(fabric_root: Path, tmp_path: Path) -> None:
    port = _free_port()
    _write_certificate(tmp_path, port)
    other = tmp_path / "other"
    _write_certificate(other, port)
    tls_files(tmp_path, port)[1].write_bytes(tls_files(other, port)[1].read_bytes())

    async def run() -> None:
        await start_ingress(
            [Ingress(port, TLS)], tmp_path, backend=EmulatedFabric(fabric_root, ENCLAVE_CID)
        )

    with pytest.raises(IngressError, match=rf"ingress port {port}: cannot use .* matches it"):
        run_async(run())


def test_a_taken_host_port_is_a_clear_error(fabric_root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def run() -> None:
            await start_ingress_proxy(
                ENCLAVE_CID, [port], bind_host="127.0.0.1", backend=EmulatedFabric(fabric_root, 3)
            )

        with pytest.raises(IngressProxyError, match=rf"cannot listen on 127.0.0.1:{port}"):
            run_async(run())


def test_closing_ends_open_connections(fabric_root: Path, tmp_path: Path) -> None:
    port = _free_port()

    async def run() -> bytes:
        arrived = asyncio.Event()

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            arrived.set()
            await reader.read()  # never answers
            writer.close()

        server = await asyncio.start_server(app, "127.0.0.1", port)
        async with server:
            async with _ingress(fabric_root, tmp_path, [Ingress(port)]) as (_, proxy):
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.bound[port])
                writer.write(b"waiting for an answer that never comes")
                await arrived.wait()
            data = await reader.read()  # closing the ingress ended the connection
            writer.close()
            return data

    assert run_async(run()) == b""
