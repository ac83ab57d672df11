"""nitro_host on fleets: runtime tasks under `serial`, the pool from the instance's facts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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


POOL_PLAY = """\
- name: The role's pool defaults from hardware facts
  hosts: batch
  gather_facts: false
  tasks:
    - name: Read the role's defaults
      ansible.builtin.include_vars:
        file: {defaults}
    - name: Report the pool
      ansible.builtin.copy:
        content: "{{{{ cpus }}}} {{{{ memory }}}}"
        dest: "{work}/{{{{ inventory_hostname }}}}.pool"
        mode: "0600"
      vars:
        cpus: "{{{{ nitro_host_allocator_cpu_count }}}}"
        memory: "{{{{ nitro_host_allocator_memory_mib }}}}"
"""


def _play(work: Path, play: str, hosts: dict[str, dict[str, object]]) -> str:
    base = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"batch": {"hosts": {name: {**base, **more} for name, more in hosts.items()}}}
    (work / "inventory.yml").write_text(yaml.safe_dump(inventory))
    (work / "play.yml").write_text(play)
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", "inventory.yml", "play.yml"],
        cwd=work,
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
    return result.stdout


def test_runtime_tasks_run_batch_by_batch(tmp_path: Path) -> None:
    stdout = _play(tmp_path, PLAY, {f"host{i}": {} for i in range(1, 4)})
    recaps = re.findall(r"^(host\d)\s*: ok=\d+ .*failed=(\d+)", stdout, re.MULTILINE)
    assert sorted(recaps) == [("host1", "0"), ("host2", "0"), ("host3", "0")], stdout


@pytest.mark.parametrize(
    ("vcpus", "memory_mb", "pool"),
    [
        (2, 3900, "2 2048"),
        (4, 7800, "2 3840"),
        (8, 16000, "6 7936"),
        (16, 65536, "14 32768"),
    ],
)
def test_the_pool_derives_from_the_instance(
    tmp_path: Path, vcpus: int, memory_mb: int, pool: str
) -> None:
    defaults = REPO_ROOT / "collections/ansible_collections/enclaveops/nitro/roles/nitro_host"
    play = POOL_PLAY.format(defaults=defaults / "defaults" / "main.yml", work=tmp_path)
    facts = {"ansible_processor_vcpus": vcpus, "ansible_memtotal_mb": memory_mb}
    _play(tmp_path, play, {"parent": facts})
    assert tmp_path.joinpath("parent.pool").read_text() == pool
