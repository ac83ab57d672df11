"""Helpers for the odyn tests: an emulated fabric where the test is the parent, odyn CID 16."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from enclave_runtime.formats.protocol import AppStatus, decode_status_line
from enclave_runtime.formats.vsock_ports import PARENT_CID
from enclave_runtime.transport.vsock import ENV_CID, ENV_ROOT, EmulatedFabric

ENCLAVE_CID = 16
PYTHON = sys.executable
MINIMAL_MANIFEST = "version: v1\nname: odyn-test\ntarget: odyn-test:latest\nsources:\n  app: app\n"


@contextmanager
def fabric_environment() -> Iterator[tuple[Path, dict[str, str]]]:
    """A short fabric root and the environment of a process that is enclave CID 16."""
    root = Path(tempfile.mkdtemp(prefix="odyn", dir="/tmp"))
    try:
        yield root, {ENV_ROOT: str(root), ENV_CID: str(ENCLAVE_CID)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_async(coroutine: Any, timeout: float = 30.0) -> Any:
    """Run a test scenario on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def in_executor(function: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking client (a plain socket, urllib) without stalling the servers under test."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def parent_side(root: Path) -> EmulatedFabric:
    return EmulatedFabric(root, PARENT_CID)


def write_manifest(config_dir: Path, extra: str = "") -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "enclaver.yaml"
    path.write_text(MINIMAL_MANIFEST + extra)
    return path


async def connect_when_listening(
    parent: EmulatedFabric, port: int, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to odyn's (16, port) once it listens, as the sleeve does (it retries too)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await parent.open_connection(ENCLAVE_CID, port)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition that no event announces (another process's state, a socket's peer)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float = 10.0) -> bytes:
    """Everything up to and including ``marker`` (fails after ``timeout``)."""
    return await asyncio.wait_for(reader.readuntil(marker), timeout)


async def read_status(reader: asyncio.StreamReader, timeout: float = 10.0) -> AppStatus:
    return decode_status_line(await asyncio.wait_for(reader.readline(), timeout))


def odyn_command(config_dir: Path, *options: str) -> list[str]:
    return [PYTHON, "-m", "enclave_runtime.odyn.cli", "--config-dir", str(config_dir), *options]


def odyn_environment(fabric_env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **fabric_env}
