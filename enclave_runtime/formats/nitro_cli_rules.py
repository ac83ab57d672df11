"""nitro-cli's resource rules, as pure functions: the emulator, the build and the host share them.

The rules are those of nitro-cli's ``resource_manager`` (docs/emulator.md lists what nitro-emu
reproduces); the errors are nitro-cli's own (:mod:`.nitro_cli_errors`).
"""

from __future__ import annotations

from enclave_runtime.formats import nitro_cli_errors as errors

MIB = 1024 * 1024
ENCLAVE_MEMORY_EIF_SIZE_RATIO = 4


def minimum_memory_mib(eif_size: int) -> int:
    """The least ``--memory`` nitro-cli accepts for an EIF of ``eif_size`` bytes (4 × its MiB)."""
    return -(-eif_size // MIB) * ENCLAVE_MEMORY_EIF_SIZE_RATIO


def check_memory_for_eif(memory_mib: int, eif_size: int) -> None:
    """E26 when the memory cannot hold 4 × the EIF (the rule of nitro-cli's resource_manager)."""
    if ENCLAVE_MEMORY_EIF_SIZE_RATIO * eif_size > memory_mib * MIB:
        raise errors.insufficient_memory_requested(memory_mib, minimum_memory_mib(eif_size))
    if memory_mib <= 0:
        raise errors.insufficient_memory_requested(memory_mib, None)
