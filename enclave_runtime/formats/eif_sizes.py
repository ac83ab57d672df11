"""What each part of an EIF costs in bytes: kernel, bootstrap ramdisk, runtime, app (docs/eif.md).

The kernel and its command line, the first ramdisk (``init`` and ``nsm.ko``: nitro-cli's
bootstrap) and the headers, metadata and signature are counted from the EIF's sections. The
other ramdisks are the customer's cpio archives (``cmd``, ``env``, ``rootfs/…``): each member
counts, header and padding included, for the runtime when it lies under ``rootfs/`` +
:data:`RUNTIME_PREFIX` (what ``enclaveops build`` adds to the app image), else for the app; the
trailer and the archive's final padding count for the app. The parts add up to the EIF's size.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import IO

from enclave_runtime.formats.cpio import HEADER_SIZE, CpioHeader, iter_entries
from enclave_runtime.formats.eif import SectionType, read_eif

RUNTIME_PREFIX = "opt/enclave-runtime"  # docs/images.md: the runtime's one directory
_RUNTIME_MEMBER = f"rootfs/{RUNTIME_PREFIX}"


@dataclass(frozen=True)
class ComponentSizes:
    """Bytes of the EIF per component; ``other`` is headers, metadata and signature."""

    kernel: int
    bootstrap: int
    runtime: int
    app: int
    other: int

    @property
    def total(self) -> int:
        return self.kernel + self.bootstrap + self.runtime + self.app + self.other

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _is_runtime(name: str) -> bool:
    return name == _RUNTIME_MEMBER or name.startswith(_RUNTIME_MEMBER + "/")


def _align4(size: int) -> int:
    return (size + 3) & ~3


def member_size(header: CpioHeader) -> int:
    """A newc member's bytes: header and NUL-ended name, then the data, each padded to 4."""
    return _align4(HEADER_SIZE + len(header.name_bytes) + 1) + _align4(header.size)


def split_customer_ramdisk(data: IO[bytes], size: int) -> tuple[int, int]:
    """(runtime bytes, app bytes) of one customer ramdisk of ``size`` bytes read from ``data``."""
    runtime = sum(
        member_size(header) for header, _ in iter_entries(data) if _is_runtime(header.name)
    )
    return runtime, size - runtime


def component_sizes(path: str | os.PathLike[str]) -> ComponentSizes:
    """Bytes per component of the EIF at ``path``."""
    image = read_eif(path)
    counts = {"kernel": 0, "bootstrap": 0, "runtime": 0, "app": 0}
    ramdisks = image.ramdisk_sections()
    for section in image.sections:
        if section.section_type in (SectionType.KERNEL, SectionType.CMDLINE):
            counts["kernel"] += section.size
        elif ramdisks and section.index == ramdisks[0].index:
            counts["bootstrap"] += section.size
        elif section.section_type is SectionType.RAMDISK:
            with image.open_section(section) as data:
                runtime, app = split_customer_ramdisk(data, section.size)
            counts["runtime"] += runtime
            counts["app"] += app
    counted = sum(counts.values())
    return ComponentSizes(**counts, other=os.path.getsize(path) - counted)
