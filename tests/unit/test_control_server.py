"""The init control server on a Unix socket and on the emulated vsock fabric (fake controller)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.formats.init_protocol import (
    MAX_REQUEST_SIZE,
    ErrorResponse,
    PongResponse,
    ReloadChanges,
    Response,
    ServiceListResponse,
    ServiceLogsResponse,
    ServiceState,
    ServiceStatusResponse,
    SuccessResponse,
    SystemStatusResponse,
    decode_response,
)
from enclave_runtime.formats.manifest import Control
from enclave_runtime.init.control_server import ControlServer, ControlServerError
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.unit.init_support import FakeController
from tests.unit.odyn_support import ENCLAVE_CID, run_async

CONTROL_PORT = 9001


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "init.sock"


async def exchange(
    path: Path, payload: bytes, *, half_close: bool = True, timeout: float = 10.0
) -> bytes:
    """Send ``payload`` and return everything the server sends until it closes."""
    reader, writer = await asyncio.open_unix_connection(os.fsencode(path))
    writer.write(payload)
    await writer.drain()
    if half_close:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def ask(path: Path, payload: bytes, **options: Any) -> Response:
    answer = await exchange(path, payload, **options)
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1
    return decode_response(answer)


def serve(controller: FakeController, path: Path, **options: Any) -> ControlServer:
    options.setdefault("vsock_port", None)
    return ControlServer(controller, unix_socket=path, **options)


# --- the Unix socket -----------------------------------------------------------------------------


def test_the_unix_socket_is_owner_only_and_removed_at_close(socket_path: Path) -> None:
    async def scenario() -> None:
        server = serve(FakeController(), socket_path)
        await server.start()
        try:
            assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
            assert stat.S_ISSOCK(socket_path.stat().st_mode)
        finally:
            await server.close()
        assert not socket_path.exists()

    run_async(scenario())


@pytest.mark.parametrize(
    ("payload", "half_close"),
    [
        (b'"Ping"\n', False),  # ended by a newline
        (b'"Ping"', True),  # ended by half-close
        (b'"Ping"', False),  # enclave-init's initctl: one write, then it waits
        (b'{"Ping":null}', False),
    ],
)
def test_a_request_may_end_with_a_newline_a_half_close_or_its_last_brace(
    socket_path: Path, payload: bytes, half_close: bool
) -> None:
    async def scenario() -> None:
        server = serve(FakeController(), socket_path)
        await server.start()
        try:
            assert await ask(socket_path, payload, half_close=half_close) == PongResponse()
        finally:
            await server.close()

    run_async(scenario())


def test_each_request_reaches_the_controller_and_answers_in_enclave_inits_variants(
    socket_path: Path,
) -> None:
    controller = FakeController()

    async def scenario() -> None:
        server = serve(controller, socket_path)
        await server.start()
        try:
            listed = await ask(socket_path, b'"ListServices"\n')
            assert isinstance(listed, ServiceListResponse)
            assert [info.name for info in listed.services] == ["db", "web"]

            started = await ask(socket_path, b'{"ServiceStart":{"name":"web"}}\n')
            assert isinstance(started, SuccessResponse)
            assert started.message == "Service 'web' started"
            assert started.service is not None and started.service.pid == 4242

            status = await ask(socket_path, b'{"ServiceStatus":{"name":"web"}}\n')
            assert isinstance(status, ServiceStatusResponse)
            assert status.status.state is ServiceState.RUNNING

            enabled = await ask(socket_path, b'{"ServiceEnable":{"name":"db","now":true}}\n')
            assert isinstance(enabled, SuccessResponse) and enabled.service is not None
            assert enabled.message == "Service 'db' enabled and started"
            assert enabled.service.active

            logs = await ask(socket_path, b'{"ServiceLogs":{"name":"web","lines":2}}\n')
            assert logs == ServiceLogsResponse(
                ("2025-01-01T00:00:03Z line 3", "2025-01-01T00:00:04Z line 4")
            )

            cleared = await ask(socket_path, b'{"ServiceLogsClear":{"name":"web"}}\n')
            assert cleared == SuccessResponse("Logs cleared for service 'web'")

            reloaded = await ask(socket_path, b'"SystemReload"\n')
            assert reloaded == SuccessResponse(
                "System reloaded: added cache; restarted web",
                changes=ReloadChanges(added=("cache",), restarted=("web",)),
            )

            system = await ask(socket_path, b'"SystemStatus"\n')
            assert isinstance(system, SystemStatusResponse)
            assert system.status.total_services == 3

            stopped = await ask(socket_path, b'{"ServiceStop":{"name":"web"}}\n')
            assert isinstance(stopped, SuccessResponse) and stopped.service is not None
            assert not stopped.service.active

            shutdown = await ask(socket_path, b'"SystemShutdown"\n')
            assert shutdown == SuccessResponse("System shutdown initiated")
        finally:
            await server.close()

    run_async(scenario())
    assert controller.calls == [
        ("list", None),
        ("start", "web"),
        ("status", "web"),
        ("enable", ("db", True)),
        ("start", "db"),
        ("logs", ("web", 2)),
        ("logs-clear", "web"),
        ("reload", None),
        ("system-status", None),
        ("stop", "web"),
        ("shutdown", None),
    ]
    assert controller.shutdown_requested.is_set()


@pytest.mark.parametrize(
    ("payload", "kind", "message"),
    [
        (b'{"ServiceStatus":{"name":"nope"}}\n', "UnknownService", "service 'nope' not found"),
        (b'{"ServiceStart":{"name":"db"}}\n', None, None),
        (b"this is not json\n", "InvalidRequest", "invalid request: request is not valid JSON"),
        (b'"Reboot"\n', "InvalidRequest", 'unknown request variant "Reboot"'),
        (
            b'{"ProcessStart":{"command":"sh","args":[],"env":[]}}\n',
            "Unsupported",
            "no request may run an arbitrary command",
        ),
        (b'{"ServiceStart":{"name":"../x"}}\n', "InvalidRequest", "is not a service name"),
        (b"", "InvalidRequest", "request is empty"),
        (b'"' + b"A" * (MAX_REQUEST_SIZE + 10), "InvalidRequest", "larger than 16384 bytes"),
        (b'{"ServiceStatus":{"name":"boom"}}\n', "Internal", "failed unexpectedly inside"),
    ],
)
def test_every_failure_is_an_error_response_and_the_server_keeps_serving(
    socket_path: Path, payload: bytes, kind: str | None, message: str | None
) -> None:
    async def scenario() -> None:
        server = serve(FakeController(), socket_path)
        await server.start()
        try:
            response = await ask(socket_path, payload)
            if kind is None:
                assert isinstance(response, SuccessResponse)
                return
            assert isinstance(response, ErrorResponse)
            assert response.kind == kind
            assert message in response.message
            assert await ask(socket_path, b'"Ping"\n') == PongResponse()
        finally:
            await server.close()

    run_async(scenario())


def test_a_controller_bug_is_logged_with_its_traceback(
    socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        server = serve(FakeController(), socket_path)
        await server.start()
        try:
            await ask(socket_path, b'{"ServiceStatus":{"name":"boom"}}\n')
        finally:
            await server.close()

    with caplog.at_level(logging.ERROR, logger="odyn"):
        run_async(scenario())
    assert any("a bug in the controller" in str(r.exc_info[1]) for r in caplog.records)


def test_a_state_error_keeps_the_controllers_message(socket_path: Path) -> None:
    async def scenario() -> None:
        server = serve(FakeController(), socket_path)
        await server.start()
        try:
            await ask(socket_path, b'{"ServiceStart":{"name":"web"}}\n')
            again = await ask(socket_path, b'{"ServiceStart":{"name":"web"}}\n')
            assert again == ErrorResponse("service 'web' is already running", "ServiceState")
        finally:
            await server.close()

    run_async(scenario())


def test_a_client_that_sends_nothing_is_answered_after_the_request_timeout(
    socket_path: Path,
) -> None:
    async def scenario() -> None:
        server = serve(FakeController(), socket_path, request_timeout=0.2)
        await server.start()
        try:
            response = await ask(socket_path, b'{"ServiceSta', half_close=False)
            assert isinstance(response, ErrorResponse)
            assert response.kind == "InvalidRequest"
            assert "no complete request within 0.2 s" in response.message
        finally:
            await server.close()

    run_async(scenario())


def test_beyond_max_clients_a_client_is_told_the_server_is_busy(socket_path: Path) -> None:
    async def scenario() -> None:
        server = serve(FakeController(), socket_path, max_clients=1)
        await server.start()
        try:
            idle_reader, idle_writer = await asyncio.open_unix_connection(os.fsencode(socket_path))
            while server.connection_count < 1:
                await asyncio.sleep(0.01)
            busy = await ask(socket_path, b'"Ping"\n')
            assert isinstance(busy, ErrorResponse) and busy.kind == "Busy"
            idle_writer.write(b'"Ping"\n')
            assert decode_response(await idle_reader.read()) == PongResponse()
            idle_writer.close()
            while server.connection_count:
                await asyncio.sleep(0.01)
            assert await ask(socket_path, b'"Ping"\n') == PongResponse()
        finally:
            await server.close()

    run_async(scenario())


def test_a_request_in_progress_is_answered_when_the_server_closes(socket_path: Path) -> None:
    controller = FakeController()

    async def scenario() -> None:
        controller.release = asyncio.Event()
        server = serve(controller, socket_path)
        await server.start()
        pending = asyncio.ensure_future(ask(socket_path, b'{"ServiceStop":{"name":"web"}}\n'))
        while ("stop", "web") not in controller.calls:
            await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(server.close())
        await asyncio.sleep(0.05)
        controller.release.set()
        await closing
        assert isinstance(await pending, SuccessResponse)

    run_async(scenario())


def test_a_stale_socket_is_replaced(socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fsencode(socket_path))
    stale.close()

    async def scenario() -> None:
        server = serve(FakeController(), socket_path)
        await server.start()
        try:
            assert await ask(socket_path, b'"Ping"\n') == PongResponse()
        finally:
            await server.close()

    run_async(scenario())


def test_a_live_socket_or_another_file_is_never_replaced(socket_path: Path) -> None:
    async def scenario() -> None:
        first = serve(FakeController(), socket_path)
        await first.start()
        try:
            with pytest.raises(ControlServerError, match="in use by another running init"):
                await serve(FakeController(), socket_path).start()
            assert await ask(socket_path, b'"Ping"\n') == PongResponse()
        finally:
            await first.close()
        socket_path.write_text("precious")
        with pytest.raises(ControlServerError, match="exists and is not a socket"):
            await serve(FakeController(), socket_path).start()
        assert socket_path.read_text() == "precious"

    run_async(scenario())


def test_the_manifest_control_section_configures_the_server(socket_path: Path) -> None:
    control = Control(unix_socket=str(socket_path), vsock_port=9123, allowed_cids=(3, 7))
    server = ControlServer.from_manifest(FakeController(), control)
    assert (server.unix_socket, server.vsock_port, server.allowed_cids) == (
        socket_path,
        9123,
        frozenset({3, 7}),
    )


# --- vsock ---------------------------------------------------------------------------------------


async def vsock_exchange(
    root: Path, cid: int, payload: bytes, local_port: int | None = 1023
) -> bytes:
    """One exchange from ``cid``; by default from a privileged source port, as root's are."""
    fabric = EmulatedFabric(root, cid)
    reader, writer = await fabric.open_connection(ENCLAVE_CID, CONTROL_PORT, local_port)
    writer.write(payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def test_on_vsock_only_allowed_cids_are_answered(enclave_fabric_root: Path) -> None:
    async def scenario() -> None:
        server = ControlServer(FakeController(), unix_socket=None, vsock_port=CONTROL_PORT)
        await server.start()
        try:
            parent = await vsock_exchange(enclave_fabric_root, 3, b'"Ping"\n')
            assert decode_response(parent) == PongResponse()
            stranger = await vsock_exchange(enclave_fabric_root, 17, b'"Ping"\n')
            assert stranger == b""
            again = await vsock_exchange(enclave_fabric_root, 3, b'"ListServices"\n')
            assert json.loads(again)["ServiceList"]["services"][0]["name"] == "db"
        finally:
            await server.close()

    run_async(scenario())


@pytest.mark.security
def test_an_unprivileged_source_port_on_the_parent_is_refused(enclave_fabric_root: Path) -> None:
    # On a Nitro parent every process is CID 3: the source port below 1024 (CAP_NET_BIND_SERVICE)
    # is what tells root from any local user (docs/init.md).
    async def scenario() -> None:
        server = ControlServer(FakeController(), unix_socket=None, vsock_port=CONTROL_PORT)
        await server.start()
        try:
            for port in (1024, 40000, 60000):
                assert (
                    await vsock_exchange(enclave_fabric_root, 3, b'"SystemShutdown"\n', port) == b""
                )
            lenient = ControlServer(
                FakeController(),
                unix_socket=None,
                vsock_port=CONTROL_PORT + 1,
                require_privileged_port=False,
            )
        finally:
            await server.close()
        await lenient.start()
        try:
            fabric = EmulatedFabric(enclave_fabric_root, 3)
            reader, writer = await fabric.open_connection(ENCLAVE_CID, CONTROL_PORT + 1, 40000)
            writer.write(b'"Ping"\n')
            assert decode_response(await asyncio.wait_for(reader.read(), 10)) == PongResponse()
            writer.close()
        finally:
            await lenient.close()

    run_async(scenario())


def test_the_allow_list_is_configurable(enclave_fabric_root: Path) -> None:
    async def scenario() -> None:
        server = ControlServer(
            FakeController(), unix_socket=None, vsock_port=CONTROL_PORT, allowed_cids=[17]
        )
        await server.start()
        try:
            assert await vsock_exchange(enclave_fabric_root, 3, b'"Ping"\n') == b""
            answer = await vsock_exchange(enclave_fabric_root, 17, b'"Ping"\n')
            assert decode_response(answer) == PongResponse()
        finally:
            await server.close()

    run_async(scenario())
