"""The project images' tags, input digests and build context, without Docker."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import docker
import pytest

import enclave_runtime
from enclave_runtime.build.project_images import (
    ProjectImages,
    ProjectImagesError,
    ensure_project_images,
    inputs_digest,
    main,
    prepare_runtime_context,
    provide_image,
    runtime_command,
    runtime_entry_points,
    runtime_image_tag,
    runtime_wheel,
    sleeve_emulator_image_tag,
    sleeve_nitro_image_tag,
)
from tests.conftest import REPO_ROOT

VERSION = enclave_runtime.__version__
COMMANDS = ["enclaveops", "initctl", "nitro-emu", "odyn", "sleeve"]


def test_tags_carry_the_runtime_version() -> None:
    assert runtime_image_tag() == f"enclaveops/runtime:{VERSION}"
    assert sleeve_emulator_image_tag() == f"enclaveops/sleeve-emulator:{VERSION}"
    assert sleeve_nitro_image_tag("9.9.9") == "enclaveops/sleeve:9.9.9"
    assert runtime_command("odyn") == "/opt/enclave-runtime/bin/odyn"


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "Dockerfile").write_text("FROM scratch\n")
    (root / "sub" / "tool").write_text("#!/bin/sh\n")
    return root


def test_the_inputs_digest_ignores_times_but_not_contents_modes_or_extras(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "a")
    digest = inputs_digest([tree], ["base=sha256:1"])
    copy = tmp_path / "copy" / "a"
    shutil.copytree(tree, copy)
    os.utime(copy / "Dockerfile", (1, 1))
    assert inputs_digest([copy], ["base=sha256:1"]) == digest
    assert inputs_digest([copy], ["base=sha256:2"]) != digest
    (copy / "sub" / "tool").chmod(0o755)
    assert inputs_digest([copy], ["base=sha256:1"]) != digest
    (tree / "Dockerfile").write_text("FROM scratch \n")
    assert inputs_digest([tree], ["base=sha256:1"]) != digest


def test_a_missing_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProjectImagesError, match="nowhere does not exist"):
        inputs_digest([tmp_path / "nowhere"])


def test_the_runtime_commands_are_the_distributions_console_scripts() -> None:
    entry_points = runtime_entry_points()
    assert [line.split(" = ")[0] for line in entry_points] == COMMANDS
    assert "odyn = enclave_runtime.odyn.cli:main" in entry_points


def test_the_runtime_context_holds_the_recipe_and_the_bundle(tmp_path: Path) -> None:
    context = tmp_path / "context"
    prepare_runtime_context(context)
    assert (context / "Dockerfile").read_bytes() == (
        REPO_ROOT / "images" / "runtime" / "Dockerfile"
    ).read_bytes()
    assert (context / "assemble.py").is_file()
    assert len((context / "entry-points.txt").read_text().splitlines()) == len(COMMANDS)
    assert (context / "site-packages" / "enclave_runtime" / "odyn" / "cli.py").is_file()
    assert (context / "site-packages" / "cbor2").is_dir()
    assert not list(context.rglob("__pycache__"))


def _assemble_module() -> ModuleType:
    path = REPO_ROOT / "images" / "runtime" / "assemble.py"
    spec = importlib.util.spec_from_file_location("assemble", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_command_is_a_script_the_kernel_runs_with_the_runtimes_python(
    tmp_path: Path,
) -> None:
    entry_points = tmp_path / "entry-points.txt"
    entry_points.write_text("odyn = enclave_runtime.odyn.cli:main\n\n")
    prefix = tmp_path / "opt" / "enclave-runtime"
    assert _assemble_module()._write_commands(prefix, entry_points) == ["odyn"]
    script = prefix / "bin" / "odyn"
    assert script.read_text().splitlines()[0] == f"#!{prefix}/bin/python3"
    assert "from enclave_runtime.odyn.cli import main" in script.read_text()
    assert os.access(script, os.X_OK)


def _script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "build-images.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def test_ensure_returns_the_tags_the_script_printed(tmp_path: Path) -> None:
    tags = f"{runtime_image_tag()}\\n{sleeve_emulator_image_tag()}"
    script = _script(tmp_path, f'echo "building" >&2; printf "{tags}\\n"')
    assert ensure_project_images(script=script) == ProjectImages(
        runtime_image_tag(), sleeve_emulator_image_tag()
    )


def test_a_failed_build_reports_the_scripts_status_and_last_words(tmp_path: Path) -> None:
    script = _script(tmp_path, 'echo "build-images: the Docker engine does not answer" >&2; exit 1')
    with pytest.raises(ProjectImagesError, match=r"exit status 1(.|\n)*does not answer"):
        ensure_project_images(script=script)


def test_the_build_script_refuses_an_unknown_option() -> None:
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "build-images.sh"), "--fast"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown argument --fast" in result.stderr


def test_outside_a_source_tree_the_error_says_how_to_get_the_images(tmp_path: Path) -> None:
    with pytest.raises(ProjectImagesError) as raised:
        ensure_project_images(script=tmp_path / "missing.sh")
    message = str(raised.value)
    assert "not in the wheel" in message
    assert "docker save TAG | docker load" in message
    assert "nitro_host_runtime_image" in message


def _checkout(root: Path, version: str = "1.2.3") -> Path:
    package = root / "enclave_runtime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f'"""Doc."""\n\n__version__ = "{version}"\n')
    (root / "pyproject.toml").write_text("[project]\nname = 'enclave-runtime'\n")
    (root / "README.md").write_text("readme\n")
    return root


def _fake_pip(tmp_path: Path) -> str:
    """A `python` whose `-m pip wheel ... --wheel-dir DIR SRC` writes the wheel SRC would make."""
    log = tmp_path / "pip-calls"
    script = tmp_path / "fake-python"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'version=$(sed -n \'s/^__version__ = "\\(.*\\)"/\\1/p\' "$7/enclave_runtime/__init__.py")\n'
        'touch "$6/enclave_runtime-$version-py3-none-any.whl"\n'
    )
    script.chmod(0o755)
    return str(script)


def test_the_wheel_is_named_by_version_and_source_digest_and_built_once(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "checkout")
    python = _fake_pip(tmp_path)
    wheels = tmp_path / "wheels"

    first = runtime_wheel(source, wheels, python=python)
    again = runtime_wheel(source, wheels, python=python)

    assert first.built and not again.built
    assert first.version == "1.2.3"
    assert first.path == wheels / f"1.2.3-{first.digest}" / "enclave_runtime-1.2.3-py3-none-any.whl"
    assert again.path == first.path and first.path.is_file()
    assert len((tmp_path / "pip-calls").read_text().splitlines()) == 1
    assert "wheel --no-deps --wheel-dir" in (tmp_path / "pip-calls").read_text()


def test_byte_code_is_no_source_but_a_changed_module_is(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "checkout")
    python = _fake_pip(tmp_path)
    wheels = tmp_path / "wheels"
    first = runtime_wheel(source, wheels, python=python)

    (source / "enclave_runtime" / "__pycache__").mkdir()
    (source / "enclave_runtime" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert runtime_wheel(source, wheels, build=False).digest == first.digest

    (source / "enclave_runtime" / "errors.py").write_text("# new\n")
    changed = runtime_wheel(source, wheels, python=python)
    assert changed.built and changed.digest != first.digest
    assert [p.name for p in wheels.iterdir()] == [changed.path.parent.name]


def test_without_build_the_wheel_is_only_named(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "checkout")
    planned = runtime_wheel(source, tmp_path / "wheels", build=False)
    assert not planned.built and not planned.path.exists()


def test_a_directory_that_is_no_checkout_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        ProjectImagesError, match=r"not an EnclaveOps checkout.*nitro_host_runtime_checkout"
    ):
        runtime_wheel(tmp_path, tmp_path / "wheels")


def test_a_failed_pip_wheel_reports_its_last_words(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "checkout")
    python = tmp_path / "broken-python"
    python.write_text(
        "#!/bin/sh\necho 'ERROR: No matching distribution for setuptools>=77' >&2\nexit 1\n"
    )
    python.chmod(0o755)
    with pytest.raises(ProjectImagesError, match=r"exit status 1(.|\n)*setuptools>=77"):
        runtime_wheel(source, tmp_path / "wheels", python=str(python))
    assert list((tmp_path / "wheels").iterdir()) == []


def test_the_checkouts_real_wheel_holds_the_package_without_byte_code(tmp_path: Path) -> None:
    wheel = runtime_wheel(REPO_ROOT, tmp_path / "wheels")
    assert wheel.path.name == f"enclave_runtime-{VERSION}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel.path).namelist()
    assert "enclave_runtime/build/project_images.py" in names
    assert f"enclave_runtime-{VERSION}.dist-info/entry_points.txt" in names
    assert not [name for name in names if "__pycache__" in name]


def test_the_helper_prints_the_planned_wheel_as_json(tmp_path: Path, capsys: Any) -> None:
    source = _checkout(tmp_path / "checkout", "2.0.0")
    assert main(["runtime-wheel", str(source), str(tmp_path / "wheels"), "--no-build"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == "2.0.0" and printed["built"] is False
    assert printed["path"].endswith("enclave_runtime-2.0.0-py3-none-any.whl")


class _Image:
    def __init__(self, image_id: str) -> None:
        self.id = image_id
        self.tags: list[tuple[str, str]] = []

    def tag(self, repository: str, tag: str) -> None:
        self.tags.append((repository, tag))


class _Images:
    def __init__(self, known: dict[str, _Image]) -> None:
        self.known = known

    def get(self, name: str) -> _Image:
        if name not in self.known:
            raise docker.errors.ImageNotFound(name)
        return self.known[name]


class _Api:
    def __init__(self) -> None:
        self.pulls: list[tuple[str, str]] = []

    def pull(self, repository: str, tag: str, **_: Any) -> list[dict[str, str]]:
        self.pulls.append((repository, tag))
        return [{"status": "Status: Image is up to date"}]


class _Client:
    def __init__(self, known: dict[str, _Image]) -> None:
        self.images = _Images(known)
        self.api = _Api()


def test_a_registry_image_is_tagged_as_the_projects_once(tmp_path: Path) -> None:
    pulled = _Image("sha256:abc")
    client = _Client({"registry.example/enclaveops/runtime:1": pulled})

    provided = provide_image(client, "registry.example/enclaveops/runtime:1", runtime_image_tag())
    assert provided.changed and provided.image_id == "sha256:abc"
    assert pulled.tags == [("enclaveops/runtime", VERSION)]

    client.images.known[runtime_image_tag()] = pulled
    again = provide_image(client, "registry.example/enclaveops/runtime:1", runtime_image_tag())
    assert not again.changed and pulled.tags == [("enclaveops/runtime", VERSION)]
    assert client.api.pulls == [("registry.example/enclaveops/runtime", "1")] * 2
