"""enclaver.yaml, the manifest (docs/manifest.md): read it, check it, return typed settings.

Checking has two stages and reports everything both find in one :class:`ManifestError`: the
JSON Schema shipped beside this module (``data/manifest.schema.json``) fixes keys, shapes and
types; semantic checks then cover what a schema cannot say (unique ports, reserved vsock ports,
egress patterns, service references and cycles). The semantic checks read the raw document
defensively, so a type error in one place does not hide a port clash in another.

YAML is read with YAML 1.2 core-schema scalars, as enclaver's serde_yaml reads it: ``Restart: no``
is the string "no" and ``port: 010`` is ten, where PyYAML's YAML 1.1 default would give false and
eight. Only JSON-compatible values are accepted, and duplicate keys are errors.

This module is the public entry point; the work is split by job, each module importing only
those listed before it:

- ``manifest_model.py``: the defaults, the typed settings (frozen dataclasses),
  :class:`ManifestError` and its findings, and ``Manifest.to_dict`` back to enclaver.yaml keys;
- ``manifest_yaml.py``: YAML text to plain data, with line numbers and size bounds;
- ``manifest_checks.py``: the semantic checks;
- ``manifest_load.py``: the schema, then the checks, then the typed manifest
  (:func:`parse_manifest`, :func:`load_manifest`).
"""

from __future__ import annotations

from enclave_runtime.formats.manifest_checks import (
    egress_rule_problem,
)
from enclave_runtime.formats.manifest_load import (
    load_manifest,
    manifest_schema,
    parse_manifest,
    strict_validator,
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
    DEFAULT_SPIFFE_WORKLOAD_API_ADDR,
    DEFAULT_TIMEOUT_STOP_SEC,
    MANIFEST_VERSION,
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
    ManifestIssue,
    ManifestReadError,
    PathPart,
    Runtime,
    Services,
    ServiceUnit,
    Signature,
    Sources,
    Spire,
    Tls,
    format_path,
)
from enclave_runtime.formats.manifest_yaml import (
    MAX_MANIFEST_BYTES,
)

__all__ = [
    "DEFAULT_ALLOWED_CIDS",
    "DEFAULT_CONTROL_SOCKET",
    "DEFAULT_CPU_COUNT",
    "DEFAULT_EGRESS_PROXY_PORT",
    "DEFAULT_KILL_SIGNAL",
    "DEFAULT_LOG_BUFFER_SIZE",
    "DEFAULT_MAX_LOG_FILES",
    "DEFAULT_MAX_LOG_SIZE",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_RESTART",
    "DEFAULT_RESTART_SEC",
    "DEFAULT_SERVICES_DIRECTORY",
    "DEFAULT_SERVICES_LOG_DIRECTORY",
    "DEFAULT_SPIFFE_WORKLOAD_API_ADDR",
    "DEFAULT_TIMEOUT_STOP_SEC",
    "MANIFEST_VERSION",
    "MAX_MANIFEST_BYTES",
    "Api",
    "AuxApi",
    "Control",
    "Defaults",
    "DocPath",
    "Egress",
    "Ingress",
    "KmsProxy",
    "Manifest",
    "ManifestError",
    "ManifestIssue",
    "ManifestReadError",
    "PathPart",
    "Runtime",
    "ServiceUnit",
    "Services",
    "Signature",
    "Sources",
    "Spire",
    "Tls",
    "egress_rule_problem",
    "format_path",
    "load_manifest",
    "manifest_schema",
    "parse_manifest",
    "strict_validator",
]
