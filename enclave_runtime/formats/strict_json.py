"""JSON as serde reads it from a peer: no duplicate keys, no NaN or Infinity.

Python's :func:`json.loads` lets the last of two equal keys win and accepts ``NaN``,
``Infinity`` and ``-Infinity``; the Rust peers (enclave-init, enclaver's odyn and proxies) refuse
both, and so does every decoder of untrusted JSON here. Errors are :class:`ValueError` (as
:func:`json.loads` raises): callers wrap them in their protocol's error.
"""

from __future__ import annotations

import json
from typing import Any, Callable

_SHOWN_KEY = 80


def loads(
    text: str,
    *,
    parse_int: Callable[[str], Any] | None = None,
    parse_float: Callable[[str], Any] | None = None,
) -> Any:
    """``text`` decoded; ValueError for invalid JSON, a duplicate key or a non-finite constant."""
    return json.loads(
        text,
        object_pairs_hook=_unique_keys,
        parse_constant=_reject_constant,
        parse_int=parse_int,
        parse_float=parse_float,
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_quote(key)}: it appears twice")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _quote(key: str) -> str:
    """A peer-supplied key for an error message, bounded and JSON-escaped."""
    text = json.dumps(key, ensure_ascii=True)
    return text if len(text) <= _SHOWN_KEY else text[: _SHOWN_KEY - 3] + "..."
