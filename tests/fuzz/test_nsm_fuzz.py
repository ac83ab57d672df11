"""NSM messages and frames from the other side of a trust boundary: only our errors come out.

The emulator decodes requests written by enclave code; clients decode responses from a device or
a socket. Random bytes, mutations of valid messages and well-formed CBOR of the wrong shape must
all end in NsmMessageError (or NsmError for frames), never another exception or a hang.
"""

from __future__ import annotations

import socket

import cbor2
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.nsm_messages import (
    Attestation,
    AttestationResponse,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    DescribePCRResponse,
    ErrorCode,
    ErrorResponse,
    ExtendPCR,
    ExtendPCRResponse,
    GetRandom,
    GetRandomResponse,
    LockPCR,
    LockPCRResponse,
    LockPCRs,
    LockPCRsResponse,
    NsmMessageError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from enclave_runtime.transport.nsm import NsmError, read_frame

VALID_REQUESTS = [
    encode_request(message)
    for message in (
        DescribeNSM(),
        GetRandom(),
        DescribePCR(7),
        ExtendPCR(16, b"measurement"),
        LockPCR(31),
        LockPCRs(32),
        Attestation(),
        Attestation(user_data=b"u" * 40, nonce=b"n" * 32, public_key=b"k" * 97),
    )
]
VALID_RESPONSES = [
    encode_response(message)
    for message in (
        DescribePCRResponse(True, bytes(48)),
        ExtendPCRResponse(b"\x01" * 48),
        LockPCRResponse(),
        LockPCRsResponse(),
        DescribeNSMResponse(1, 0, 0, "i-0123-enc0123", 32, tuple(range(16)), "SHA384"),
        AttestationResponse(b"\x84" * 100),
        GetRandomResponse(b"\x07" * 256),
        ErrorResponse(ErrorCode.INVALID_INDEX),
    )
]


def decodes_only_to_our_error(decode, encode, data: bytes) -> None:
    try:
        message = decode(data)
    except NsmMessageError:
        return
    # Whatever decodes is a valid message: it re-encodes and reads back the same.
    assert decode(encode(message)) == message


@st.composite
def mutated(draw, valid: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(valid)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "insert" or not data:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "truncate":
            del data[position:]
        else:
            index = min(position, len(data) - 1)
            if action == "delete":
                del data[index]
            elif action == "flip":
                data[index] ^= 1 << draw(st.integers(0, 7))
            else:
                data[index] = draw(st.integers(0, 255))
    return bytes(data)


cbor_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.binary(max_size=64)
    | st.text(max_size=16)
    | st.sampled_from(["index", "data", "nonce", "user_data", "public_key", "SHA384", "Success"])
)
cbor_values = st.recursive(
    cbor_leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.integers(0, 40), children, max_size=4)
    ),
    max_leaves=12,
)
variant_names = st.sampled_from(
    [
        "DescribePCR",
        "ExtendPCR",
        "LockPCR",
        "LockPCRs",
        "DescribeNSM",
        "Attestation",
        "GetRandom",
        "Error",
        "Bogus",
    ]
)
field_names = st.sampled_from(
    [
        "index",
        "data",
        "range",
        "user_data",
        "nonce",
        "public_key",
        "lock",
        "document",
        "random",
        "version_major",
        "module_id",
        "max_pcrs",
        "locked_pcrs",
        "digest",
    ]
)
shaped_messages = variant_names | st.dictionaries(
    variant_names,
    cbor_values | st.dictionaries(field_names, cbor_values, max_size=7),
    min_size=1,
    max_size=2,
).map(cbor2.dumps)


@given(st.binary(max_size=512))
def test_random_bytes_as_request(data: bytes) -> None:
    decodes_only_to_our_error(decode_request, encode_request, data)


@given(st.binary(max_size=512))
def test_random_bytes_as_response(data: bytes) -> None:
    decodes_only_to_our_error(decode_response, encode_response, data)


@given(mutated(VALID_REQUESTS))
def test_mutated_requests(data: bytes) -> None:
    decodes_only_to_our_error(decode_request, encode_request, data)


@given(mutated(VALID_RESPONSES))
def test_mutated_responses(data: bytes) -> None:
    decodes_only_to_our_error(decode_response, encode_response, data)


@given(shaped_messages)
def test_well_formed_cbor_of_any_shape(data) -> None:
    if isinstance(data, str):
        data = cbor2.dumps(data)
    decodes_only_to_our_error(decode_request, encode_request, data)
    decodes_only_to_our_error(decode_response, encode_response, data)


@given(st.binary(max_size=64), st.integers(0, 16))
def test_frames_from_any_byte_stream(stream: bytes, max_size: int) -> None:
    sender, receiver = socket.socketpair()
    with sender, receiver:
        receiver.settimeout(5)
        sender.sendall(stream)
        sender.shutdown(socket.SHUT_WR)
        consumed = 0
        try:
            while (frame := read_frame(receiver, max_size)) is not None:
                assert len(frame) <= max_size
                consumed += 4 + len(frame)
        except NsmError:
            return
        assert consumed == len(stream)
