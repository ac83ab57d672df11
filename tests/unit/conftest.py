"""Fixtures shared by the unit tests that use the emulated vsock fabric."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.odyn_support import fabric_environment


@pytest.fixture
def fabric_root() -> Iterator[Path]:
    """An empty emulator root; short, because fabric sockets are Unix socket paths."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="fab"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def enclave_fabric_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fabric root, with this process set up as enclave CID 16 on it (odyn's view)."""
    with fabric_environment() as (root, env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield root
