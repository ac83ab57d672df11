"""Fixtures of the fleet tests: one bed per session (tests/fleet/README.md), taken down at the end.

Every test here is marked ``fleet`` (select them with ``-m fleet``); those that use the bed are
also ``root``, ``docker`` and ``slow``: the root conftest skips them off CI when root or Docker
is missing and fails them in CI, which runs as root.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet import bed as fleet_bed

LOCK = Path("/tmp/enclaveops-fleet-bed.lock")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here not in Path(item.fspath).parents:
            continue
        item.add_marker("fleet")
        if "bed" in getattr(item, "fixturenames", ()):
            for marker in ("root", "docker", "slow"):
                item.add_marker(marker)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the fleet bed needs root (namespaces, sshd, dockerd, iptables)"
    absent = [c for c in fleet_bed.REQUIRED_COMMANDS if shutil.which(c) is None]
    if absent:
        return f"the fleet bed needs {', '.join(absent)}: run scripts/ensure-packages.sh"
    return None


@pytest.fixture(scope="session")
def bed() -> Iterator[fleet_bed.Bed]:
    missing = _missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}, and CI must run the fleet tests")
        pytest.skip(missing)
    with LOCK.open("w") as lock:
        # One bed at a time on a machine: it owns fixed names and addresses.
        fcntl.flock(lock, fcntl.LOCK_EX)
        running = fleet_bed.Bed().start()
        try:
            yield running
        finally:
            running.stop()
