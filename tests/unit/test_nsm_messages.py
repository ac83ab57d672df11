"""NSM CBOR messages: byte-exact with serde_cbor, strict on what comes from the other side.

The golden bytes below were derived by hand from the rules of aws-nitro-enclaves-nsm-api
(src/api/mod.rs: serde enums, ``serde_bytes`` on byte fields, ``Option<ByteBuf>`` for the
attestation fields, ``BTreeSet<u16>`` for locked_pcrs) and serde_cbor 0.11's serializer
(src/ser.rs, ``to_vec`` = ``enum_as_map``, not packed):

- unit variant            -> text string of the variant name (major type 3: 0x60 + length)
- struct variant          -> map(1) 0xa1, variant name, map(n) 0xa0+n of "field": value, in
                             the order the fields are declared
- newtype variant (Error) -> 0xa1, "Error", the ErrorCode unit variant as text
- u16 -> shortest unsigned int: 0x00-0x17 inline, 0x18 xx up to 255, 0x19 xxxx above
- Vec<u8> via serde_bytes -> byte string 0x40 + length (0x58 ll when length > 23)
- None -> 0xf6; bool -> 0xf4/0xf5; BTreeSet<u16> -> definite array 0x80 + n, ascending

Text strings are annotated with their ASCII spelling.
"""

from __future__ import annotations

import cbor2
import pytest

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.nsm_messages import (
    REQUEST_MAX_SIZE,
    RESPONSE_FOR_REQUEST,
    Attestation,
    AttestationResponse,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    DescribePCRResponse,
    Digest,
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


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


MODULE_ID = "i-0918f6c55e3b61d89-enc018aa8b8e2285d13"

GOLDEN_REQUESTS = [
    # "DescribeNSM": text(11)
    (DescribeNSM(), h("6b 44657363726962654e534d")),
    # "GetRandom": text(9)
    (GetRandom(), h("69 47657452616e646f6d")),
    # {"DescribePCR": {"index": 3}}
    (DescribePCR(3), h("a1 6b 4465736372696265504352  a1 65 696e646578 03")),
    # {"ExtendPCR": {"index": 16, "data": h'010203'}}: index 16 = 0x10 inline, data bstr(3)
    (
        ExtendPCR(16, b"\x01\x02\x03"),
        h("a1 69 457874656e64504352  a2 65 696e646578 10  64 64617461 43 010203"),
    ),
    # {"LockPCR": {"index": 31}}: 31 > 23, so 0x18 0x1f
    (LockPCR(31), h("a1 67 4c6f636b504352  a1 65 696e646578 18 1f")),
    # {"LockPCRs": {"range": 32}}
    (LockPCRs(32), h("a1 68 4c6f636b50435273  a1 65 72616e6765 18 20")),
    # {"Attestation": {"user_data": null, "nonce": null, "public_key": null}}
    (
        Attestation(),
        h(
            "a1 6b 4174746573746174696f6e  a3"
            "  69 757365725f64617461 f6"
            "  65 6e6f6e6365 f6"
            "  6a 7075626c69635f6b6579 f6"
        ),
    ),
    # {"Attestation": {"user_data": h'75', "nonce": h'deadbeef', "public_key": bstr(24 x 0xaa)}}
    (
        Attestation(user_data=b"u", nonce=h("deadbeef"), public_key=b"\xaa" * 24),
        h(
            "a1 6b 4174746573746174696f6e  a3"
            "  69 757365725f64617461 41 75"
            "  65 6e6f6e6365 44 deadbeef"
            "  6a 7075626c69635f6b6579 58 18" + "aa" * 24
        ),
    ),
]

PCR0 = bytes(48)
GOLDEN_RESPONSES = [
    # {"DescribePCR": {"lock": true, "data": bstr(48 zero bytes)}}: 48 = 0x30 needs 0x58 0x30
    (
        DescribePCRResponse(lock=True, data=PCR0),
        h("a1 6b 4465736372696265504352  a2 64 6c6f636b f5  64 64617461 58 30" + "00" * 48),
    ),
    # {"ExtendPCR": {"data": bstr(48 x 0x11)}}
    (
        ExtendPCRResponse(b"\x11" * 48),
        h("a1 69 457874656e64504352  a1 64 64617461 58 30" + "11" * 48),
    ),
    # "LockPCR", "LockPCRs": unit variants
    (LockPCRResponse(), h("67 4c6f636b504352")),
    (LockPCRsResponse(), h("68 4c6f636b50435273")),
    # {"DescribeNSM": {version 1.0.0, module_id text(39), max_pcrs 32,
    #                  locked_pcrs [0..15] = array(16) 0x90, digest "SHA384"}}
    (
        DescribeNSMResponse(1, 0, 0, MODULE_ID, 32, tuple(range(16)), Digest.SHA384),
        h(
            "a1 6b 44657363726962654e534d  a7"
            "  6d 76657273696f6e5f6d616a6f72 01"
            "  6d 76657273696f6e5f6d696e6f72 00"
            "  6d 76657273696f6e5f7061746368 00"
            "  69 6d6f64756c655f6964 78 27"
            + MODULE_ID.encode().hex()
            + "  68 6d61785f70637273 18 20"
            "  6b 6c6f636b65645f70637273 90 000102030405060708090a0b0c0d0e0f"
            "  66 646967657374 66 534841333834"
        ),
    ),
    # {"Attestation": {"document": bstr(5)}}
    (
        AttestationResponse(h("8443a10126")),
        h("a1 6b 4174746573746174696f6e  a1 68 646f63756d656e74 45 8443a10126"),
    ),
    # {"GetRandom": {"random": bstr(4)}}
    (
        GetRandomResponse(h("01020304")),
        h("a1 69 47657452616e646f6d  a1 66 72616e646f6d 44 01020304"),
    ),
    # {"Error": "ReadOnlyIndex"}: newtype variant holding a unit variant
    (ErrorResponse(ErrorCode.READ_ONLY_INDEX), h("a1 65 4572726f72 6d 526561644f6e6c79496e646578")),
]


@pytest.mark.parametrize(("request_", "wire"), GOLDEN_REQUESTS)
def test_requests_encode_like_serde_cbor_and_round_trip(request_, wire):
    assert encode_request(request_) == wire
    assert decode_request(wire) == request_


@pytest.mark.parametrize(("response", "wire"), GOLDEN_RESPONSES)
def test_responses_encode_like_serde_cbor_and_round_trip(response, wire):
    assert encode_response(response) == wire
    assert decode_response(wire) == response


def test_every_variant_has_a_golden_vector():
    assert {type(m) for m, _ in GOLDEN_REQUESTS} == set(RESPONSE_FOR_REQUEST)
    assert {type(m) for m, _ in GOLDEN_RESPONSES} == set(RESPONSE_FOR_REQUEST.values()) | {
        ErrorResponse
    }


def test_every_error_code_round_trips():
    for code in ErrorCode:
        assert decode_response(encode_response(ErrorResponse(code))) == ErrorResponse(code)


def test_real_attestation_document_travels_unchanged(vectors_dir):
    document = (vectors_dir / "evervault-valid-attestation-doc.cbor").read_bytes()
    wire = encode_response(AttestationResponse(document))
    # 4748-byte document: bstr header 0x59 0x128c
    assert wire[:26] == h("a1 6b 4174746573746174696f6e a1 68 646f63756d656e74 59 128c")
    assert wire[26:] == document
    assert decode_response(wire).document == document


def test_locked_pcrs_are_a_sorted_set_like_btreeset():
    described = DescribeNSMResponse(1, 0, 0, "m", 32, [15, 0, 3, 0], "SHA384")
    assert described.locked_pcrs == (0, 3, 15)
    assert described.digest is Digest.SHA384
    assert cbor2.loads(encode_response(described))["DescribeNSM"]["locked_pcrs"] == [0, 3, 15]


def test_decoding_accepts_what_serde_accepts():
    # Fields in another order, missing Option fields (serde: None), indefinite-length maps.
    reordered = cbor2.dumps({"ExtendPCR": {"data": b"x", "index": 20}})
    assert decode_request(reordered) == ExtendPCR(20, b"x")
    assert decode_request(cbor2.dumps({"Attestation": {"nonce": b"n"}})) == Attestation(nonce=b"n")
    assert decode_request(cbor2.dumps({"Attestation": {}})) == Attestation()
    indefinite = h("bf 6b 4465736372696265504352 bf 65 696e646578 05 ff ff")
    assert decode_request(indefinite) == DescribePCR(5)


def expect_error(data: bytes, *, request: bool = True) -> NsmMessageError:
    decode = decode_request if request else decode_response
    with pytest.raises(NsmMessageError) as caught:
        decode(data)
    assert isinstance(caught.value, FormatError)
    return caught.value


@pytest.mark.parametrize(
    ("body", "field", "code", "words"),
    [
        ({"DescribePCR": {"index": 32}}, "DescribePCR.index", ErrorCode.INVALID_INDEX, "0..31"),
        ({"LockPCR": {"index": 0x10000}}, "LockPCR.index", ErrorCode.INVALID_ARGUMENT, "16 bits"),
        ({"LockPCRs": {"range": 33}}, "LockPCRs.range", ErrorCode.INVALID_INDEX, "0..32"),
        ({"DescribePCR": {"index": -1}}, "DescribePCR.index", ErrorCode.INVALID_ARGUMENT, "16"),
        ({"DescribePCR": {"index": "3"}}, "DescribePCR.index", ErrorCode.INVALID_ARGUMENT, "str"),
        ({"DescribePCR": {"index": True}}, "DescribePCR.index", ErrorCode.INVALID_ARGUMENT, "bool"),
        # serde_bytes fields are byte strings, never arrays of integers
        ({"ExtendPCR": {"index": 16, "data": [1, 2]}}, "ExtendPCR.data", None, "byte string"),
        ({"Attestation": {"nonce": "abc"}}, "Attestation.nonce", None, "byte string"),
        (
            {"Attestation": {"user_data": bytes(1025)}},
            "Attestation.user_data",
            ErrorCode.INPUT_TOO_LARGE,
            "1025 bytes, at most 1024",
        ),
        ({"ExtendPCR": {"index": 16}}, "ExtendPCR.data", None, "missing field(s) data"),
        ({"DescribePCR": {"index": 1, "idx": 2}}, "DescribePCR", None, "'idx'"),
        ({"DescribePCR": [1]}, "DescribePCR", None, "must be a map"),
        ({"DescribeNSM": None}, "DescribeNSM", None, "sent as the text"),
        ({"Frobnicate": {}}, "Frobnicate", None, "unknown NSM request"),
    ],
)
def test_invalid_requests_name_the_field(body, field, code, words):
    err = expect_error(cbor2.dumps(body))
    assert err.field == field
    assert words in str(err)
    if code is not None:
        assert err.code is code


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (b"", "not valid CBOR"),
        (h("a1 6b 4465736372696265504352"), "not valid CBOR"),  # truncated
        (h("6b 44657363726962654e534d 00"), "1 bytes after its CBOR item (offset 12)"),
        (cbor2.dumps(["DescribeNSM"]), "got list"),
        (cbor2.dumps({"DescribePCR": {"index": 1}, "LockPCR": {"index": 1}}), "map of 2"),
        (cbor2.dumps({1: {"index": 1}}), "one-entry map"),
        (cbor2.dumps("ExtendPCR"), "needs a map of its fields (index, data)"),
    ],
)
def test_malformed_requests_are_refused(wire, words):
    assert words in str(expect_error(wire))


def test_oversized_request_bytes_are_refused_before_parsing():
    err = expect_error(bytes(REQUEST_MAX_SIZE + 1))
    assert err.code is ErrorCode.INPUT_TOO_LARGE
    assert "4097 bytes" in str(err)


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"DescribePCR": {"lock": 1, "data": PCR0}}, "DescribePCR.lock", "boolean"),
        ({"DescribePCR": {"lock": False, "data": bytes(47)}}, "DescribePCR.data", "47"),
        ({"ExtendPCR": {"data": b""}}, "ExtendPCR.data", "32, 48 or 64"),
        ({"GetRandom": {"random": b""}}, "GetRandom.random", "empty"),
        ({"Attestation": {"document": b""}}, "Attestation.document", "empty"),
        ({"Error": "Oops"}, "Error.code", "'Oops' is not one of Success"),
        ({"Error": 3}, "Error.code", "text string"),
        ({"LockPCR": None}, "LockPCR", "sent as the text"),
    ],
)
def test_invalid_responses_name_the_field(body, field, words):
    err = expect_error(cbor2.dumps(body), request=False)
    assert err.field == field
    assert words in str(err)


def test_describe_nsm_response_fields_are_checked():
    good = cbor2.loads(GOLDEN_RESPONSES[4][1])
    for name, bad, words in [
        ("digest", "MD5", "'MD5' is not one of SHA256, SHA384, SHA512"),
        ("locked_pcrs", [0, 40], "40 is out of range"),
        ("locked_pcrs", 7, "array of PCR indexes"),
        ("module_id", b"i-0", "text string"),
        ("max_pcrs", 70000, "16 bits"),
    ]:
        body = dict(good["DescribeNSM"], **{name: bad})
        err = expect_error(cbor2.dumps({"DescribeNSM": body}), request=False)
        assert err.field == f"DescribeNSM.{name}"
        assert words in str(err)


def test_error_response_needs_its_code():
    assert "Error" in str(expect_error(cbor2.dumps("Error"), request=False))


def test_python_callers_get_the_same_checks():
    with pytest.raises(NsmMessageError, match=r"DescribePCR\.index: 32 is out of range"):
        DescribePCR(32)
    with pytest.raises(NsmMessageError, match=r"Attestation\.public_key: is 2000 bytes"):
        Attestation(public_key=bytes(2000))
    assert ExtendPCR(16, bytearray(b"ab")).data == b"ab"


def test_encoding_refuses_messages_over_the_driver_limits():
    with pytest.raises(NsmMessageError, match="more than the 4096 bytes") as caught:
        encode_request(ExtendPCR(16, bytes(5000)))
    assert caught.value.code is ErrorCode.INPUT_TOO_LARGE
    with pytest.raises(NsmMessageError, match="more than the 12288 bytes"):
        encode_response(AttestationResponse(bytes(0x3000)))


def test_encoding_refuses_the_wrong_kind_of_message():
    with pytest.raises(NsmMessageError, match="cannot encode LockPCRResponse as an NSM request"):
        encode_request(LockPCRResponse())
    with pytest.raises(NsmMessageError, match="cannot encode GetRandom as an NSM response"):
        encode_response(GetRandom())
