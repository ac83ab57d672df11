"""How a sleeve container must run on the emulator (docs/images.md, "The sleeve-emulator base").

``EMULATOR_CONTAINER_SETTINGS`` and, for a given emulator root, ``emulator_container_settings()``
(docker SDK keyword arguments) or ``emulator_docker_run_args()`` (the same for the ``docker run``
command line).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from enclave_runtime.errors import EnclaveOpsError

# How a sleeve-emulator container runs (verified in tests/e2e/test_runtime_image.py):
# SYS_ADMIN for the sandbox's namespaces and mounts (unshare, overlayfs, proc, bind mounts),
# NET_ADMIN to bring up lo in the enclave's network namespace; AppArmor's docker-default profile
# forbids mount(2) (a no-op where AppArmor is off); Docker's default seccomp profile allows these
# calls once SYS_ADMIN is granted. The host PID namespace, because the emulator's records hold
# PIDs that host tools (nitro-emu describe-enclaves, terminate-enclave) check and signal.
EMULATOR_CONTAINER_SETTINGS: Mapping[str, Any] = {
    "cap_add": ("SYS_ADMIN", "NET_ADMIN"),
    "security_opt": ("apparmor=unconfined",),
    "pid_mode": "host",
    "user": "root",
    # The emulator root is bind-mounted at the SAME path: records, EIF paths and the fabric's
    # Unix sockets are absolute paths shared by the container and host tools.
    "volumes": {
        "emulator_root": "the same path, read-write",
        "allocator": "the same path, read-only (when outside the emulator root)",
    },
    "environment": ("NITRO_EMU_ROOT", "NITRO_EMU_ALLOCATOR"),
}


class EmulatorContainerError(EnclaveOpsError):
    """The emulator root or allocator file cannot be mounted into a sleeve container."""


def _absolute(path: str | os.PathLike[str], what: str) -> str:
    text = os.fspath(path)
    if not os.path.isabs(text):
        raise EmulatorContainerError(
            f"{what} {text!r} must be an absolute path: the container mounts it at the same path"
        )
    return os.path.normpath(text)


def emulator_container_settings(
    emulator_root: str | os.PathLike[str], allocator: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """docker SDK ``containers.run`` keyword arguments for a sleeve on this emulator root."""
    root = _absolute(emulator_root, "the emulator root (NITRO_EMU_ROOT)")
    volumes = {root: {"bind": root, "mode": "rw"}}
    environment = {"NITRO_EMU_ROOT": root}
    if allocator is not None:
        allocator_path = _absolute(allocator, "the allocator file (NITRO_EMU_ALLOCATOR)")
        if not allocator_path.startswith(root + "/"):
            volumes[allocator_path] = {"bind": allocator_path, "mode": "ro"}
        environment["NITRO_EMU_ALLOCATOR"] = allocator_path
    return {
        "cap_add": list(EMULATOR_CONTAINER_SETTINGS["cap_add"]),
        "security_opt": list(EMULATOR_CONTAINER_SETTINGS["security_opt"]),
        "pid_mode": EMULATOR_CONTAINER_SETTINGS["pid_mode"],
        "user": EMULATOR_CONTAINER_SETTINGS["user"],
        "volumes": volumes,
        "environment": environment,
    }


def emulator_docker_run_args(
    emulator_root: str | os.PathLike[str], allocator: str | os.PathLike[str] | None = None
) -> list[str]:
    """The same settings as ``docker run`` options (place them before the image)."""
    settings = emulator_container_settings(emulator_root, allocator)
    args = [f"--cap-add={cap}" for cap in settings["cap_add"]]
    args += [f"--security-opt={option}" for option in settings["security_opt"]]
    args += [f"--pid={settings['pid_mode']}", f"--user={settings['user']}"]
    for source, bind in settings["volumes"].items():
        args.append(f"--volume={source}:{bind['bind']}:{bind['mode']}")
    args += [f"--env={name}={value}" for name, value in settings["environment"].items()]
    return args
