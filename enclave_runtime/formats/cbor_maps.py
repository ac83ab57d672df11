"""Refuse CBOR maps that repeat a key: a signed structure must have one meaning.

cbor2 keeps the last of two equal keys and, before 6.1 (the last release for Python 3.9 is
5.9), has no switch to refuse them. This walk reads the item heads (RFC 8949 §3) only to find
where each map key starts and ends; the keys themselves are decoded by cbor2, so equal keys
written differently (``0x01`` and ``0x1801``) still count as equal. See docs/attestation.md.
"""

from __future__ import annotations

import cbor2

MAX_DEPTH = 64
BREAK = 0xFF
_ARRAY, _MAP, _TAG, _SIMPLE = 4, 5, 6, 7
_ARGUMENT_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}


class DuplicateKeyError(ValueError):
    """A map with a repeated key, or bytes that are not well-formed CBOR."""


def reject_duplicate_keys(data: bytes) -> None:
    """Raise :class:`DuplicateKeyError` if any map in the CBOR item ``data`` repeats a key."""
    end = _skip(bytes(data), 0, 0)
    if end != len(data):
        raise DuplicateKeyError(f"{len(data) - end} bytes after the CBOR item")


def _head(data: bytes, offset: int) -> tuple[int, int | None, int]:
    """(major type, argument or None for indefinite length, offset after the head)."""
    if offset >= len(data):
        raise DuplicateKeyError(f"truncated CBOR at offset {offset}")
    initial = data[offset]
    major, info = initial >> 5, initial & 0x1F
    if info < 24:
        return major, info, offset + 1
    if info == 31:
        return major, None, offset + 1
    size = _ARGUMENT_BYTES.get(info)
    if size is None or offset + 1 + size > len(data):
        raise DuplicateKeyError(f"malformed CBOR head 0x{initial:02x} at offset {offset}")
    return major, int.from_bytes(data[offset + 1 : offset + 1 + size], "big"), offset + 1 + size


def _skip(data: bytes, offset: int, depth: int) -> int:
    """The offset after the item at ``offset``, checking every map inside it."""
    if depth > MAX_DEPTH:
        raise DuplicateKeyError(f"CBOR nested deeper than {MAX_DEPTH} levels")
    major, argument, position = _head(data, offset)
    if major == _TAG:
        return _skip(data, position, depth + 1)
    if major == _ARRAY:
        return _skip_entries(data, position, argument, depth, pairs=False)
    if major == _MAP:
        return _skip_entries(data, position, argument, depth, pairs=True)
    if major in (2, 3):  # byte and text strings
        if argument is not None:
            return _within(data, position + argument)
        return _skip_entries(data, position, None, depth, pairs=False)
    if argument is None and major != _SIMPLE:
        raise DuplicateKeyError(f"indefinite length on major type {major} at offset {offset}")
    return position  # integers, simple values and floats: the head is the whole item


def _skip_entries(data: bytes, position: int, count: int | None, depth: int, pairs: bool) -> int:
    seen: set[object] = set()
    index = 0
    while count is None or index < count:
        if count is None and position < len(data) and data[position] == BREAK:
            return position + 1
        if not pairs:
            position = _skip(data, position, depth + 1)
        else:
            key_end = _skip(data, position, depth + 1)
            _remember(seen, data[position:key_end], position)
            position = _skip(data, key_end, depth + 1)
        index += 1
    return position


def _remember(seen: set[object], key_bytes: bytes, offset: int) -> None:
    try:
        key = cbor2.loads(key_bytes)
        # The type is part of the identity: CBOR's true and 1 are different keys, Python's not.
        marker = (type(key).__name__, key)
        fresh = marker not in seen
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise DuplicateKeyError(f"map key at offset {offset} is not a usable key ({err})") from err
    if not fresh:
        raise DuplicateKeyError(f"map key {key!r:.40} at offset {offset} appears twice")
    seen.add(marker)


def _within(data: bytes, end: int) -> int:
    if end > len(data):
        raise DuplicateKeyError(f"truncated CBOR: an item needs {end - len(data)} more bytes")
    return end
