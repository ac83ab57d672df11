"""``initctl``: control the enclave init's services, inside the enclave or from the parent.

The command line, the configuration file (``/etc/initctl.yaml`` or ``$INITCTL_CONFIG``: keys
``protocol``, ``unix_socket_path``, ``vsock_cid``, ``vsock_port``) and the ``INIT_SOCKET``
variable are enclave-init's initctl's. :class:`InitClient`
(:mod:`enclave_runtime.transport.init_client`) is the client behind it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import yaml

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.init_errors import InitError
from enclave_runtime.formats.init_protocol import (
    MAX_LOG_LINES,
    ErrorResponse,
    Request,
    RequestKind,
    Response,
    ServiceInfo,
    ServiceListResponse,
    ServiceLogsResponse,
    ServiceStatusResponse,
    SuccessResponse,
    SystemStatus,
    SystemStatusResponse,
    service_info_to_json,
    system_status_to_json,
)
from enclave_runtime.formats.vsock_ports import INIT_CONTROL_PORT, PARENT_CID
from enclave_runtime.transport.init_client import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_LOG_LINES,
    DEFAULT_SOCKET_PATH,
    DEFAULT_TIMEOUT,
    SOCKET_ENV,
    InitClient,
    InitctlConfig,
)

PROTOCOLS = ("unix", "vsock")
_CONFIG_KEYS = ("protocol", "unix_socket_path", "vsock_cid", "vsock_port", "timeout")
_MAX_VSOCK_PORT = 0xFFFFFFFE


class InitctlConfigError(EnclaveOpsError):
    """The initctl configuration file cannot be used."""


def load_config(path: str | os.PathLike[str] | None = None) -> InitctlConfig:
    """Read the configuration: ``path``, else ``$INITCTL_CONFIG``, else /etc/initctl.yaml.

    A missing default file means the defaults (as enclave-init's initctl); a file named
    explicitly must exist, and a file that exists must be valid.
    """
    explicit = path if path is not None else os.environ.get(CONFIG_ENV)
    config_path = Path(explicit if explicit else DEFAULT_CONFIG_PATH)
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise InitctlConfigError(
                f"initctl configuration {config_path} does not exist; create it or drop "
                f"--config / {CONFIG_ENV}"
            ) from None
        return InitctlConfig()
    except (OSError, UnicodeDecodeError) as err:
        raise InitctlConfigError(f"cannot read initctl configuration {config_path}: {err}") from err
    return parse_config(text, str(config_path))


def parse_config(text: str, source: str) -> InitctlConfig:
    """An initctl configuration from YAML text; errors name ``source`` and the key."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InitctlConfigError(f"{source} is not valid YAML: {err}") from None
    if raw is None:
        return InitctlConfig()
    if not isinstance(raw, dict):
        raise InitctlConfigError(f"{source} must be a mapping of {', '.join(_CONFIG_KEYS)}")
    unknown = sorted(str(key) for key in raw if key not in _CONFIG_KEYS)
    if unknown:
        raise InitctlConfigError(
            f"{source}: unknown key {unknown[0]!r}; the keys are {', '.join(_CONFIG_KEYS)}"
        )
    config = InitctlConfig()
    if "protocol" in raw:
        config = replace(config, protocol=_protocol(raw["protocol"], f"{source}: protocol"))
    if "unix_socket_path" in raw:
        value = raw["unix_socket_path"]
        if not isinstance(value, str) or not value:
            raise InitctlConfigError(f"{source}: unix_socket_path must be a non-empty path")
        config = replace(config, unix_socket_path=value)
    if "vsock_cid" in raw:
        config = replace(config, vsock_cid=_u32(raw["vsock_cid"], f"{source}: vsock_cid"))
    if "vsock_port" in raw:
        config = replace(config, vsock_port=_port(raw["vsock_port"], f"{source}: vsock_port"))
    if "timeout" in raw:
        config = replace(config, timeout=_timeout(raw["timeout"], f"{source}: timeout"))
    return config


def _protocol(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.lower() not in PROTOCOLS:
        raise InitctlConfigError(f"{where} is {value!r}; use 'unix' or 'vsock'")
    return value.lower()


def _u32(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
        raise InitctlConfigError(f"{where} is {value!r}; use an integer from 0 to 4294967295")
    return value


def _port(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAX_VSOCK_PORT:
        raise InitctlConfigError(
            f"{where} is {value!r}; use an integer from 1 to {_MAX_VSOCK_PORT}"
        )
    return value


def _timeout(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise InitctlConfigError(f"{where} is {value!r}; use a number of seconds above 0")
    return float(value)


# ----------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="initctl", description="Control the services of the enclave init (odyn)."
    )
    parser.add_argument(
        "-c",
        "--config",
        help=f"configuration file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument("-p", "--protocol", choices=PROTOCOLS, help="unix (default) or vsock")
    parser.add_argument(
        "-s", "--socket", help=f"Unix socket path (default: ${SOCKET_ENV} or {DEFAULT_SOCKET_PATH})"
    )
    parser.add_argument("--vsock-cid", type=int, help=f"enclave CID (default {PARENT_CID})")
    parser.add_argument(
        "--vsock-port", type=int, help=f"control port (default {INIT_CONTROL_PORT})"
    )
    parser.add_argument(
        "--timeout", type=float, help=f"seconds to wait (default {DEFAULT_TIMEOUT:g})"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("list", help="list all services")
    for command, text in (
        ("status", "show a service's status"),
        ("start", "start a service"),
        ("stop", "stop a service"),
        ("restart", "restart a service"),
        ("disable", "stop a service and disable it (persists: renames the unit file)"),
        ("logs-clear", "clear a service's log"),
    ):
        commands.add_parser(command, help=text).add_argument("name", metavar="SERVICE")
    enable = commands.add_parser("enable", help="enable a service (persists: renames the unit)")
    enable.add_argument("name", metavar="SERVICE")
    enable.add_argument("--now", action="store_true", help="also start it")
    logs = commands.add_parser("logs", help="show a service's latest log lines")
    logs.add_argument("name", metavar="SERVICE")
    logs.add_argument(
        "-n", "--lines", type=int, default=DEFAULT_LOG_LINES, help="how many (default 50)"
    )
    commands.add_parser("system-status", help="show the init's status")
    commands.add_parser("reload", help="re-read the unit files")
    commands.add_parser("shutdown", help="stop every service and end the enclave")
    commands.add_parser("ping", help="check that the init answers")
    return parser


_SIMPLE_COMMANDS = {
    "list": RequestKind.LIST_SERVICES,
    "status": RequestKind.SERVICE_STATUS,
    "start": RequestKind.SERVICE_START,
    "stop": RequestKind.SERVICE_STOP,
    "restart": RequestKind.SERVICE_RESTART,
    "disable": RequestKind.SERVICE_DISABLE,
    "logs-clear": RequestKind.SERVICE_LOGS_CLEAR,
    "system-status": RequestKind.SYSTEM_STATUS,
    "reload": RequestKind.SYSTEM_RELOAD,
    "shutdown": RequestKind.SYSTEM_SHUTDOWN,
    "ping": RequestKind.PING,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "logs" and not 0 <= args.lines <= MAX_LOG_LINES:
        parser.error(f"-n/--lines must be from 0 to {MAX_LOG_LINES}")
    try:
        client = InitClient(config_from_arguments(args))
        response = _run(client, args)
    except EnclaveOpsError as err:
        return _report_failure(str(err), getattr(err, "kind", None), args.json)
    if isinstance(response, ErrorResponse):
        return _report_failure(response.message, response.kind, args.json)
    if args.json:
        print(json.dumps(response_to_json(response), indent=2, ensure_ascii=False))
    else:
        print_human(response, sys.stdout)
    return 0


def config_from_arguments(args: argparse.Namespace) -> InitctlConfig:
    """The configuration file, then $INIT_SOCKET, then the command-line options, in that order."""
    config = load_config(args.config)
    socket_path = args.socket or os.environ.get(SOCKET_ENV)
    if socket_path:
        config = replace(config, unix_socket_path=socket_path)
    if args.protocol:
        config = replace(config, protocol=args.protocol)
    if args.vsock_cid is not None:
        config = replace(config, vsock_cid=_u32(args.vsock_cid, "--vsock-cid"))
    if args.vsock_port is not None:
        config = replace(config, vsock_port=_port(args.vsock_port, "--vsock-port"))
    if args.timeout is not None:
        config = replace(config, timeout=_timeout(args.timeout, "--timeout"))
    return config


def _run(client: InitClient, args: argparse.Namespace) -> Response:
    name = getattr(args, "name", None)
    if args.command == "enable":
        try:
            return client.enable(name, now=args.now)
        except InitError as err:
            return ErrorResponse(str(err), err.kind)
    if args.command == "logs":
        return client.request(Request(RequestKind.SERVICE_LOGS, name=name, lines=args.lines))
    return client.request(Request(_SIMPLE_COMMANDS[args.command], name=name))


def _report_failure(message: str, kind: str | None, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": {"kind": kind, "message": message}}, ensure_ascii=False))
    else:
        print(f"initctl: {message}", file=sys.stderr)
    return 1


def response_to_json(response: Response) -> Any:
    """What ``--json`` prints for a response other than Error."""
    if isinstance(response, ServiceListResponse):
        return {"services": [service_info_to_json(info) for info in response.services]}
    if isinstance(response, ServiceStatusResponse):
        return service_info_to_json(response.status)
    if isinstance(response, ServiceLogsResponse):
        return {"logs": list(response.logs)}
    if isinstance(response, SystemStatusResponse):
        return system_status_to_json(response.status)
    if isinstance(response, SuccessResponse):
        result: dict[str, Any] = {"message": response.message}
        if response.service is not None:
            result["service"] = service_info_to_json(response.service)
        if response.changes is not None:
            result["changes"] = {
                "added": list(response.changes.added),
                "removed": list(response.changes.removed),
                "restarted": list(response.changes.restarted),
            }
        return result
    return {"message": "Pong"}


def print_human(response: Response, out: TextIO) -> None:
    """The human-readable form, laid out as enclave-init's initctl prints it."""
    if isinstance(response, ServiceListResponse):
        _print_services(response.services, out)
    elif isinstance(response, ServiceStatusResponse):
        _print_status(response.status, out)
    elif isinstance(response, ServiceLogsResponse):
        out.write("\n".join(response.logs) + "\n" if response.logs else "No logs available\n")
    elif isinstance(response, SystemStatusResponse):
        _print_system_status(response.status, out)
    elif isinstance(response, SuccessResponse):
        out.write(response.message + "\n")
    else:
        out.write("Pong - init system is responsive\n")


def _print_services(services: tuple[ServiceInfo, ...], out: TextIO) -> None:
    if not services:
        out.write("No services found\n")
        return
    row = "{:<25} {:<10} {:<10} {:<15} {:<10} {}\n"
    out.write(row.format("NAME", "ENABLED", "ACTIVE", "RESTART", "RESTARTS", "STATE"))
    out.write("-" * 85 + "\n")
    for info in services:
        out.write(
            row.format(
                info.name,
                "enabled" if info.enabled else "disabled",
                "active" if info.active else "inactive",
                info.restart_policy,
                info.restart_count,
                info.state.value,
            )
        )


def _print_status(info: ServiceInfo, out: TextIO) -> None:
    lines = [
        f"Service: {info.name}",
        f"  Enabled: {'yes' if info.enabled else 'no'}",
        f"  Status: {'active' if info.active else 'inactive'} ({info.state.value})",
    ]
    if info.pid is not None:
        lines.append(f"  PID: {info.pid}")
    if info.exec_start:
        lines.append(f"  Command: {info.exec_start}")
    if info.working_directory:
        lines.append(f"  Working Directory: {info.working_directory}")
    lines += [
        f"  Restart Policy: {info.restart_policy}",
        f"  Restart Delay: {info.restart_sec:g}s",
        f"  Restart Count: {info.restart_count}",
    ]
    if info.exit_status is not None:
        lines.append(f"  Last Exit Code: {info.exit_status}")
    if info.exit_signal is not None:
        lines.append(f"  Last Exit Signal: {info.exit_signal}")
    dependencies = info.dependencies
    for label, names in (
        ("Before", dependencies.before),
        ("After", dependencies.after),
        ("Requires", dependencies.requires),
        ("Required By", dependencies.required_by),
    ):
        if names:
            lines.append(f"  {label}: {', '.join(names)}")
    if info.error:
        lines.append(f"  Error: {info.error}")
    out.write("\n".join(lines) + "\n")


def _print_system_status(status: SystemStatus, out: TextIO) -> None:
    lines = [
        "System Status",
        f"  Uptime: {format_uptime(status.uptime_secs)}",
        f"  Services: {status.total_services} total, {status.enabled_services} enabled, "
        f"{status.active_services} active, {status.failed_services} failed",
        f"  Processes: {status.total_processes} total",
        f"  Service Directory: {status.service_dir}",
        f"  Log Directory: {status.log_dir}",
    ]
    lines += [f"  Error: {error}" for error in status.errors]
    out.write("\n".join(lines) + "\n")


def format_uptime(seconds: int) -> str:
    """``1d 2h 3m 4s``, leaving out leading zero units, as enclave-init's initctl does."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m {secs}s"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


if __name__ == "__main__":
    sys.exit(main())
