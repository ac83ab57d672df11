"""The collection's quality gates: ansible-test sanity and units, ansible-lint, build, install, doc.

ansible-test needs its pip bootstrap stand-in (scripts/ansible-test-setup.sh) because the host it
downloads get-pip.py from is unreachable here; its sanity virtual environments come from PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

COLLECTION = REPO_ROOT / "collections" / "ansible_collections" / "enclaveops" / "nitro"
VENV_BIN = Path(sys.executable).parent
# Every sanity test that runs offline here; pslint needs PowerShell and shellcheck is not
# installed (the collection ships no PowerShell or shell files).
SANITY_TESTS = (
    "action-plugin-docs",
    "ansible-doc",
    "changelog",
    "compile",
    "empty-init",
    "ignores",
    "import",
    "line-endings",
    "no-assert",
    "no-get-exception",
    "no-illegal-filenames",
    "no-smart-quotes",
    "pep8",
    "pylint",
    "replace-urlopen",
    "runtime-metadata",
    "shebang",
    "symlinks",
    "use-argspec-type-path",
    "use-compat-six",
    "validate-modules",
    "yamllint",
)
# Amazon Linux 2023's system Python: the modules must at least compile and import there.
TARGET_PYTHON = "3.9"
UNITS_REQUIREMENTS = ("xdist", "pytest_mock", "mock")

pytestmark = pytest.mark.slow


def _run(
    command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 1200
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout[-8000:]}\n{result.stderr[-8000:]}"


def _module_names() -> list[str]:
    return sorted(p.stem for p in (COLLECTION / "plugins" / "modules").glob("*.py"))


@pytest.fixture(scope="module")
def ansible_test() -> str:
    """ansible-test, with the pip bootstrap stand-in in its cache."""
    setup = _run(["bash", str(REPO_ROOT / "scripts" / "ansible-test-setup.sh")], REPO_ROOT)
    assert setup.returncode == 0, _output(setup)
    return str(VENV_BIN / "ansible-test")


def test_ansible_test_sanity_passes(ansible_test: str) -> None:
    tests = [arg for name in SANITY_TESTS for arg in ("--test", name)]
    result = _run([ansible_test, "sanity", "--python", "3.11", *tests], COLLECTION)
    assert result.returncode == 0, _output(result)


def _target_python_dir() -> Path | None:
    """A directory holding python3.9: on PATH, or a pyenv installation not selected globally."""
    found = shutil.which(f"python{TARGET_PYTHON}")
    if found and _run([found, "--version"], REPO_ROOT).returncode == 0:
        return Path(found).parent
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{TARGET_PYTHON}.*/bin")):
        if (candidate / f"python{TARGET_PYTHON}").is_file():
            return candidate
    return None


def test_modules_compile_and_import_on_the_oldest_target_python(ansible_test: str) -> None:
    directory = _target_python_dir()
    if directory is None:
        pytest.fail(f"python{TARGET_PYTHON} is needed to check the modules for Amazon Linux 2023")
    env = {"PATH": f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [ansible_test, "sanity", "--python", TARGET_PYTHON, "--test", "compile"]
    result = _run([*command, "--test", "import"], COLLECTION, env)
    assert result.returncode == 0, _output(result)


def test_ansible_test_units_pass(ansible_test: str) -> None:
    missing = [
        name
        for name in UNITS_REQUIREMENTS
        if _run([sys.executable, "-c", f"import {name}"], REPO_ROOT).returncode
    ]
    assert not missing, (
        f"ansible-test units needs {', '.join(missing)} in the venv: add pytest-xdist, "
        "pytest-mock and mock to the dev extras of pyproject.toml"
    )
    result = _run([ansible_test, "units", "--python", "3.11"], COLLECTION)
    assert result.returncode == 0, _output(result)


def test_ansible_lint_production_profile_passes() -> None:
    targets = ["playbooks", "molecule", str(COLLECTION.relative_to(REPO_ROOT))]
    result = _run([str(VENV_BIN / "ansible-lint"), "--profile", "production", *targets], REPO_ROOT)
    assert result.returncode == 0, _output(result)


def test_built_collection_installs_and_documents_every_module(tmp_path: Path) -> None:
    galaxy = str(VENV_BIN / "ansible-galaxy")
    build = _run(
        [galaxy, "collection", "build", str(COLLECTION), "--output-path", str(tmp_path)], tmp_path
    )
    assert build.returncode == 0, _output(build)
    tarballs = list(tmp_path.glob("enclaveops-nitro-*.tar.gz"))
    assert len(tarballs) == 1, _output(build)

    installed = tmp_path / "installed"
    install = _run(
        [galaxy, "collection", "install", "--offline", "-p", str(installed), str(tarballs[0])],
        tmp_path,
    )
    assert install.returncode == 0, _output(install)
    assert (installed / "ansible_collections" / "enclaveops" / "nitro" / "MANIFEST.json").is_file()

    # Only the installed copy: the repository's ansible.cfg (collections_path) is not read here.
    empty_config = tmp_path / "ansible.cfg"
    empty_config.write_text("[defaults]\n")
    env = {
        "ANSIBLE_COLLECTIONS_PATH": str(installed),
        "ANSIBLE_CONFIG": str(empty_config),
        "ANSIBLE_NOCOLOR": "1",
    }
    names = _module_names()
    assert names, "the collection has no modules"
    for name in names:
        doc = _run([str(VENV_BIN / "ansible-doc"), f"enclaveops.nitro.{name}"], tmp_path, env)
        assert doc.returncode == 0 and "EXAMPLES" in doc.stdout, f"{name}: {_output(doc)}"
    for role in ("nitro_host", "enclave"):
        doc = _run(
            [str(VENV_BIN / "ansible-doc"), "-t", "role", f"enclaveops.nitro.{role}"], tmp_path, env
        )
        assert doc.returncode == 0 and "ENTRY POINT: *main*" in doc.stdout, (
            f"{role}: {_output(doc)}"
        )
