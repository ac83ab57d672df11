"""enclaver.yaml, the manifest (DESIGN §4.1): read it, check it, return typed settings.

Checking has two stages and reports everything both find in one :class:`ManifestError`: the
JSON Schema shipped beside this module (``data/manifest.schema.json``) fixes keys, shapes and
types; semantic checks then cover what a schema cannot say (unique ports, reserved vsock ports,
egress patterns, service references and cycles). The semantic checks read the raw document
defensively, so a type error in one place does not hide a port clash in another.

YAML is read with YAML 1.2 core-schema scalars, as enclaver's serde_yaml reads it: ``Restart: no``
is the string "no" and ``port: 010`` is ten, where PyYAML's YAML 1.1 default would give false and
eight. Only JSON-compatible values are accepted, and duplicate keys are errors.
"""

from __future__ import annotations

import copy
import difflib
import functools
import graphlib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Union

import jsonschema
import yaml

from enclave_runtime.errors import EnclaveOpsError, FormatError
from enclave_runtime.formats.kms_checks import kms_egress_findings
from enclave_runtime.formats.vsock_ports import INIT_CONTROL_PORT, PARENT_CID, RESERVED_PORT_NAMES

MANIFEST_VERSION = "v1"
# enclaver's run defaults when neither the command line nor the manifest gives resources.
DEFAULT_CPU_COUNT = 2
DEFAULT_MEMORY_MB = 4096
# enclaver's in-enclave HTTP egress proxy port.
DEFAULT_EGRESS_PROXY_PORT = 10000
# enclaver's SPIFFE Workload API address inside the enclave.
DEFAULT_SPIFFE_WORKLOAD_API_ADDR = "127.0.0.1:5000"
DEFAULT_SERVICES_DIRECTORY = "/etc/enclaver/services"
DEFAULT_SERVICES_LOG_DIRECTORY = "/var/log/enclave-services"
DEFAULT_MAX_LOG_SIZE = 1024 * 1024
DEFAULT_MAX_LOG_FILES = 5
DEFAULT_CONTROL_SOCKET = "/run/init.sock"
DEFAULT_ALLOWED_CIDS = (PARENT_CID,)
DEFAULT_LOG_BUFFER_SIZE = 128 * 1024
# enclave-init's unit defaults, plus a bounded stop for the keys EnclaveOps adds.
DEFAULT_RESTART = "no"
DEFAULT_RESTART_SEC = 5
DEFAULT_KILL_SIGNAL = "SIGTERM"
DEFAULT_TIMEOUT_STOP_SEC = 10

# A manifest is a small hand-written file; these bounds keep hostile input (alias bombs,
# self-referencing anchors, megabytes of YAML) from costing more than a quick "no".
MAX_MANIFEST_BYTES = 1024 * 1024
_MAX_VALUES = 20_000
_MAX_DEPTH = 32

_MAX_DOMAIN_LENGTH = 253
_MAX_LABEL_LENGTH = 63
_DOMAIN_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?\Z")
_DEPENDENCY_KEYS = ("Requires", "After", "Before", "RequiredBy")

PathPart = Union[str, int]
DocPath = tuple[PathPart, ...]


# --- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestIssue:
    """One problem: where (``ingress[1].listen_port``, empty for the whole file) and what."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(FormatError):
    """A manifest that is not valid; carries every problem found, one line each in ``str()``."""

    def __init__(self, issues: Iterable[ManifestIssue], source: str = "<manifest>") -> None:
        self.issues: tuple[ManifestIssue, ...] = tuple(issues)
        self.source = source
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.issues, self.source))

    @property
    def errors(self) -> list[tuple[str, str]]:
        """The problems as ``(path, message)`` pairs."""
        return [(issue.path, issue.message) for issue in self.issues]


class ManifestReadError(EnclaveOpsError):
    """The manifest file could not be read at all (missing, a directory, no permission)."""


# --- the typed manifest ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    app: str
    odyn: str | None = None
    sleeve: str | None = None


@dataclass(frozen=True)
class Signature:
    """Raw paths as written; ``Manifest.resolve_path`` makes them relative to the manifest."""

    certificate: str
    key: str


@dataclass(frozen=True)
class Defaults:
    cpu_count: int = DEFAULT_CPU_COUNT
    memory_mb: int = DEFAULT_MEMORY_MB


@dataclass(frozen=True)
class Tls:
    """Raw paths as written; ``Manifest.resolve_path`` makes them relative to the manifest."""

    key_file: str
    cert_file: str


@dataclass(frozen=True)
class Ingress:
    listen_port: int
    tls: Tls | None = None


@dataclass(frozen=True)
class Egress:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    proxy_port: int = DEFAULT_EGRESS_PROXY_PORT

    @property
    def enabled(self) -> bool:
        """As in enclaver: the egress proxy runs only when something is allowed."""
        return bool(self.allow)


@dataclass(frozen=True)
class KmsProxy:
    listen_port: int
    endpoints: tuple[tuple[str, str], ...] = ()

    def endpoint_for(self, region: str) -> str:
        """The configured endpoint for ``region``, else AWS's public one (as enclaver does)."""
        return dict(self.endpoints).get(region, f"kms.{region}.amazonaws.com")


@dataclass(frozen=True)
class Api:
    listen_port: int


@dataclass(frozen=True)
class AuxApi:
    listen_port: int


@dataclass(frozen=True)
class Spire:
    """Upstream enclaver's SPIFFE settings; the paths are inside the enclave, not resolved."""

    server_addr: str
    ca_cert: str
    trust_domain: str
    svid_dir: str
    workload_api_addr: str = DEFAULT_SPIFFE_WORKLOAD_API_ADDR


@dataclass(frozen=True)
class ServiceUnit:
    """One init service, with enclave-init's unit keys under Python names."""

    name: str
    exec_start: str
    environment: tuple[str, ...] = ()
    restart: str = DEFAULT_RESTART
    restart_sec: float = DEFAULT_RESTART_SEC
    working_directory: str | None = None
    enable: bool = True
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    required_by: tuple[str, ...] = ()
    user: str | int | None = None
    group: str | int | None = None
    timeout_start_sec: float | None = None
    kill_signal: str = DEFAULT_KILL_SIGNAL
    timeout_stop_sec: float = DEFAULT_TIMEOUT_STOP_SEC

    @property
    def environment_map(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.environment)


@dataclass(frozen=True)
class Services:
    directory: str = DEFAULT_SERVICES_DIRECTORY
    log_directory: str = DEFAULT_SERVICES_LOG_DIRECTORY
    max_log_size: int = DEFAULT_MAX_LOG_SIZE
    max_log_files: int = DEFAULT_MAX_LOG_FILES
    units: tuple[ServiceUnit, ...] = ()

    def unit(self, name: str) -> ServiceUnit:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise KeyError(name)

    def start_order(self) -> tuple[str, ...]:
        """Unit names in an order that honours Requires, After, Before and RequiredBy."""
        relations = {
            unit.name: {
                "Requires": unit.requires,
                "After": unit.after,
                "Before": unit.before,
                "RequiredBy": unit.required_by,
            }
            for unit in self.units
        }
        return _start_order(relations)


@dataclass(frozen=True)
class Control:
    unix_socket: str = DEFAULT_CONTROL_SOCKET
    vsock_port: int = INIT_CONTROL_PORT
    allowed_cids: tuple[int, ...] = DEFAULT_ALLOWED_CIDS


@dataclass(frozen=True)
class Runtime:
    log_buffer_size: int = DEFAULT_LOG_BUFFER_SIZE


@dataclass(frozen=True)
class Manifest:
    """A valid manifest with every default filled in; absent optional features are ``None``.

    ``source`` (where it came from) and ``base_dir`` (what relative paths are relative to) do
    not take part in equality: the same settings read from two places are the same manifest.
    """

    version: str
    name: str
    target: str
    sources: Sources
    signature: Signature | None = None
    defaults: Defaults = field(default_factory=Defaults)
    ingress: tuple[Ingress, ...] = ()
    egress: Egress | None = None
    kms_proxy: KmsProxy | None = None
    api: Api | None = None
    aux_api: AuxApi | None = None
    spire: Spire | None = None
    services: Services = field(default_factory=Services)
    control: Control = field(default_factory=Control)
    runtime: Runtime = field(default_factory=Runtime)
    source: str = field(default="<string>", compare=False)
    base_dir: Path | None = field(default=None, compare=False)

    def resolve_path(self, raw: str) -> Path:
        """A path from the manifest (signature, TLS files), relative to the manifest's directory.

        Manifests given as text or a mapping without ``base_dir`` resolve against the current
        directory, as enclaver does for a manifest read from stdin.
        """
        path = Path(raw)
        if path.is_absolute():
            return path
        return (self.base_dir if self.base_dir is not None else Path.cwd()) / path

    def to_dict(self) -> dict[str, Any]:
        """The manifest as enclaver.yaml keys, defaults included; parses back to an equal one."""
        return _manifest_to_dict(self)


# --- public entry points -----------------------------------------------------------------------


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and check the manifest at ``path``; relative paths in it resolve beside it."""
    file_path = Path(path)
    try:
        with file_path.open("rb") as stream:
            data = stream.read(MAX_MANIFEST_BYTES + 1)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ManifestReadError(
            f"cannot read manifest {file_path}: {reason}; check the path and its permissions"
        ) from err
    return parse_manifest(data, source=str(file_path), base_dir=file_path.absolute().parent)


def parse_manifest(
    text_or_mapping: str | bytes | Mapping[str, Any],
    source: str = "<string>",
    base_dir: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Check a manifest given as YAML text (or bytes) or as an already-parsed mapping.

    Raises :class:`ManifestError` listing every problem; returns the typed manifest otherwise.
    """
    if isinstance(text_or_mapping, Mapping):
        raw: Any = text_or_mapping
        lines: dict[DocPath, int] = {}
        findings: list[_Finding] = []
    elif isinstance(text_or_mapping, (str, bytes)):
        raw, lines, findings = _read_yaml(text_or_mapping)
    else:
        raise TypeError(f"expected YAML text or a mapping, got {type(text_or_mapping).__name__}")
    doc = _document_or_raise(raw, findings, lines, source)
    findings.extend(_schema_findings(doc))
    findings.extend(_semantic_findings(doc))
    if findings:
        raise ManifestError(_issues(findings, lines), source)
    return _build_manifest(doc, source, Path(base_dir) if base_dir is not None else None)


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    schema_file = (
        resources.files("enclave_runtime.formats").joinpath("data").joinpath("manifest.schema.json")
    )
    return json.loads(schema_file.read_text(encoding="utf-8"))


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of enclaver.yaml, as shipped; a copy the caller may keep."""
    return copy.deepcopy(_schema())


def format_path(parts: Iterable[PathPart]) -> str:
    """``("ingress", 1, "listen_port")`` -> ``ingress[1].listen_port``; odd keys are quoted."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_@-]+", part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text


def egress_rule_problem(entry: str) -> str | None:
    """Why ``entry`` is not a valid egress rule, or None when it is.

    A rule is an IP address or CIDR, or a domain pattern matched label by label from the right:
    ``*`` stands for exactly one label, a leftmost ``**`` for one or more.
    """
    if entry != entry.strip():
        return f"{_show(entry)} has leading or trailing whitespace"
    if not entry:
        return "is empty; give an IP address, a CIDR or a domain pattern"
    if _parses_as_network(entry):
        return None
    if _looks_like_ip(entry):
        return f"{_show(entry)} is not a valid IP address or CIDR"
    problem = _domain_pattern_problem(entry)
    return f"{_show(entry)} is not a valid domain pattern: {problem}" if problem else None


# --- reading YAML ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Finding:
    path: DocPath
    message: str
    at: DocPath | None = None  # where to look for a line number, when not ``path``
    line: int | None = None


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


def _one_line(text: str) -> str:
    return " ".join(text.split())


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


# --- plain data --------------------------------------------------------------------------------


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


def _show(value: Any) -> str:
    """A value as a message shows it: JSON-like, one line, short."""
    if isinstance(value, str):
        text = json.dumps(value[:48])
        return text if len(value) <= 48 else text[:-1] + '..."'
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _issues(findings: Iterable[_Finding], lines: Mapping[DocPath, int]) -> list[ManifestIssue]:
    issues: list[ManifestIssue] = []
    seen: set[tuple[str, str]] = set()
    for finding in findings:
        path = format_path(finding.path)
        if (path, finding.message) in seen:
            continue
        seen.add((path, finding.message))
        line = finding.line
        if line is None:
            line = _line_of(finding.at if finding.at is not None else finding.path, lines)
        issues.append(ManifestIssue(path, finding.message, line))
    issues.sort(key=lambda issue: issue.line if issue.line is not None else math.inf)
    return issues


def _line_of(path: DocPath, lines: Mapping[DocPath, int]) -> int | None:
    for length in range(len(path), -1, -1):
        if path[:length] in lines:
            return lines[path[:length]]
    return None


# --- schema ------------------------------------------------------------------------------------


def _is_integer(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(_checker: Any, instance: Any) -> bool:
    if isinstance(instance, bool):
        return False
    return isinstance(instance, int) or (isinstance(instance, float) and math.isfinite(instance))


def strict_validator(schema: Mapping[str, Any]) -> jsonschema.protocols.Validator:
    """A draft 2020-12 validator where, unlike plain JSON Schema, 8080.0 is not an integer and
    NaN is not a number of seconds; the manifest and unit files both validate with it."""
    base = jsonschema.Draft202012Validator
    types = base.TYPE_CHECKER.redefine_many({"integer": _is_integer, "number": _is_number})
    return jsonschema.validators.extend(base, type_checker=types)(schema)


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    return strict_validator(_schema())


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "a boolean (true or false)",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def _schema_findings(doc: dict[str, Any]) -> Iterator[_Finding]:
    for error in _validator().iter_errors(doc):
        yield from _translate(error)


def _translate(error: jsonschema.ValidationError) -> Iterator[_Finding]:
    path: DocPath = tuple(error.absolute_path)
    keyword = error.validator
    if "propertyNames" in error.absolute_schema_path:
        yield _Finding((*path, error.instance), error.schema["x-message"])
    elif keyword == "required":
        for key in error.validator_value:
            if key not in error.instance:
                yield _Finding((*path, key), "required key is missing", at=path)
    elif keyword == "additionalProperties":
        yield from _unknown_keys(path, error.instance, list(error.schema.get("properties", {})))
    else:
        yield _Finding(path, _value_message(error))


def _value_message(error: jsonschema.ValidationError) -> str:
    keyword, schema, got = error.validator, error.schema, _show(error.instance)
    if keyword == "type":
        wanted = error.validator_value
        names = [_TYPE_NAMES[name] for name in _as_list(wanted) if name != "null"]
        return f"expected {' or '.join(names)}, got {got}"
    if keyword == "const":
        return f"must be {_show(error.validator_value)}, got {got}"
    if keyword == "enum":
        return _enum_message(error.validator_value, error.instance)
    if "x-message" in schema:
        return f"{schema['x-message']}, got {got}"
    if keyword in ("minimum", "maximum") and "minimum" in schema and "maximum" in schema:
        return f"must be between {schema['minimum']} and {schema['maximum']}, got {got}"
    if keyword == "minimum":
        return f"must be at least {schema['minimum']}, got {got}"
    if keyword == "maximum":
        return f"must be at most {schema['maximum']}, got {got}"
    if keyword == "uniqueItems":
        return "must not list the same value twice"
    return _one_line(error.message)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _enum_message(allowed: Sequence[Any], got: Any) -> str:
    choices = [value for value in allowed if value is not None]
    message = f"must be one of {', '.join(_show(value) for value in choices)}; got {_show(got)}"
    return message + _did_you_mean(got, [str(value) for value in choices], quote=_show)


def _did_you_mean(word: Any, candidates: Sequence[str], quote: Any = repr) -> str:
    """A close match among ``candidates`` (typo or wrong case), quoted like the message."""
    if not isinstance(word, str):
        return ""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not match:
        lowered = {candidate.lower(): candidate for candidate in candidates}
        match = [lowered[word.lower()]] if word.lower() in lowered else []
    return f" (did you mean {quote(match[0])}?)" if match else ""


_UNKNOWN_KEY_HINTS = {
    "vsock_ports": (
        "the sparsity-xyz fork's vsock_ports is not supported: EnclaveOps keeps enclaver's "
        "fixed vsock ports (status 17000, app log 17001, egress 17002) so that every host and "
        "enclave side interoperates; remove the key"
    ),
}


def _unknown_keys(path: DocPath, instance: dict[str, Any], known: list[str]) -> Iterator[_Finding]:
    for key in instance:
        if key in known:
            continue
        where = "top-level key" if not path else "key"
        hint = _UNKNOWN_KEY_HINTS.get(key) if not path else None
        if hint:
            message = f"unknown {where} {key!r}: {hint}"
        else:
            suggestion = _did_you_mean(key, known)
            listing = f"; known keys: {', '.join(known)}" if not suggestion else ""
            message = f"unknown {where} {key!r}{suggestion}{listing}"
        yield _Finding(path, message, at=(*path, key))


# --- semantic checks ---------------------------------------------------------------------------
# These read the raw document and skip whatever has the wrong type: the schema reports that.


def _semantic_findings(doc: dict[str, Any]) -> Iterator[_Finding]:
    yield from _section_dependency_findings(doc)
    yield from _spire_findings(doc)
    yield from (_Finding(path, message) for path, message in kms_egress_findings(doc))
    yield from _port_clash_findings(doc)
    yield from _reserved_vsock_findings(doc)
    yield from _egress_rule_findings(doc)
    yield from _service_findings(doc)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _port(value: Any, highest: int = 65535) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= highest:
        return value
    return None


def _configured(doc: dict[str, Any], key: str) -> bool:
    """A section that is there: ``api: null`` is the same as no ``api`` at all."""
    return isinstance(doc.get(key), dict)


def _egress_enabled(doc: dict[str, Any]) -> bool:
    return bool(_items(_mapping(doc.get("egress")).get("allow")))


def _aux_api_default(doc: dict[str, Any]) -> int | None:
    """api.listen_port + 1 when aux_api is configured without a port (the fork's default)."""
    api_port = _port(_mapping(doc.get("api")).get("listen_port"))
    if not _configured(doc, "aux_api") or doc["aux_api"].get("listen_port") is not None:
        return None
    return api_port + 1 if api_port is not None else None


def _section_dependency_findings(doc: dict[str, Any]) -> Iterator[_Finding]:
    if _configured(doc, "kms_proxy") and not _egress_enabled(doc):
        yield _Finding(
            ("kms_proxy",),
            "requires egress: the KMS proxy reaches IMDS and KMS through the egress proxy; "
            "add egress.allow with 169.254.169.254 and kms.*.amazonaws.com",
        )
    if _configured(doc, "aux_api") and not _configured(doc, "api"):
        yield _Finding(
            ("aux_api",),
            "requires api: the aux API is served next to the API; add api.listen_port",
        )
    if _aux_api_default(doc) == 65536:
        yield _Finding(
            ("aux_api", "listen_port"),
            "defaults to api.listen_port + 1 = 65536, which is not a port; set it explicitly",
        )


def _spire_findings(doc: dict[str, Any]) -> Iterator[_Finding]:
    addr = _mapping(doc.get("spire")).get("workload_api_addr")
    if isinstance(addr, str) and addr and _socket_address_port(addr) is None:
        yield _Finding(
            ("spire", "workload_api_addr"),
            f"must be IP:PORT such as {DEFAULT_SPIFFE_WORKLOAD_API_ADDR}, got {_show(addr)}",
        )


def _socket_address_port(text: str) -> int | None:
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return _port(int(port)) if port.isdigit() and len(port) <= 5 else None


@dataclass(frozen=True)
class _Listener:
    """A TCP port something inside the enclave listens on."""

    path: DocPath
    port: int
    default: str = ""  # how the port was derived, when the manifest does not say it


# What an ingress port would expose to the outside if it targeted the runtime's own listeners;
# the aux API is the one meant to be exposed.
_NOT_EXPOSABLE = {
    "api": "the full API (decrypt, sign) to the outside; expose aux_api instead",
    "kms_proxy": "the KMS proxy to the outside",
    "egress": "the egress proxy: outside clients would reach the network as the enclave",
    "spire": "the SPIFFE workload API to the outside",
}


def _ingress_ports(doc: dict[str, Any]) -> list[_Listener]:
    ports: list[_Listener] = []
    for index, entry in enumerate(_items(doc.get("ingress"))):
        port = _port(_mapping(entry).get("listen_port"))
        if port is not None:
            ports.append(_Listener(("ingress", index, "listen_port"), port))
    return ports


def _tcp_listeners(doc: dict[str, Any]) -> list[_Listener]:
    """The runtime's own listeners inside the enclave; explicit ports first, so that a
    defaulted port is the one blamed for a clash."""
    explicit: list[_Listener] = []
    defaulted: list[_Listener] = []
    for section in ("api", "kms_proxy", "aux_api"):
        port = _port(_mapping(doc.get(section)).get("listen_port"))
        if port is not None:
            explicit.append(_Listener((section, "listen_port"), port))
    aux_default = _port(_aux_api_default(doc))
    if aux_default is not None:
        how = "the default, api.listen_port + 1"
        defaulted.append(_Listener(("aux_api", "listen_port"), aux_default, how))
    if _egress_enabled(doc):
        proxy_port = doc["egress"].get("proxy_port")
        if proxy_port is None:
            defaulted.append(
                _Listener(("egress", "proxy_port"), DEFAULT_EGRESS_PROXY_PORT, "the default")
            )
        elif _port(proxy_port) is not None:
            explicit.append(_Listener(("egress", "proxy_port"), proxy_port))
    if _configured(doc, "spire"):
        addr = doc["spire"].get("workload_api_addr")
        path = ("spire", "workload_api_addr")
        if addr is None:
            default_port = int(DEFAULT_SPIFFE_WORKLOAD_API_ADDR.rsplit(":", 1)[1])
            defaulted.append(_Listener(path, default_port, "the default"))
        elif isinstance(addr, str) and (port := _socket_address_port(addr)) is not None:
            explicit.append(_Listener(path, port))
    return explicit + defaulted


def _port_clash_findings(doc: dict[str, Any]) -> Iterator[_Finding]:
    owners: dict[int, _Listener] = {}
    for listener in _tcp_listeners(doc):
        owner = owners.setdefault(listener.port, listener)
        if owner is listener:
            continue
        how = f" ({listener.default})" if listener.default else ""
        fix = f"; set {format_path(listener.path)} to a free port" if listener.default else ""
        message = f"{listener.port}{how} is already used by {format_path(owner.path)}{fix}"
        yield _Finding(listener.path, message)
    yield from _ingress_findings(_ingress_ports(doc), owners)


def _ingress_findings(
    ingress: list[_Listener], listeners: dict[int, _Listener]
) -> Iterator[_Finding]:
    """Ingress P forwards to 127.0.0.1:P: it may target the app or the aux API, nothing else."""
    seen: dict[int, _Listener] = {}
    for entry in ingress:
        first = seen.setdefault(entry.port, entry)
        if first is not entry:
            yield _Finding(entry.path, f"{entry.port} is already used by {format_path(first.path)}")
            continue
        target = listeners.get(entry.port)
        if target is not None and target.path[0] in _NOT_EXPOSABLE:
            how = f" ({target.default})" if target.default else ""
            fix = f"; set {format_path(target.path)} to another port" if target.default else ""
            yield _Finding(
                entry.path,
                f"{entry.port} is {format_path(target.path)}{how}: this would expose "
                f"{_NOT_EXPOSABLE[target.path[0]]}{fix}",
            )


def _reserved_vsock_findings(doc: dict[str, Any]) -> Iterator[_Finding]:
    """Ingress port P is vsock port P, so it must stay off the ports the runtime itself uses."""
    control_port = _port(_mapping(doc.get("control")).get("vsock_port"), 2**32 - 2)
    for index, entry in enumerate(_items(doc.get("ingress"))):
        port = _port(_mapping(entry).get("listen_port"))
        path = ("ingress", index, "listen_port")
        if port in RESERVED_PORT_NAMES:
            yield _Finding(
                path, f"{port} collides with the reserved {RESERVED_PORT_NAMES[port]} port"
            )
        elif port is not None and port == control_port:
            yield _Finding(path, f"{port} collides with the init control port (control.vsock_port)")
    if control_port in RESERVED_PORT_NAMES and control_port != INIT_CONTROL_PORT:
        name = RESERVED_PORT_NAMES[control_port]
        yield _Finding(
            ("control", "vsock_port"), f"{control_port} collides with the reserved {name} port"
        )


def _egress_rule_findings(doc: dict[str, Any]) -> Iterator[_Finding]:
    egress = _mapping(doc.get("egress"))
    for key in ("allow", "deny"):
        for index, entry in enumerate(_items(egress.get(key))):
            problem = egress_rule_problem(entry) if isinstance(entry, str) else None
            if problem:
                yield _Finding(("egress", key, index), problem)


def _parses_as_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def _looks_like_ip(entry: str) -> bool:
    """A slash, a colon or an all-digit last label: meant as an address, not a domain."""
    return "/" in entry or ":" in entry or entry.rsplit(".", 1)[-1].isdigit()


def _domain_pattern_problem(pattern: str) -> str | None:
    if len(pattern) > _MAX_DOMAIN_LENGTH:
        return f"longer than {_MAX_DOMAIN_LENGTH} characters"
    for index, label in enumerate(pattern.split(".")):
        problem = _label_problem(label, leftmost=index == 0)
        if problem:
            return problem
    return None


def _label_problem(label: str, leftmost: bool) -> str | None:
    if not label:
        return "it has an empty label (look for '..' or a leading or trailing dot)"
    if label == "*" or (label == "**" and leftmost):
        return None
    if label == "**":
        return "'**' (one or more labels) is only allowed as the leftmost label"
    if "*" in label:
        return f"'*' must be a whole label, as in '*.example.com', not part of {label!r}"
    if len(label) > _MAX_LABEL_LENGTH:
        return f"label {label[:20]!r}... is longer than {_MAX_LABEL_LENGTH} characters"
    if not _DOMAIN_LABEL.match(label):
        return (
            f"label {label!r} may only hold letters, digits, '-' and '_', "
            "and may not start or end with '-'"
        )
    return None


def _service_findings(doc: dict[str, Any]) -> Iterator[_Finding]:
    units = _mapping(_mapping(doc.get("services")).get("units"))
    names = sorted(units)
    relations: dict[str, dict[str, list[str]]] = {}
    for name, unit in units.items():
        unit_path: DocPath = ("services", "units", name)
        references = {key: _names(_mapping(unit).get(key)) for key in _DEPENDENCY_KEYS}
        for key, targets in references.items():
            for index, target in targets:
                if target not in units:
                    yield _Finding((*unit_path, key, index), _unknown_service(target, names))
        relations[name] = {key: [t for _, t in targets] for key, targets in references.items()}
        yield from _environment_findings(unit_path, _mapping(unit).get("Environment"))
    try:
        _start_order(relations)
    except graphlib.CycleError as err:
        cycle = " -> ".join(err.args[1])
        yield _Finding(
            ("services", "units"),
            f"dependency cycle: {cycle} (each starts before the next); remove one of the "
            "Requires/After/Before/RequiredBy entries that form it",
        )


def _names(value: Any) -> list[tuple[int, str]]:
    return [(index, item) for index, item in enumerate(_items(value)) if isinstance(item, str)]


def _unknown_service(target: str, names: Sequence[str]) -> str:
    suggestion = _did_you_mean(target, names, quote=_show)
    defined = f"; defined: {', '.join(names)}" if names and not suggestion else ""
    return f"unknown service {_show(target)}{suggestion}{defined}"


def _environment_findings(unit_path: DocPath, environment: Any) -> Iterator[_Finding]:
    first: dict[str, int] = {}
    for index, item in enumerate(_items(environment)):
        if not isinstance(item, str) or "=" not in item:
            continue
        name = item.split("=", 1)[0]
        if name in first:
            message = f"sets {name} again (first set by Environment[{first[name]}])"
            yield _Finding((*unit_path, "Environment", index), message)
        first.setdefault(name, index)


def _start_order(relations: Mapping[str, Mapping[str, Sequence[str]]]) -> tuple[str, ...]:
    """Topological start order; raises graphlib.CycleError naming the cycle.

    X ``Requires``/``After`` Y: Y starts first (enclave-init orders by Requires too).
    X ``Before``/``RequiredBy`` Y: X starts first. Names that are not units are ignored.
    """
    starts_after: dict[str, set[str]] = {name: set() for name in relations}
    for name, keys in relations.items():
        for earlier in (*keys.get("Requires", ()), *keys.get("After", ())):
            if earlier in starts_after:
                starts_after[name].add(earlier)
        for later in (*keys.get("Before", ()), *keys.get("RequiredBy", ())):
            if later in starts_after:
                starts_after[later].add(name)
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for name in sorted(starts_after):
        sorter.add(name, *sorted(starts_after[name]))
    return tuple(sorter.static_order())


# --- building the typed manifest (the document is valid here) ----------------------------------


def _value(section: Mapping[str, Any], key: str, default: Any) -> Any:
    """``key: null`` means the default, as an absent key does."""
    value = section.get(key)
    return default if value is None else value


def _build_manifest(doc: dict[str, Any], source: str, base_dir: Path | None) -> Manifest:
    return Manifest(
        version=doc["version"],
        name=doc["name"],
        target=doc["target"],
        sources=Sources(**doc["sources"]),
        signature=_optional(doc, "signature", lambda raw: Signature(**raw)),
        defaults=Defaults(
            cpu_count=_value(_mapping(doc.get("defaults")), "cpu_count", DEFAULT_CPU_COUNT),
            memory_mb=_value(_mapping(doc.get("defaults")), "memory_mb", DEFAULT_MEMORY_MB),
        ),
        ingress=tuple(_build_ingress(raw) for raw in _items(doc.get("ingress"))),
        egress=_optional(doc, "egress", _build_egress),
        kms_proxy=_optional(doc, "kms_proxy", _build_kms_proxy),
        api=_optional(doc, "api", lambda raw: Api(raw["listen_port"])),
        aux_api=_optional(
            doc, "aux_api", lambda raw: AuxApi(_value(raw, "listen_port", _aux_api_default(doc)))
        ),
        spire=_optional(
            doc, "spire", lambda raw: Spire(**{k: v for k, v in raw.items() if v is not None})
        ),
        services=_build_services(_mapping(doc.get("services"))),
        control=_build_control(_mapping(doc.get("control"))),
        runtime=Runtime(
            _value(_mapping(doc.get("runtime")), "log_buffer_size", DEFAULT_LOG_BUFFER_SIZE)
        ),
        source=source,
        base_dir=base_dir,
    )


def _optional(doc: dict[str, Any], key: str, build: Callable[[dict[str, Any]], Any]) -> Any:
    return build(doc[key]) if _configured(doc, key) else None


def _build_ingress(raw: dict[str, Any]) -> Ingress:
    tls = raw.get("tls")
    return Ingress(raw["listen_port"], Tls(**tls) if tls is not None else None)


def _build_egress(raw: dict[str, Any]) -> Egress:
    return Egress(
        allow=tuple(_value(raw, "allow", ())),
        deny=tuple(_value(raw, "deny", ())),
        proxy_port=_value(raw, "proxy_port", DEFAULT_EGRESS_PROXY_PORT),
    )


def _build_kms_proxy(raw: dict[str, Any]) -> KmsProxy:
    endpoints = _value(raw, "endpoints", {})
    return KmsProxy(raw["listen_port"], tuple(sorted(endpoints.items())))


def _build_services(raw: dict[str, Any]) -> Services:
    units = _value(raw, "units", {})
    return Services(
        directory=_value(raw, "directory", DEFAULT_SERVICES_DIRECTORY),
        log_directory=_value(raw, "log_directory", DEFAULT_SERVICES_LOG_DIRECTORY),
        max_log_size=_value(raw, "max_log_size", DEFAULT_MAX_LOG_SIZE),
        max_log_files=_value(raw, "max_log_files", DEFAULT_MAX_LOG_FILES),
        units=tuple(_build_unit(name, units[name]) for name in sorted(units)),
    )


def _build_unit(name: str, raw: dict[str, Any]) -> ServiceUnit:
    return ServiceUnit(
        name=name,
        exec_start=raw["ExecStart"],
        environment=tuple(_value(raw, "Environment", ())),
        restart=_value(raw, "Restart", DEFAULT_RESTART),
        restart_sec=_value(raw, "RestartSec", DEFAULT_RESTART_SEC),
        working_directory=raw.get("WorkingDirectory"),
        enable=_value(raw, "ServiceEnable", True),
        before=tuple(_value(raw, "Before", ())),
        after=tuple(_value(raw, "After", ())),
        requires=tuple(_value(raw, "Requires", ())),
        required_by=tuple(_value(raw, "RequiredBy", ())),
        user=raw.get("User"),
        group=raw.get("Group"),
        timeout_start_sec=raw.get("TimeoutStartSec"),
        kill_signal=_value(raw, "KillSignal", DEFAULT_KILL_SIGNAL),
        timeout_stop_sec=_value(raw, "TimeoutStopSec", DEFAULT_TIMEOUT_STOP_SEC),
    )


def _build_control(raw: dict[str, Any]) -> Control:
    return Control(
        unix_socket=_value(raw, "unix_socket", DEFAULT_CONTROL_SOCKET),
        vsock_port=_value(raw, "vsock_port", INIT_CONTROL_PORT),
        allowed_cids=tuple(_value(raw, "allowed_cids", DEFAULT_ALLOWED_CIDS)),
    )


# --- back to enclaver.yaml keys ----------------------------------------------------------------

_UNIT_KEYS = (
    ("ExecStart", "exec_start"),
    ("Environment", "environment"),
    ("Restart", "restart"),
    ("RestartSec", "restart_sec"),
    ("WorkingDirectory", "working_directory"),
    ("ServiceEnable", "enable"),
    ("Before", "before"),
    ("After", "after"),
    ("Requires", "requires"),
    ("RequiredBy", "required_by"),
    ("User", "user"),
    ("Group", "group"),
    ("TimeoutStartSec", "timeout_start_sec"),
    ("KillSignal", "kill_signal"),
    ("TimeoutStopSec", "timeout_stop_sec"),
)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _fields(obj: Any, names: Sequence[str]) -> dict[str, Any]:
    """Named attributes, tuples as lists, unset (None) ones left out."""
    values = {name: _jsonable(getattr(obj, name)) for name in names}
    return {name: value for name, value in values.items() if value is not None}


def _manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": manifest.version,
        "name": manifest.name,
        "target": manifest.target,
        "sources": _fields(manifest.sources, ("app", "odyn", "sleeve")),
        "defaults": _fields(manifest.defaults, ("cpu_count", "memory_mb")),
        "ingress": [_ingress_to_dict(ingress) for ingress in manifest.ingress],
    }
    optional = {
        "signature": ("certificate", "key"),
        "egress": ("allow", "deny", "proxy_port"),
        "api": ("listen_port",),
        "aux_api": ("listen_port",),
        "spire": ("server_addr", "ca_cert", "trust_domain", "svid_dir", "workload_api_addr"),
    }
    for key, names in optional.items():
        section = getattr(manifest, key)
        if section is not None:
            doc[key] = _fields(section, names)
    if manifest.kms_proxy is not None:
        doc["kms_proxy"] = {
            "listen_port": manifest.kms_proxy.listen_port,
            "endpoints": dict(manifest.kms_proxy.endpoints),
        }
    services = manifest.services
    doc["services"] = _fields(
        services, ("directory", "log_directory", "max_log_size", "max_log_files")
    )
    doc["services"]["units"] = {
        unit.name: {key: value for key, value in _unit_items(unit)} for unit in services.units
    }
    doc["control"] = _fields(manifest.control, ("unix_socket", "vsock_port", "allowed_cids"))
    doc["runtime"] = {"log_buffer_size": manifest.runtime.log_buffer_size}
    return doc


def _ingress_to_dict(ingress: Ingress) -> dict[str, Any]:
    entry: dict[str, Any] = {"listen_port": ingress.listen_port}
    if ingress.tls is not None:
        entry["tls"] = {"key_file": ingress.tls.key_file, "cert_file": ingress.tls.cert_file}
    return entry


def _unit_items(unit: ServiceUnit) -> Iterator[tuple[str, Any]]:
    for key, attribute in _UNIT_KEYS:
        value = getattr(unit, attribute)
        if value is not None:
            yield key, _jsonable(value)
