"""The log ring and the log server on vsock 17001: backlog then live, slow clients never block."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.vsock_ports import APP_LOG_PORT
from enclave_runtime.odyn.console import Console, LogRing
from tests.unit.odyn_support import (
    PYTHON,
    connect_when_listening,
    eventually,
    parent_side,
)

# --- the ring ----------------------------------------------------------------------------------


def test_the_ring_keeps_the_newest_bytes_at_absolute_offsets() -> None:
    ring = LogRing(8)
    ring.append(b"abcdef")
    ring.append(b"ghij")
    assert (ring.start, ring.end) == (2, 10)
    chunk = ring.read(0)
    assert (chunk.data, chunk.end, chunk.skipped) == (b"cdefghij", 10, 2)
    assert ring.read(7).data == b"hij"
    assert ring.read(10).data == b""
    assert ring.read(3, limit=2).data == b"de"


def test_shrinking_the_ring_keeps_the_newest_bytes() -> None:
    ring = LogRing(1024)
    ring.append(b"0123456789")
    ring.resize(4)
    assert ring.read(0).data == b"6789"
    ring.resize(100)
    ring.append(b"ab")
    assert ring.read(0).data == b"6789ab"


def test_a_ring_needs_room() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        LogRing(0)


@given(
    capacity=st.integers(1, 64),
    steps=st.lists(st.tuples(st.binary(max_size=40), st.booleans()), max_size=60),
)
def test_a_reader_gets_every_byte_once_or_is_told_what_it_missed(
    capacity: int, steps: list[tuple[bytes, bool]]
) -> None:
    ring = LogRing(capacity)
    written = bytearray()
    received: list[int | None] = []  # None: a byte the reader was told it missed
    cursor = 0

    def read_all() -> None:
        nonlocal cursor
        while True:
            oldest_kept = max(0, len(written) - capacity)
            chunk = ring.read(cursor, limit=7)
            assert chunk.skipped == max(0, oldest_kept - cursor)
            received.extend([None] * chunk.skipped)
            received.extend(chunk.data)
            cursor = chunk.end
            if not chunk.data:
                return

    for data, read_now in steps:
        ring.append(data)
        written += data
        if read_now:
            read_all()
    read_all()
    assert cursor == len(written) == len(received)
    assert all(got is None or got == byte for got, byte in zip(received, written))
    assert received[-capacity:] == list(written[-capacity:])


def test_a_reader_that_keeps_up_loses_nothing() -> None:
    ring = LogRing(16)
    written = bytearray()
    received = bytearray()
    cursor = 0
    for index in range(200):
        data = os.urandom(index % 17)
        ring.append(data)
        written += data
        chunk = ring.read(cursor)
        assert chunk.skipped == 0
        received += chunk.data
        cursor = chunk.end
    assert received == written


# --- the server --------------------------------------------------------------------------------


def _write(console: Console, data: bytes) -> None:
    """What the application does: write to its stdout."""
    fd = console.app_output
    assert fd is not None
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def test_a_client_gets_the_backlog_then_live_output(enclave_fabric_root: Path) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        console = Console()
        await console.start()
        try:
            _write(console, b"before anyone listened\n")
            reader, writer = await connect_when_listening(
                parent_side(enclave_fabric_root), APP_LOG_PORT
            )
            backlog = await asyncio.wait_for(reader.readline(), 10)
            _write(console, b"live\n")
            live = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            return backlog, live
        finally:
            await console.close()

    assert asyncio.run(scenario()) == (b"before anyone listened\n", b"live\n")


def test_the_backlog_is_the_newest_log_buffer_size_bytes(enclave_fabric_root: Path) -> None:
    text = b"".join(b"line %05d\n" % number for number in range(1000))

    async def scenario() -> bytes:
        console = Console()
        await console.start()
        console.resize(1024)
        _write(console, text)
        console.end_input()
        await asyncio.wait_for(console.wait_drained(), 10)
        reader, writer = await connect_when_listening(
            parent_side(enclave_fabric_root), APP_LOG_PORT
        )
        backlog = await asyncio.wait_for(reader.readexactly(1024), 10)
        await console.close()
        rest = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return backlog + rest

    assert asyncio.run(scenario()) == text[-1024:]


def test_a_client_that_keeps_up_gets_everything_across_many_ring_sizes(
    enclave_fabric_root: Path,
) -> None:
    bursts = [os.urandom(3000) for _ in range(64)]

    async def scenario() -> tuple[bytes, bytes]:
        console = Console(capacity=4096)
        await console.start()
        try:
            reader, writer = await connect_when_listening(
                parent_side(enclave_fabric_root), APP_LOG_PORT
            )
            received = bytearray()
            for burst in bursts:
                _write(console, burst)
                received += await asyncio.wait_for(reader.readexactly(len(burst)), 10)
            late_reader, late_writer = await parent_side(enclave_fabric_root).open_connection(
                16, APP_LOG_PORT
            )
            late = await asyncio.wait_for(late_reader.readexactly(4096), 10)
            writer.close()
            late_writer.close()
            return bytes(received), late
        finally:
            await console.close()

    received, late = asyncio.run(scenario())
    everything = b"".join(bursts)
    assert received == everything
    assert late == everything[-4096:]


def test_a_client_that_does_not_read_never_blocks_the_application(
    enclave_fabric_root: Path,
) -> None:
    lines = 400_000  # 3.6 MB: far more than the ring and the socket buffers hold
    program = f"import sys\nfor n in range({lines}): sys.stdout.write('%08d\\n' % n)\n"

    async def scenario() -> tuple[int, bytes]:
        console = Console(capacity=4096)
        await console.start()
        try:
            reader, writer = await connect_when_listening(
                parent_side(enclave_fabric_root), APP_LOG_PORT
            )
            app = subprocess.Popen([PYTHON, "-c", program], stdout=console.app_output)
            # The client reads nothing until the application has written everything and ended.
            code = await asyncio.get_running_loop().run_in_executor(None, app.wait, 30)
            console.end_input()
            received = bytearray()
            while not received.endswith(b"%08d\n" % (lines - 1)):
                received += await asyncio.wait_for(reader.read(65536), 10)
            writer.close()
            return code, bytes(received)
        finally:
            await console.close()

    code, received = asyncio.run(scenario())
    assert code == 0
    notices = re.findall(rb"\[odyn\] (\d+) bytes of log skipped: [^\n]*\n", received)
    assert notices, "the slow client must be told that it missed output"
    data = re.sub(rb"\[odyn\] \d+ bytes of log skipped: [^\n]*\n", b"", received)
    # Each notice may begin with a newline of its own (when it interrupts a line).
    missing = 9 * lines - sum(int(count) for count in notices)
    assert missing <= len(data) <= missing + len(notices)
    # What it did get is the stream's own bytes: the end is intact and in order.
    tail = data[-4096:].split(b"\n")[1:-1]
    assert [int(line) for line in tail] == list(range(lines - len(tail), lines))


def test_the_log_stream_ends_when_the_application_and_odyn_are_done(
    enclave_fabric_root: Path,
) -> None:
    async def scenario() -> bytes:
        console = Console()
        await console.start()
        reader, writer = await connect_when_listening(
            parent_side(enclave_fabric_root), APP_LOG_PORT
        )
        await eventually(lambda: console.client_count == 1)
        app = subprocess.Popen(
            ["sh", "-c", "echo out; echo err >&2"],
            stdout=console.app_output,
            stderr=console.app_output,
        )
        console.end_input()
        await asyncio.get_running_loop().run_in_executor(None, app.wait, 30)
        await asyncio.wait_for(console.wait_drained(), 10)
        await console.close()
        received = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return received

    assert asyncio.run(scenario()) == b"out\nerr\n"
