"""The project images' tags, container settings, input digests and build context, without Docker."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

import enclave_runtime
from enclave_runtime.host.project_images import (
    EMULATOR_CONTAINER_SETTINGS,
    ProjectImages,
    ProjectImagesError,
    emulator_container_settings,
    emulator_docker_run_args,
    ensure_project_images,
    inputs_digest,
    prepare_runtime_context,
    runtime_command,
    runtime_entry_points,
    runtime_image_tag,
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


def test_the_emulator_root_is_shared_at_the_same_path_with_the_capabilities_it_needs() -> None:
    settings = emulator_container_settings("/tmp/emu/", "/etc/enclaveops/allocator.yaml")
    assert settings["cap_add"] == ["SYS_ADMIN", "NET_ADMIN"]
    assert settings["pid_mode"] == "host"
    assert settings["volumes"] == {
        "/tmp/emu": {"bind": "/tmp/emu", "mode": "rw"},
        "/etc/enclaveops/allocator.yaml": {"bind": "/etc/enclaveops/allocator.yaml", "mode": "ro"},
    }
    assert settings["environment"] == {
        "NITRO_EMU_ROOT": "/tmp/emu",
        "NITRO_EMU_ALLOCATOR": "/etc/enclaveops/allocator.yaml",
    }


def test_an_allocator_inside_the_root_needs_no_mount_of_its_own() -> None:
    settings = emulator_container_settings(Path("/tmp/emu"), Path("/tmp/emu/allocator.yaml"))
    assert list(settings["volumes"]) == ["/tmp/emu"]
    assert settings["environment"]["NITRO_EMU_ALLOCATOR"] == "/tmp/emu/allocator.yaml"


def test_docker_run_arguments_say_the_same() -> None:
    args = emulator_docker_run_args("/tmp/emu")
    assert args == [
        "--cap-add=SYS_ADMIN",
        "--cap-add=NET_ADMIN",
        *[f"--security-opt={option}" for option in EMULATOR_CONTAINER_SETTINGS["security_opt"]],
        "--pid=host",
        "--user=root",
        "--volume=/tmp/emu:/tmp/emu:rw",
        "--env=NITRO_EMU_ROOT=/tmp/emu",
    ]


def test_a_relative_emulator_root_is_refused_with_the_reason() -> None:
    with pytest.raises(ProjectImagesError, match=r"emulator root .*'emu'.* absolute path"):
        emulator_container_settings("emu")


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


def test_outside_a_source_tree_the_error_says_where_images_come_from(tmp_path: Path) -> None:
    with pytest.raises(ProjectImagesError, match="source tree"):
        ensure_project_images(script=tmp_path / "missing.sh")


def test_the_build_script_refuses_an_unknown_option() -> None:
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "build-images.sh"), "--fast"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown argument --fast" in result.stderr
