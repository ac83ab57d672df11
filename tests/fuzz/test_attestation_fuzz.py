"""Attestation documents come from the other side of a trust boundary: whatever bytes arrive,
parsing and verification may only fail with AttestationError, never crash or hang, and nothing
that alters the signed content may verify."""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.attestation import (
    AttestationError,
    parse_attestation_document,
    verify_attestation_document,
)
from enclave_runtime.formats.cose import decode_sign1
from tests.conftest import VECTORS_DIR

# (file, a time inside the document's certificate window)
VECTORS = (
    ("evervault-valid-attestation-doc.cbor", datetime(2023, 9, 18, 15, 0, tzinfo=timezone.utc)),
    (
        "evervault-beta-debug-mode-attestation-doc.cbor",
        datetime(2022, 10, 12, 15, 0, tzinfo=timezone.utc),
    ),
)


def _load(name: str) -> bytes:
    path = Path(VECTORS_DIR, name)
    if not path.is_file():
        pytest.fail(f"test vector {path} missing; clone the repo beside shared/")
    return path.read_bytes()


DOCUMENTS = tuple((_load(name), at) for name, at in VECTORS)


def _verify_or_reject(data: bytes, at: datetime) -> bytes | None:
    """The payload that verified, or None when AttestationError (the only allowed failure)."""
    try:
        return verify_attestation_document(data, at=at).document.envelope.payload
    except AttestationError:
        return None


def _signed_content(data: bytes) -> tuple[bytes, bytes]:
    envelope = decode_sign1(data)
    return envelope.protected, envelope.payload


@given(st.binary(max_size=6000))
def test_random_bytes_only_raise_attestation_error(data: bytes) -> None:
    with pytest.raises(AttestationError):
        parse_attestation_document(data)
    assert _verify_or_reject(data, DOCUMENTS[0][1]) is None


@given(
    st.sampled_from(DOCUMENTS),
    st.lists(
        st.tuples(
            st.sampled_from(("flip", "set", "insert", "delete")),
            st.integers(min_value=0),
            st.integers(min_value=0, max_value=255),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_mutated_real_documents_never_verify_altered_content(
    document: tuple[bytes, datetime], edits: list[tuple[str, int, int]]
) -> None:
    original, at = document
    data = bytearray(original)
    for kind, position, value in edits:
        where = position % (len(data) + 1)
        if kind == "insert":
            data[where:where] = bytes([value])
        elif where < len(data):
            if kind == "flip":
                data[where] ^= 1 << (value % 8)
            elif kind == "set":
                data[where] = value
            else:
                del data[where]
    payload = _verify_or_reject(bytes(data), at)
    # A re-encoding of the envelope (e.g. with the COSE tag) may verify; altered content never.
    if payload is not None:
        assert _signed_content(bytes(data)) == _signed_content(original)


@given(st.sampled_from(DOCUMENTS), st.integers(min_value=0))
def test_truncated_real_documents_are_rejected(document: tuple[bytes, datetime], cut: int) -> None:
    original, at = document
    assert _verify_or_reject(original[: cut % len(original)], at) is None


CBOR_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.binary(max_size=80)
    | st.text(max_size=20)
    | st.sampled_from([b"\x00" * 48, "SHA384", b"", -35]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-2, 40) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
FIELDS += ("public_key", "user_data", "nonce", "extra")


@given(st.sampled_from(DOCUMENTS), st.sampled_from(FIELDS), CBOR_VALUES | st.just(...))
def test_payload_with_a_field_replaced_parses_strictly_and_never_verifies(
    document: tuple[bytes, datetime], field: str, value: object
) -> None:
    original, at = document
    envelope = decode_sign1(original)
    fields = cbor2.loads(envelope.payload)
    if value is ...:
        fields.pop(field, None)
    else:
        fields[field] = value
    payload = cbor2.dumps(fields)
    tampered = cbor2.dumps([envelope.protected, {}, payload, envelope.signature])
    with contextlib.suppress(AttestationError):
        parse_attestation_document(tampered)
    if payload != envelope.payload:
        assert _verify_or_reject(tampered, at) is None
