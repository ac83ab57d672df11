"""Hostile bytes against the egress parsers: the broker framing and the proxy's request parser.

Property: whatever arrives, only the parser's own error comes out (EgressProtocolError,
HttpError, EgressPolicyError), and never a hang (the streams end, so a read cannot wait).
"""

from __future__ import annotations

import asyncio
import contextlib

from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.egress_policy import EgressPolicy, EgressPolicyError, parse_destination
from enclave_runtime.formats.protocol import (
    ConnectErr,
    ConnectOk,
    ConnectRequest,
    EgressProtocolError,
    Peer,
    decode_connect_request,
    decode_connect_response,
    read_egress_frame,
    split_egress_frame,
)
from enclave_runtime.odyn.egress import proxy_target
from enclave_runtime.odyn.http import (
    HttpError,
    Limits,
    read_request,
    read_request_head,
    read_response_head,
)

VALID_MESSAGES = [
    ConnectRequest("example.com", 443).encode(),
    ConnectRequest("[2001:db8::1]", 80, report_peer=True).encode(),
    ConnectOk().encode(),
    ConnectOk(Peer.parse("[::1]:8080")).encode(),
    ConnectErr(111, "Connection refused").encode(),
]
VALID_PROXY_REQUESTS = [
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    b"GET http://api.example.com:8080/v1?x=1 HTTP/1.1\r\nHost: api.example.com\r\n"
    b"Proxy-Connection: keep-alive\r\nConnection: Keep-Alive, X-Hop\r\nX-Hop: 1\r\n\r\n",
    b"POST http://10.0.0.1/up HTTP/1.1\r\nHost: 10.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
    b"POST http://[2001:db8::1]/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext\r\nhello\r\n0\r\nTrailer: 1\r\n\r\n",
    b"OPTIONS http://a.example HTTP/1.0\r\nExpect: 100-continue\r\n\r\n",
]
VALID_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"HTTP/1.0 100 Continue\r\n\r\nHTTP/1.1 204\r\n\r\n",
]
POLICY = EgressPolicy(allow=["**", "0.0.0.0/0", "::/0"], deny=["169.254.0.0/16", "*.internal"])
LIMITS = Limits(max_line=512, max_head=2048, max_headers=20, max_body=4096)


@st.composite
def _mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(("flip", "insert", "delete", "truncate")))
        if action == "flip" and position < len(data):
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    return bytes(data)


def _ended_stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=4096)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def _decode_framed(data: bytes) -> None:
    split = split_egress_frame(data)
    if split is None:
        return
    payload, used = split
    assert 2 <= used <= len(data)
    for decode in (decode_connect_request, decode_connect_response):
        with contextlib.suppress(EgressProtocolError):
            decode(payload)


async def _read_frames(data: bytes) -> None:
    reader = _ended_stream(data)
    try:
        while True:
            await read_egress_frame(reader)
    except EgressProtocolError:
        return


@given(st.one_of(st.binary(max_size=300), _mutated(VALID_MESSAGES)))
def test_the_broker_framing_only_raises_its_protocol_error(data: bytes) -> None:
    _decode_framed(data)
    asyncio.run(_read_frames(data))


@given(st.text(max_size=80))
def test_peer_addresses_only_raise_the_protocol_error(text: str) -> None:
    try:
        peer = Peer.parse(text)
    except EgressProtocolError:
        return
    assert Peer.parse(str(peer)) == peer


@given(st.text(max_size=300))
def test_hosts_only_raise_the_policy_error(text: str) -> None:
    try:
        destination = parse_destination(text)
    except EgressPolicyError:
        return
    assert POLICY.check_host(str(destination)) is not None


async def _parse_proxy_request(data: bytes) -> None:
    reader = _ended_stream(data)
    try:
        head = await read_request_head(reader, LIMITS)
        if head is None:
            return
        target = proxy_target(head)
    except HttpError as err:
        assert 400 <= err.status < 600
        return
    # A host the proxy accepted is always one the policy can judge.
    POLICY.check_host(target.host)
    assert 0 < target.port <= 0xFFFF


async def _read_whole(data: bytes) -> None:
    try:
        await read_request(_ended_stream(data), LIMITS)
    except HttpError:
        return


async def _read_response(data: bytes) -> None:
    try:
        await read_response_head(_ended_stream(data), LIMITS)
    except HttpError as err:
        assert err.status in (502, 504)


@given(st.one_of(st.binary(max_size=600), _mutated(VALID_PROXY_REQUESTS)))
def test_the_proxy_request_parser_only_raises_http_errors(data: bytes) -> None:
    asyncio.run(_parse_proxy_request(data))
    asyncio.run(_read_whole(data))


@given(st.one_of(st.binary(max_size=400), _mutated(VALID_RESPONSES)))
def test_the_upstream_response_parser_only_raises_http_errors(data: bytes) -> None:
    asyncio.run(_read_response(data))
