"""Status lines come from inside the enclave: whatever arrives, only StatusLineError comes out."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.protocol import (
    STATUS_LINE_MAX,
    StatusExited,
    StatusFatal,
    StatusLineError,
    StatusRunning,
    StatusSignaled,
    decode_status_line,
    encode_status_line,
)

VALID_LINES = [
    encode_status_line(status)
    for status in (
        StatusRunning(),
        StatusExited(0),
        StatusExited(137),
        StatusSignaled(15),
        StatusSignaled(40),
        StatusFatal("cannot read /etc/enclaver/enclaver.yaml"),
    )
] + [b'{ "status": "signaled", "signal": "SIGKILL" }\n']

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _decode_or_refuse(line: bytes) -> None:
    with contextlib.suppress(StatusLineError):
        decode_status_line(line)


@given(st.binary(max_size=2 * STATUS_LINE_MAX))
def test_random_bytes(line: bytes) -> None:
    _decode_or_refuse(line)


@given(
    st.sampled_from(VALID_LINES),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_valid_lines(line: bytes, flips: list[tuple[int, int]]) -> None:
    mutated = bytearray(line)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    _decode_or_refuse(bytes(mutated))


@given(
    st.dictionaries(
        st.sampled_from(["status", "code", "signal", "name", "error", "extra"]),
        JSON_VALUES | st.sampled_from(["running", "exited", "signaled", "fatal", "SIGTERM"]),
    )
)
def test_well_formed_json_of_any_shape(document: dict[str, object]) -> None:
    _decode_or_refuse(json.dumps(document).encode())


@given(st.text(max_size=3000))
def test_any_fatal_error_encodes_within_the_limit_and_reads_back(error: str) -> None:
    line = encode_status_line(StatusFatal(error))
    assert len(line) <= STATUS_LINE_MAX and line.count(b"\n") == 1
    decoded = decode_status_line(line)
    assert isinstance(decoded, StatusFatal)
    if decoded.error != error:
        assert decoded.error.endswith("…") and error.startswith(decoded.error[:-1])
