"""nitro_host's runtime tasks under `serial`: later batches have not decided yet (issue 12)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO_ROOT

VENV_BIN = Path(sys.executable).parent
PLAY = """\
- name: The runtime tasks, one host per batch
  hosts: batch
  gather_facts: true
  gather_subset: [min]
  serial: 1
  tasks:
    - name: Check the runtime as nitro_host does
      ansible.builtin.include_role:
        name: enclaveops.nitro.nitro_host
        tasks_from: runtime.yml
      vars:
        nitro_host_runtime_install: never
        nitro_host_runtime_venv: ""
"""


def test_runtime_tasks_run_batch_by_batch(tmp_path: Path) -> None:
    hostvars = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"batch": {"hosts": {f"host{i}": dict(hostvars) for i in range(1, 4)}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "play.yml").write_text(PLAY)
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", "inventory.yml", "play.yml"],
        cwd=tmp_path,
        env={
            **os.environ,
            "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
            "ANSIBLE_COLLECTIONS_PATH": str(REPO_ROOT / "collections"),
            "ANSIBLE_NOCOLOR": "1",
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    recaps = re.findall(r"^(host\d)\s*: ok=\d+ .*failed=(\d+)", result.stdout, re.MULTILINE)
    assert sorted(recaps) == [("host1", "0"), ("host2", "0"), ("host3", "0")], result.stdout
