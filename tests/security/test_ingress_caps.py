"""Ingress findings of issue 15: per-listener connection caps, a default idle timeout, and a
refusal log that cannot flood (docs/networking.md, "Connection caps")."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from enclave_runtime.formats.manifest import Ingress, parse_manifest
from enclave_runtime.host.ingress_proxy import start_ingress_proxy
from enclave_runtime.odyn.ingress import start_ingress
from enclave_runtime.transport.relay import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    ListenerLimits,
    RefusalLog,
)
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.unit.odyn_support import run_async

pytestmark = pytest.mark.security

ENCLAVE_CID = 16


def _listening_app() -> socket.socket:
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(64)
    return app


async def _held_open(fabric: EmulatedFabric, port: int, count: int) -> list[bool]:
    """Open ``count`` connections and report which are still open after a moment."""
    streams = [await fabric.open_connection(ENCLAVE_CID, port) for _ in range(count)]
    await asyncio.sleep(0.3)
    alive = []
    for reader, _writer in streams:
        try:
            data = await asyncio.wait_for(reader.read(1), 0.2)
            alive.append(data != b"")  # b"": closed by the listener
        except asyncio.TimeoutError:
            alive.append(True)  # still open, nothing to read
    for _reader, writer in streams:
        writer.close()
    return alive


def test_odyn_ingress_refuses_past_its_cap_and_logs_once(
    fabric_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = _listening_app()
    port = app.getsockname()[1]

    async def scenario() -> list[bool]:
        servers = await start_ingress(
            [Ingress(port, max_connections=3)],
            tmp_path,
            backend=EmulatedFabric(fabric_root, ENCLAVE_CID),
        )
        try:
            return await _held_open(EmulatedFabric(fabric_root, 3), port, 40)
        finally:
            await servers.close()

    with caplog.at_level(logging.WARNING):
        alive = run_async(scenario())
    app.close()
    assert alive.count(True) == 3
    refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refusals) == 1  # 37 refusals, one line
    assert "3 connections already" in refusals[0].getMessage()


def test_host_ingress_proxy_refuses_past_its_cap(fabric_root: Path) -> None:
    async def scenario() -> list[bool]:
        proxy = await start_ingress_proxy(
            ENCLAVE_CID,
            [8080],
            bind_host="127.0.0.1",
            host_ports={8080: 0},
            backend=EmulatedFabric(fabric_root, 3),
            limits={8080: ListenerLimits(max_connections=2)},
        )
        enclave_side = await EmulatedFabric(fabric_root, ENCLAVE_CID).start_server(_hold, 8080)
        try:
            host_port = proxy.bound[8080]
            streams = [await asyncio.open_connection("127.0.0.1", host_port) for _ in range(6)]
            await asyncio.sleep(0.3)
            alive = []
            for reader, _writer in streams:
                try:
                    alive.append(await asyncio.wait_for(reader.read(1), 0.2) != b"")
                except asyncio.TimeoutError:
                    alive.append(True)  # still open, nothing to read
                except ConnectionError:
                    alive.append(False)  # reset by the cap
            for _reader, writer in streams:
                writer.close()
            return alive
        finally:
            enclave_side.close()
            await proxy.close()

    assert run_async(scenario()).count(True) == 2


async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _peer: object) -> None:
    await reader.read()
    writer.close()


def test_refusal_log_counts_what_it_does_not_print() -> None:
    now = [0.0]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.refusals")
    logger.addHandler(Collect())
    refusals = RefusalLog(logger, "ingress 80", interval=10.0, clock=lambda: now[0])
    for step in range(730):
        now[0] = step * (10.0 / 730)  # ~730 refusals in ten seconds, as in the finding
        refusals.refused("cap")
    now[0] = 10.5
    refusals.refused("cap")
    assert len(records) == 2
    assert records[1].endswith("(and 729 more since the last report)")


def test_manifest_limits_and_defaults() -> None:
    manifest = parse_manifest(
        "version: v1\nname: a\ntarget: t\nsources: {app: a}\n"
        "ingress: [{listen_port: 80, max_connections: 10, idle_timeout: 30}, {listen_port: 81}]\n"
    )
    first, second = manifest.ingress
    assert ListenerLimits.of(first.max_connections, first.idle_timeout) == ListenerLimits(10, 30.0)
    assert ListenerLimits.of(second.max_connections, second.idle_timeout) == ListenerLimits(
        DEFAULT_MAX_CONNECTIONS, DEFAULT_IDLE_TIMEOUT
    )
