"""Running the project's playbooks the way an operator does: from the repository root (its
ansible.cfg and inventory/local.yml), with the venv's Ansible, on a private emulator root."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

VENV_BIN = Path(sys.executable).parent
RECAP = re.compile(
    r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)
# Host ports unlikely to be taken by other tests on a shared machine.
APP_HOST_PORT = 28080
AUX_API_HOST_PORT = 29101


@dataclass(frozen=True)
class PlaybookRun:
    returncode: int
    output: str

    @property
    def changed(self) -> int:
        """The `changed` count of localhost in the play recap (the last recap)."""
        recaps = RECAP.findall(self.output)
        assert recaps, f"no play recap in the output:\n{self.output[-4000:]}"
        return int(recaps[-1][1])


def private_emulator_root() -> Path:
    """A short emulator root under /tmp (Unix socket paths under it must stay within 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="nedp-", dir="/tmp"))


def extra_vars(emulator_root: Path, **more: object) -> str:
    return json.dumps(
        {
            "nitro_host_emulator_root": str(emulator_root),
            "enclave_published_ports": [f"{APP_HOST_PORT}:8080", f"{AUX_API_HOST_PORT}:9101"],
            **more,
        }
    )


def run_playbook(playbook: str, *args: str, timeout: int = 1800) -> PlaybookRun:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
    }
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), f"playbooks/{playbook}", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return PlaybookRun(result.returncode, result.stdout + result.stderr)
