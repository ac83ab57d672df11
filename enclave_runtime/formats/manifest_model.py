"""The manifest's model: its defaults, its typed settings, and how a problem with one is reported.

The bottom of the manifest modules (``manifest.py`` is the entry point): the frozen dataclasses
:func:`enclave_runtime.formats.manifest_load.parse_manifest` returns, the defaults it fills in,
:class:`ManifestError` and the findings every checking stage records, and ``Manifest.to_dict``,
the way back to enclaver.yaml keys. It imports none of the other manifest modules.
"""

from __future__ import annotations

import graphlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from enclave_runtime.errors import EnclaveOpsError, FormatError
from enclave_runtime.formats.service_graph import ordering_edges
from enclave_runtime.formats.vsock_ports import INIT_CONTROL_PORT, PARENT_CID

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


PathPart = Union[str, int]


DocPath = tuple[PathPart, ...]


# --- errors ---------------------------------------------------------------------------------------


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


# --- the typed manifest ---------------------------------------------------------------------------


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
    # None: the relays' defaults (docs/networking.md, "Connection caps").
    max_connections: int | None = None
    idle_timeout: float | None = None


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
    require_privileged_port: bool = True


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


# --- findings (what every checking stage records) -------------------------------------------------


@dataclass(frozen=True)
class _Finding:
    path: DocPath
    message: str
    at: DocPath | None = None  # where to look for a line number, when not ``path``
    line: int | None = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


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


def _start_order(relations: Mapping[str, Mapping[str, Sequence[str]]]) -> tuple[str, ...]:
    """Topological start order; raises graphlib.CycleError naming the cycle.

    The ordering rule is :func:`enclave_runtime.formats.service_graph.ordering_edges`.
    """
    starts_after: dict[str, set[str]] = {name: set() for name in relations}
    for earlier, later_names in ordering_edges(relations).items():
        for later in later_names:
            starts_after[later].add(earlier)
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for name in sorted(starts_after):
        sorter.add(name, *sorted(starts_after[name]))
    return tuple(sorter.static_order())


# --- back to enclaver.yaml keys -------------------------------------------------------------------


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
    doc["control"] = _fields(
        manifest.control,
        ("unix_socket", "vsock_port", "allowed_cids", "require_privileged_port"),
    )
    doc["runtime"] = {"log_buffer_size": manifest.runtime.log_buffer_size}
    return doc


def _ingress_to_dict(ingress: Ingress) -> dict[str, Any]:
    entry: dict[str, Any] = {"listen_port": ingress.listen_port}
    if ingress.tls is not None:
        entry["tls"] = {"key_file": ingress.tls.key_file, "cert_file": ingress.tls.cert_file}
    for key in ("max_connections", "idle_timeout"):
        if getattr(ingress, key) is not None:
            entry[key] = getattr(ingress, key)
    return entry


def _unit_items(unit: ServiceUnit) -> Iterator[tuple[str, Any]]:
    for key, attribute in _UNIT_KEYS:
        value = getattr(unit, attribute)
        if value is not None:
            yield key, _jsonable(value)
