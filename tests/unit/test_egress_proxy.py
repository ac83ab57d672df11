"""The egress path end to end: a real client -> odyn's proxy -> emulated vsock -> broker -> server.

Everything runs on loopback and on an emulated vsock fabric in a temporary directory. Names are
resolved by a test resolver handed to the broker, so no test depends on DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import os
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.formats.egress_policy import EgressPolicy
from enclave_runtime.formats.manifest import Egress
from enclave_runtime.formats.protocol import ConnectOk, decode_connect_request, read_egress_frame
from enclave_runtime.host.egress_broker import (
    DEFAULT_BROKER_TIMEOUTS,
    BrokerTimeouts,
    EgressBroker,
    EgressBrokerError,
    start_egress_broker,
)
from enclave_runtime.odyn.egress import (
    DEFAULT_TIMEOUTS,
    EgressError,
    EgressProxy,
    EgressTimeouts,
    start_egress_proxy,
)
from enclave_runtime.transport.relay import Connections, StreamEndpoint, relay
from enclave_runtime.transport.vsock import EmulatedFabric, VsockAddress
from tests.tls_support import write_self_signed
from tests.unit.odyn_support import in_executor, run_async

ENCLAVE_CID = 16
TEST_NAMES = {"app.test": ["127.0.0.1"], "denied.test": ["127.0.0.2"]}


async def _test_resolver(host: str, port: int) -> list[str]:
    if host in TEST_NAMES:
        return TEST_NAMES[host]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def _hanging_resolver(host: str, port: int) -> list[str]:
    await asyncio.Event().wait()
    return []


@contextlib.asynccontextmanager
async def _egress(
    root: Path,
    allow: tuple[str, ...],
    deny: tuple[str, ...] = (),
    *,
    resolver: Any = _test_resolver,
    allowlist: EgressPolicy | None = None,
    broker_timeouts: BrokerTimeouts = DEFAULT_BROKER_TIMEOUTS,
    timeouts: EgressTimeouts = DEFAULT_TIMEOUTS,
    with_broker: bool = True,
) -> AsyncIterator[tuple[EgressProxy, EgressBroker | None]]:
    broker = None
    if with_broker:
        broker = await start_egress_broker(
            backend=EmulatedFabric(root, 3),
            resolver=resolver,
            allowlist=allowlist,
            timeouts=broker_timeouts,
        )
    proxy = await start_egress_proxy(
        Egress(allow=allow, deny=deny, proxy_port=0),
        backend=EmulatedFabric(root, ENCLAVE_CID),
        timeouts=timeouts,
    )
    assert proxy is not None
    try:
        yield proxy, broker
    finally:
        await proxy.close()
        if broker is not None:
            await broker.close()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers with what it saw; the server object keeps every request."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, dict(self.headers), body))  # type: ignore[attr-defined]
        payload = f"{self.command} {self.path} {body.decode()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Keep-Alive", "timeout=5")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_OPTIONS = _answer

    def log_message(self, *args: object) -> None:
        return


@contextlib.contextmanager
def _http_server(host: str = "127.0.0.1", context: ssl.SSLContext | None = None) -> Iterator[Any]:
    server = http.server.ThreadingHTTPServer((host, 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _port(server: Any) -> int:
    return int(server.server_address[1])


def _opener(proxy: EgressProxy) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))


def _fetch(proxy: EgressProxy, url: str, data: bytes | None = None) -> tuple[int, str, Any]:
    try:
        with _opener(proxy).open(url, data=data, timeout=10) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers


def _raw(proxy: EgressProxy, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _connect_tunnel(proxy: EgressProxy, target: str) -> tuple[socket.socket, bytes]:
    conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    conn.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(1)
        if not chunk:
            break
        head += chunk
    return conn, head


# --- absolute-form HTTP ------------------------------------------------------------------------


def test_an_allowed_http_request_reaches_the_server_in_origin_form(fabric_root: Path) -> None:
    with _http_server() as server:

        async def run() -> tuple[int, str, Any]:
            async with _egress(fabric_root, allow=("127.0.0.1",)) as (proxy, _):
                url = f"http://127.0.0.1:{_port(server)}/v1/x?q=1"
                return await in_executor(_fetch, proxy, url, b"payload")

        status, body, headers = run_async(run())
        method, path, seen_headers, seen_body = server.seen[0]
    assert status == 200
    assert body == "POST /v1/x?q=1 payload"
    assert (method, path, seen_body) == ("POST", "/v1/x?q=1", b"payload")
    assert seen_headers["Host"] == f"127.0.0.1:{_port(server)}"
    assert seen_headers["Connection"] == "close"
    assert headers["Connection"] == "close"
    assert "Keep-Alive" not in headers  # the server's hop-by-hop field stays on its hop


def test_a_chunked_request_body_is_forwarded_as_sent(fabric_root: Path) -> None:
    received = []

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(b"HTTP/1.1 201 Made Here\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def run() -> bytes:
        upstream = await asyncio.start_server(server, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        async with upstream, _egress(fabric_root, allow=("app.test", "127.0.0.1")) as (proxy, _):
            request = (
                f"POST http://app.test:{port}/up HTTP/1.1\r\nHost: app.test\r\n"
                "Transfer-Encoding: chunked\r\nProxy-Connection: keep-alive\r\n\r\n"
                "5\r\nhello\r\n0\r\n\r\n"
            ).encode()
            return await in_executor(_raw, proxy, request)

    answer = run_async(run())
    assert answer.startswith(b"HTTP/1.1 201 Made Here\r\n")
    assert answer.endswith(b"\r\n\r\nok")
    head, _, body = received[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /up HTTP/1.1\r\n")
    assert b"Proxy-Connection" not in head
    assert body == b"5\r\nhello\r\n0\r\n\r\n"


def test_options_with_an_empty_path_becomes_an_asterisk(fabric_root: Path) -> None:
    with _http_server() as server:

        async def run() -> bytes:
            async with _egress(fabric_root, allow=("127.0.0.1",)) as (proxy, _):
                request = f"OPTIONS http://127.0.0.1:{_port(server)} HTTP/1.1\r\nHost: x\r\n\r\n"
                return await in_executor(_raw, proxy, request.encode())

        answer = run_async(run())
    assert answer.endswith(b"OPTIONS * ")


def test_expect_100_continue_is_relayed_before_the_body_is_sent(fabric_root: Path) -> None:
    def client(proxy: EgressProxy, port: int) -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
            conn.sendall(
                f"POST http://127.0.0.1:{port}/upload HTTP/1.1\r\nHost: x\r\n"
                "Content-Length: 4\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):
                interim += conn.recv(1)
            conn.sendall(b"body")  # only now, as curl does
            final = b""
            while chunk := conn.recv(65536):
                final += chunk
        return interim, final

    with _http_server() as server:

        async def run() -> tuple[bytes, bytes]:
            async with _egress(fabric_root, allow=("127.0.0.1",)) as (proxy, _):
                return await in_executor(client, proxy, _port(server))

        interim, final = run_async(run())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert final.endswith(b"POST /upload body")


# --- CONNECT -----------------------------------------------------------------------------------


def _certificate(tmp: Path, name: str) -> tuple[Path, Path]:
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    write_self_signed(cert_path, key_path, name)
    return cert_path, key_path


def test_https_through_connect_works_with_a_real_client(fabric_root: Path, tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path, "app.test")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    def client(proxy: EgressProxy, port: int) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", proxy.port, timeout=10, context=client_context
        )
        conn.set_tunnel("app.test", port)
        conn.request("GET", "/secret")
        response = conn.getresponse()
        result = response.status, response.read()
        conn.close()
        return result

    with _http_server(context=server_context) as server:

        async def run() -> tuple[int, bytes]:
            async with _egress(fabric_root, allow=("*.test", "127.0.0.1")) as (proxy, _):
                return await in_executor(client, proxy, _port(server))

        assert run_async(run()) == (200, b"GET /secret ")


async def _echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads everything, then answers how much it got: only a propagated half-close ends it."""
    data = await reader.read()
    writer.write(b"got %d bytes" % len(data))
    await writer.drain()
    writer.close()


def test_a_half_close_travels_through_the_tunnel(fabric_root: Path) -> None:
    def client(proxy: EgressProxy, port: int) -> tuple[bytes, bytes]:
        conn, head = _connect_tunnel(proxy, f"127.0.0.1:{port}")
        with conn:
            conn.sendall(b"x" * 100_000)
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        return head, answer

    async def run() -> tuple[bytes, bytes]:
        upstream = await asyncio.start_server(_echo_until_eof, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        async with upstream, _egress(fabric_root, allow=("127.0.0.1",)) as (proxy, _):
            return await in_executor(client, proxy, port)

    head, answer = run_async(run())
    assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert answer == b"got 100000 bytes"


def test_an_idle_tunnel_is_closed(fabric_root: Path) -> None:
    def client(proxy: EgressProxy, port: int) -> bytes:
        conn, _ = _connect_tunnel(proxy, f"127.0.0.1:{port}")
        with conn:
            return conn.recv(100)  # nothing moves: the proxy ends the tunnel

    async def run() -> bytes:
        upstream = await asyncio.start_server(_echo_until_eof, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        timeouts = EgressTimeouts(idle=0.3)
        async with upstream, _egress(fabric_root, ("127.0.0.1",), timeouts=timeouts) as (p, _):
            return await in_executor(client, p, port)

    assert run_async(run()) == b""


# --- refusals ----------------------------------------------------------------------------------


def test_denied_destinations_get_403_and_never_reach_the_server(fabric_root: Path) -> None:
    with _http_server() as server:
        port = _port(server)

        async def run() -> list[tuple[int, str]]:
            async with _egress(fabric_root, allow=("**",), deny=("bad.test",)) as (proxy, _):
                plain = await in_executor(_fetch, proxy, f"http://bad.test:{port}/")
                literal = await in_executor(_fetch, proxy, f"http://127.0.0.1:{port}/")
                conn, head = await in_executor(_connect_tunnel, proxy, f"BAD.test.:{port}")
                conn.close()
                return [plain[:2], literal[:2], (int(head.split()[1]), head.decode())]

        plain, literal, tunnel = run_async(run())
        assert server.seen == []
    assert plain == (
        403,
        f"egress to bad.test:{port} is denied: bad.test matches the deny rule 'bad.test'\n",
    )
    assert literal == (
        403,
        f"egress to 127.0.0.1:{port} is denied: 127.0.0.1 is in 127.0.0.0/8 (loopback, "
        "link-local or instance metadata), denied by default; allow it explicitly with an IP "
        "rule (egress.allow: [127.0.0.1])\n",
    )
    assert tunnel[0] == 403


def test_a_name_that_resolves_to_a_denied_address_is_refused(fabric_root: Path) -> None:
    # The broker resolves denied.test to 127.0.0.2 and connects; the enclave sees the peer
    # address in the answer and refuses, because 127.0.0.2 is denied.
    with _http_server(host="127.0.0.2") as server:
        port = _port(server)

        async def run() -> tuple[int, str, Any]:
            async with _egress(fabric_root, allow=("*.test",), deny=("127.0.0.2/32",)) as (p, _):
                return await in_executor(_fetch, p, f"http://denied.test:{port}/metadata")

        status, body, _ = run_async(run())
        assert server.seen == []
    assert status == 403
    assert body == (
        f"egress to denied.test:{port} is denied: it resolved to 127.0.0.2, in the denied "
        "network 127.0.0.2/32\n"
    )


def test_the_name_host_reaches_the_parents_loopback_only_when_allowed(fabric_root: Path) -> None:
    with _http_server() as server:
        url = f"http://host:{_port(server)}/on-the-parent"

        async def run() -> tuple[tuple[int, str, Any], tuple[int, str, Any]]:
            async with _egress(fabric_root, allow=("host",)) as (proxy, _):
                allowed = await in_executor(_fetch, proxy, url)
            async with _egress(fabric_root, allow=("*.test",)) as (proxy, _):
                denied = await in_executor(_fetch, proxy, url)
            return allowed, denied

        allowed, denied = run_async(run())
    assert allowed[:2] == (200, "GET /on-the-parent ")
    assert denied[0] == 403


def test_upstream_failures_are_502_and_timeouts_504(fabric_root: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now

    async def run() -> list[tuple[int, str]]:
        async with _egress(fabric_root, allow=("**", "127.0.0.1")) as (proxy, _):
            refused = await in_executor(_fetch, proxy, f"http://127.0.0.1:{port}/")
            unknown = await in_executor(_fetch, proxy, "http://nowhere.test/")
        slow = BrokerTimeouts(connect=0.2)
        async with _egress(
            fabric_root, ("**",), resolver=_hanging_resolver, broker_timeouts=slow
        ) as (proxy, _):
            timed_out = await in_executor(_fetch, proxy, "http://slow.test/")
        return [refused[:2], unknown[:2], timed_out[:2]]

    refused, unknown, timed_out = run_async(run())
    assert refused == (502, f"cannot connect to 127.0.0.1:{port}: Connection refused\n")
    assert unknown[0] == 502
    assert "cannot resolve nowhere.test" in unknown[1]
    assert timed_out == (
        504,
        "cannot connect to slow.test:80: no connection within 0.2 s\n",
    )


def test_a_missing_or_silent_broker_is_502_or_504(fabric_root: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: Any) -> None:
        await reader.read()  # accepts, never answers
        writer.close()

    async def run() -> tuple[tuple[int, str, Any], tuple[int, str, Any]]:
        async with _egress(fabric_root, allow=("**",), with_broker=False) as (proxy, _):
            missing = await in_executor(_fetch, proxy, "http://app.test/")
        server = await EmulatedFabric(fabric_root, 3).start_server(silent, 17002)
        timeouts = EgressTimeouts(connect=0.2)
        async with _egress(fabric_root, ("**",), with_broker=False, timeouts=timeouts) as (p, _):
            quiet = await in_executor(_fetch, p, "http://app.test/")
        server.close()
        await server.wait_closed()
        return missing, quiet

    missing, quiet = run_async(run())
    assert missing[0] == 502
    assert "cannot reach the egress broker at vsock(3:17002)" in missing[1]
    assert quiet[0] == 504


def test_the_parents_allowlist_refuses_with_403(fabric_root: Path) -> None:
    allowlist = EgressPolicy(allow=["**"], deny=["127.0.0.0/8"])
    with _http_server() as server:

        async def run() -> tuple[int, str, Any]:
            async with _egress(fabric_root, ("app.test",), allowlist=allowlist) as (proxy, _):
                return await in_executor(_fetch, proxy, f"http://app.test:{_port(server)}/")

        status, body, _ = run_async(run())
        assert server.seen == []
    assert status == 403
    assert "denied by the parent's egress allowlist" in body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /origin-form HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET https://app.test/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT app.test HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT app.test:99999 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://user@app.test/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://a..test/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://127.1/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
        (b"GET http://app.test/ HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_malformed_proxy_requests_get_400(
    fabric_root: Path, request_bytes: bytes, status: int
) -> None:
    async def run() -> bytes:
        async with _egress(fabric_root, allow=("**",)) as (proxy, _):
            return await in_executor(_raw, proxy, request_bytes)

    answer = run_async(run())
    assert answer.startswith(b"HTTP/1.1 %d " % status)


# --- compatibility with enclaver's broker ------------------------------------------------------


class _EnclaverStyleBroker:
    """enclaver's HostHttpProxy: reads the request, connects, answers a plain "Ok"."""

    def __init__(self) -> None:
        self.connections = Connections("enclaver-style broker")

    async def __call__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: VsockAddress
    ) -> None:
        await self.connections.serve(self._serve(reader, writer), writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = decode_connect_request(await read_egress_frame(reader))
        upstream = await asyncio.open_connection(TEST_NAMES[request.host][0], request.port)
        writer.write(ConnectOk().encode())
        await relay(StreamEndpoint(reader, writer), StreamEndpoint(*upstream))


def test_a_broker_that_does_not_report_the_peer_works_unless_ip_deny_rules_need_it(
    fabric_root: Path,
) -> None:
    with _http_server() as server:
        url = f"http://app.test:{_port(server)}/"

        async def run() -> tuple[tuple[int, str, Any], tuple[int, str, Any]]:
            broker = _EnclaverStyleBroker()
            fake = await EmulatedFabric(fabric_root, 3).start_server(broker, 17002)
            async with fake:
                async with _egress(fabric_root, ("*.test",), with_broker=False) as (proxy, _):
                    plain = await in_executor(_fetch, proxy, url)
                async with _egress(
                    fabric_root, ("*.test",), ("10.0.0.0/8",), with_broker=False
                ) as (proxy, _):
                    strict = await in_executor(_fetch, proxy, url)
                await broker.connections.close()
            return plain, strict

        plain, strict = run_async(run())
    assert plain[:2] == (200, "GET / ")
    assert strict[0] == 502
    assert "IP deny rules cannot be enforced" in strict[1]


# --- the proxy as odyn starts it ---------------------------------------------------------------


def test_egress_is_off_without_an_allow_list() -> None:
    async def run() -> tuple[object, object]:
        return (
            await start_egress_proxy(None),
            await start_egress_proxy(Egress(allow=(), deny=("x.com",))),
        )

    assert run_async(run()) == (None, None)


def test_the_app_gets_enclavers_proxy_variables(fabric_root: Path) -> None:
    async def run() -> tuple[int, dict[str, str]]:
        async with _egress(fabric_root, allow=("**",)) as (proxy, _):
            return proxy.port, proxy.env()

    port, env = run_async(run())
    url = f"http://127.0.0.1:{port}"
    assert env == {
        "http_proxy": url,
        "https_proxy": url,
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "no_proxy": "localhost,127.0.0.1",
        "NO_PROXY": "localhost,127.0.0.1",
    }


def test_taken_ports_are_clear_errors(fabric_root: Path) -> None:
    async def run() -> tuple[str, str]:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(EgressError) as proxy_error:
                await start_egress_proxy(
                    Egress(allow=("**",), proxy_port=port),
                    backend=EmulatedFabric(fabric_root, ENCLAVE_CID),
                )
        broker = await start_egress_broker(backend=EmulatedFabric(fabric_root, 3))
        try:
            with pytest.raises(EgressBrokerError) as broker_error:
                await start_egress_broker(backend=EmulatedFabric(fabric_root, 3))
        finally:
            await broker.close()
        return str(proxy_error.value), str(broker_error.value)

    proxy_message, broker_message = run_async(run())
    assert "for the egress proxy" in proxy_message
    assert "choose another egress.proxy_port" in proxy_message
    assert broker_message.startswith("cannot listen on vsock port 17002 for the egress broker")


# --- load --------------------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_1000_concurrent_tunnels_are_held_and_nothing_leaks(fabric_root: Path) -> None:
    import resource

    connections = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections * 6 + 200  # client, proxy x2, broker x2, server per tunnel
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    server_tasks: set[asyncio.Task[None]] = set()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        server_tasks.add(task)
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()
        await writer.wait_closed()

    async def tunnel(proxy: EgressProxy, port: int, index: int) -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        message = b"tunnel %d" % index
        writer.write(message)
        assert await reader.readexactly(len(message)) == message
        return reader, writer

    async def run() -> tuple[int, int, int]:
        upstream = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
        port = upstream.sockets[0].getsockname()[1]
        async with upstream, _egress(fabric_root, allow=("127.0.0.1",)) as (proxy, broker):
            assert broker is not None
            before = _open_fds()
            opened = []
            for start in range(0, connections, 100):  # bursts the listen backlogs absorb
                opened += await asyncio.gather(
                    *(tunnel(proxy, port, i) for i in range(start, start + 100))
                )
            held = len(proxy.connections), len(broker.connections)
            assert held == (connections, connections)
            for _, writer in opened:
                writer.close()
            await asyncio.gather(*(writer.wait_closed() for _, writer in opened))
            await asyncio.gather(*proxy.connections, *broker.connections, *server_tasks)
            after = _open_fds()
        return before, after, len(opened)

    before, after, count = run_async(run(), timeout=60)
    assert count == connections
    assert after == before
