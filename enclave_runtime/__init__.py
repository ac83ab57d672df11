"""EnclaveOps runtime: formats, transport, enclave side, host side and the Nitro emulator."""

from __future__ import annotations

__version__ = "0.1.0"
