"""The status server on vsock 17000: the application's state as JSON lines (docs/odyn.md).

A client first gets the current state, then every change, one line each (see
:mod:`enclave_runtime.formats.protocol`). Before the application has been started there is no
state yet and a client simply waits: the first line it reads is ``running`` or ``fatal``.
"""

from __future__ import annotations

import asyncio

from enclave_runtime.formats.protocol import AppStatus, encode_status_line
from enclave_runtime.formats.vsock_ports import STATUS_PORT
from enclave_runtime.process.streams import (
    DEFAULT_MAX_CLIENTS,
    Broadcast,
    StreamServer,
    drain_within,
    wait_for_news,
)


class StatusServer:
    """Publishes the application's state to every status client."""

    def __init__(self, port: int = STATUS_PORT, max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        self._status: AppStatus | None = None
        self._changes = Broadcast()
        self._delivered_version = 0
        self._deliveries = Broadcast()
        self._server = StreamServer("status", port, self._stream_to, max_clients)

    @property
    def current(self) -> AppStatus | None:
        return self._status

    @property
    def client_count(self) -> int:
        return self._server.client_count

    async def start(self) -> None:
        await self._server.start()

    def publish(self, status: AppStatus) -> None:
        self._status = status
        self._changes.bump()

    async def wait_delivered(self) -> None:
        """Return once some client has been sent the latest state (it is in the socket)."""
        while self._delivered_version < self._changes.version:
            await self._deliveries.wait_past(self._deliveries.version)

    async def close(self) -> None:
        await self._server.close()

    async def _stream_to(self, writer: asyncio.StreamWriter, hangup: asyncio.Future[None]) -> None:
        sent = 0
        while True:
            version = self._changes.version
            if version > sent and self._status is not None:
                writer.write(encode_status_line(self._status))
                await drain_within(writer)
                sent = version
                self._record_delivery(version)
            if not await wait_for_news(self._changes, sent, hangup):
                return

    def _record_delivery(self, version: int) -> None:
        if version > self._delivered_version:
            self._delivered_version = version
            self._deliveries.bump()
