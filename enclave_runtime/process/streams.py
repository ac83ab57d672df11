"""One-way streams on vsock, shared by the status (17000) and log (17001) servers.

The host only reads these streams; whatever it sends is read and thrown away, so a peer that
hangs up is noticed at once even when there is nothing to send it. Every client has its own
task, so a client that stops reading stalls only itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Callable

from enclave_runtime.formats.vsock_ports import HOST_CID, PARENT_CID
from enclave_runtime.transport import vsock
from enclave_runtime.transport.relay import RefusalLog

LOG = logging.getLogger("odyn")

# Enough for a sleeve, an operator's tools and a few retries; beyond it a client is refused, so
# a misbehaving host cannot make odyn hold an unbounded number of connections.
DEFAULT_MAX_CLIENTS = 32
# Only the parent reads these streams; other enclaves (CID 16 and up) are refused.
DEFAULT_ALLOWED_CIDS = frozenset((HOST_CID, PARENT_CID))
# A client that has not taken what it was sent after this many seconds is dropped: a reader that
# stops reading must not hold a slot (and odyn's buffers) forever (docs/odyn.md).
STALL_TIMEOUT = 30.0
_DISCARD_CHUNK = 4096
_CLOSE_GRACE = 1.0

ClientLoop = Callable[[asyncio.StreamWriter, "asyncio.Future[None]"], Awaitable[None]]


class Broadcast:
    """A version counter that tasks can wait on: ``bump`` wakes everyone waiting for news."""

    def __init__(self) -> None:
        self.version = 0
        self._waiters: list[asyncio.Future[None]] = []

    def bump(self) -> None:
        self.version += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_past(self, seen: int) -> None:
        """Return once ``version`` is greater than ``seen``."""
        while self.version <= seen:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)


async def discard_until_eof(reader: asyncio.StreamReader) -> None:
    """Read and drop what the peer sends until it hangs up (or the connection breaks)."""
    try:
        while await reader.read(_DISCARD_CHUNK):
            pass
    except (ConnectionError, OSError):
        return


async def drain_within(writer: asyncio.StreamWriter, timeout: float = STALL_TIMEOUT) -> None:
    """``writer.drain()``, or ConnectionError when the client has not read for ``timeout`` s."""
    try:
        await asyncio.wait_for(writer.drain(), timeout)
    except asyncio.TimeoutError:
        raise ConnectionError(f"the client read nothing for {timeout:g} s") from None


async def wait_for_news(broadcast: Broadcast, seen: int, hangup: asyncio.Future[None]) -> bool:
    """Wait until ``broadcast`` moves past ``seen`` (True) or the peer hangs up (False)."""
    news = asyncio.ensure_future(broadcast.wait_past(seen))
    try:
        await asyncio.wait({news, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        news.cancel()
    return not hangup.done()


class StreamServer:
    """A vsock listener that runs ``client_loop(writer, hangup)`` for each connection."""

    def __init__(
        self,
        name: str,
        port: int,
        client_loop: ClientLoop,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        allowed_cids: frozenset[int] = DEFAULT_ALLOWED_CIDS,
    ) -> None:
        self.name = name
        self.port = port
        self._client_loop = client_loop
        self._max_clients = max_clients
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False
        self.allowed_cids = allowed_cids
        self._refusals = RefusalLog(LOG, name)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        self._server = await vsock.start_server(self._on_connect, self.port)

    async def _on_connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: vsock.VsockAddress
    ) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:
            # Accepted just as the server closed: its handler ran too late to be served.
            writer.close()
            return
        if peer.cid not in self.allowed_cids:
            self._refusals.refused(f"{peer}: only the parent (CID 3) reads this stream")
            writer.close()
            return
        if len(self._clients) >= self._max_clients:
            self._refusals.refused(f"{peer}: already serving {self._max_clients} clients")
            writer.close()
            return
        self._clients[task] = writer
        hangup = asyncio.ensure_future(discard_until_eof(reader))
        try:
            await self._client_loop(writer, hangup)
        except (ConnectionError, OSError) as err:
            LOG.debug("%s: %s went away: %s", self.name, peer, err)
        finally:
            hangup.cancel()
            del self._clients[task]
            writer.close()

    async def close(self) -> None:
        """Stop listening and end every client's stream.

        What was written is still sent to clients that read it; a client that does not read
        within ``_CLOSE_GRACE`` seconds has its connection aborted.
        """
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._clients)
        for writer in self._clients.values():
            writer.close()
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_GRACE)
        for writer in self._clients.values():
            writer.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
