# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The options every enclaveops.nitro module shares (module_utils/common.py NITRO_COMMON_ARGS)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  nitro_cli_path:
    description:
      - The C(nitro-cli) executable to drive, as a name looked up on E(PATH) or a full path.
      - For the emulator give the path of C(nitro-emu), which takes the same flags.
      - Set it once for every module with C(module_defaults) and C(group/enclaveops.nitro.nitro).
    type: str
    default: nitro-cli
  emulator_root:
    description:
      - The state directory of the nitro-emu emulator (E(NITRO_EMU_ROOT)).
      - When set, C(nitro_cli_path) runs with E(NITRO_EMU_ROOT) set to it, host-to-enclave
        connections use the emulated vsock fabric under it, and attestation trusts the
        emulator's CA root (C(<emulator_root>/ca/root.pem)) by default.
      - When E(NITRO_EMU_ALLOCATOR) is not set and C(<emulator_root>/allocator.yaml) exists
        (where the C(enclaveops.nitro.nitro_host) role writes the emulator's pool), nitro-emu
        runs with E(NITRO_EMU_ALLOCATOR) pointing at it.
      - Keep it short (for example C(/run/nitro-emu)) because Unix socket paths are limited to
        107 bytes.
      - Leave it unset on a real Nitro parent instance.
    type: path
  docker_host:
    description:
      - The Docker engine to talk to (E(DOCKER_HOST)), for example C(unix:///var/run/docker.sock).
      - Defaults to the environment's E(DOCKER_HOST), else the local socket.
    type: str
requirements:
  - enclave-runtime (the Python package, on the target; the C(enclaveops.nitro.nitro_host) role
    installs it)
notes:
  - Module options that the whole play shares can be set once with
    C(module_defaults) for C(group/enclaveops.nitro.nitro).
"""
