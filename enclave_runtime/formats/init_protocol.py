"""The init control protocol (docs/init.md): enclave-init's JSON requests and responses.

Messages are serde's externally tagged enums, as the Sentient Enclaves Framework's enclave-init
speaks them (``enclave-init/src/protocol.rs``): a unit variant is a bare string (``"Ping"``), a
struct variant a one-key object (``{"ServiceStatus": {"name": "web"}}``). One request per
connection, ended by a newline or by half-close; the answer is one JSON line.

Compatibility runs both ways. Every field enclave-init sends is sent under its name, so its
``initctl`` reads our answers; fields we add (``state``, ``error``, ``service``, ``changes``, ...)
are ignored by serde and optional when we decode, so our client reads enclave-init's answers.
enclave-init's process-management and log-streaming variants are refused with an explanation:
no request may run an arbitrary command or open a connection the operator did not configure.

Bytes from the other side of the socket are untrusted: every decoding failure is an
:class:`InitProtocolError` whose message names the field and what was expected.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any, Union

from enclave_runtime.errors import FormatError
from enclave_runtime.formats import strict_json

# A request is a service name or two: 16 KiB leaves room for any legitimate one (enclave-init
# reads 8 KiB) and bounds what an unauthenticated peer can make the server buffer.
MAX_REQUEST_SIZE = 16 * 1024
# Log answers are the large ones; the client refuses anything beyond this.
MAX_RESPONSE_SIZE = 16 * 1024 * 1024
# ServiceLogs answers at most this many lines, keeping a response under MAX_RESPONSE_SIZE.
MAX_LOG_LINES = 10_000
# The one rule for service names, in unit files, the manifest (its schema repeats it, and a test
# keeps the two equal) and requests: names become file names (NAME.service), so they must not
# name a path or start like an option.
SERVICE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_@][A-Za-z0-9_.@-]{0,127}")


class InitProtocolError(FormatError):
    """A control message that is not valid JSON or not a known, well-formed variant."""


class UnsupportedRequestError(InitProtocolError):
    """A variant enclave-init knows that EnclaveOps refuses on purpose."""


class RequestKind(str, enum.Enum):
    """The request variants served, named exactly as on the wire."""

    PING = "Ping"
    LIST_SERVICES = "ListServices"
    SERVICE_STATUS = "ServiceStatus"
    SERVICE_START = "ServiceStart"
    SERVICE_STOP = "ServiceStop"
    SERVICE_RESTART = "ServiceRestart"
    SERVICE_ENABLE = "ServiceEnable"
    SERVICE_DISABLE = "ServiceDisable"
    SERVICE_LOGS = "ServiceLogs"
    SERVICE_LOGS_CLEAR = "ServiceLogsClear"
    SYSTEM_STATUS = "SystemStatus"
    SYSTEM_RELOAD = "SystemReload"
    SYSTEM_SHUTDOWN = "SystemShutdown"


_UNIT_REQUESTS = frozenset(
    {
        RequestKind.PING,
        RequestKind.LIST_SERVICES,
        RequestKind.SYSTEM_STATUS,
        RequestKind.SYSTEM_RELOAD,
        RequestKind.SYSTEM_SHUTDOWN,
    }
)

_UNSUPPORTED_REASONS = {
    "ProcessList": "process management is not offered; use ListServices",
    "ProcessStatus": "process management is not offered; use ServiceStatus",
    "ProcessStart": "no request may run an arbitrary command; add a service unit and reload",
    "ProcessStop": "process management is not offered; use ServiceStop",
    "ProcessRestart": "process management is not offered; use ServiceRestart",
    "ProcessKill": "process management is not offered; use ServiceStop",
    "ServiceLogsStream": (
        "log streaming to an arbitrary vsock address is not offered; read ServiceLogs, or the "
        "app log stream on vsock port 17001, which carries every service's output"
    ),
    "ServiceLogsStreamStop": "log streaming is not offered",
    "SystemReboot": "an enclave cannot reboot itself; use SystemShutdown and run it again",
}


class ServiceState(str, enum.Enum):
    """Where a service is in its life; ``active`` is true for STARTING, RUNNING and STOPPING."""

    INACTIVE = "inactive"  # never started, or stopped on request
    STARTING = "starting"  # spawned, start timeout running
    RUNNING = "running"
    STOPPING = "stopping"  # stop signal sent, grace period running
    EXITED = "exited"  # ended with status 0 and will not be restarted
    FAILED = "failed"  # ended badly or could not start, and will not be restarted
    RESTARTING = "restarting"  # waiting out its restart back-off
    BLOCKED = "blocked"  # not started: cycle, missing or failed Requires (see ``error``)


ACTIVE_STATES = frozenset({ServiceState.STARTING, ServiceState.RUNNING, ServiceState.STOPPING})


@dataclass(frozen=True)
class Request:
    """One control request; ``name`` for the Service* variants, ``lines`` for ServiceLogs.

    ``now`` is our extension of ServiceEnable (enable and start in one request); enclave-init's
    initctl sends a ServiceStart after the ServiceEnable instead.
    """

    kind: RequestKind
    name: str | None = None
    lines: int | None = None
    now: bool = False


@dataclass(frozen=True)
class ServiceDependencies:
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    required_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceInfo:
    """What the init reports about one service: enclave-init's ServiceStatus fields and ours.

    enclave-init's fields: name, enabled, active, pid, restart_policy, restart_count,
    restart_sec, exit_status, exec_start, working_directory, dependencies. Ours: ``state``,
    ``exit_signal`` (the signal that ended the last run; ``exit_status`` is then None) and
    ``error`` (why the service is blocked or failed, in words an operator can act on).
    """

    name: str
    enabled: bool
    active: bool
    state: ServiceState
    pid: int | None
    restart_policy: str
    restart_count: int
    exit_status: int | None
    dependencies: ServiceDependencies = field(default_factory=ServiceDependencies)
    error: str | None = None
    restart_sec: float = 5
    exec_start: str = ""
    working_directory: str | None = None
    exit_signal: int | None = None


@dataclass(frozen=True)
class SystemStatus:
    """enclave-init's SystemStatus fields, plus failed services and dependency-graph errors."""

    uptime_secs: int
    total_services: int
    active_services: int
    enabled_services: int
    total_processes: int
    log_dir: str
    service_dir: str
    failed_services: int = 0
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReloadChanges:
    """What a reload did, by service name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()


@dataclass(frozen=True)
class PongResponse:
    pass


@dataclass(frozen=True)
class SuccessResponse:
    """enclave-init's ``Success{message}``; ``service`` and ``changes`` are our additions."""

    message: str
    service: ServiceInfo | None = None
    changes: ReloadChanges | None = None


@dataclass(frozen=True)
class ErrorResponse:
    """enclave-init's ``Error{message}``; ``kind`` (ours) lets scripts tell errors apart."""

    message: str
    kind: str | None = None


@dataclass(frozen=True)
class ServiceListResponse:
    services: tuple[ServiceInfo, ...]


@dataclass(frozen=True)
class ServiceStatusResponse:
    status: ServiceInfo


@dataclass(frozen=True)
class ServiceLogsResponse:
    logs: tuple[str, ...]


@dataclass(frozen=True)
class SystemStatusResponse:
    status: SystemStatus


Response = Union[
    PongResponse,
    SuccessResponse,
    ErrorResponse,
    ServiceListResponse,
    ServiceStatusResponse,
    ServiceLogsResponse,
    SystemStatusResponse,
]


# ----------------------------------------------------------------------------- requests


def encode_request(request: Request) -> bytes:
    """The request as one JSON line."""
    return _json_line(_request_value(request))


def _request_value(request: Request) -> Any:
    if request.kind in _UNIT_REQUESTS:
        return request.kind.value
    body: dict[str, Any] = {"name": request.name}
    if request.kind is RequestKind.SERVICE_LOGS:
        body["lines"] = request.lines
    if request.kind is RequestKind.SERVICE_ENABLE and request.now:
        body["now"] = True
    return {request.kind.value: body}


def decode_request(data: bytes) -> Request:
    """Parse one request (without or with its trailing newline); raise InitProtocolError."""
    variant, body = _split_variant(_parse_json(data, "request"), "request")
    kind = _request_kind(variant)
    if kind in _UNIT_REQUESTS:
        if body is not None:
            raise InitProtocolError(
                f"{variant} takes no fields; send the bare string {json.dumps(variant)}"
            )
        return Request(kind)
    fields = _struct_body(body, variant, _request_fields(kind))
    name = _service_name(fields.get("name"), f"{variant}.name")
    if kind is RequestKind.SERVICE_LOGS:
        return Request(kind, name=name, lines=_log_lines(fields.get("lines"), variant))
    if kind is RequestKind.SERVICE_ENABLE:
        return Request(kind, name=name, now=_optional_bool(fields.get("now"), f"{variant}.now"))
    return Request(kind, name=name)


def _request_kind(variant: str) -> RequestKind:
    if variant in _UNSUPPORTED_REASONS:
        raise UnsupportedRequestError(
            f"request {variant} is not supported: {_UNSUPPORTED_REASONS[variant]}"
        )
    try:
        return RequestKind(variant)
    except ValueError:
        known = ", ".join(kind.value for kind in RequestKind)
        raise InitProtocolError(
            f"unknown request variant {_quote(variant)}; expected one of {known}"
        ) from None


def _request_fields(kind: RequestKind) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) field names of a struct variant."""
    if kind is RequestKind.SERVICE_LOGS:
        return ("name", "lines"), ()
    if kind is RequestKind.SERVICE_ENABLE:
        return ("name",), ("now",)
    return ("name",), ()


def _service_name(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise InitProtocolError(f"{path} must be a string, got {_json_type(value)}")
    if SERVICE_NAME_PATTERN.fullmatch(value) is None:
        raise InitProtocolError(
            f"{path} {_quote(value)} is not a service name: use 1-128 letters, digits and "
            "'_.@-', starting with a letter, digit, '_' or '@'"
        )
    return value


def _log_lines(value: Any, variant: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InitProtocolError(f"{variant}.lines must be an integer, got {_json_type(value)}")
    if not 0 <= value <= MAX_LOG_LINES:
        raise InitProtocolError(f"{variant}.lines is {value}; ask for 0 to {MAX_LOG_LINES} lines")
    return value


def _optional_bool(value: Any, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InitProtocolError(f"{path} must be true or false, got {_json_type(value)}")
    return value


# ----------------------------------------------------------------------------- responses


def encode_response(response: Response) -> bytes:
    """The response as one JSON line."""
    return _json_line(_response_value(response))


def _response_value(response: Response) -> Any:
    if isinstance(response, PongResponse):
        return "Pong"
    if isinstance(response, SuccessResponse):
        body: dict[str, Any] = {"message": response.message}
        if response.service is not None:
            body["service"] = service_info_to_json(response.service)
        if response.changes is not None:
            body["changes"] = _changes_to_json(response.changes)
        return {"Success": body}
    if isinstance(response, ErrorResponse):
        error: dict[str, Any] = {"message": response.message}
        if response.kind is not None:
            error["kind"] = response.kind
        return {"Error": error}
    if isinstance(response, ServiceListResponse):
        return {"ServiceList": {"services": [service_info_to_json(s) for s in response.services]}}
    if isinstance(response, ServiceStatusResponse):
        return {"ServiceStatus": {"status": service_info_to_json(response.status)}}
    if isinstance(response, ServiceLogsResponse):
        return {"ServiceLogs": {"logs": list(response.logs)}}
    return {"SystemStatus": {"status": system_status_to_json(response.status)}}


def decode_response(data: bytes) -> Response:
    """Parse one response, ours or enclave-init's; raise InitProtocolError."""
    variant, body = _split_variant(_parse_json(data, "response"), "response")
    if variant == "Pong":
        if body is not None:
            raise InitProtocolError("Pong takes no fields")
        return PongResponse()
    decoder = _RESPONSE_DECODERS.get(variant)
    if decoder is None:
        known = ", ".join(["Pong", *_RESPONSE_DECODERS])
        raise InitProtocolError(
            f"unknown response variant {_quote(variant)}; expected one of {known}"
        )
    if not isinstance(body, dict):
        raise InitProtocolError(f"{variant} must carry an object, got {_json_type(body)}")
    return decoder(body)


def _decode_success(body: dict[str, Any]) -> SuccessResponse:
    service = body.get("service")
    changes = body.get("changes")
    return SuccessResponse(
        message=_str(body, "message", "Success"),
        service=None if service is None else service_info_from_json(service, "Success.service"),
        changes=None if changes is None else _changes_from_json(changes, "Success.changes"),
    )


def _decode_error(body: dict[str, Any]) -> ErrorResponse:
    return ErrorResponse(
        message=_str(body, "message", "Error"), kind=_optional_str(body, "kind", "Error")
    )


def _decode_service_list(body: dict[str, Any]) -> ServiceListResponse:
    services = _list(body, "services", "ServiceList")
    return ServiceListResponse(
        tuple(
            service_info_from_json(item, f"ServiceList.services[{index}]")
            for index, item in enumerate(services)
        )
    )


def _decode_service_status(body: dict[str, Any]) -> ServiceStatusResponse:
    return ServiceStatusResponse(service_info_from_json(body.get("status"), "ServiceStatus.status"))


def _decode_service_logs(body: dict[str, Any]) -> ServiceLogsResponse:
    logs = _list(body, "logs", "ServiceLogs")
    for index, line in enumerate(logs):
        if not isinstance(line, str):
            raise InitProtocolError(
                f"ServiceLogs.logs[{index}] must be a string, got {_json_type(line)}"
            )
    return ServiceLogsResponse(tuple(logs))


def _decode_system_status(body: dict[str, Any]) -> SystemStatusResponse:
    return SystemStatusResponse(system_status_from_json(body.get("status"), "SystemStatus.status"))


_RESPONSE_DECODERS = {
    "Success": _decode_success,
    "Error": _decode_error,
    "ServiceList": _decode_service_list,
    "ServiceStatus": _decode_service_status,
    "ServiceLogs": _decode_service_logs,
    "SystemStatus": _decode_system_status,
}


# ----------------------------------------------------------------------------- records


def service_info_to_json(info: ServiceInfo) -> dict[str, Any]:
    """enclave-init's ServiceStatus object, plus our fields; also the ``--json`` output."""
    return {
        "name": info.name,
        "enabled": info.enabled,
        "active": info.active,
        "state": ServiceState(info.state).value,
        "pid": info.pid,
        "restart_policy": info.restart_policy,
        "restart_count": info.restart_count,
        "restart_sec": _number(info.restart_sec),
        "exit_status": info.exit_status,
        "exit_signal": info.exit_signal,
        "exec_start": info.exec_start,
        "working_directory": info.working_directory,
        "dependencies": {
            "before": list(info.dependencies.before),
            "after": list(info.dependencies.after),
            "requires": list(info.dependencies.requires),
            "required_by": list(info.dependencies.required_by),
        },
        "error": info.error,
    }


def service_info_from_json(value: Any, path: str) -> ServiceInfo:
    """Read a service record; enclave-init's list entries carry only the first five fields."""
    if not isinstance(value, dict):
        raise InitProtocolError(f"{path} must be an object, got {_json_type(value)}")
    active = _bool(value, "active", path)
    return ServiceInfo(
        name=_str(value, "name", path),
        enabled=_bool(value, "enabled", path),
        active=active,
        state=_state(value, path, active),
        pid=_optional_int(value, "pid", path),
        restart_policy=_str(value, "restart_policy", path),
        restart_count=_int(value, "restart_count", path),
        exit_status=_optional_int(value, "exit_status", path),
        dependencies=_dependencies(value.get("dependencies"), f"{path}.dependencies"),
        error=_optional_str(value, "error", path),
        restart_sec=_optional_number(value, "restart_sec", path, 5),
        exec_start=_optional_str(value, "exec_start", path) or "",
        working_directory=_optional_str(value, "working_directory", path),
        exit_signal=_optional_int(value, "exit_signal", path),
    )


def system_status_to_json(status: SystemStatus) -> dict[str, Any]:
    return {
        "uptime_secs": status.uptime_secs,
        "total_services": status.total_services,
        "active_services": status.active_services,
        "enabled_services": status.enabled_services,
        "failed_services": status.failed_services,
        "total_processes": status.total_processes,
        "log_dir": status.log_dir,
        "service_dir": status.service_dir,
        "errors": list(status.errors),
    }


def system_status_from_json(value: Any, path: str) -> SystemStatus:
    if not isinstance(value, dict):
        raise InitProtocolError(f"{path} must be an object, got {_json_type(value)}")
    return SystemStatus(
        uptime_secs=_int(value, "uptime_secs", path),
        total_services=_int(value, "total_services", path),
        active_services=_int(value, "active_services", path),
        enabled_services=_int(value, "enabled_services", path),
        total_processes=_int(value, "total_processes", path),
        log_dir=_str(value, "log_dir", path),
        service_dir=_str(value, "service_dir", path),
        failed_services=_optional_int(value, "failed_services", path) or 0,
        errors=_str_tuple(value.get("errors"), f"{path}.errors"),
    )


def _changes_to_json(changes: ReloadChanges) -> dict[str, list[str]]:
    return {
        "added": list(changes.added),
        "removed": list(changes.removed),
        "restarted": list(changes.restarted),
    }


def _changes_from_json(value: Any, path: str) -> ReloadChanges:
    if not isinstance(value, dict):
        raise InitProtocolError(f"{path} must be an object, got {_json_type(value)}")
    return ReloadChanges(
        added=_str_tuple(value.get("added"), f"{path}.added"),
        removed=_str_tuple(value.get("removed"), f"{path}.removed"),
        restarted=_str_tuple(value.get("restarted"), f"{path}.restarted"),
    )


def _dependencies(value: Any, path: str) -> ServiceDependencies:
    if value is None:
        return ServiceDependencies()
    if not isinstance(value, dict):
        raise InitProtocolError(f"{path} must be an object, got {_json_type(value)}")
    return ServiceDependencies(
        before=_str_tuple(value.get("before"), f"{path}.before"),
        after=_str_tuple(value.get("after"), f"{path}.after"),
        requires=_str_tuple(value.get("requires"), f"{path}.requires"),
        required_by=_str_tuple(value.get("required_by"), f"{path}.required_by"),
    )


def _state(value: dict[str, Any], path: str, active: bool) -> ServiceState:
    """Our ``state``; for enclave-init's records (which lack it) what ``active`` implies."""
    raw = value.get("state")
    if raw is None:
        return ServiceState.RUNNING if active else ServiceState.INACTIVE
    if not isinstance(raw, str):
        raise InitProtocolError(f"{path}.state must be a string, got {_json_type(raw)}")
    try:
        return ServiceState(raw)
    except ValueError:
        known = ", ".join(state.value for state in ServiceState)
        raise InitProtocolError(f"{path}.state is {_quote(raw)}; expected one of {known}") from None


# ----------------------------------------------------------------------------- JSON helpers


def _json_line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _parse_json(data: bytes, what: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InitProtocolError(f"{what} is not UTF-8 (byte {exc.start}): send JSON text") from None
    if not text.strip():
        raise InitProtocolError(f'{what} is empty: send one JSON value, e.g. "Ping"')
    try:
        return strict_json.loads(text)
    except json.JSONDecodeError as exc:
        raise InitProtocolError(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise InitProtocolError(f"{what} nests too deeply to be a control message") from None
    except ValueError as exc:
        raise InitProtocolError(f"{what} is not valid JSON: {exc}") from None


def _split_variant(value: Any, what: str) -> tuple[str, Any]:
    """(variant, body) of an externally tagged enum; body is None for a unit variant.

    serde also accepts ``{"Ping": null}`` for a unit variant, so we do too.
    """
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and len(value) == 1:
        ((variant, body),) = value.items()
        return variant, body
    raise InitProtocolError(
        f"{what} must be a variant name string or an object with exactly one key (the "
        f'variant), e.g. {{"ServiceStatus":{{"name":"web"}}}}; got {_json_type(value)}'
        + (f" with {len(value)} keys" if isinstance(value, dict) else "")
    )


def _struct_body(
    body: Any, variant: str, names: tuple[tuple[str, ...], tuple[str, ...]]
) -> dict[str, Any]:
    required, optional = names
    expected = ", ".join(required + optional)
    if not isinstance(body, dict):
        raise InitProtocolError(
            f"{variant} must carry an object with {expected}, got {_json_type(body)}"
        )
    for key in body:
        if key not in required and key not in optional:
            raise InitProtocolError(
                f"unknown field {_quote(key)} in {variant}; expected {expected}"
            )
    for key in required:
        if key not in body:
            raise InitProtocolError(f"{variant} is missing the field {_quote(key)}")
    return body


def _str(value: dict[str, Any], key: str, path: str) -> str:
    item = value.get(key)
    if not isinstance(item, str):
        raise InitProtocolError(f"{path}.{key} must be a string, got {_json_type(item)}")
    return item


def _optional_str(value: dict[str, Any], key: str, path: str) -> str | None:
    return None if value.get(key) is None else _str(value, key, path)


def _bool(value: dict[str, Any], key: str, path: str) -> bool:
    item = value.get(key)
    if not isinstance(item, bool):
        raise InitProtocolError(f"{path}.{key} must be true or false, got {_json_type(item)}")
    return item


def _int(value: dict[str, Any], key: str, path: str) -> int:
    item = value.get(key)
    if not isinstance(item, int) or isinstance(item, bool):
        raise InitProtocolError(f"{path}.{key} must be an integer, got {_json_type(item)}")
    return item


def _optional_int(value: dict[str, Any], key: str, path: str) -> int | None:
    return None if value.get(key) is None else _int(value, key, path)


def _optional_number(value: dict[str, Any], key: str, path: str, default: float) -> float:
    item = value.get(key)
    if item is None:
        return default
    if not isinstance(item, (int, float)) or isinstance(item, bool):
        raise InitProtocolError(f"{path}.{key} must be a number, got {_json_type(item)}")
    return item


def _list(value: dict[str, Any], key: str, path: str) -> list[Any]:
    item = value.get(key)
    if not isinstance(item, list):
        raise InitProtocolError(f"{path}.{key} must be an array, got {_json_type(item)}")
    return item


def _str_tuple(value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InitProtocolError(f"{path} must be an array of strings, got {_json_type(value)}")
    return tuple(value)


def _number(value: float) -> float:
    """Whole seconds as JSON integers, as enclave-init's u64 restart_sec reads them."""
    return int(value) if float(value).is_integer() else value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _quote(value: str) -> str:
    """A peer-supplied string for an error message, bounded and JSON-escaped."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 80 else text[:77] + "..."
