"""Loading a manifest: YAML text or a mapping, checked, into the typed :class:`Manifest`.

Checking has two stages and reports everything both find in one :class:`ManifestError`: the
JSON Schema shipped beside this package (``data/manifest.schema.json``) fixes keys, shapes and
types; the semantic checks (``manifest_checks.py``) then cover what a schema cannot say.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from enclave_runtime.formats.manifest_checks import (
    _aux_api_default,
    _configured,
    _items,
    _mapping,
    _semantic_findings,
)
from enclave_runtime.formats.manifest_model import (
    DEFAULT_ALLOWED_CIDS,
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_CPU_COUNT,
    DEFAULT_EGRESS_PROXY_PORT,
    DEFAULT_KILL_SIGNAL,
    DEFAULT_LOG_BUFFER_SIZE,
    DEFAULT_MAX_LOG_FILES,
    DEFAULT_MAX_LOG_SIZE,
    DEFAULT_MEMORY_MB,
    DEFAULT_RESTART,
    DEFAULT_RESTART_SEC,
    DEFAULT_SERVICES_DIRECTORY,
    DEFAULT_SERVICES_LOG_DIRECTORY,
    DEFAULT_TIMEOUT_STOP_SEC,
    Api,
    AuxApi,
    Control,
    Defaults,
    DocPath,
    Egress,
    Ingress,
    KmsProxy,
    Manifest,
    ManifestError,
    ManifestReadError,
    Runtime,
    Services,
    ServiceUnit,
    Signature,
    Sources,
    Spire,
    Tls,
    _Finding,
    _issues,
    _one_line,
    _show,
)
from enclave_runtime.formats.manifest_yaml import MAX_MANIFEST_BYTES, _document_or_raise, _read_yaml
from enclave_runtime.formats.suggestions import did_you_mean
from enclave_runtime.formats.vsock_ports import INIT_CONTROL_PORT

# --- public entry points --------------------------------------------------------------------------


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


# --- schema ---------------------------------------------------------------------------------------


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
        hint = f" ({schema['x-hint']})" if "x-hint" in schema else ""
        return f"expected {' or '.join(names)}, got {got}{hint}"
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
    return message + did_you_mean(got, [str(value) for value in choices], quote=_show)


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
            suggestion = did_you_mean(key, known)
            listing = f"; known keys: {', '.join(known)}" if not suggestion else ""
            message = f"unknown {where} {key!r}{suggestion}{listing}"
        yield _Finding(path, message, at=(*path, key))


# --- building the typed manifest (the document is valid here) -------------------------------------


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
    return Ingress(
        raw["listen_port"],
        Tls(**tls) if tls is not None else None,
        max_connections=raw.get("max_connections"),
        idle_timeout=raw.get("idle_timeout"),
    )


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
        require_privileged_port=_value(raw, "require_privileged_port", True),
    )
