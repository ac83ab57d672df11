"""The duplicate-key walk (formats/cbor_maps.py) against cbor2, on generated and random input."""

from __future__ import annotations

import contextlib
import inspect
import io

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.cbor_maps import DuplicateKeyError, reject_duplicate_keys

pytestmark = pytest.mark.security

scalars = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)
keys = st.one_of(st.integers(min_value=-1000, max_value=1000), st.text(max_size=4))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)
SUPPORTS_STRICT = "allow_duplicate_keys" in (inspect.signature(cbor2.CBORDecoder).parameters)


@given(values)
def test_what_cbor2_encodes_passes(value: object) -> None:
    reject_duplicate_keys(cbor2.dumps(value))


@given(st.dictionaries(keys, values, min_size=1, max_size=4), st.data())
def test_a_repeated_key_is_found_wherever_it_is_nested(mapping: dict, data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(mapping, key=repr)))
    body = cbor2.dumps(mapping)
    assert len(mapping) < 23  # a one-byte map head: count in the low bits
    doubled = bytes([body[0] + 1]) + body[1:] + cbor2.dumps(key) + cbor2.dumps(None)
    wrapped = cbor2.dumps([1, {"outer": cbor2.CBORSimpleValue(0)}])
    item = wrapped.replace(cbor2.dumps(cbor2.CBORSimpleValue(0)), doubled, 1)
    with pytest.raises(DuplicateKeyError, match="appears twice"):
        reject_duplicate_keys(item)


@given(st.binary(max_size=64))
def test_random_bytes_raise_only_our_error(data: bytes) -> None:
    with contextlib.suppress(DuplicateKeyError):
        reject_duplicate_keys(data)


@pytest.mark.skipif(not SUPPORTS_STRICT, reason="cbor2 < 6.1 has no allow_duplicate_keys")
@given(st.binary(max_size=64))
def test_agrees_with_cbor2_strict_mode_where_cbor2_decodes(data: bytes) -> None:
    stream = io.BytesIO(data)
    try:
        cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORError, ValueError, TypeError, LookupError, OverflowError, RecursionError):
        return  # only items cbor2 reads are compared
    if stream.tell() != len(data):
        return  # trailing bytes: the walk refuses them, cbor2.loads ignores them
    try:
        cbor2.loads(data, allow_duplicate_keys=False)
        strict_ok = True
    except cbor2.CBORDecodeError:
        strict_ok = False
    try:
        reject_duplicate_keys(data)
        ours_ok = True
    except DuplicateKeyError:
        ours_ok = False
    assert ours_ok == strict_ok
