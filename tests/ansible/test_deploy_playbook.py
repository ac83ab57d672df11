"""The main job, playbooks/deploy-enclave.yml, on the emulator: deploy, converge again with no
change, preview a manifest change with --check --diff without making it, tear down."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.ansible.playbook_runner import (
    APP_HOST_PORT,
    VENV_BIN,
    PlaybookRun,
    extra_vars,
    private_emulator_root,
    run_playbook,
)
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

HELLO_MANIFEST = REPO_ROOT / "examples" / "hello" / "enclaver.yaml"
CONTAINER = yaml.safe_load(HELLO_MANIFEST.read_text())["name"]


def _container_image_id(name: str) -> str:
    result = subprocess.run(
        ["docker", "inspect", "--format", "{{.Image}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def _enclaves(emulator_root: Path) -> list[dict]:
    result = subprocess.run(
        [str(VENV_BIN / "nitro-emu"), "describe-enclaves"],
        env={"NITRO_EMU_ROOT": str(emulator_root), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _app_answers() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{APP_HOST_PORT}/", timeout=10) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def emulator_root() -> Iterator[Path]:
    root = private_emulator_root()
    yield root
    teardown = run_playbook("teardown.yml", "-e", extra_vars(root))
    shutil.rmtree(root, ignore_errors=True)
    assert teardown.returncode == 0, teardown.output[-4000:]


@pytest.fixture(scope="module")
def first_run(emulator_root: Path) -> PlaybookRun:
    return run_playbook("deploy-enclave.yml", "-e", extra_vars(emulator_root))


def test_deploy_prints_where_the_app_answers_and_the_verified_pcrs(first_run: PlaybookRun) -> None:
    assert first_run.returncode == 0, first_run.output[-6000:]
    assert f"Application: http://127.0.0.1:{APP_HOST_PORT}/" in first_run.output
    for index in (0, 1, 2):
        assert f"PCR{index} " in first_run.output
    assert _app_answers()


def test_second_run_changes_nothing(first_run: PlaybookRun, emulator_root: Path) -> None:
    assert first_run.returncode == 0, first_run.output[-6000:]
    second = run_playbook("deploy-enclave.yml", "-e", extra_vars(emulator_root))
    assert second.returncode == 0, second.output[-6000:]
    assert second.changed == 0, second.output[-6000:]


def test_check_diff_reports_a_manifest_change_without_making_it(
    first_run: PlaybookRun, emulator_root: Path, tmp_path: Path
) -> None:
    assert first_run.returncode == 0, first_run.output[-6000:]
    manifest = yaml.safe_load(HELLO_MANIFEST.read_text())
    manifest["egress"]["allow"].append("example.org")
    changed_manifest = tmp_path / "enclaver.yaml"
    changed_manifest.write_text(yaml.safe_dump(manifest))
    image_before = _container_image_id(CONTAINER)
    enclaves_before = _enclaves(emulator_root)

    preview = run_playbook(
        "deploy-enclave.yml",
        "--check",
        "--diff",
        "-e",
        extra_vars(emulator_root, deploy_enclave_manifest=str(changed_manifest)),
    )

    assert preview.returncode == 0, preview.output[-6000:]
    assert preview.changed > 0, preview.output[-6000:]
    assert _container_image_id(CONTAINER) == image_before
    assert [e["EnclaveID"] for e in _enclaves(emulator_root)] == [
        e["EnclaveID"] for e in enclaves_before
    ]
    assert _app_answers()


def test_teardown_removes_the_container_and_the_enclave(
    first_run: PlaybookRun, emulator_root: Path
) -> None:
    assert first_run.returncode == 0, first_run.output[-6000:]
    teardown = run_playbook("teardown.yml", "-e", extra_vars(emulator_root))
    assert teardown.returncode == 0, teardown.output[-6000:]
    assert _container_image_id(CONTAINER) == ""
    assert _enclaves(emulator_root) == []
