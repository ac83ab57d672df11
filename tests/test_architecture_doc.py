"""docs/architecture.md matches the tree: every path it names exists, every package is mapped."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "architecture.md"
# `a/b/`, `a/b.py`, `a/b.json`...: a path of the repository, in backticks.
_PATH = re.compile(r"`((?:enclave_runtime|collections|docs|tests|scripts)/[^`\s]*)`")
_FILE_IN_PACKAGE = re.compile(r"`([a-z_]+\.py)`")


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_path_the_architecture_names_exists() -> None:
    paths = _PATH.findall(_text())
    assert len(paths) > 20, paths
    missing = [path for path in paths if not (REPO_ROOT / path).exists()]
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_file_named_in_a_package_row_exists_in_that_package() -> None:
    for line in _text().splitlines():
        package = re.match(r"\| `(enclave_runtime/[a-z_]+/)` \|", line)
        if package is None:
            continue
        for name in _FILE_IN_PACKAGE.findall(line):
            assert (REPO_ROOT / package.group(1) / name).is_file(), f"{package.group(1)}{name}"


def test_every_package_of_the_runtime_is_in_the_map_and_the_layers() -> None:
    text = _text()
    layers = text.split("## Layering rules", 1)[1].split("```")[1].split()
    packages = sorted(
        path.name
        for path in (REPO_ROOT / "enclave_runtime").iterdir()
        if (path / "__init__.py").is_file()
    )
    for name in packages:
        assert f"`enclave_runtime/{name}/`" in text, f"enclave_runtime/{name}/ is not in the map"
        assert name in layers, f"{name} is not in the layers"


def test_the_layers_are_the_import_linter_contracts() -> None:
    import tomllib

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    assert _text().split("## Layering rules", 1)[1].split("```")[1].split() == layers
