"""The manifest reader on hostile input: a Manifest or a ManifestError, nothing else, quickly.

Manifests come from image builders and operators' repositories, and odyn reads the one baked into
the image; a malformed one must produce a readable error, never a traceback or a hang.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.manifest import ManifestError, load_manifest, parse_manifest

MANIFESTS = Path(__file__).resolve().parent.parent / "unit" / "data" / "manifests"
VALID_TEXTS = [
    (MANIFESTS / name).read_text(encoding="utf-8")
    for name in ("upstream-full.yaml", "extensions.yaml", "fork-aux-api.yaml")
]
VALID_DOCS = [
    load_manifest(MANIFESTS / name).to_dict() for name in ("upstream-full.yaml", "extensions.yaml")
]

YAML_PIECES = [
    "version: v1\n", "name: x\n", "target: t\n", "sources:\n", "  app: a\n", "ingress:\n",
    "  - listen_port: 8000\n", "- ", ": ", "\n", "  ", "{", "}", "[", "]", ",", "&a ", "*a",
    "<<: *a\n", "!!str ", "!!int ", "!!binary ", "!custom ", "? ", "|\n", ">\n", "'", '"', "#",
    "---\n", "...\n", "~", "null", "true", "no", "0x1F", "0o17", "1e400", ".nan", "-.inf",
    "17000", "65536", "services:\n", "  units:\n", "    web: {ExecStart: /w, Requires: [web]}\n",
    "egress:\n", "  allow: [a..b, '**', 10.0.0.0/40]\n", "aux_api: {}\n",
    "api: {listen_port: 65535}\n",
    "\t", "\x00", "\ufeff", "\u2028", "%YAML 1.2\n", "%TAG ! tag:x,2000:\n",
]  # fmt: skip

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["v1", "SIGTERM", "no", "/abs", "example.com", "A=1", "web"]),
    st.integers(min_value=0, max_value=70000),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=20,
)


def assert_manifest_or_manifest_error(value: Any) -> None:
    try:
        manifest = parse_manifest(value)
    except ManifestError as err:
        assert err.issues
        assert all("\n" not in str(issue) for issue in err.issues)
    else:
        assert parse_manifest(manifest.to_dict()) == manifest


@given(st.text(max_size=400))
def test_random_text(text: str) -> None:
    assert_manifest_or_manifest_error(text)


@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    assert_manifest_or_manifest_error(data)


@given(st.lists(st.sampled_from(YAML_PIECES), max_size=40))
def test_yaml_like_text(pieces: list[str]) -> None:
    assert_manifest_or_manifest_error("".join(pieces))


@given(
    st.sampled_from(VALID_TEXTS),
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "delete", "replace"]),
            st.floats(min_value=0, max_value=1),
            st.sampled_from([*YAML_PIECES, "x", "9", "-", ":", " "]),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_valid_text(text: str, edits: list[tuple[str, float, str]]) -> None:
    for operation, where, piece in edits:
        at = int(where * len(text))
        if operation == "insert":
            text = text[:at] + piece + text[at:]
        elif operation == "delete":
            text = text[:at] + text[at + len(piece) :]
        else:
            text = text[:at] + piece + text[at + len(piece) :]
    assert_manifest_or_manifest_error(text)


def _containers(value: Any, found: list[Any]) -> list[Any]:
    if isinstance(value, (dict, list)):
        found.append(value)
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            _containers(child, found)
    return found


@given(st.sampled_from(VALID_DOCS), st.data())
def test_mutated_valid_mapping(base: dict[str, Any], data: st.DataObject) -> None:
    doc = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        target = data.draw(st.sampled_from(_containers(doc, [])))
        if isinstance(target, dict) and target and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(sorted(target)))
            if data.draw(st.booleans()):
                del target[key]
            else:
                target[key] = data.draw(JSON_VALUES)
        elif isinstance(target, dict):
            target[data.draw(st.text(max_size=12))] = data.draw(JSON_VALUES)
        elif target:
            target[data.draw(st.integers(0, len(target) - 1))] = data.draw(JSON_VALUES)
        else:
            target.append(data.draw(JSON_VALUES))
    assert_manifest_or_manifest_error(doc)


@given(st.dictionaries(st.sampled_from([*VALID_DOCS[1], "x"]), JSON_VALUES, max_size=8))
def test_random_mapping(doc: dict[str, Any]) -> None:
    assert_manifest_or_manifest_error(doc)
