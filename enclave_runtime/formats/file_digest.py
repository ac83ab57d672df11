"""SHA-256 and SHA-384 of a file in one read: an EIF is hundreds of MB, and a build records both
(the release label, the build record) while a parent checks the SHA-384 before it runs one."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 1 << 20


def file_digests(path: str | os.PathLike[str]) -> tuple[str, str]:
    """SHA-256 and SHA-384 (hex) of the file at ``path``."""
    sha256, sha384 = hashlib.sha256(), hashlib.sha384()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            sha256.update(chunk)
            sha384.update(chunk)
    return sha256.hexdigest(), sha384.hexdigest()
