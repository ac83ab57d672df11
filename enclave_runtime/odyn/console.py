"""The application's log: its stdout and stderr kept in a ring buffer and served on vsock 17001.

The application writes into a pipe. A dedicated thread empties the pipe into the ring as fast as
it can, whatever the log clients do, so the application is never held up by a reader and the
event loop may be busy without the pipe filling. In the odyn process the pipe is also odyn's own
stdout and stderr (as in enclaver), so odyn's messages and even a crash's traceback reach the
log stream too; the thread keeps that from ever deadlocking, since odyn's writes never wait for
the event loop.

Every client starts at the oldest byte still in the ring (the backlog) and then follows the live
output. A client that keeps up gets every byte once and in order. A client that falls so far
behind that the ring has overwritten what it had not read yet is **not** disconnected and does
not slow anything down: it skips ahead to the oldest byte still held and is told, in its own
stream only, how many bytes it missed (``[odyn] 4096 bytes of log skipped: ...``). Keeping the
connection avoids a reconnect that would replay the backlog as duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from enclave_runtime.formats.manifest import DEFAULT_LOG_BUFFER_SIZE
from enclave_runtime.formats.vsock_ports import APP_LOG_PORT
from enclave_runtime.process.streams import (
    DEFAULT_MAX_CLIENTS,
    Broadcast,
    StreamServer,
    drain_within,
    wait_for_news,
)

_PIPE_READ_SIZE = 64 * 1024
_CLIENT_CHUNK = 64 * 1024


@dataclass(frozen=True)
class LogChunk:
    """Bytes read from the ring: ``data`` starts at offset ``end - len(data)``.

    ``skipped`` counts the bytes between the reader's offset and the oldest byte still held,
    lost to that reader because the ring overwrote them.
    """

    data: bytes
    end: int
    skipped: int


class LogRing:
    """The last ``capacity`` bytes of a byte stream, addressed by absolute offsets.

    Offset 0 is the first byte ever appended; ``end`` is the offset after the newest byte and
    ``start`` the offset of the oldest one kept. Safe to append from one thread while others read.
    """

    def __init__(self, capacity: int = DEFAULT_LOG_BUFFER_SIZE) -> None:
        _check_capacity(capacity)
        self._capacity = capacity
        self._data = bytearray()
        self._end = 0
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def start(self) -> int:
        with self._lock:
            return self._end - len(self._data)

    @property
    def end(self) -> int:
        with self._lock:
            return self._end

    def resize(self, capacity: int) -> None:
        """Keep the newest ``capacity`` bytes from now on (the manifest's log_buffer_size)."""
        _check_capacity(capacity)
        with self._lock:
            self._capacity = capacity
            self._trim()

    def append(self, data: bytes) -> None:
        with self._lock:
            self._data += data
            self._end += len(data)
            self._trim()

    def read(self, offset: int, limit: int = _CLIENT_CHUNK) -> LogChunk:
        """Up to ``limit`` bytes from ``offset`` on (from ``start`` if that is later)."""
        with self._lock:
            start = self._end - len(self._data)
            skipped = max(0, start - offset)
            first = max(offset, start) - start
            data = bytes(self._data[first : first + limit])
            return LogChunk(data, start + first + len(data), skipped)

    def _trim(self) -> None:
        excess = len(self._data) - self._capacity
        if excess > 0:
            del self._data[:excess]


def _check_capacity(capacity: int) -> None:
    if capacity < 1:
        raise ValueError(f"log buffer size must be at least 1 byte, not {capacity}")


def skip_notice(skipped: int, at_line_start: bool) -> bytes:
    """The line a lagging client gets where its stream skips ahead."""
    lead = b"" if at_line_start else b"\n"
    return lead + (
        f"[odyn] {skipped} bytes of log skipped: this log client read more slowly than the "
        "application wrote\n"
    ).encode("ascii")


class Console:
    """Captures the application's output and serves it to log clients.

    ``capture_own_stdio`` (the odyn process) also points odyn's own stdout and stderr at the
    pipe; the application then simply inherits them (``app_output`` is None). Without it (tests,
    embedding) ``app_output`` is the pipe's write end to give the application as stdout/stderr.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_LOG_BUFFER_SIZE,
        port: int = APP_LOG_PORT,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.ring = LogRing(capacity)
        self._appended = Broadcast()
        self._progress = Broadcast()
        self._cursors: dict[int, int] = {}
        self._input_ended = False
        self._notify_pending = False
        self._write_fd: int | None = None
        self._saved_stdio: tuple[int, int] | None = None
        self._server = StreamServer("log", port, self._stream_to, max_clients)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def app_output(self) -> int | None:
        """The file descriptor for the application's stdout and stderr; None: inherit odyn's."""
        return None if self._saved_stdio is not None else self._write_fd

    @property
    def client_count(self) -> int:
        return self._server.client_count

    async def start(self, capture_own_stdio: bool = False) -> None:
        """Serve the log port, then start capturing (the pipe and its reader thread)."""
        await self._server.start()
        self._loop = asyncio.get_running_loop()
        read_fd, self._write_fd = os.pipe()
        if capture_own_stdio:
            self._capture_own_stdio()
        threading.Thread(target=self._pump, args=(read_fd,), name="odyn-log", daemon=True).start()

    def resize(self, capacity: int) -> None:
        self.ring.resize(capacity)

    def end_input(self) -> None:
        """odyn writes no more: give odyn's stdio back and close its end of the pipe.

        The stream then ends once every process of the application has closed its copy.
        """
        if self._saved_stdio is not None:
            _flush_python_stdio()
            for target, saved in zip((1, 2), self._saved_stdio):
                os.dup2(saved, target)
                os.close(saved)
            self._saved_stdio = None
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    async def wait_drained(self) -> None:
        """Return once the pipe has ended and every connected client has been sent everything."""
        while True:
            seen = self._progress.version
            end = self.ring.end
            if self._input_ended and all(cursor >= end for cursor in self._cursors.values()):
                return
            await self._progress.wait_past(seen)

    async def close(self) -> None:
        self.end_input()
        await self._server.close()

    def _capture_own_stdio(self) -> None:
        assert self._write_fd is not None
        _flush_python_stdio()
        saved = (os.dup(1), os.dup(2))
        for fd in saved:
            os.set_inheritable(fd, False)
        os.dup2(self._write_fd, 1)
        os.dup2(self._write_fd, 2)
        os.close(self._write_fd)
        self._write_fd = None
        self._saved_stdio = saved

    def _pump(self, read_fd: int) -> None:
        """Thread: move everything from the pipe into the ring until every writer has closed."""
        try:
            while True:
                data = os.read(read_fd, _PIPE_READ_SIZE)
                if not data:
                    break
                self.ring.append(data)
                if not self._notify_pending:
                    self._notify_pending = True
                    self._call_in_loop(self._on_appended)
        except OSError:
            pass
        finally:
            os.close(read_fd)
            self._call_in_loop(self._on_input_end)

    def _call_in_loop(self, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        # RuntimeError: the loop has closed; odyn is exiting and nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback)

    def _on_appended(self) -> None:
        self._notify_pending = False
        self._appended.bump()
        self._progress.bump()

    def _on_input_end(self) -> None:
        self._input_ended = True
        self._appended.bump()
        self._progress.bump()

    async def _stream_to(self, writer: asyncio.StreamWriter, hangup: asyncio.Future[None]) -> None:
        key = id(writer)
        cursor = self.ring.start
        self._cursors[key] = cursor
        at_line_start = True
        try:
            while True:
                seen = self._appended.version
                chunk = self.ring.read(cursor)
                if chunk.skipped:
                    writer.write(skip_notice(chunk.skipped, at_line_start))
                if chunk.data:
                    writer.write(chunk.data)
                    at_line_start = chunk.data.endswith(b"\n")
                    await drain_within(writer)
                    cursor = self._cursors[key] = chunk.end
                    self._progress.bump()
                    continue
                if not await wait_for_news(self._appended, seen, hangup):
                    return
        finally:
            del self._cursors[key]
            self._progress.bump()


def _flush_python_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
