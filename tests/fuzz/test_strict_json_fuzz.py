"""formats/strict_json: what json.loads reads, minus duplicate keys and non-finite constants."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats import strict_json

VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(VALUES)
def test_valid_json_reads_as_json_loads_reads_it(value: object) -> None:
    text = json.dumps(value)
    assert strict_json.loads(text) == json.loads(text)


@given(st.text(), VALUES, VALUES)
def test_a_key_given_twice_is_refused_at_any_depth(key: str, first: object, second: object) -> None:
    inner = f"{{{json.dumps(key)}: {json.dumps(first)}, {json.dumps(key)}: {json.dumps(second)}}}"
    with pytest.raises(ValueError, match=r"duplicate key .*appears twice"):
        strict_json.loads(f'{{"outer": [{inner}]}}')


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_constants_are_refused(constant: str) -> None:
    with pytest.raises(ValueError, match="is not a JSON number"):
        strict_json.loads(f'{{"x": {constant}}}')


@given(st.binary(max_size=200))
def test_arbitrary_text_decodes_or_raises_value_error_only(data: bytes) -> None:
    with contextlib.suppress(ValueError, RecursionError):
        strict_json.loads(data.decode("utf-8", errors="replace"))
