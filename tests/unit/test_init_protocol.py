"""The init control protocol's messages, as enclave-init's serde encodes them (docs/init.md)."""

from __future__ import annotations

import json

import pytest

from enclave_runtime.formats.init_protocol import (
    MAX_LOG_LINES,
    ErrorResponse,
    InitProtocolError,
    PongResponse,
    ReloadChanges,
    Request,
    RequestKind,
    ServiceDependencies,
    ServiceListResponse,
    ServiceLogsResponse,
    ServiceState,
    ServiceStatusResponse,
    SuccessResponse,
    SystemStatus,
    SystemStatusResponse,
    UnsupportedRequestError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from tests.unit.init_support import service

# enclave-init's protocol.rs: the fields its ServiceStatus and SystemStatus structs serialise.
ENCLAVE_INIT_SERVICE_STATUS_FIELDS = {
    "name",
    "enabled",
    "active",
    "pid",
    "restart_policy",
    "restart_count",
    "restart_sec",
    "exit_status",
    "exec_start",
    "working_directory",
    "dependencies",
}
ENCLAVE_INIT_SYSTEM_STATUS_FIELDS = {
    "uptime_secs",
    "total_services",
    "active_services",
    "enabled_services",
    "total_processes",
    "log_dir",
    "service_dir",
}

# --- requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "wire"),
    [
        (Request(RequestKind.PING), b'"Ping"\n'),
        (Request(RequestKind.LIST_SERVICES), b'"ListServices"\n'),
        (Request(RequestKind.SYSTEM_STATUS), b'"SystemStatus"\n'),
        (Request(RequestKind.SYSTEM_RELOAD), b'"SystemReload"\n'),
        (Request(RequestKind.SYSTEM_SHUTDOWN), b'"SystemShutdown"\n'),
        (Request(RequestKind.SERVICE_STATUS, name="web"), b'{"ServiceStatus":{"name":"web"}}\n'),
        (Request(RequestKind.SERVICE_START, name="web"), b'{"ServiceStart":{"name":"web"}}\n'),
        (Request(RequestKind.SERVICE_STOP, name="web"), b'{"ServiceStop":{"name":"web"}}\n'),
        (Request(RequestKind.SERVICE_RESTART, name="w"), b'{"ServiceRestart":{"name":"w"}}\n'),
        (Request(RequestKind.SERVICE_ENABLE, name="w"), b'{"ServiceEnable":{"name":"w"}}\n'),
        (
            Request(RequestKind.SERVICE_ENABLE, name="w", now=True),
            b'{"ServiceEnable":{"name":"w","now":true}}\n',
        ),
        (Request(RequestKind.SERVICE_DISABLE, name="w"), b'{"ServiceDisable":{"name":"w"}}\n'),
        (
            Request(RequestKind.SERVICE_LOGS, name="web", lines=50),
            b'{"ServiceLogs":{"name":"web","lines":50}}\n',
        ),
        (
            Request(RequestKind.SERVICE_LOGS_CLEAR, name="web"),
            b'{"ServiceLogsClear":{"name":"web"}}\n',
        ),
    ],
)
def test_each_request_is_enclave_inits_externally_tagged_json(
    request_: Request, wire: bytes
) -> None:
    assert encode_request(request_) == wire
    assert decode_request(wire) == request_
    assert decode_request(wire.rstrip(b"\n")) == request_


def test_requests_as_enclave_inits_initctl_sends_them_are_understood() -> None:
    # serde_json::to_vec output: no newline, unit variants as strings, serde's null form too.
    assert decode_request(b'"Ping"') == Request(RequestKind.PING)
    assert decode_request(b'{"Ping":null}') == Request(RequestKind.PING)
    assert decode_request(b' {"ServiceLogs": {"lines": 20, "name": "db"}} \r\n') == Request(
        RequestKind.SERVICE_LOGS, name="db", lines=20
    )


@pytest.mark.parametrize(
    "variant",
    [
        '{"ProcessStart":{"command":"/bin/sh","args":["-c","id"],"env":[]}}',
        '{"ProcessKill":{"pid":1,"signal":9}}',
        '"ProcessList"',
        '{"ServiceLogsStream":{"name":"web","vsock_cid":3,"vsock_port":9100}}',
        '"SystemReboot"',
    ],
)
def test_enclave_init_variants_that_run_commands_or_dial_out_are_refused_with_a_reason(
    variant: str,
) -> None:
    name = next(iter(json.loads(variant))) if variant.startswith("{") else json.loads(variant)
    with pytest.raises(UnsupportedRequestError, match=rf"request {name} is not supported: \w"):
        decode_request(variant.encode())


def test_process_start_is_refused_because_no_request_runs_a_command() -> None:
    with pytest.raises(UnsupportedRequestError, match="no request may run an arbitrary command"):
        decode_request(b'{"ProcessStart":{"command":"sh","args":[],"env":[]}}')


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b'"Reboot"', r'unknown request variant "Reboot"; expected one of Ping, ListServices'),
        (b'{"ServiceStatus":{}}', 'ServiceStatus is missing the field "name"'),
        (b'{"ServiceStatus":{"name":"w","x":1}}', 'unknown field "x" in ServiceStatus'),
        (b'{"ServiceStatus":"web"}', "ServiceStatus must carry an object with name"),
        (b'{"ServiceStatus":{"name":5}}', "ServiceStatus.name must be a string, got a number"),
        (b'{"ServiceStart":{"name":"../../etc/passwd"}}', "is not a service name"),
        (b'{"ServiceStart":{"name":""}}', "is not a service name"),
        (b'{"ServiceStart":{"name":".hidden"}}', "is not a service name"),
        (b'{"ServiceStart":{"name":"a/b"}}', "is not a service name"),
        (b'{"ServiceLogs":{"name":"w","lines":-1}}', "lines is -1; ask for 0 to 10000"),
        (b'{"ServiceLogs":{"name":"w","lines":10001}}', "lines is 10001"),
        (b'{"ServiceLogs":{"name":"w","lines":true}}', "lines must be an integer, got a boolean"),
        (b'{"ServiceLogs":{"name":"w","lines":1.5}}', "lines must be an integer, got a number"),
        (b'{"ServiceLogs":{"name":"w"}}', 'ServiceLogs is missing the field "lines"'),
        (b'{"ServiceEnable":{"name":"w","now":1}}', "now must be true or false"),
        (b'{"Ping":{"x":1}}', "Ping takes no fields"),
        (b'{"Ping":null,"ListServices":null}', "exactly one key .* with 2 keys"),
        (b"[]", "must be a variant name string or an object"),
        (b"", "request is empty"),
        (b"  \n", "request is empty"),
        (b'"Ping', "not valid JSON: Unterminated string"),
        (b"\xff\xfe", "not UTF-8 \\(byte 0\\)"),
        (b'{"ServiceStatus":{"name":"a","name":"b"}}', 'duplicate key "name"'),
        (b'{"ServiceLogs":{"name":"w","lines":NaN}}', "NaN is not a JSON number"),
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply|not valid JSON"),
    ],
)
def test_malformed_requests_are_refused_with_a_message_naming_the_problem(
    wire: bytes, message: str
) -> None:
    with pytest.raises(InitProtocolError, match=message):
        decode_request(wire)


def test_the_log_line_limit_itself_is_accepted() -> None:
    wire = json.dumps({"ServiceLogs": {"name": "w", "lines": MAX_LOG_LINES}}).encode()
    assert decode_request(wire).lines == MAX_LOG_LINES


def test_service_names_that_units_use_are_accepted() -> None:
    for name in ("web", "my-app_2", "worker@1", "db.primary", "_hidden"):
        wire = json.dumps({"ServiceStart": {"name": name}}).encode()
        assert decode_request(wire).name == name


def test_names_no_unit_file_could_have_are_refused() -> None:
    for name in ("a:b", "-x", ".hidden", "..", "a/b"):
        wire = json.dumps({"ServiceStart": {"name": name}}).encode()
        with pytest.raises(InitProtocolError, match="is not a service name"):
            decode_request(wire)


def test_an_error_message_quotes_a_hostile_variant_bounded_and_escaped() -> None:
    with pytest.raises(InitProtocolError) as caught:
        decode_request(json.dumps("X\n\x1b[2J" + "y" * 500).encode())
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
    assert len(str(caught.value)) < 400


# --- responses -----------------------------------------------------------------------------------


def test_pong_and_error_are_enclave_inits_shapes() -> None:
    assert encode_response(PongResponse()) == b'"Pong"\n'
    assert encode_response(ErrorResponse("Service 'x' not found")) == (
        b'{"Error":{"message":"Service \'x\' not found"}}\n'
    )
    assert json.loads(encode_response(ErrorResponse("m", "UnknownService"))) == {
        "Error": {"message": "m", "kind": "UnknownService"}
    }


def test_a_service_status_carries_every_field_enclave_inits_initctl_reads() -> None:
    info = service("web", active=True, state=ServiceState.RUNNING, pid=77, restart_sec=5)
    wire = json.loads(encode_response(ServiceStatusResponse(info)))
    status = wire["ServiceStatus"]["status"]
    assert set(status) >= ENCLAVE_INIT_SERVICE_STATUS_FIELDS
    assert status["restart_sec"] == 5 and isinstance(status["restart_sec"], int)
    assert status["dependencies"] == {
        "before": [],
        "after": ["db"],
        "requires": [],
        "required_by": [],
    }
    assert status["state"] == "running" and status["pid"] == 77


def test_a_system_status_carries_every_field_enclave_inits_initctl_reads() -> None:
    status = SystemStatus(61, 3, 1, 2, 4, "/log", "/service", 1, ("cycle: a -> b -> a",))
    wire = json.loads(encode_response(SystemStatusResponse(status)))["SystemStatus"]["status"]
    assert set(wire) >= ENCLAVE_INIT_SYSTEM_STATUS_FIELDS
    assert wire["errors"] == ["cycle: a -> b -> a"] and wire["failed_services"] == 1


@pytest.mark.parametrize(
    "response",
    [
        PongResponse(),
        SuccessResponse("Service 'web' started", service("web", active=True, pid=3)),
        SuccessResponse("System reloaded", changes=ReloadChanges(("a",), ("b",), ("c",))),
        SuccessResponse("Logs cleared for service 'web'"),
        ErrorResponse("Service 'x' not found", "UnknownService"),
        ServiceListResponse((service("db"), service("web", exit_status=3, error="crashed"))),
        ServiceStatusResponse(service("web", exit_signal=9, state=ServiceState.FAILED)),
        ServiceLogsResponse(("line one", "ünïcode ✓", "")),
        SystemStatusResponse(SystemStatus(1, 2, 1, 2, 3, "/l", "/s")),
    ],
)
def test_every_response_survives_the_wire(response: object) -> None:
    wire = encode_response(response)  # type: ignore[arg-type]
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    assert decode_response(wire) == response


def test_responses_of_enclave_inits_own_init_are_understood() -> None:
    # As enclave-init's serde_json::to_vec writes them: no newline, no fields of ours.
    listed = decode_response(
        b'{"ServiceList":{"services":[{"name":"web","enabled":true,"active":true,'
        b'"restart_policy":"always","restart_count":2}]}}'
    )
    assert isinstance(listed, ServiceListResponse)
    (web,) = listed.services
    assert (web.name, web.active, web.state, web.restart_count) == (
        "web",
        True,
        ServiceState.RUNNING,
        2,
    )
    status = decode_response(
        b'{"ServiceStatus":{"status":{"name":"db","enabled":true,"active":false,"pid":null,'
        b'"restart_policy":"no","restart_count":0,"restart_sec":5,"exit_status":1,'
        b'"exec_start":"/bin/db","working_directory":null,"dependencies":{"before":["web"],'
        b'"after":[],"requires":[],"required_by":["web"]}}}}'
    )
    assert isinstance(status, ServiceStatusResponse)
    assert status.status.state is ServiceState.INACTIVE
    assert status.status.exit_status == 1
    assert status.status.dependencies == ServiceDependencies(before=("web",), required_by=("web",))
    system = decode_response(
        b'{"SystemStatus":{"status":{"uptime_secs":9,"total_services":1,"active_services":1,'
        b'"enabled_services":1,"total_processes":5,"log_dir":"/log","service_dir":"/service"}}}'
    )
    assert isinstance(system, SystemStatusResponse)
    assert system.status.errors == () and system.status.total_processes == 5
    assert decode_response(b'{"Success":{"message":"System reload initiated"}}') == (
        SuccessResponse("System reload initiated")
    )
    assert decode_response(b'"Pong"') == PongResponse()


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b'"Pang"', 'unknown response variant "Pang"'),
        (b'{"ServiceList":{"services":{}}}', "ServiceList.services must be an array"),
        (
            b'{"ServiceList":{"services":[{"name":"w"}]}}',
            r"services\[0\].active must be true or false",
        ),
        (b'{"ServiceLogs":{"logs":[1]}}', r"ServiceLogs.logs\[0\] must be a string"),
        (b'{"Error":{}}', "Error.message must be a string, got null"),
        (b'{"SystemStatus":{"status":[]}}', "SystemStatus.status must be an object"),
        (
            b'{"ServiceStatus":{"status":{"name":"w","enabled":true,"active":true,'
            b'"restart_policy":"no","restart_count":0,"state":"zombie"}}}',
            'state is "zombie"',
        ),
    ],
)
def test_malformed_responses_are_refused_with_the_field_named(wire: bytes, message: str) -> None:
    with pytest.raises(InitProtocolError, match=message):
        decode_response(wire)
