"""What the enclave role's tests share: the playbook they run, its outcome, and their fixtures'
set-up (the hello app image, a renamed copy of its manifest, a private emulator pool)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO_ROOT

VENV_BIN = Path(sys.executable).parent
EXAMPLE = REPO_ROOT / "examples" / "hello"
PLAYBOOK = """\
- name: Deploy with the enclave role
  hosts: localhost
  gather_facts: false
  module_defaults:
    group/enclaveops.nitro.nitro:
      nitro_cli_path: {nitro_emu}
      emulator_root: {root}
  environment:
    NITRO_EMU_ROOT: {root}
    NITRO_EMU_ALLOCATOR: {allocator}
  roles:
    - role: enclaveops.nitro.enclave
  post_tasks:
    - name: Record the deployment for the test
      ansible.builtin.copy:
        content: "{{{{ enclave_deployment | to_json }}}}"
        dest: {work}/deployment.json
        mode: "0600"
      when: not ansible_check_mode
"""


def run(
    command: list[str], timeout: float = 900, **options: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, **options
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout[-12000:]}\n{result.stderr[-4000:]}"


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    match = re.search(r"^localhost\s*:\s*(.*)$", result.stdout, re.MULTILINE)
    assert match, output(result)
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def task_outcome(result: subprocess.CompletedProcess[str], task: str) -> str:
    """The status word (ok, changed, skipping...) the default callback printed for a task."""
    match = re.search(
        rf"^TASK \[enclaveops\.nitro\.enclave : {re.escape(task)}\][^\n]*\n(\w+)",
        result.stdout,
        re.MULTILINE,
    )
    assert match, output(result)
    return match.group(1)


def write_playbook(work: Path, root: Path) -> Path:
    """The test playbook under ``work``, on the emulator ``root`` with a pool of its own."""
    allocator = work / "allocator.yaml"
    allocator.write_text("---\nmemory_mib: 2048\ncpu_count: 2\n")
    playbook = work / "deploy.yml"
    playbook.write_text(
        PLAYBOOK.format(nitro_emu=VENV_BIN / "nitro-emu", root=root, allocator=allocator, work=work)
    )
    return playbook


def play(
    playbook: Path, work: Path, *options: str, timeout: float = 900, **variables: Any
) -> subprocess.CompletedProcess[str]:
    """ansible-playbook from the repository root, the role's variables as an extra-vars file."""
    extra = work / "vars.json"
    extra.write_text(json.dumps(variables))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    command = [str(VENV_BIN / "ansible-playbook"), str(playbook), "-e", f"@{extra}", *options]
    return run(command, timeout=timeout, cwd=REPO_ROOT, env=env)


def build_app_image(base_image: str, tag: str, label: str) -> None:
    built = run(
        [
            "docker", "build", "-q", "--label", label, "--build-arg",
            f"BASE_IMAGE={base_image}", "-t", tag, str(EXAMPLE),
        ]
    )  # fmt: skip
    assert built.returncode == 0, built.stderr


def write_hello_manifest(path: Path, name: str, app_image: str, target: str) -> Path:
    """The hello example's manifest under the test's own name, app image and target."""
    manifest = yaml.safe_load((EXAMPLE / "enclaver.yaml").read_text())
    manifest.update(name=name, target=target)
    manifest["sources"]["app"] = app_image
    path.write_text(yaml.safe_dump(manifest))
    return path


def terminate_all(root: Path) -> None:
    run(
        [str(VENV_BIN / "nitro-emu"), "terminate-enclave", "--all"],
        env=dict(os.environ, NITRO_EMU_ROOT=str(root)),
    )
