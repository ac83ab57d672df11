"""Per-service log files: timestamped lines, rotated by size, also forwarded to the app log.

Each service writes to ``LOG_DIR/NAME.log``; when the next line would take the file past
``max_log_size`` it is renamed ``NAME.log.1`` (``.1`` to ``.2`` and so on, the oldest beyond
``max_log_files`` files dropped) and a new ``NAME.log`` begins — the naming of enclave-init's
logger. A line is written whole into one file, after any rotation, so rotation never loses or
splits a line; a file only exceeds ``max_log_size`` when a single line is larger.

Lines are stamped ``[YYYY-MM-DD HH:MM:SS.mmm]`` in UTC (enclave-init's stamp plus
milliseconds). The service's output is also forwarded, unstamped and prefixed with
``[NAME] ``, to odyn's app log stream (vsock 17001), so the host sees every service's output
next to the application's. Lines longer than :data:`MAX_LINE_BYTES` are split.

Writing never raises: a full or missing disk must not stop a service. The first failure is
remembered in :attr:`ServiceLog.error` (shown in the service's status) and lines keep going
to the app log.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

MAX_LINE_BYTES = 16 * 1024
_FILE_MODE = 0o640
_DIRECTORY_MODE = 0o750

Forward = Callable[[bytes], None]


class ServiceLog:
    """The log of one service (``NAME.log`` and its rotated files in ``directory``)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        name: str,
        max_log_size: int,
        max_log_files: int,
        *,
        forward: Forward | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_log_size < 1 or max_log_files < 1:
            raise ValueError("max_log_size and max_log_files must be at least 1")
        self.name = name
        self.directory = Path(directory)
        self.path = self.directory / f"{name}.log"
        self.max_log_size = max_log_size
        self.max_log_files = max_log_files
        self.error: str | None = None
        self._forward = forward
        self._clock = clock
        self._fd: int | None = None
        self._size = 0
        self._partial = b""

    # --- writing -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Raw output of the service: complete lines are logged, a trailing fragment waits."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._output_line(line)
        while len(self._partial) > MAX_LINE_BYTES:
            self._output_line(self._partial[:MAX_LINE_BYTES])
            self._partial = self._partial[MAX_LINE_BYTES:]

    def end_of_output(self) -> None:
        """The service's output ended: log what is left of an unterminated last line."""
        if self._partial:
            self._output_line(self._partial)
            self._partial = b""

    def note(self, message: str) -> None:
        """A line from the init itself (started, exited, ...): the file only, not the app log."""
        self._write(message.encode("utf-8", "replace"))

    def _output_line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        for start in range(0, max(len(line), 1), MAX_LINE_BYTES):
            piece = line[start : start + MAX_LINE_BYTES]
            self._write(piece)
            if self._forward is not None:
                self._forward(b"[" + self.name.encode() + b"] " + piece + b"\n")

    def _write(self, text: bytes) -> None:
        entry = self._stamp().encode("ascii") + text + b"\n"
        try:
            if self._fd is None:
                self._open()
            if self._size and self._size + len(entry) > self.max_log_size:
                self._rotate()
            assert self._fd is not None
            _write_all(self._fd, entry)
            self._size += len(entry)
        except OSError as err:
            self._failed(err)

    def _stamp(self) -> str:
        now = self._clock()
        clock = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
        return f"[{clock}.{int(now * 1000) % 1000:03d}] "

    def _open(self) -> None:
        self.directory.mkdir(mode=_DIRECTORY_MODE, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, _FILE_MODE)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        self._close_file()
        for index in range(self.max_log_files - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._numbered(index - 1), self._numbered(index))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._open()

    def _numbered(self, index: int) -> Path:
        return self.path if index == 0 else self.path.with_name(f"{self.path.name}.{index}")

    def _failed(self, err: OSError) -> None:
        if self.error is None:
            self.error = f"cannot write the log file {self.path}: {err.strerror or err}"
        self._close_file()

    # --- reading and clearing ----------------------------------------------------------------

    def tail(self, lines: int) -> list[str]:
        """The last ``lines`` lines, oldest first, across the current and rotated files."""
        if lines <= 0:
            return []
        collected: list[str] = []
        for path in self._files_newest_first():
            try:
                text = path.read_bytes().decode("utf-8", "replace")
            except OSError:
                continue
            collected[:0] = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
            if len(collected) >= lines:
                break
        return collected[-lines:]

    def clear(self) -> None:
        """Remove the current and every rotated file; the next line starts a new file."""
        self._close_file()
        for path in [self.path, *self._rotated_files()]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.error = None

    def close(self) -> None:
        self.end_of_output()
        self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._size = 0

    def _files_newest_first(self) -> Iterator[Path]:
        yield self.path
        yield from self._rotated_files()

    def _rotated_files(self) -> list[Path]:
        """``NAME.log.N`` files by N, including any left over from a larger max_log_files."""
        pattern = re.compile(re.escape(self.path.name) + r"\.([0-9]+)\Z")
        try:
            entries = os.listdir(self.directory)
        except OSError:
            return []
        found = [(int(m.group(1)), m.group(0)) for m in map(pattern.match, entries) if m]
        return [self.directory / entry for _, entry in sorted(found)]


def forward_to_fd(fd: int) -> Forward:
    """A forwarder writing to ``fd`` (the console pipe behind odyn's app log stream)."""

    def forward(data: bytes) -> None:
        with contextlib.suppress(OSError):
            _write_all(fd, data)

    return forward


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
