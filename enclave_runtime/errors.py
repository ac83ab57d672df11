"""The error every user-facing failure of enclave_runtime derives from.

Command-line front ends catch :class:`EnclaveOpsError` and print its message (never a
traceback); anything else escaping is a bug.
"""

from __future__ import annotations


class EnclaveOpsError(Exception):
    """A failure the user can act on; ``str(err)`` says what is wrong and how to fix it."""


class FormatError(EnclaveOpsError, ValueError):
    """Bytes or a document that do not follow the format they claim to be."""
