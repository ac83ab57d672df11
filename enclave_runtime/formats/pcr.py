"""Nitro PCR arithmetic: SHA-384 registers that start at zero and are only ever extended.

A Nitro PCR is a TPM-style register: ``extend(pcr, data) = SHA384(pcr || data)``. The boot
measurements of an EIF are one extension of the zero register by the SHA-384 of the measured
bytes, so ``PCRn = SHA384(48 zero bytes || SHA384(content))`` where ``content`` is the plain
concatenation of the measured sections (aws-nitro-enclaves-image-format builds and reads EIFs
with ``EifHasher::new_without_cache``, which hashes the bytes as one stream, no block scheme).

The :class:`Measurements` object is the ``Measurements`` JSON of ``nitro-cli build-enclave``,
``describe-eif`` and ``describe-enclaves``, so the same type serves our builder, our reader and
the parsing of nitro-cli's output.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from enclave_runtime.errors import FormatError

PCR_SIZE = 48
ZERO_PCR = bytes(PCR_SIZE)

# nitro-cli prints ``format!("{:?}", Sha384::new())``. With sha2 0.9 (every nitro-cli up to 1.4)
# that Debug output is "Sha384 { ... }", as docs/image_signing.md of aws-nitro-enclaves-cli shows.
NITRO_CLI_HASH_ALGORITHM = "Sha384 { ... }"

_PCR_HEX = re.compile(r"[0-9a-fA-F]{96}")
PCR_COUNT = 32
# ASCII digits only: str.isdigit() also accepts "²" and "٣", which int() then rejects or reads
# as 3 (docs/attestation.md, "Expected PCRs").
_PCR_INDEX = re.compile(r"(?:PCR)?([0-9]{1,2})", re.IGNORECASE)


def parse_pcr_index(text: str) -> int:
    """The index in ``"3"``, ``"03"``, ``"PCR3"`` or ``"pcr3"``; ValueError naming the fix."""
    match = _PCR_INDEX.fullmatch(text) if text.isascii() else None
    if match is None or int(match.group(1)) >= PCR_COUNT:
        raise ValueError(
            f"{text!r:.40} is not a PCR index: write 0 to {PCR_COUNT - 1} in ASCII digits, "
            "optionally after PCR (PCR0 ...)"
        )
    return int(match.group(1))


def extend(pcr: bytes, data: bytes) -> bytes:
    """The register value after extending ``pcr`` with ``data`` (NSM ``ExtendPCR``)."""
    if len(pcr) != PCR_SIZE:
        raise FormatError(f"a PCR is {PCR_SIZE} bytes (SHA-384), got {len(pcr)}")
    return hashlib.sha384(pcr + data).digest()


def pcr_of(*contents: bytes) -> bytes:
    """The boot measurement of ``contents`` concatenated, as nitro-cli computes PCR0/1/2/8."""
    hasher = PcrHasher()
    for content in contents:
        hasher.update(content)
    return hasher.pcr()


class PcrHasher:
    """Streaming form of :func:`pcr_of`: feed the measured bytes in pieces of any size."""

    def __init__(self) -> None:
        self._content = hashlib.sha384()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._content.update(data)

    def copy(self) -> PcrHasher:
        """A hasher that continues from the bytes fed so far (PCR1 is a prefix of PCR0)."""
        clone = PcrHasher.__new__(PcrHasher)
        clone._content = self._content.copy()
        return clone

    def pcr(self) -> bytes:
        return extend(ZERO_PCR, self._content.digest())


def pcr_from_hex(value: object) -> bytes:
    """A PCR from its 96 hex digits; ValueError otherwise (callers name the field)."""
    if not isinstance(value, str) or not _PCR_HEX.fullmatch(value):
        raise ValueError(f"{value!r} is not {PCR_SIZE * 2} hexadecimal digits (a SHA-384 value)")
    return bytes.fromhex(value)


def pcr_differences(
    expected: Mapping[int, bytes], actual: Mapping[int, bytes]
) -> list[tuple[int, bytes, bytes | None]]:
    """``(index, expected, actual or None)`` for each expected PCR that ``actual`` lacks or
    differs from, by index; compared in constant time (the one PCR comparison)."""
    differences = []
    for index in sorted(expected):
        want, have = bytes(expected[index]), actual.get(index)
        if have is None or not hmac.compare_digest(want, bytes(have)):
            differences.append((index, want, have))
    return differences


def _parse_pcr_hex(key: str, value: object) -> bytes:
    try:
        return pcr_from_hex(value)
    except ValueError:
        raise FormatError(
            f"Measurements.{key} must be 96 hexadecimal digits (a SHA-384 value), got {value!r}"
        ) from None


@dataclass(frozen=True)
class Measurements:
    """PCR0/1/2 of an enclave image and, for a signed image, PCR8 (its signing certificate)."""

    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    pcr8: bytes | None = None
    hash_algorithm: str = NITRO_CLI_HASH_ALGORITHM

    def to_nitro_cli(self) -> dict[str, str]:
        """The ``Measurements`` object exactly as nitro-cli prints it (keys in its order)."""
        result = {
            "HashAlgorithm": self.hash_algorithm,
            "PCR0": self.pcr0.hex(),
            "PCR1": self.pcr1.hex(),
            "PCR2": self.pcr2.hex(),
        }
        if self.pcr8 is not None:
            result["PCR8"] = self.pcr8.hex()
        return result

    def as_pcrs(self) -> dict[int, bytes]:
        """PCR index -> value, the shape attestation documents use for comparison."""
        pcrs = {0: self.pcr0, 1: self.pcr1, 2: self.pcr2}
        if self.pcr8 is not None:
            pcrs[8] = self.pcr8
        return pcrs

    @classmethod
    def from_nitro_cli(cls, measurements: Mapping[str, object]) -> Measurements:
        """Parse the ``Measurements`` object of nitro-cli's JSON output."""
        missing = [key for key in ("PCR0", "PCR1", "PCR2") if key not in measurements]
        if missing:
            raise FormatError(f"Measurements lacks {', '.join(missing)}")
        pcr8 = measurements.get("PCR8")
        algorithm = measurements.get("HashAlgorithm", NITRO_CLI_HASH_ALGORITHM)
        return cls(
            pcr0=_parse_pcr_hex("PCR0", measurements["PCR0"]),
            pcr1=_parse_pcr_hex("PCR1", measurements["PCR1"]),
            pcr2=_parse_pcr_hex("PCR2", measurements["PCR2"]),
            pcr8=None if pcr8 is None else _parse_pcr_hex("PCR8", pcr8),
            hash_algorithm=str(algorithm),
        )
