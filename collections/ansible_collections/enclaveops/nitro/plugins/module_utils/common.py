# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""What every enclaveops.nitro module shares: the common options, lazy imports, error reporting.

Modules are thin adapters over ``enclave_runtime``. The runtime (and the Docker SDK) are imported
lazily, inside the module's run, so a target without them gets one clear message instead of a
traceback, and ``ansible-test sanity`` can import the modules without either installed.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

# The options of the doc fragment enclaveops.nitro.nitro; settable once for every module of the
# collection through `module_defaults: group/enclaveops.nitro.nitro`.
NITRO_COMMON_ARGS = dict(
    nitro_cli_path=dict(type="str", default="nitro-cli"),
    emulator_root=dict(type="path"),
    docker_host=dict(type="str"),
)

ENV_EMULATOR_ROOT = "NITRO_EMU_ROOT"
ENV_DOCKER_HOST = "DOCKER_HOST"
ENV_EMULATOR_ALLOCATOR = "NITRO_EMU_ALLOCATOR"
EMULATOR_CA_ROOT = "ca/root.pem"
# Where the nitro_host role writes the emulator's pool (its allocator module's path).
EMULATOR_ALLOCATOR = "allocator.yaml"

RUNTIME_REQUIREMENT = (
    "enclave_runtime is required on the target: install enclave-runtime "
    "(the nitro_host role does it)"
)
DOCKER_REQUIREMENT = (
    "the Docker SDK for Python (docker) is required on the target: install it with "
    "`pip install docker` (the nitro_host role does it)"
)


def nitro_argument_spec(**specific):
    """``specific`` options plus NITRO_COMMON_ARGS, as one argument_spec."""
    spec = dict(NITRO_COMMON_ARGS)
    spec.update(specific)
    return spec


def import_runtime(module, name="enclave_runtime"):
    """Import ``name`` (a module of enclave_runtime) or fail with what to install."""
    return _import_or_fail(module, name, RUNTIME_REQUIREMENT)


def import_docker(module):
    """Import the Docker SDK for Python or fail with what to install."""
    return _import_or_fail(module, "docker", DOCKER_REQUIREMENT)


def _import_or_fail(module, name, requirement):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        module.fail_json(
            msg=f"{requirement} (the Python at {sys.executable} could not import {name}: {err})",
            exception=traceback.format_exc(),
        )


def runtime_environment(module):
    """Environment variables the runtime reads, from the common options (only those set)."""
    env = {}
    root = module.params.get("emulator_root")
    if root:
        env[ENV_EMULATOR_ROOT] = root
        allocator = os.path.join(root, EMULATOR_ALLOCATOR)
        if ENV_EMULATOR_ALLOCATOR not in os.environ and os.path.isfile(allocator):
            env[ENV_EMULATOR_ALLOCATOR] = allocator
    if module.params.get("docker_host"):
        env[ENV_DOCKER_HOST] = module.params["docker_host"]
    return env


def apply_environment(module):
    """Put the common options into this module process's environment.

    Parts of the runtime read the environment rather than arguments (the Docker SDK reads
    DOCKER_HOST, the vsock transport NITRO_EMU_ROOT); the module process is short-lived and ours.
    """
    os.environ.update(runtime_environment(module))


def nitro_cli(module):
    """A NitroCli for ``nitro_cli_path``, with NITRO_EMU_ROOT set when ``emulator_root`` is."""
    nitro_cli_module = import_runtime(module, "enclave_runtime.host.nitro_cli")
    return nitro_cli_module.NitroCli(
        module.params.get("nitro_cli_path") or "nitro-cli", env=runtime_environment(module)
    )


def emulator_ca_root(module):
    """The emulator's CA root certificate path when ``emulator_root`` is set, else None."""
    root = module.params.get("emulator_root")
    return os.path.join(root, EMULATOR_CA_ROOT) if root else None


def error_details(err):
    """cmd/rc/stdout/stderr an error carries (e.g. NitroCliCommandError), for fail_json."""
    details = {}
    command = getattr(err, "command", None)
    if command is not None:
        details["cmd"] = list(command) if isinstance(command, (list, tuple)) else command
    for key in ("rc", "stdout", "stderr"):
        value = getattr(err, key, None)
        if value is not None:
            details[key] = value
    return details


def fail_from_error(module, err, msg_hint=None, **result):
    """fail_json for an EnclaveOpsError: its message (it says what to do), plus cmd/rc/output.

    ``msg_hint`` prefixes what the module was doing ("cannot start enclave web"); ``result``
    carries keys the module has already computed (e.g. ``changed``).
    """
    message = str(err)
    if msg_hint:
        message = f"{msg_hint}: {message}"
    details = error_details(err)
    details.update(result)
    module.fail_json(msg=message, **details)
