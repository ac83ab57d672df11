"""Byte relays between two connections, for the ingress and egress proxies on both sides.

A relay copies each direction independently, so a half-close on one side (EOF) reaches the other
as a half-close while the opposite direction keeps flowing, as with a TCP or vsock socket. A
relay that sees no bytes in either direction for ``idle_timeout`` seconds closes both sides;
so does a reset on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Collection, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

READ_SIZE = 256 * 1024
# Listen backlog for relaying servers: a burst of connections waits in the kernel's queue
# instead of being refused (asyncio's default is 100).
BACKLOG = 1024

log = logging.getLogger(__name__)


class Endpoint(Protocol):
    """One side of a relay: bytes in, bytes out, half-close, close."""

    async def read(self) -> bytes:
        """The next bytes; ``b""`` once the peer has finished sending."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None:
        """Tell the peer nothing more will be sent (half-close)."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class StreamEndpoint:
    """An asyncio stream pair as a relay endpoint."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(READ_SIZE)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer.can_write_eof() and not self.writer.is_closing():
            self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class Activity:
    """When bytes last moved, for idle timeouts shared by several pumps."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last


@dataclass(frozen=True)
class RelayResult:
    """Bytes moved each way, and why the relay ended: ``eof``, ``idle`` or ``error``."""

    a_to_b: int
    b_to_a: int
    ended: str


async def pump(source: Endpoint, sink: Endpoint, activity: Activity) -> int:
    """Copy ``source`` to ``sink`` until EOF, then half-close ``sink``; returns the byte count."""
    total = 0
    while True:
        data = await source.read()
        if not data:
            sink.write_eof()
            return total
        activity.touch()
        sink.write(data)
        await sink.drain()
        total += len(data)


async def supervise(
    tasks: Collection[asyncio.Task[Any]],
    activity: Activity,
    idle_timeout: float | None,
    required: Collection[asyncio.Task[Any]] | None = None,
) -> str:
    """Wait until every ``required`` task (default: all) is done, and cancel the rest.

    Ends early, cancelling everything, when a task fails or nothing moved for ``idle_timeout``.
    Returns ``eof``, ``idle`` or ``error``; the tasks' exceptions are consumed.
    """
    needed = set(tasks if required is None else required)
    pending = set(tasks)
    ended = "eof"
    try:
        while needed & pending:
            timeout = None if idle_timeout is None else max(0.0, idle_timeout - activity.idle_for())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if any(not task.cancelled() and task.exception() is not None for task in done):
                ended = "error"
                break
            if idle_timeout is not None and not done and activity.idle_for() >= idle_timeout:
                ended = "idle"
                break
    finally:
        await cancel_all(pending)
    return ended


async def cancel_all(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them, swallowing what they raise."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def relay(a: Endpoint, b: Endpoint, idle_timeout: float | None = None) -> RelayResult:
    """Copy both ways until both sides finished sending, one fails, or the relay is idle.

    Both endpoints are closed when it returns (or is cancelled).
    """
    activity = Activity()
    forward = _task(pump(a, b, activity))
    backward = _task(pump(b, a, activity))
    try:
        ended = await supervise((forward, backward), activity, idle_timeout)
    finally:
        await close_all((a, b))
    return RelayResult(_count(forward), _count(backward), ended)


async def close_all(endpoints: Collection[Endpoint]) -> None:
    for endpoint in endpoints:
        endpoint.close()
    for endpoint in endpoints:
        await endpoint.wait_closed()


class Connections:
    """The tasks serving a server's connections, so that closing the server can end them all."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self, work: Awaitable[None], writer: asyncio.StreamWriter) -> None:
        """Run ``work`` for one connection and close the connection when it ends, however."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await work
        except asyncio.CancelledError:
            # close() cancelled it. The task is the top of its connection: ending normally keeps
            # asyncio's stream callback (Python 3.9-3.11) from logging the cancellation as an error.
            pass
        except OSError as err:
            log.info("%s: connection ended: %s", self.label, err)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def close(self) -> None:
        await cancel_all(list(self._tasks))

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)


def _task(coroutine: Coroutine[Any, Any, int]) -> asyncio.Task[int]:
    return asyncio.get_running_loop().create_task(coroutine)


def _count(task: asyncio.Task[int]) -> int:
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()
    return 0


__all__ = [
    "BACKLOG",
    "READ_SIZE",
    "Activity",
    "Connections",
    "Endpoint",
    "RelayResult",
    "StreamEndpoint",
    "cancel_all",
    "close_all",
    "pump",
    "relay",
    "supervise",
]
