"""Reading enclaver.yaml's YAML text into plain JSON-like data, with the line of every path.

YAML is read with YAML 1.2 core-schema scalars, as enclaver's serde_yaml reads it: ``Restart: no``
is the string "no" and ``port: 010`` is ten, where PyYAML's YAML 1.1 default would give false and
eight. Only JSON-compatible values are accepted, and duplicate keys are errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import yaml

from enclave_runtime.formats.manifest_model import (
    DocPath,
    ManifestError,
    _Finding,
    _issues,
    _one_line,
    _show,
)

# A manifest is a small hand-written file; these bounds keep hostile input (alias bombs,
# self-referencing anchors, megabytes of YAML) from costing more than a quick "no".
MAX_MANIFEST_BYTES = 1024 * 1024


_MAX_VALUES = 20_000


_MAX_DEPTH = 32


class _DocumentTooLarge(Exception):
    pass


_TOO_LARGE = (
    f"the document is too large or too deeply nested (more than {_MAX_VALUES} values once "
    f"aliases are expanded, or more than {_MAX_DEPTH} levels); a manifest is a small file"
)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars and only JSON-compatible types."""

    yaml_implicit_resolvers: ClassVar[dict[Any, Any]] = {}
    yaml_constructors: ClassVar[dict[Any, Any]] = {}


def _scalar_error(node: yaml.Node, what: str) -> yaml.constructor.ConstructorError:
    return yaml.constructor.ConstructorError(None, None, what, node.start_mark)


def _construct_bool(loader: _Yaml12Loader, node: yaml.ScalarNode) -> bool:
    text = loader.construct_scalar(node).lower()
    if text not in ("true", "false"):
        raise _scalar_error(node, f"{text[:20]!r} is not a boolean (true or false)")
    return text == "true"


def _construct_int(loader: _Yaml12Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    base = {"0x": 16, "0o": 8}.get(text[:2], 10)
    try:
        return int(text[2:] if base != 10 else text, base)
    except ValueError as err:
        raise _scalar_error(node, f"{text[:20]!r} is not a usable integer") from err


def _construct_float(loader: _Yaml12Loader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    try:
        return float(text.replace(".inf", "inf").replace(".nan", "nan"))
    except ValueError as err:
        raise _scalar_error(node, f"{text[:20]!r} is not a number") from err


def _reject_tag(_loader: _Yaml12Loader, node: yaml.Node) -> None:
    raise _scalar_error(
        node,
        f"unsupported YAML tag {node.tag!r}: a manifest holds only strings, numbers, "
        "booleans, null, lists and mappings",
    )


def _register_yaml12() -> None:
    core = "tag:yaml.org,2002:"
    resolvers = (
        ("null", r"(?:~|null|Null|NULL|)\Z", ["~", "n", "N", ""]),
        ("bool", r"(?:true|True|TRUE|false|False|FALSE)\Z", list("tTfF")),
        ("int", r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z", list("-+0123456789")),
        (
            "float",
            r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z",
            list("-+0123456789."),
        ),
        ("merge", r"<<\Z", ["<"]),
    )
    for tag, pattern, first in resolvers:
        _Yaml12Loader.add_implicit_resolver(core + tag, re.compile(pattern), first)
    safe = yaml.constructor.SafeConstructor
    constructors = {
        "null": safe.construct_yaml_null,
        "bool": _construct_bool,
        "int": _construct_int,
        "float": _construct_float,
        "str": safe.construct_yaml_str,
        "seq": safe.construct_yaml_seq,
        "map": safe.construct_yaml_map,
    }
    for tag, constructor in constructors.items():
        _Yaml12Loader.add_constructor(core + tag, constructor)
    _Yaml12Loader.add_constructor(None, _reject_tag)


_register_yaml12()


def _read_yaml(text: str | bytes) -> tuple[Any, dict[DocPath, int], list[_Finding]]:
    if len(text) > MAX_MANIFEST_BYTES:
        message = (
            f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes; a manifest is a small file"
        )
        return None, {}, [_Finding((), message)]
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            message = f"the manifest is not UTF-8 text (invalid byte at offset {err.start})"
            return None, {}, [_Finding((), message)]
    loader: _Yaml12Loader | None = None
    try:
        loader = _Yaml12Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None, {}, []
        lines, findings = _index_nodes(node)
        return loader.construct_document(node), lines, findings
    except yaml.YAMLError as err:
        return None, {}, [_yaml_finding(err, text)]
    except _DocumentTooLarge:
        return None, {}, [_Finding((), _TOO_LARGE)]
    except RecursionError:
        return None, {}, [_Finding((), _TOO_LARGE)]
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_finding(err: yaml.YAMLError, text: str) -> _Finding:
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        character = f"#x{err.character:04x}" if isinstance(err.character, int) else "a byte"
        message = f"invalid YAML at line {line}: {err.reason} (character {character})"
        return _Finding((), message, line=line)
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return _Finding((), f"invalid YAML: {_one_line(str(err))}")
    problem = _one_line(getattr(err, "problem", None) or "syntax error")
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        context = f"{context}; see line {context_mark.line + 1}, column {context_mark.column + 1}"
    detail = f"{problem} ({_one_line(context)})" if context else problem
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return _Finding((), f"invalid YAML at {where}: {detail}", line=mark.line + 1)


def _index_nodes(root: yaml.Node) -> tuple[dict[DocPath, int], list[_Finding]]:
    """Line of every path, and duplicate keys (which PyYAML would silently let win)."""
    lines: dict[DocPath, int] = {}
    findings: list[_Finding] = []
    pending: list[tuple[DocPath, yaml.Node]] = [((), root)]
    visited = 0
    while pending:
        path, node = pending.pop()
        visited += 1
        if visited > _MAX_VALUES or len(path) > _MAX_DEPTH:
            raise _DocumentTooLarge
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            pending.extend(_mapping_children(path, node, findings))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(((*path, index), item) for index, item in enumerate(node.value))
    return lines, findings


def _mapping_children(
    path: DocPath, node: yaml.MappingNode, findings: list[_Finding]
) -> Iterator[tuple[DocPath, yaml.Node]]:
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        if key_node.tag == "tag:yaml.org,2002:merge":
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            yield from ((path, item) for item in merged)
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in first_line:
            message = f"duplicate key (first defined on line {first_line[key_node.value]})"
            findings.append(_Finding((*path, key_node.value), message, line=line))
        first_line.setdefault(key_node.value, line)
        yield (*path, key_node.value), value_node


# --- plain data -----------------------------------------------------------------------------------


def _document_or_raise(
    raw: Any, findings: list[_Finding], lines: dict[DocPath, int], source: str
) -> dict[str, Any]:
    """The document as plain JSON-like data; raises when nothing further can be checked."""
    if raw is None and not findings:
        needs = "version, name, target and sources.app"
        findings.append(_Finding((), f"the manifest is empty; it needs at least {needs}"))
    doc: Any = None
    if raw is not None:
        try:
            doc = _plain(raw, (), findings, [0])
        except _DocumentTooLarge:
            findings.append(_Finding((), _TOO_LARGE))
            raise ManifestError(_issues(findings, lines), source) from None
        if not isinstance(doc, dict):
            kind = _show(doc)
            message = f"the manifest must be a mapping of keys (version, name, ...), got {kind}"
            findings.append(_Finding((), message))
    if not isinstance(doc, dict):
        raise ManifestError(_issues(findings, lines), source)
    return doc


def _plain(value: Any, path: DocPath, findings: list[_Finding], count: list[int]) -> Any:
    """A copy with only dict/list/str/int/float/bool/None; string keys; bounded size."""
    count[0] += 1
    if count[0] > _MAX_VALUES or len(path) > _MAX_DEPTH:
        raise _DocumentTooLarge
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, str):
                copied[key] = _plain(item, (*path, key), findings, count)
            else:
                message = f"key {_show(key)} is not a string; quote it"
                findings.append(_Finding(path, message))
        return copied
    if isinstance(value, (list, tuple)):
        return [_plain(item, (*path, index), findings, count) for index, item in enumerate(value)]
    findings.append(_Finding(path, f"unsupported value of type {type(value).__name__}"))
    return None
