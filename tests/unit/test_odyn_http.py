"""odyn's strict HTTP/1.1 reader and writer, with real clients and hostile bytes."""

from __future__ import annotations

import asyncio
import http.client
import json

import pytest

from enclave_runtime.odyn.http import (
    DEFAULT_LIMITS,
    HttpError,
    Limits,
    Request,
    copy_body,
    read_request,
    read_request_head,
    write_error,
    write_json,
    write_response,
)


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def _parse(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Request | None:
    async def run() -> Request | None:
        return await read_request(_reader(data), limits)

    return asyncio.run(run())


def _status_of(data: bytes, limits: Limits = DEFAULT_LIMITS) -> int:
    with pytest.raises(HttpError) as caught:
        _parse(data, limits)
    return caught.value.status


class _Buffer:
    """A StreamWriter stand-in that keeps what is written."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None


async def _echo_server(limits: Limits = DEFAULT_LIMITS) -> asyncio.AbstractServer:
    """Answers each request with its method, target, headers and body as JSON; keeps alive."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await read_request(reader, limits, writer)
                except HttpError as err:
                    await write_error(writer, err)
                    return
                if request is None:
                    return
                payload = {
                    "method": request.method,
                    "path": request.path,
                    "query": request.query,
                    "body": request.body.decode(),
                    "host": request.headers.get("host"),
                }
                await write_json(writer, 200, payload, close=not request.keep_alive)
                if not request.keep_alive:
                    return
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _port(server: asyncio.AbstractServer) -> int:
    return int(server.sockets[0].getsockname()[1])


def test_a_real_client_keeps_one_connection_for_several_requests() -> None:
    def client(port: int) -> list[dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        answers = []
        conn.request("POST", "/v1/encryption/encrypt?x=1", body=b'{"a":1}')
        answers.append(json.loads(conn.getresponse().read()))
        conn.request("GET", "/v1/random")  # the same connection: keep-alive worked
        answers.append(json.loads(conn.getresponse().read()))
        body = iter([b"hello ", b"chunked"])
        conn.request("POST", "/chunked", body=body, encode_chunked=True)
        answers.append(json.loads(conn.getresponse().read()))
        conn.close()
        return answers

    async def run() -> list[dict[str, str]]:
        server = await _echo_server()
        async with server:
            return await asyncio.get_running_loop().run_in_executor(None, client, _port(server))

    first, second, third = asyncio.run(run())
    assert first["method"] == "POST"
    assert first["path"] == "/v1/encryption/encrypt"
    assert first["query"] == "x=1"
    assert first["body"] == '{"a":1}'
    assert first["host"].startswith("127.0.0.1:")
    assert second["path"] == "/v1/random"
    assert third["body"] == "hello chunked"


def test_expect_100_continue_gets_an_interim_response_before_the_body() -> None:
    async def run() -> bytes:
        server = await _echo_server()
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
            writer.write(
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            interim = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"data")
            rest = await reader.read()
            writer.close()
            return interim + rest

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in answer
    assert answer.endswith(b'"body":"data","host":"a"}')


def test_a_clean_eof_before_a_request_is_not_an_error() -> None:
    assert _parse(b"") is None


def test_lf_only_lines_and_leading_empty_lines_are_accepted() -> None:
    request = _parse(b"\r\nGET / HTTP/1.1\nHost: h\n\n")
    assert request is not None
    assert request.headers.get("HOST") == "h"


def test_http_1_0_closes_unless_asked_to_keep_alive() -> None:
    plain = _parse(b"GET / HTTP/1.0\r\n\r\n")
    kept = _parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert plain is not None
    assert kept is not None
    assert not plain.keep_alive
    assert kept.keep_alive


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),  # double space
        (b"GET /\r\nHost: h\r\n\r\n", 400),  # HTTP/0.9
        (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),  # method not a token
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),  # space before the colon
        (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400),  # bare CR
        (b"GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 3\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nshort", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nExpect: magic\r\n\r\n", 417),
        (b"GET / HTTP/1.1\r\nHost: h\r\n", 400),  # closed in the head
        (b"\r\n" * 10 + b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ],
)
def test_ambiguous_or_malformed_requests_get_the_right_status(raw: bytes, status: int) -> None:
    assert _status_of(raw) == status


def test_limits_are_enforced_with_their_statuses() -> None:
    limits = Limits(max_line=64, max_head=256, max_headers=3, max_body=8)
    assert _status_of(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n\r\n", limits) == 414
    assert _status_of(b"GET / HTTP/1.1\r\nX: " + b"a" * 100 + b"\r\n\r\n", limits) == 431
    many = b"".join(b"X%d: y\r\n" % i for i in range(4))
    assert _status_of(b"GET / HTTP/1.1\r\nHost: h\r\n" + many + b"\r\n", limits) == 431
    body = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\n123456789"
    assert _status_of(body, limits) == 413
    chunked = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n123456789\r\n"
    assert _status_of(chunked + b"0\r\n\r\n", limits) == 413


def test_a_slow_head_times_out_with_408() -> None:
    async def run() -> int:
        reader = _reader(b"GET / HTTP/1.1\r\n", eof=False)
        with pytest.raises(HttpError) as caught:
            await read_request_head(reader, Limits(head_timeout=0.05))
        return caught.value.status

    assert asyncio.run(run()) == 408


def test_copy_body_forwards_exactly_one_chunked_body() -> None:
    body = b"4;ext=1\r\nWiki\r\n0\r\nTrailer: yes\r\n\r\n"
    pipelined = b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"

    async def run() -> tuple[bytes, Request | None]:
        reader = _reader(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        head = await read_request_head(reader)
        assert head is not None
        assert head.chunked
        reader = _reader(body + pipelined)
        sink = _Buffer()
        await copy_body(reader, sink, head)  # type: ignore[arg-type]
        return bytes(sink.data), await read_request_head(reader)

    forwarded, following = asyncio.run(run())
    assert forwarded == body
    assert following is not None
    assert following.target == "/next"


def test_copy_body_forwards_a_content_length_body_and_nothing_more() -> None:
    async def run() -> bytes:
        reader = _reader(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcEXTRA")
        head = await read_request_head(reader)
        assert head is not None
        sink = _Buffer()
        await copy_body(reader, sink, head)  # type: ignore[arg-type]
        return bytes(sink.data)

    assert asyncio.run(run()) == b"abc"


def test_responses_carry_length_reason_and_close() -> None:
    async def run() -> bytes:
        sink = _Buffer()
        await write_response(sink, 404, {"Content-Type": "text/plain"}, b"nope", close=True)  # type: ignore[arg-type]
        await write_response(sink, 204)  # type: ignore[arg-type]
        return bytes(sink.data)

    assert asyncio.run(run()) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: 4\r\n\r\nnope"
        b"HTTP/1.1 204 No Content\r\n\r\n"
    )


def test_response_headers_cannot_be_split() -> None:
    async def run() -> None:
        await write_response(_Buffer(), 200, {"X": "a\r\nSet-Cookie: evil"})  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="invalid response header"):
        asyncio.run(run())
