"""Build plane of EnclaveOps: what runs on the build machine (docs/architecture.md).

:mod:`.docker_rootfs` turns a Docker image into the flattened root file system and the command an
enclave boots with; :mod:`.eif_builder` is the native EIF builder (nitro-cli's build-enclave
without nitro-cli) that nitro-emu and the build pipeline use; :mod:`.pipeline` is the release
build; :mod:`.project_images` and :mod:`.runtime_bundle` build the project's own images.
"""

from __future__ import annotations
