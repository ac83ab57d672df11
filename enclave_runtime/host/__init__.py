"""Host side of EnclaveOps: what runs on the parent instance or the build machine (DESIGN §3).

Among its modules, :mod:`.docker_rootfs` turns a Docker image into the flattened root file
system and the command an enclave boots with, and :mod:`.eif_builder` is the native EIF builder
(nitro-cli's build-enclave without nitro-cli) that nitro-emu and the build pipeline use.
"""

from __future__ import annotations
