"""molecule/default: converge (the main playbook on the emulator), idempotence, verify, cleanup.

Offline: the scenario disables Galaxy and prerun and reads the collection from this tree.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.ansible.playbook_runner import VENV_BIN
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]


def test_molecule_default_scenario_passes() -> None:
    env = {
        **os.environ,
        # molecule runs ansible-config and ansible-playbook from PATH.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_NOCOLOR": "1",
        "NO_COLOR": "1",
    }
    result = subprocess.run(
        [str(VENV_BIN / "molecule"), "test", "-s", "default"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    for step in ("converge", "idempotence", "verify"):
        assert f"{step}: Executed: Successful" in output, output[-8000:]
