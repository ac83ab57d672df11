"""``enclaveops build --explain``: each EIF section, its size and digest, and the PCRs it feeds.

Which section feeds which PCR is :func:`enclave_runtime.formats.eif.section_pcrs`, the table the
EIF measurement itself uses (docs/eif.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

from enclave_runtime.formats.eif import read_eif, section_pcrs

HASH_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class SectionDigest:
    """One EIF section as ``--explain`` shows it: what it is, its size and digest, its PCRs."""

    index: int
    kind: str
    size: int
    sha384: str
    pcrs: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "Index": self.index,
            "Type": self.kind,
            "Size": self.size,
            "SHA384": self.sha384,
            "PCRs": list(self.pcrs),
        }


def explain(eif: str | os.PathLike[str]) -> list[SectionDigest]:
    """Each section of the EIF with its size, SHA-384 and the PCRs that measure it."""
    image = read_eif(eif)
    first_ramdisk = image.ramdisk_sections()[0].index if image.ramdisk_sections() else -1
    digests = []
    for section in image.sections:
        hasher = hashlib.sha384()
        with image.open_section(section) as data:
            for chunk in iter(lambda: data.read(HASH_CHUNK), b""):
                hasher.update(chunk)
        digests.append(
            SectionDigest(
                section.index,
                section.section_type.label,
                section.size,
                hasher.hexdigest(),
                section_pcrs(section.section_type, section.index == first_ramdisk),
            )
        )
    return digests
