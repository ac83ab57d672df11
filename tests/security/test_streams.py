"""Status and log streams (issue 15): only the parent is served, and a client that stops
reading loses its slot instead of holding it (docs/odyn.md)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from enclave_runtime.formats.protocol import StatusRunning
from enclave_runtime.formats.vsock_ports import STATUS_PORT
from enclave_runtime.odyn.status import StatusServer
from enclave_runtime.process.streams import drain_within
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.unit.odyn_support import run_async

pytestmark = pytest.mark.security


def test_another_enclave_cannot_read_the_status_stream(enclave_fabric_root: Path) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        server = StatusServer()
        await server.start()
        server.publish(StatusRunning())
        try:
            answers = []
            for cid in (17, 3):
                reader, writer = await EmulatedFabric(enclave_fabric_root, cid).open_connection(
                    16, STATUS_PORT
                )
                answers.append(await asyncio.wait_for(reader.readline(), 5))
                writer.close()
            return answers[0], answers[1]
        finally:
            await server.close()

    stranger, parent = run_async(scenario())
    assert stranger == b""
    assert parent == b'{"status":"running"}\n'


def test_a_client_that_stops_reading_is_dropped() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        _reader, writer = await asyncio.open_connection(sock=ours)
        try:
            with pytest.raises(ConnectionError, match=r"read nothing for 0\.2 s"):
                for _ in range(1000):  # the peer never reads
                    writer.write(b"x" * 65536)
                    await drain_within(writer, 0.2)
        finally:
            writer.close()
            theirs.close()

    run_async(scenario())
