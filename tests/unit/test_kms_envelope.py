"""CiphertextForRecipient: KMS's CMS envelope, opened fail-closed (docs/kms.md)."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_runtime.formats.kms_envelope import (
    EnvelopeError,
    open_envelope,
    parse_envelope,
    seal_envelope,
    subject_key_identifier,
)

DATA = Path(__file__).parent / "data" / "kms"


def _b64(name: str) -> bytes:
    return base64.b64decode((DATA / name).read_text())


# enclaver's published vector (src/proxy/pkcs7.rs): a CiphertextForRecipient captured from KMS
# and the recipient's private key; the plaintext is "Hello, World".
VECTOR = _b64("enclaver-ciphertext-for-recipient.b64")
VECTOR_KEY = load_der_private_key(_b64("enclaver-recipient-key.pk8.b64"), None)
assert isinstance(VECTOR_KEY, rsa.RSAPrivateKey)


def test_opens_kms_captured_envelope() -> None:
    assert open_envelope(VECTOR, VECTOR_KEY) == b"Hello, World"


def test_kms_envelope_is_ber_with_indefinite_lengths() -> None:
    assert VECTOR[:2] == b"\x30\x80"
    parsed = parse_envelope(VECTOR)
    assert parsed.recipient_key_id == subject_key_identifier(VECTOR_KEY.public_key())


def test_sealed_envelope_has_kms_layout() -> None:
    sealed = seal_envelope(b"Hello, World", VECTOR_KEY.public_key())
    # Same structure byte for byte up to the random parts: header, recipient id, algorithms.
    assert sealed[:100] == VECTOR[:100]
    assert len(sealed) == len(VECTOR)
    assert open_envelope(sealed, VECTOR_KEY) == b"Hello, World"


def test_refuses_envelope_for_another_key() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(EnvelopeError, match="for another key"):
        open_envelope(VECTOR, other)


def _mutated(change: Callable[[cms.ContentInfo], None]) -> bytes:
    info = cms.ContentInfo.load(VECTOR)
    change(info)
    return info.dump(force=True)


def _recipient(info: cms.ContentInfo) -> cms.KeyTransRecipientInfo:
    return info["content"]["recipient_infos"][0].chosen


def _oaep(info: cms.ContentInfo):
    return _recipient(info)["key_encryption_algorithm"]["parameters"]


def _content_algorithm(info: cms.ContentInfo):
    return info["content"]["encrypted_content_info"]["content_encryption_algorithm"]


def _set(getter: Callable, key: str, value: object) -> Callable[[cms.ContentInfo], None]:
    def change(info: cms.ContentInfo) -> None:
        getter(info)[key] = value

    return change


def _two_recipients(info: cms.ContentInfo) -> None:
    recipients = info["content"]["recipient_infos"]
    info["content"]["recipient_infos"] = [recipients[0], recipients[0]]


MUTATIONS = {
    "EnvelopedData.version": _set(lambda i: i["content"], "version", "v0"),
    "recipientInfos count": _two_recipients,
    "KeyTransRecipientInfo.version": _set(_recipient, "version", "v0"),
    "keyEncryptionAlgorithm": _set(
        _recipient, "key_encryption_algorithm", {"algorithm": "rsaes_pkcs1v15"}
    ),
    "hashFunc": _set(_oaep, "hash_algorithm", {"algorithm": "sha1"}),
    "MGF1 hash": _set(
        _oaep, "mask_gen_algorithm", {"algorithm": "mgf1", "parameters": {"algorithm": "sha1"}}
    ),
    "label": _set(
        _oaep, "p_source_algorithm", {"algorithm": "p_specified", "parameters": b"label"}
    ),
    "contentEncryptionAlgorithm": _set(_content_algorithm, "algorithm", "aes128_cbc"),
    "IV": _set(_content_algorithm, "parameters", b"\x00" * 8),
    "EncryptedContentInfo.contentType": _set(
        lambda i: i["content"]["encrypted_content_info"], "content_type", "signed_data"
    ),
    "for another key": _set(
        _recipient,
        "rid",
        cms.RecipientIdentifier(name="subject_key_identifier", value=b"\x01" * 32),
    ),
}


def test_mutations_reencode_to_an_openable_envelope_when_unchanged() -> None:
    """The DER re-encoding used by the mutations is itself accepted (so each refusal below is
    caused by its mutation, not by the re-encoding)."""
    assert open_envelope(_mutated(lambda info: None), VECTOR_KEY) == b"Hello, World"


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_refuses_each_deviation(field: str) -> None:
    with pytest.raises(EnvelopeError, match=field):
        open_envelope(_mutated(MUTATIONS[field]), VECTOR_KEY)


def test_refuses_wrong_content_type() -> None:
    enveloped_oid = bytes.fromhex("2a864886f70d010703")
    changed = VECTOR.replace(enveloped_oid, bytes.fromhex("2a864886f70d010702"), 1)
    with pytest.raises(EnvelopeError, match="ContentInfo"):
        open_envelope(changed, VECTOR_KEY)


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00", b"\x30\x00"])
def test_refuses_trailing_bytes(extra: bytes) -> None:
    with pytest.raises(EnvelopeError, match="not valid BER CMS"):
        open_envelope(VECTOR + extra, VECTOR_KEY)


def test_refuses_truncation() -> None:
    for cut in (1, 2, 11, len(VECTOR) // 2):
        with pytest.raises(EnvelopeError):
            open_envelope(VECTOR[:-cut], VECTOR_KEY)


def test_refuses_oversized_input() -> None:
    with pytest.raises(EnvelopeError, match="more than"):
        parse_envelope(b"\x30\x80" + b"\x00" * 70000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_fail_only_with_envelope_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        parse_envelope(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(VECTOR) - 1), st.integers(1, 255))
def test_corrupted_vector_fails_closed(position: int, flip: int) -> None:
    corrupted = bytearray(VECTOR)
    corrupted[position] ^= flip
    try:
        open_envelope(bytes(corrupted), VECTOR_KEY)
    except EnvelopeError:
        return
    # CBC has no integrity: a flip in the IV or the encrypted content can still unpad (KMS's
    # envelope is not authenticated either). A flip anywhere else must be refused.
    parts = parse_envelope(VECTOR)
    unauthenticated = [
        range(VECTOR.index(part), VECTOR.index(part) + len(part))
        for part in (parts.iv, parts.encrypted_content)
    ]
    assert any(position in span for span in unauthenticated)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=4096))
def test_seal_then_open_round_trips(plaintext: bytes) -> None:
    assert open_envelope(seal_envelope(plaintext, VECTOR_KEY.public_key()), VECTOR_KEY) == (
        plaintext
    )
