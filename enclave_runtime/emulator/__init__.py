"""nitro-emu: a drop-in for nitro-cli on machines without Nitro hardware (docs/emulator.md).

The ``nitro-emu`` command (:mod:`.cli`) speaks nitro-cli's flags, JSON and ``[ Exx ]`` errors
(:mod:`.nitro_cli_errors`); enclaves, the emulated instance ID and the resource bookkeeping live
in the state directory (:mod:`.state`); the launcher and sandbox start the enclave itself.
"""

from __future__ import annotations
