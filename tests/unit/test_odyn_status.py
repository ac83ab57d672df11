"""Status lines (docs/odyn.md) and odyn's status server on vsock 17000."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from enclave_runtime.formats.protocol import (
    STATUS_LINE_MAX,
    StatusExited,
    StatusFatal,
    StatusLineError,
    StatusRunning,
    StatusSignaled,
    decode_status_line,
    encode_status_line,
    signal_name,
)
from enclave_runtime.formats.vsock_ports import STATUS_PORT
from enclave_runtime.odyn.status import StatusServer
from tests.unit.odyn_support import (
    connect_when_listening,
    eventually,
    parent_side,
    read_status,
)

# --- the line format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (StatusRunning(), b'{"status":"running"}\n'),
        (StatusExited(0), b'{"status":"exited","code":0}\n'),
        (StatusExited(255), b'{"status":"exited","code":255}\n'),
        (StatusSignaled(9), b'{"status":"signaled","signal":9,"name":"SIGKILL"}\n'),
        (StatusSignaled(15), b'{"status":"signaled","signal":15,"name":"SIGTERM"}\n'),
        (StatusFatal("no such file"), b'{"status":"fatal","error":"no such file"}\n'),
    ],
)
def test_each_status_is_one_documented_json_line(status: object, line: bytes) -> None:
    assert encode_status_line(status) == line  # type: ignore[arg-type]
    assert decode_status_line(line) == status


def test_a_fatal_error_with_quotes_and_newlines_is_real_json() -> None:
    error = 'manifest: ingress[0].listen_port: "x" is not an integer\nsecond line — ünïcode'
    line = encode_status_line(StatusFatal(error))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"status": "fatal", "error": error}
    assert decode_status_line(line) == StatusFatal(error)


def test_a_long_fatal_error_is_shortened_to_fit_enclavers_line_limit() -> None:
    error = "ingress[3].tls: " + "cannot read /etc/enclaver/tls/server/443/cert.pem; " * 80
    line = encode_status_line(StatusFatal(error))
    assert len(line) <= STATUS_LINE_MAX
    decoded = decode_status_line(line)
    assert isinstance(decoded, StatusFatal)
    assert decoded.error.endswith("…")
    assert error.startswith(decoded.error[:-1])
    assert len(decoded.error) > 900  # cut at the limit, not far before it


def test_escapes_count_against_the_limit() -> None:
    line = encode_status_line(StatusFatal('"\\\n\x01' * 600))
    assert len(line) <= STATUS_LINE_MAX
    assert decode_status_line(line).error.startswith('"\\\n\x01')  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "status"),
    [
        # enclaver's odyn: spaces, and the signal as a name where the number belongs.
        (b'{ "status": "running" }\n', StatusRunning()),
        (b'{ "status": "exited", "code": 2 }\n', StatusExited(2)),
        (b'{ "status": "signaled", "signal": "SIGTERM" }\n', StatusSignaled(15)),
        (b'{"status":"signaled","signal":"SIGIOT"}', StatusSignaled(6)),
        (b'{"status":"signaled","signal":"SIGRTMIN+2"}\r\n', StatusSignaled(36)),
        # the name is informative only: the number decides.
        (b'{"status":"signaled","signal":9,"name":"SIGTERM"}', StatusSignaled(9, "SIGKILL")),
        # fields a later version may add are ignored.
        (b'{"status":"exited","code":1,"at":"2025-01-01T00:00:00Z"}', StatusExited(1)),
    ],
)
def test_enclavers_lines_and_later_additions_are_read(line: bytes, status: object) -> None:
    assert decode_status_line(line) == status


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{ "status": "fatal", "error": "bad "quote"" }\n', "not JSON"),
        (b'{"status":"starting"}', 'status "starting"'),
        (b'{"code":1}', "status null"),
        (b'["status","running"]', "not an object"),
        (b'{"status":"exited"}', '"code", which is missing'),
        (b'{"status":"exited","code":true}', '"code" as an integer, got true'),
        (b'{"status":"exited","code":256}', "outside 0..255"),
        (b'{"status":"exited","code":-1}', "outside 0..255"),
        (b'{"status":"signaled","signal":0}', "outside 1..64"),
        (b'{"status":"signaled","signal":"SIGNOPE"}', "unknown signal"),
        (b'{"status":"fatal","error":7}', '"error" as a string'),
        (b'{"status":"running"}\xff', "not UTF-8"),
        (b"[" * 1000, "JSON"),
        (b'{"status":"fatal","error":"' + b"x" * STATUS_LINE_MAX + b'"}', "limit"),
    ],
)
def test_bad_lines_are_refused_with_the_reason(line: bytes, reason: str) -> None:
    with pytest.raises(StatusLineError, match=reason.replace("(", r"\(")) as err:
        decode_status_line(line)
    assert isinstance(err.value, ValueError)


def test_real_time_signals_have_their_linux_names() -> None:
    assert signal_name(34) == "SIGRTMIN"
    assert signal_name(37) == "SIGRTMIN+3"
    assert signal_name(64) == "SIGRTMAX"
    assert StatusSignaled(37).name == "SIGRTMIN+3"


# --- the server --------------------------------------------------------------------------------


def test_a_client_waits_for_the_first_state_then_follows_every_change(
    enclave_fabric_root: Path,
) -> None:
    async def scenario() -> list[object]:
        server = StatusServer()
        await server.start()
        try:
            reader, writer = await connect_when_listening(
                parent_side(enclave_fabric_root), STATUS_PORT
            )
            await eventually(lambda: server.client_count == 1)
            server.publish(StatusRunning())
            first = await read_status(reader)
            server.publish(StatusExited(4))
            second = await read_status(reader)
            writer.close()
            return [first, second]
        finally:
            await server.close()

    assert asyncio.run(scenario()) == [StatusRunning(), StatusExited(4)]


def test_a_new_client_gets_the_current_state_first(enclave_fabric_root: Path) -> None:
    async def scenario() -> tuple[object, object]:
        server = StatusServer()
        await server.start()
        try:
            server.publish(StatusRunning())
            server.publish(StatusSignaled(9))
            early_reader, early_writer = await connect_when_listening(
                parent_side(enclave_fabric_root), STATUS_PORT
            )
            late_reader, late_writer = await connect_when_listening(
                parent_side(enclave_fabric_root), STATUS_PORT
            )
            states = (await read_status(early_reader), await read_status(late_reader))
            early_writer.close()
            late_writer.close()
            return states
        finally:
            await server.close()

    assert asyncio.run(scenario()) == (StatusSignaled(9), StatusSignaled(9))


def test_every_client_sees_each_transition_and_delivery_is_known(enclave_fabric_root: Path) -> None:
    async def scenario() -> list[list[object]]:
        server = StatusServer()
        await server.start()
        try:
            parent = parent_side(enclave_fabric_root)
            clients = [await connect_when_listening(parent, STATUS_PORT) for _ in range(3)]
            await eventually(lambda: server.client_count == 3)
            seen: list[list[object]] = []
            server.publish(StatusRunning())
            server.publish(StatusFatal("late"))
            await asyncio.wait_for(server.wait_delivered(), 10)
            for reader, writer in clients:
                states = [await read_status(reader)]
                if states[0] != StatusFatal("late"):
                    states.append(await read_status(reader))
                seen.append(states)
                writer.close()
            return seen
        finally:
            await server.close()

    for states in asyncio.run(scenario()):
        # A client sees running unless both changes landed before its first write.
        assert states[-1] == StatusFatal("late")
        assert states in ([StatusRunning(), StatusFatal("late")], [StatusFatal("late")])


def test_clients_that_hang_up_are_forgotten_and_the_limit_holds(enclave_fabric_root: Path) -> None:
    async def scenario() -> tuple[bytes, object]:
        server = StatusServer(max_clients=1)
        await server.start()
        try:
            parent = parent_side(enclave_fabric_root)
            server.publish(StatusRunning())
            reader, writer = await connect_when_listening(parent, STATUS_PORT)
            await read_status(reader)
            over_reader, over_writer = await parent.open_connection(16, STATUS_PORT)
            refused = await asyncio.wait_for(over_reader.read(), 10)
            over_writer.close()
            writer.close()
            await eventually(lambda: server.client_count == 0)
            again_reader, again_writer = await parent.open_connection(16, STATUS_PORT)
            state = await read_status(again_reader)
            again_writer.close()
            return refused, state
        finally:
            await server.close()

    refused, state = asyncio.run(scenario())
    assert refused == b""  # the extra client is closed without a line
    assert state == StatusRunning()


def test_closing_the_server_ends_client_streams(enclave_fabric_root: Path) -> None:
    async def scenario() -> bytes:
        server = StatusServer()
        await server.start()
        server.publish(StatusExited(0))
        reader, writer = await connect_when_listening(parent_side(enclave_fabric_root), STATUS_PORT)
        await read_status(reader)
        await server.close()
        rest = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return rest

    assert asyncio.run(scenario()) == b""
