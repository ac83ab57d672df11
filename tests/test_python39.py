"""The runtime's unit suite under Python 3.9, the system Python of Amazon Linux 2023 parents.

The nitro_host role builds the runtime's venv on a real parent with that Python, and the sleeve
runs there in bare mode (docs/development.md, "Python versions"). This test runs tests/unit in
the venv that scripts/setup-py39.sh makes, in a separate process, so the development Python
(3.11) hides no 3.9 failure. Docker-marked tests stay on 3.11: they need the shared engine.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PYTHON39 = REPO_ROOT / ".venv39" / "bin" / "python"


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"


def test_the_unit_suite_passes_on_python_3_9() -> None:
    setup = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "setup-py39.sh")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert setup.returncode == 0, _tail(setup)
    version = subprocess.run(
        [str(PYTHON39), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == "(3, 9)", version.stdout

    workers = "2" if (os.cpu_count() or 1) > 1 else "0"
    pytest_args = ["tests/unit", "-q", "-p", "no:cacheprovider", "-m", "not docker", "-n", workers]
    result = subprocess.run(
        [str(PYTHON39), "-m", "pytest", *pytest_args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, _tail(result)
    assert " passed" in result.stdout.splitlines()[-1], _tail(result)
