"""Control requests come from the host (and responses from the enclave): whatever arrives, only
InitProtocolError comes out of the decoders, and a running control server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.init_protocol import (
    MAX_REQUEST_SIZE,
    ErrorResponse,
    InitProtocolError,
    PongResponse,
    ReloadChanges,
    Request,
    RequestKind,
    ServiceListResponse,
    ServiceLogsResponse,
    ServiceStatusResponse,
    SuccessResponse,
    SystemStatus,
    SystemStatusResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from enclave_runtime.init.control_server import ControlServer
from tests.unit.init_support import FakeController, service

VALID_REQUESTS = [
    encode_request(Request(kind))
    for kind in (
        RequestKind.PING,
        RequestKind.LIST_SERVICES,
        RequestKind.SYSTEM_STATUS,
        RequestKind.SYSTEM_RELOAD,
    )
] + [
    encode_request(Request(RequestKind.SERVICE_STATUS, name="web")),
    encode_request(Request(RequestKind.SERVICE_START, name="db")),
    encode_request(Request(RequestKind.SERVICE_STOP, name="web")),
    encode_request(Request(RequestKind.SERVICE_ENABLE, name="db", now=True)),
    encode_request(Request(RequestKind.SERVICE_LOGS, name="web", lines=3)),
    encode_request(Request(RequestKind.SERVICE_LOGS_CLEAR, name="db")),
    b'{"ProcessStart":{"command":"/bin/sh","args":["-c","id"],"env":[]}}\n',
    b'{"Ping":null}',
]

VALID_RESPONSES = [
    encode_response(response)
    for response in (
        PongResponse(),
        SuccessResponse("ok", service("web"), ReloadChanges(("a",), (), ("b",))),
        ErrorResponse("no", "UnknownService"),
        ServiceListResponse((service("db"), service("web"))),
        ServiceStatusResponse(service("web", pid=9, exit_status=1, error="crashed")),
        ServiceLogsResponse(("a", "b")),
        SystemStatusResponse(SystemStatus(1, 2, 1, 2, 3, "/l", "/s", 1, ("cycle",))),
    )
]

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
VARIANTS = [kind.value for kind in RequestKind] + ["ProcessKill", "Pong", "Success", "Error"]
FIELDS = ["name", "lines", "now", "message", "services", "status", "logs", "service", "x"]


def _decode_request_or_refuse(data: bytes) -> None:
    with contextlib.suppress(InitProtocolError):
        decode_request(data)


def _decode_response_or_refuse(data: bytes) -> None:
    with contextlib.suppress(InitProtocolError):
        decode_response(data)


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    mutated = bytearray(data)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    return bytes(mutated)


FLIPS = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6)
TAGGED = st.builds(
    lambda variant, body: json.dumps({variant: body}).encode(),
    st.sampled_from(VARIANTS),
    JSON_VALUES | st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=4),
)


@given(st.binary(max_size=512))
def test_random_bytes_as_requests(data: bytes) -> None:
    _decode_request_or_refuse(data)


@given(st.sampled_from(VALID_REQUESTS), FLIPS)
def test_mutated_valid_requests(data: bytes, flips: list[tuple[int, int]]) -> None:
    _decode_request_or_refuse(_mutate(data, flips))


@given(TAGGED)
def test_well_formed_json_of_any_shape_as_requests(data: bytes) -> None:
    _decode_request_or_refuse(data)


@given(st.binary(max_size=512))
def test_random_bytes_as_responses(data: bytes) -> None:
    _decode_response_or_refuse(data)


@given(st.sampled_from(VALID_RESPONSES), FLIPS)
def test_mutated_valid_responses(data: bytes, flips: list[tuple[int, int]]) -> None:
    _decode_response_or_refuse(_mutate(data, flips))


@given(TAGGED)
def test_well_formed_json_of_any_shape_as_responses(data: bytes) -> None:
    _decode_response_or_refuse(data)


# --- a running server ----------------------------------------------------------------------------

REQUEST_COUNT = 10_000
CONCURRENCY = 16


def _hostile_payloads(rng: random.Random, count: int) -> list[bytes]:
    """Random bytes, mutated and truncated valid requests, oversized and deeply nested ones."""
    payloads = []
    for index in range(count):
        choice = index % 6
        if choice == 0:
            payloads.append(rng.randbytes(rng.randint(0, 300)))
        elif choice == 1:
            valid = rng.choice(VALID_REQUESTS)
            flips = [(rng.randint(0, 400), rng.randint(0, 255)) for _ in range(rng.randint(1, 4))]
            payloads.append(_mutate(valid, flips))
        elif choice == 2:
            valid = rng.choice(VALID_REQUESTS)
            payloads.append(valid[: rng.randint(0, len(valid))])
        elif choice == 3:
            payloads.append(b"[" * rng.randint(1, MAX_REQUEST_SIZE))
        elif choice == 4:
            payloads.append(b'"' + b"A" * rng.randint(MAX_REQUEST_SIZE - 10, MAX_REQUEST_SIZE * 2))
        else:
            payloads.append(rng.choice(VALID_REQUESTS))
    return payloads


async def _send(path: Path, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(os.fsencode(path))
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await reader.read()
    except ConnectionError:
        # An oversized request: the server answered and closed before taking all of it.
        return b""
    finally:
        writer.close()


async def _hammer(path: Path, payloads: list[bytes]) -> list[bytes]:
    queue = list(reversed(payloads))
    answers: list[bytes] = []

    async def worker() -> None:
        while queue:
            answers.append(await _send(path, queue.pop()))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return answers


def test_ten_thousand_hostile_requests_leave_the_server_serving() -> None:
    payloads = _hostile_payloads(random.Random(20250105), REQUEST_COUNT)
    with tempfile.TemporaryDirectory(prefix="ictl", dir="/tmp") as directory:
        path = Path(directory) / "init.sock"

        async def scenario() -> list[bytes]:
            server = ControlServer(FakeController(), unix_socket=path, vsock_port=None)
            await server.start()
            try:
                answers = await _hammer(path, payloads)
                answers.append(await _send(path, b'"Ping"\n'))
                return answers
            finally:
                await server.close()

        answers = asyncio.run(asyncio.wait_for(scenario(), 60))

    assert len(answers) == REQUEST_COUNT + 1
    assert decode_response(answers[-1]) == PongResponse()
    decoded = [decode_response(answer) for answer in answers if answer]
    assert len(decoded) >= REQUEST_COUNT * 0.9
    assert any(isinstance(response, ErrorResponse) for response in decoded)
