"""How a sleeve container runs on the emulator: mounts, capabilities, environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclave_runtime.host.emulator_container import (
    EMULATOR_CONTAINER_SETTINGS,
    EmulatorContainerError,
    emulator_container_settings,
    emulator_docker_run_args,
)


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
    with pytest.raises(EmulatorContainerError, match=r"emulator root .*'emu'.* absolute path"):
        emulator_container_settings("emu")
