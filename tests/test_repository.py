"""The repository's own promises: the set-up is idempotent and the collection skeleton builds."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

from tests.conftest import REPO_ROOT

COLLECTION = REPO_ROOT / "collections" / "ansible_collections" / "enclaveops" / "nitro"


def test_second_setup_run_installs_nothing() -> None:
    result = subprocess.run(
        ["scripts/setup.sh"],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "creating .venv" not in result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make test" in ci
    assert "make test" in readme.split("\n## ")[0], "the README must open with the test command"
    assert "make deploy" in readme.split("\n## ")[0], "the README must open with the main job"


def test_collection_requires_ansible_2_19() -> None:
    runtime = yaml.safe_load((COLLECTION / "meta" / "runtime.yml").read_text())
    assert runtime["requires_ansible"] == ">=2.19.0"
    assert "nitro" in runtime["action_groups"]


def test_collection_builds_into_an_installable_tarball(tmp_path: Path) -> None:
    galaxy = Path(sys.executable).parent / "ansible-galaxy"
    subprocess.run(
        [str(galaxy), "collection", "build", str(COLLECTION), "--output-path", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (tarball,) = tmp_path.glob("enclaveops-nitro-*.tar.gz")
    with tarfile.open(tarball) as archive:
        manifest = json.load(archive.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
    info = manifest["collection_info"]
    assert (info["namespace"], info["name"]) == ("enclaveops", "nitro")

    install_dir = tmp_path / "installed"
    subprocess.run(  # from outside the repo: its ansible.cfg already sees the collection
        [str(galaxy), "collection", "install", str(tarball), "-p", str(install_dir)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    installed = (
        install_dir / "ansible_collections" / "enclaveops" / "nitro" / "meta" / "runtime.yml"
    )
    assert installed.is_file()
