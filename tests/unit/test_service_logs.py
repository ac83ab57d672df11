"""Service log files: stamped lines, size rotation that loses nothing, and the app log copy."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from enclave_runtime.init.service_logs import MAX_LINE_BYTES, ServiceLog, forward_to_fd

STAMP = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] ")


def _body(line: str) -> str:
    assert STAMP.match(line), line
    return STAMP.sub("", line, count=1)


def _all_lines(directory: Path, name: str) -> list[str]:
    """Every line kept, oldest file first, as an operator would read them back."""
    files = sorted(
        directory.glob(f"{name}.log*"),
        key=lambda path: -int(path.suffix[1:]) if path.suffix[1:].isdigit() else 0,
    )
    return [_body(line) for path in files for line in path.read_text().splitlines()]


def test_lines_are_stamped_in_utc_with_milliseconds(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path, "web", 1 << 20, 3, clock=lambda: 1_700_000_000.25)
    log.feed(b"hello\n")
    log.close()
    assert (tmp_path / "web.log").read_text() == "[2023-11-14 22:13:20.250] hello\n"


def test_partial_lines_wait_for_their_end_and_the_last_one_is_kept(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path, "web", 1 << 20, 3)
    log.feed(b"first li")
    log.feed(b"ne\nsecond\r\nunterminated")
    assert [_body(line) for line in log.tail(10)] == ["first line", "second"]
    log.end_of_output()
    assert [_body(line) for line in log.tail(10)] == ["first line", "second", "unterminated"]


def test_output_goes_to_the_app_log_prefixed_init_notes_do_not(tmp_path: Path) -> None:
    forwarded: list[bytes] = []
    log = ServiceLog(tmp_path, "web", 1 << 20, 3, forward=forwarded.append)
    log.note("Service web started with PID 42")
    log.feed(b"listening on 8080\n")
    assert forwarded == [b"[web] listening on 8080\n"]
    assert [_body(line) for line in log.tail(5)] == [
        "Service web started with PID 42",
        "listening on 8080",
    ]


def test_rotation_keeps_every_line_whole_and_in_order(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path, "burst", max_log_size=1024, max_log_files=200)
    lines = [f"line {index} " + "x" * (index % 50) for index in range(3000)]
    data = "".join(line + "\n" for line in lines).encode()
    for start in range(0, len(data), 997):  # chunks that cut lines anywhere
        log.feed(data[start : start + 997])
    log.close()
    assert _all_lines(tmp_path, "burst") == lines
    for path in tmp_path.glob("burst.log*"):
        assert path.stat().st_size <= 1024


def test_only_max_log_files_are_kept_newest_first(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path, "web", max_log_size=1024, max_log_files=3)
    for index in range(500):
        log.feed(f"{index:04d} {'y' * 60}\n".encode())
    log.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["web.log", "web.log.1", "web.log.2"]
    kept = _all_lines(tmp_path, "web")
    assert kept[-1].startswith("0499 ")
    assert [int(line[:4]) for line in kept] == list(range(500 - len(kept), 500))


def test_tail_reads_back_across_rotated_files(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path, "web", max_log_size=1024, max_log_files=5)
    for index in range(100):
        log.feed(f"{index}\n".encode())
    assert (tmp_path / "web.log.1").exists()
    assert [_body(line) for line in log.tail(60)] == [str(i) for i in range(40, 100)]
    assert log.tail(0) == []


def test_a_huge_line_is_split_not_held_in_memory(tmp_path: Path) -> None:
    forwarded: list[bytes] = []
    log = ServiceLog(tmp_path, "web", 1 << 20, 2, forward=forwarded.append)
    log.feed(b"z" * (MAX_LINE_BYTES * 2 + 5))
    assert [len(item) for item in forwarded] == [len("[web] \n") + MAX_LINE_BYTES] * 2
    log.end_of_output()
    assert len(forwarded) == 3


def test_clear_removes_current_and_rotated_files(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path, "web", max_log_size=1024, max_log_files=4)
    for index in range(200):
        log.feed(f"{index}\n".encode())
    (tmp_path / "web.log.9").write_text("from an older, larger max_log_files\n")
    (tmp_path / "webapp.log").write_text("another service\n")
    log.clear()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["webapp.log"]
    log.feed(b"after\n")
    assert [_body(line) for line in log.tail(5)] == ["after"]


def test_a_log_that_cannot_be_written_keeps_forwarding_and_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    forwarded: list[bytes] = []
    log = ServiceLog(blocker / "logs", "web", 1 << 20, 2, forward=forwarded.append)
    log.feed(b"still visible\n")
    assert forwarded == [b"[web] still visible\n"]
    assert log.error is not None
    assert log.error.startswith(f"cannot write the log file {blocker / 'logs' / 'web.log'}: ")


def test_forward_to_fd_writes_whole_lines_to_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        forward_to_fd(write_fd)(b"[web] hello\n")
        assert os.read(read_fd, 100) == b"[web] hello\n"
        os.close(read_fd)
        read_fd = -1
        forward_to_fd(write_fd)(b"[web] nobody reads\n")  # EPIPE is not the service's problem
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)


def test_nonsense_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ServiceLog(tmp_path, "web", 0, 1)
