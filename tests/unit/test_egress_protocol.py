"""The egress broker framing: enclaver's exact bytes, our peer extension, and strict decoding."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from enclave_runtime.formats.protocol import (
    ConnectErr,
    ConnectOk,
    ConnectRequest,
    EgressProtocolError,
    Peer,
    decode_connect_request,
    decode_connect_response,
    encode_egress_frame,
    read_egress_frame,
    split_egress_frame,
)


def test_requests_are_byte_for_byte_what_enclavers_odyn_sends() -> None:
    # serde_json writes struct fields in declaration order with no spaces, after a u16 LE length.
    assert ConnectRequest("example.com", 443).encode() == (
        b'!\x00{"host":"example.com","port":443}'
    )


def test_responses_are_byte_for_byte_what_enclavers_broker_sends() -> None:
    assert ConnectOk().encode() == b'\x04\x00"Ok"'
    assert ConnectErr(111, "Connection refused (os error 111)").encode() == (
        b'E\x00{"Err":{"os_code":111,"message":"Connection refused (os error 111)"}}'
    )


def test_the_peer_extension_is_asked_for_and_answered() -> None:
    request = decode_connect_request(
        split_egress_frame(ConnectRequest("a.com", 80, report_peer=True).encode())[0]  # type: ignore[index]
    )
    assert request == ConnectRequest("a.com", 80, True)
    peer = Peer(ipaddress.ip_address("93.184.216.34"), 80)
    assert ConnectOk(peer).encode()[2:] == b'{"Ok":{"peer":"93.184.216.34:80"}}'
    answer = decode_connect_response(ConnectOk(peer).encode()[2:])
    assert answer == ConnectOk(peer)


def test_enclavers_request_without_the_extension_decodes() -> None:
    request = decode_connect_request(b'{"host":"example.com","port":443,"future":1}')
    assert request == ConnectRequest("example.com", 443, report_peer=False)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'"Ok"', ConnectOk()),
        (b'{"Ok":null}', ConnectOk()),  # serde_json accepts a unit variant this way too
        (
            b'{"Ok":{"peer":"[2001:db8::1]:443"}}',
            ConnectOk(Peer(ipaddress.ip_address("2001:db8::1"), 443)),
        ),
        (b'{"Err":{"os_code":-2,"message":"x"}}', ConnectErr(-2, "x")),
    ],
)
def test_every_response_form_decodes(payload: bytes, expected: object) -> None:
    assert decode_connect_response(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff",
        b"[]",
        b'{"host":"a.com"}',
        b'{"host":"a.com","port":0}',
        b'{"host":"a.com","port":65536}',
        b'{"host":"a.com","port":true}',
        b'{"host":"a.com","port":80.0}',
        b'{"host":"","port":80}',
        b'{"host":"a b","port":80}',
        b'{"host":"a\\u0000b","port":80}',
        b'{"host":"a.com","port":80,"report_peer":"yes"}',
        b'{"host":"a.com","host":"b.com","port":80}',
        b"[" * 100_000,
    ],
)
def test_bad_requests_are_refused_with_the_protocol_error(payload: bytes) -> None:
    with pytest.raises(EgressProtocolError):
        decode_connect_request(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'"Err"',
        b'"ok"',
        b'{"Ok":{}}',
        b'{"Ok":{"peer":"1.2.3.4"}}',
        b'{"Ok":{"peer":"1.2.3.4:0"}}',
        b'{"Ok":{"peer":"::1:80"}}',
        b'{"Ok":{"peer":"[1.2.3.4]:80"}}',
        b'{"Ok":{"peer":"name:80"}}',
        b'{"Err":{"os_code":1}}',
        b'{"Err":{"os_code":4294967296,"message":"x"}}',
        b'{"Ok":null,"Err":null}',
    ],
)
def test_bad_responses_are_refused_with_the_protocol_error(payload: bytes) -> None:
    with pytest.raises(EgressProtocolError):
        decode_connect_response(payload)


def test_frames_split_from_a_stream() -> None:
    stream = ConnectOk().encode() + b"raw bytes follow"
    assert split_egress_frame(stream[:1]) is None
    assert split_egress_frame(stream[:4]) is None
    payload, used = split_egress_frame(stream)  # type: ignore[misc]
    assert payload == b'"Ok"'
    assert stream[used:] == b"raw bytes follow"
    with pytest.raises(ValueError, match="at most 65535"):
        encode_egress_frame(b"x" * 65536)


def test_reading_a_frame_leaves_the_relayed_bytes_in_the_stream() -> None:
    async def run() -> tuple[bytes, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(ConnectOk().encode() + b"HTTP/1.1 200 OK\r\n")
        reader.feed_eof()
        return await read_egress_frame(reader), await reader.read()

    assert asyncio.run(run()) == (b'"Ok"', b"HTTP/1.1 200 OK\r\n")


def test_a_stream_that_ends_inside_a_frame_is_a_protocol_error() -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"\x10\x00{")
        reader.feed_eof()
        await read_egress_frame(reader)

    with pytest.raises(EgressProtocolError, match="1 of 16 bytes"):
        asyncio.run(run())
