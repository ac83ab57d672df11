"""The manifest's semantic checks: what its JSON Schema cannot say.

Unique ports, reserved vsock ports, egress patterns, service references and cycles. The checks
read the raw document defensively and skip whatever has the wrong type (the schema reports that),
so a type error in one place does not hide a port clash in another.
"""

from __future__ import annotations

import graphlib
import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from enclave_runtime.formats.kms_checks import kms_egress_findings
from enclave_runtime.formats.manifest_model import (
    DEFAULT_EGRESS_PROXY_PORT,
    DEFAULT_SPIFFE_WORKLOAD_API_ADDR,
    DocPath,
    _Finding,
    _show,
    _start_order,
    format_path,
)
from enclave_runtime.formats.service_graph import DEPENDENCY_KEYS, repeated_variables
from enclave_runtime.formats.suggestions import did_you_mean
from enclave_runtime.formats.vsock_ports import INIT_CONTROL_PORT, RESERVED_PORT_NAMES

_MAX_DOMAIN_LENGTH = 253


_MAX_LABEL_LENGTH = 63


_DOMAIN_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?\Z")


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


# --- semantic checks ------------------------------------------------------------------------------
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
        references = {key: _names(_mapping(unit).get(key)) for key in DEPENDENCY_KEYS}
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
    suggestion = did_you_mean(target, names, quote=_show)
    defined = f"; defined: {', '.join(names)}" if names and not suggestion else ""
    return f"unknown service {_show(target)}{suggestion}{defined}"


def _environment_findings(unit_path: DocPath, environment: Any) -> Iterator[_Finding]:
    for index, name, first in repeated_variables(_items(environment)):
        message = f"sets {name} again (first set by Environment[{first}])"
        yield _Finding((*unit_path, "Environment", index), message)
