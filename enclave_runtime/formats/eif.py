"""Enclave Image Format (EIF) v4: read, verify, measure and build, byte-exact with AWS nitro-cli.

Layout (aws-nitro-enclaves-image-format src/defs/mod.rs), all integers big-endian::

    header (548 bytes): magic ".eif", version u16, flags u16, default_mem u64, default_cpus u64,
                        reserved u16, num_sections u16, section_offsets [u64; 32],
                        section_sizes [u64; 32], unused u32, eif_crc32 u32
    sections, back to back from offset 548, each a 12-byte header (type u16, flags u16,
    size u64) followed by ``size`` bytes of data

nitro-cli writes the sections Kernel, Cmdline, Metadata, Ramdisk (bootstrap), Ramdisk
(customer)[, Signature]; flags bit 0 marks an aarch64 image. The CRC is CRC-32/ISO-HDLC (zlib's)
over the header without its last 4 bytes, then every section header and section data in file
order. nitro-cli's reader walks the sections one after the other from offset 548 and ignores the
offset table; we walk the same way and also require the table to agree.

Measurements follow nitro-cli's EifReader: PCR0 measures kernel, cmdline and all ramdisks in
file order, PCR1 kernel, cmdline and the first ramdisk, PCR2 the other ramdisks, PCR8 the DER
of the signing certificate. Big sections stream through the SHA-384 hashers and the CRC in one
pass, the hashers running on worker threads (hashlib and zlib release the GIL), so a 500 MB
image is read once and never held in memory.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import IO, Any, Callable, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.eif_metadata import EifBuildInfo, EifIdentity, EifMetadataError
from enclave_runtime.formats.eif_signature import (
    EifSignatureError,
    EifSigner,
    PcrSignature,
    SignatureVerdict,
    certificate_info,
    check_certificate_validity,
    check_pcr0_signature,
    decode_signature_section,
    load_certificate,
    load_private_key,
    read_private_key,
    read_signing_certificate,
)
from enclave_runtime.formats.pcr import Measurements, PcrHasher

EIF_MAGIC = b".eif"
EIF_VERSION = 4
SUPPORTED_VERSIONS = range(1, EIF_VERSION + 1)
MAX_SECTIONS = 32
ARCH_ARM64_FLAG = 0x1
ARCHITECTURES = {"x86_64": 0, "aarch64": ARCH_ARM64_FLAG}
# What nitro-cli's EifBuilder writes; nothing reads them back (run-enclave takes --memory).
DEFAULT_MEMORY = 1024 * 1024 * 1024
DEFAULT_CPUS = 2

_HEADER = struct.Struct(f">4sHHQQHH{MAX_SECTIONS}Q{MAX_SECTIONS}QII")
_SECTION_HEADER = struct.Struct(">HHQ")
HEADER_SIZE = _HEADER.size
SECTION_HEADER_SIZE = _SECTION_HEADER.size
CRC_OFFSET = HEADER_SIZE - 4

_CHUNK = 256 << 10  # fits in L2 while two hashers and the CRC read it
# Metadata and signature sections are parsed in memory; real ones are a few kilobytes.
_MAX_PARSED_SECTION = 16 << 20

Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes]]


class EifError(FormatError):
    """An EIF that cannot be read, or that fails a check (CRC, signature)."""


class SectionType(IntEnum):
    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5

    @property
    def label(self) -> str:
        return self.name.capitalize()


@dataclass(frozen=True)
class EifHeader:
    version: int
    flags: int
    default_mem: int
    default_cpus: int
    num_sections: int
    section_offsets: tuple[int, ...]
    section_sizes: tuple[int, ...]
    crc32: int
    reserved: int = 0
    unused: int = 0

    @property
    def arch(self) -> str:
        return "aarch64" if self.flags & ARCH_ARM64_FLAG else "x86_64"

    def pack(self) -> bytes:
        return _HEADER.pack(
            EIF_MAGIC,
            self.version,
            self.flags,
            self.default_mem,
            self.default_cpus,
            self.reserved,
            self.num_sections,
            *self.section_offsets,
            *self.section_sizes,
            self.unused,
            self.crc32,
        )

    @classmethod
    def unpack(cls, data: bytes) -> EifHeader:
        if len(data) < HEADER_SIZE:
            raise EifError(
                f"file is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte EIF header: "
                "truncated, or not an EIF"
            )
        fields = _HEADER.unpack(data[:HEADER_SIZE])
        magic, version, flags, mem, cpus, reserved, count = fields[:7]
        if magic != EIF_MAGIC:
            raise EifError(f"not an EIF: bytes 0-3 are {magic!r}, an EIF starts with {EIF_MAGIC!r}")
        if version not in SUPPORTED_VERSIONS:
            raise EifError(
                f"EIF version {version} (header offset 4) is not supported; this tool reads "
                f"versions 1-{EIF_VERSION}, as nitro-cli does"
            )
        if not 1 <= count <= MAX_SECTIONS:
            raise EifError(
                f"header field num_sections (offset 26) is {count}; an EIF has 1-{MAX_SECTIONS}"
            )
        tables = fields[7 : 7 + 2 * MAX_SECTIONS]
        return cls(
            version=version,
            flags=flags,
            default_mem=mem,
            default_cpus=cpus,
            num_sections=count,
            section_offsets=tuple(tables[:MAX_SECTIONS]),
            section_sizes=tuple(tables[MAX_SECTIONS:]),
            crc32=fields[-1],
            reserved=reserved,
            unused=fields[-2],
        )


@dataclass(frozen=True)
class EifSection:
    """Where one section sits: ``offset`` is its 12-byte header, its data follows."""

    index: int
    section_type: SectionType
    flags: int
    offset: int
    size: int

    @property
    def data_offset(self) -> int:
        return self.offset + SECTION_HEADER_SIZE


@dataclass(frozen=True)
class EifImage:
    """Everything ``nitro-cli describe-eif`` reports, plus where each section lies."""

    path: Path
    header: EifHeader
    sections: tuple[EifSection, ...]
    measurements: Measurements
    crc_computed: int
    cmdline: bytes
    metadata: EifIdentity | None = None
    signatures: tuple[PcrSignature, ...] = ()
    signing_certificate: dict[str, Any] | None = None
    signature_check: SignatureVerdict | None = None

    @property
    def crc_ok(self) -> bool:
        return self.crc_computed == self.header.crc32

    @property
    def is_signed(self) -> bool:
        return bool(self.signatures)

    @property
    def arch(self) -> str:
        return self.header.arch

    def ramdisk_sections(self) -> tuple[EifSection, ...]:
        return tuple(s for s in self.sections if s.section_type is SectionType.RAMDISK)

    @contextmanager
    def open_section(self, section: EifSection) -> Iterator[IO[bytes]]:
        """A buffered reader over one section's data alone (it ends where the section ends)."""
        with _open_input(self.path) as eif:
            raw = _SectionReader(eif.fileno(), section.data_offset, section.size)
            yield io.BufferedReader(raw, _CHUNK)

    def describe(self) -> dict[str, Any]:
        """The JSON of ``nitro-cli describe-eif``, same keys in the same order."""
        described: dict[str, Any] = {
            "EifVersion": self.header.version,
            "Measurements": self.measurements.to_nitro_cli(),
            "IsSigned": self.is_signed,
        }
        if self.signing_certificate is not None:
            described["SigningCertificate"] = self.signing_certificate
        described["CheckCRC"] = self.crc_ok
        if self.signature_check is not None:
            described["SignatureCheck"] = self.signature_check.valid
        if self.metadata is not None:
            described["ImageName"] = self.metadata.image_name
            described["ImageVersion"] = self.metadata.image_version
            described["Metadata"] = self.metadata.describe()
        return described


class _SectionReader(io.RawIOBase):
    """Reads ``size`` bytes from ``start`` of a file descriptor, then reports end of file."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._position = start
        self._end = start + size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self._end - self._position)
        if wanted <= 0:
            return 0
        data = os.pread(self._fd, wanted, self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def read_eif(path: str | os.PathLike[str]) -> EifImage:
    """Parse and measure an EIF in one pass; a CRC or signature mismatch is reported, not raised."""
    eif_path = Path(path)
    with _open_input(eif_path) as eif, _ChunkPipeline() as pipeline:
        try:
            return _EifScan(eif_path, eif, pipeline).run()
        except EifError as err:
            raise EifError(f"{eif_path}: {err}") from err


def measure(path: str | os.PathLike[str]) -> Measurements:
    """PCR0/1/2 (and PCR8 when signed) of an EIF, as ``nitro-cli describe-eif`` computes them."""
    return read_eif(path).measurements


def verify_eif(path: str | os.PathLike[str], *, at: datetime | None = None) -> EifImage:
    """Read an EIF and raise :class:`EifError` unless its CRC and signature (if any) hold.

    With ``at``, the signing certificate must also be valid at that time, as nitro-cli
    run-enclave requires of signed images.
    """
    image = read_eif(path)
    if not image.crc_ok:
        raise EifError(
            f"{path}: CRC mismatch: the header (offset {CRC_OFFSET}) says "
            f"0x{image.header.crc32:08x}, the content gives 0x{image.crc_computed:08x}; the file "
            "is corrupt or was modified after it was built; rebuild or re-download it"
        )
    if image.signature_check is not None and not image.signature_check.valid:
        raise EifError(f"{path}: signature check failed: {image.signature_check.reason}")
    if at is not None and image.signatures:
        validity = check_certificate_validity(image.signatures[0].signing_certificate, at)
        if not validity.valid:
            raise EifError(f"{path}: {validity.reason}")
    return image


def build_eif(
    kernel: Source,
    cmdline: str | bytes,
    ramdisks: Sequence[Source],
    output: str | os.PathLike[str],
    *,
    metadata: EifIdentity | Mapping[str, Any] | None = None,
    signing_certificate: bytes | str | os.PathLike[str] | None = None,
    private_key: bytes | str | os.PathLike[str] | ec.EllipticCurvePrivateKey | None = None,
    default_mem: int = DEFAULT_MEMORY,
    default_cpus: int = DEFAULT_CPUS,
    arch: str = "x86_64",
) -> Measurements:
    """Write an EIF as nitro-cli does and return its measurements.

    Sources are bytes, paths or binary file objects; each is read once, streamed to the output
    while it is hashed. ``metadata`` is a full :class:`EifIdentity`, or only the custom metadata
    (nitro-cli's ``--metadata``) under a default identity. The output depends on the inputs
    alone: no clock, no host name; signatures use deterministic ECDSA where available. The file
    appears at ``output`` only when complete.
    """
    if arch not in ARCHITECTURES:
        raise EifError(f"arch {arch!r} is not an EIF architecture; use x86_64 or aarch64")
    if not ramdisks:
        raise EifError("an EIF needs at least one ramdisk (nitro-cli: bootstrap, then customer)")
    signer = _signer(signing_certificate, private_key)
    count = 3 + len(ramdisks) + (1 if signer else 0)
    if count > MAX_SECTIONS:
        raise EifError(
            f"{len(ramdisks)} ramdisks make {count} sections; an EIF holds at most {MAX_SECTIONS}"
        )
    identity = _identity(metadata, kernel)
    try:
        metadata_bytes = identity.to_json_bytes()
    except EifMetadataError as err:
        raise EifError(str(err)) from err
    sections = [
        (SectionType.KERNEL, kernel),
        (SectionType.CMDLINE, _cmdline_bytes(cmdline)),
        (SectionType.METADATA, metadata_bytes),
        *((SectionType.RAMDISK, ramdisk) for ramdisk in ramdisks),
    ]
    with _atomic_output(Path(output)) as out, _ChunkPipeline() as pipeline:
        writer = _EifWriter(out, pipeline)
        for section_type, source in sections:
            writer.add_section(section_type, source)
        measurements = writer.measurer.measurements(signer.pcr8 if signer else None)
        if signer:
            writer.add_section(SectionType.SIGNATURE, signer.signature_section(measurements.pcr0))
        writer.finish(flags=ARCHITECTURES[arch], default_mem=default_mem, cpus=default_cpus)
    return measurements


def default_identity(kernel: Source, custom_metadata: Any = None) -> EifIdentity:
    """eif_build's defaults: the kernel's file name as image name, version 1.0."""
    name = Path(os.fspath(kernel)).name if isinstance(kernel, (str, os.PathLike)) else "kernel"
    return EifIdentity(name, "1.0", EifBuildInfo(), None, custom_metadata)


def _identity(metadata: EifIdentity | Mapping[str, Any] | None, kernel: Source) -> EifIdentity:
    if isinstance(metadata, EifIdentity):
        return metadata
    return default_identity(kernel, None if metadata is None else dict(metadata))


def _signer(
    certificate: bytes | str | os.PathLike[str] | None,
    key: bytes | str | os.PathLike[str] | ec.EllipticCurvePrivateKey | None,
) -> EifSigner | None:
    if certificate is None and key is None:
        return None
    if certificate is None or key is None:
        raise EifError("signing needs both a signing certificate and its private key")
    try:
        if not isinstance(certificate, bytes):
            certificate = read_signing_certificate(certificate)
        if isinstance(key, bytes):
            key = load_private_key(key)
        elif not isinstance(key, ec.EllipticCurvePrivateKey):
            key = read_private_key(key)
        return EifSigner(certificate, key)
    except EifSignatureError as err:
        raise EifError(str(err)) from err


def _cmdline_bytes(cmdline: str | bytes) -> bytes:
    data = cmdline.encode("utf-8") if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in data:
        raise EifError("the kernel command line contains a NUL byte; nitro-cli refuses that too")
    return data


def section_pcrs(section_type: SectionType, first_ramdisk: bool) -> tuple[int, ...]:
    """The PCRs that measure a section, as nitro-cli's EifReader routes them (the one table).

    Kernel, cmdline and the first ramdisk feed PCR0 and PCR1; every later ramdisk PCR0 and PCR2;
    a signature section PCR8 (through the certificate inside it, not the section's bytes).
    """
    if section_type in (SectionType.KERNEL, SectionType.CMDLINE) or (
        section_type is SectionType.RAMDISK and first_ramdisk
    ):
        return (0, 1)
    if section_type is SectionType.RAMDISK:
        return (0, 2)
    if section_type is SectionType.SIGNATURE:
        return (8,)
    return ()


class _Measurer:
    """Routes sections to the PCR hashers exactly as nitro-cli's EifReader does.

    PCR1 shares PCR0's hasher until a second ramdisk appears (it is a prefix of PCR0 in every
    image nitro-cli writes), which saves hashing the bootstrap ramdisk twice.
    """

    def __init__(self) -> None:
        self._image = PcrHasher()
        self._bootstrap: PcrHasher | None = None
        self._app = PcrHasher()
        self._ramdisks = 0

    def hashers_for(self, section_type: SectionType) -> list[PcrHasher]:
        first_ramdisk = section_type is SectionType.RAMDISK and self._ramdisks == 0
        if section_type is SectionType.RAMDISK:
            self._ramdisks += 1
        pcrs = section_pcrs(section_type, first_ramdisk)
        if 2 in pcrs and self._bootstrap is None:
            self._bootstrap = self._image.copy()
        # Until then PCR1 is PCR0's hasher; PCR8 is fed the certificate, not the section.
        hashers = {0: self._image, 1: self._bootstrap, 2: self._app}
        return [hashers[pcr] for pcr in pcrs if hashers.get(pcr) is not None]

    def measurements(self, pcr8: bytes | None) -> Measurements:
        bootstrap = self._image if self._bootstrap is None else self._bootstrap
        return Measurements(self._image.pcr(), bootstrap.pcr(), self._app.pcr(), pcr8)


class _ChunkPipeline:
    """Streams bytes through the hashers, the CRC and an optional sink.

    The first hasher runs on the calling thread, the others on workers (hashlib releases the
    GIL), so PCR0 and PCR2 of a customer ramdisk cost one core each. Two buffers alternate:
    a worker may still hash one chunk while the next is read into the other.
    """

    def __init__(self) -> None:
        self._buffers = (bytearray(_CHUNK), bytearray(_CHUNK))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eif-hash")

    def __enter__(self) -> _ChunkPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True)

    def stream(
        self,
        source: IO[bytes],
        hashers: Sequence[PcrHasher],
        crc: int,
        limit: int | None = None,
        sink: Callable[[memoryview], Any] | None = None,
    ) -> tuple[int, int]:
        """Consume ``source`` up to ``limit`` bytes (or EOF); return (crc, bytes consumed)."""
        pending: list[Future[None]] = []
        total = 0
        turn = 0
        while limit is None or total < limit:
            want = _CHUNK if limit is None else min(_CHUNK, limit - total)
            chunk = _read_chunk(source, memoryview(self._buffers[turn])[:want])
            if not chunk:
                break
            for future in pending:
                future.result()
            pending = [self._pool.submit(hasher.update, chunk) for hasher in hashers[1:]]
            if hashers:
                hashers[0].update(chunk)
            crc = zlib.crc32(chunk, crc)
            if sink is not None:
                sink(chunk)
            total += len(chunk)
            turn ^= 1
        for future in pending:
            future.result()
        return crc, total


def _read_chunk(source: IO[bytes], buffer: memoryview) -> memoryview:
    readinto = getattr(source, "readinto", None)
    if readinto is not None:
        return buffer[: readinto(buffer) or 0]
    data = source.read(len(buffer))
    buffer[: len(data)] = data
    return buffer[: len(data)]


class _EifScan:
    """One sequential pass over an EIF: structure checks, CRC, measurements, metadata."""

    def __init__(self, path: Path, eif: IO[bytes], pipeline: _ChunkPipeline) -> None:
        self._path = path
        self._eif = eif
        self._pipeline = pipeline
        self._size = os.fstat(eif.fileno()).st_size
        self._measurer = _Measurer()
        self._pcr8 = PcrHasher()
        self._sections: list[EifSection] = []
        self._cmdline = b""
        self._metadata: EifIdentity | None = None
        self._signatures: tuple[PcrSignature, ...] = ()

    def run(self) -> EifImage:
        raw_header = self._eif.read(HEADER_SIZE)
        header = EifHeader.unpack(raw_header)
        crc = zlib.crc32(raw_header[:CRC_OFFSET])
        offset = HEADER_SIZE
        while offset < self._size:
            section = self._section_at(offset, header)
            crc = self._consume(section, crc)
            self._sections.append(section)
            offset = section.data_offset + section.size
        if len(self._sections) != header.num_sections:
            raise EifError(
                f"the header announces {header.num_sections} sections but the file holds "
                f"{len(self._sections)}: the file is truncated or its header is corrupt"
            )
        measurements = self._measurer.measurements(self._pcr8.pcr() if self._signatures else None)
        return EifImage(
            path=self._path,
            header=header,
            sections=tuple(self._sections),
            measurements=measurements,
            crc_computed=crc,
            cmdline=self._cmdline,
            metadata=self._metadata,
            signatures=self._signatures,
            signing_certificate=self._certificate_info(),
            signature_check=self._signature_check(measurements),
        )

    def _section_at(self, offset: int, header: EifHeader) -> EifSection:
        index = len(self._sections)
        raw = self._eif.read(SECTION_HEADER_SIZE)
        if len(raw) < SECTION_HEADER_SIZE:
            raise EifError(
                f"{self._size - offset} stray bytes at offset {offset}, after the last section: "
                "a truncated section header"
            )
        type_code, flags, size = _SECTION_HEADER.unpack(raw)
        if index >= MAX_SECTIONS:
            raise EifError(
                f"more than {MAX_SECTIONS} sections (section {index} at offset {offset})"
            )
        section = EifSection(index, _section_type(type_code, index, offset), flags, offset, size)
        remaining = self._size - section.data_offset
        if size > remaining:
            raise EifError(
                f"section {index} ({section.section_type.label}) at offset {offset} declares "
                f"{size} bytes but only {remaining} follow: the file is truncated"
            )
        if index < header.num_sections and (
            header.section_offsets[index] != offset or header.section_sizes[index] != size
        ):
            raise EifError(
                f"section {index} ({section.section_type.label}) lies at offset {offset} with "
                f"{size} bytes, but the header table says offset "
                f"{header.section_offsets[index]} with {header.section_sizes[index]} bytes"
            )
        return section

    def _consume(self, section: EifSection, crc: int) -> int:
        crc = zlib.crc32(
            _SECTION_HEADER.pack(section.section_type, section.flags, section.size), crc
        )
        hashers = self._measurer.hashers_for(section.section_type)
        if section.section_type in (SectionType.KERNEL, SectionType.RAMDISK):
            crc, consumed = self._pipeline.stream(self._eif, hashers, crc, section.size)
            if consumed != section.size:
                raise EifError(f"the file ended inside section {section.index}: truncated")
            return crc
        data = self._read_parsed(section)
        for hasher in hashers:
            hasher.update(data)
        if section.section_type is SectionType.CMDLINE:
            self._cmdline = data
        elif section.section_type is SectionType.METADATA:
            self._metadata = self._parse_metadata(section, data)
        else:
            self._signatures = self._parse_signature(section, data)
        return zlib.crc32(data, crc)

    def _read_parsed(self, section: EifSection) -> bytes:
        if section.size > _MAX_PARSED_SECTION:
            raise EifError(
                f"section {section.index} ({section.section_type.label}) is {section.size} "
                f"bytes; refusing to parse more than {_MAX_PARSED_SECTION} bytes"
            )
        data = self._eif.read(section.size)
        if len(data) != section.size:
            raise EifError(f"the file ended inside section {section.index}: truncated")
        return data

    @staticmethod
    def _parse_metadata(section: EifSection, data: bytes) -> EifIdentity:
        try:
            return EifIdentity.from_json_bytes(data)
        except EifMetadataError as err:
            raise EifError(
                f"section {section.index} (Metadata) at {section.offset}: {err}"
            ) from err

    def _parse_signature(self, section: EifSection, data: bytes) -> tuple[PcrSignature, ...]:
        where = f"section {section.index} (Signature) at {section.offset}"
        try:
            signatures = tuple(decode_signature_section(data))
            certificate = load_certificate(signatures[0].signing_certificate)
        except EifSignatureError as err:
            raise EifError(f"{where}: {err}") from err
        # nitro-cli feeds the certificate of every signature section into PCR8.
        self._pcr8.update(_certificate_der(certificate))
        return signatures

    def _certificate_info(self) -> dict[str, Any] | None:
        if not self._signatures:
            return None
        try:
            return certificate_info(self._signatures[0].signing_certificate)
        except (EifSignatureError, ValueError) as err:
            raise EifError(f"signing certificate: {err}") from err

    def _signature_check(self, measurements: Measurements) -> SignatureVerdict | None:
        if not self._signatures:
            return None
        return check_pcr0_signature(self._signatures[0], measurements.pcr0)


def _section_type(code: int, index: int, offset: int) -> SectionType:
    try:
        section_type = SectionType(code)
    except ValueError:
        section_type = SectionType.INVALID
    if section_type is SectionType.INVALID:
        raise EifError(
            f"section {index} at offset {offset} has type {code}, not an EIF section type "
            "(1 kernel, 2 cmdline, 3 ramdisk, 4 signature, 5 metadata)"
        )
    return section_type


def _certificate_der(certificate: Any) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


class _EifWriter:
    """Appends sections after a placeholder header; ``finish`` writes the real header."""

    def __init__(self, out: IO[bytes], pipeline: _ChunkPipeline) -> None:
        self._out = out
        self._pipeline = pipeline
        self.measurer = _Measurer()
        self._sections: list[tuple[EifSection, int]] = []
        out.write(bytes(HEADER_SIZE))

    def add_section(self, section_type: SectionType, source: Source) -> None:
        offset = self._out.tell()
        self._out.write(bytes(SECTION_HEADER_SIZE))
        hashers = self.measurer.hashers_for(section_type)
        with _open_source(source) as data:
            data_crc, size = self._pipeline.stream(data, hashers, 0, sink=self._out.write)
        self._out.seek(offset)
        self._out.write(_SECTION_HEADER.pack(section_type, 0, size))
        self._out.seek(0, io.SEEK_END)
        self._sections.append(
            (EifSection(len(self._sections), section_type, 0, offset, size), data_crc)
        )

    def finish(self, *, flags: int, default_mem: int, cpus: int) -> None:
        padding = (0,) * (MAX_SECTIONS - len(self._sections))
        header = EifHeader(
            version=EIF_VERSION,
            flags=flags,
            default_mem=default_mem,
            default_cpus=cpus,
            num_sections=len(self._sections),
            section_offsets=tuple(section.offset for section, _ in self._sections) + padding,
            section_sizes=tuple(section.size for section, _ in self._sections) + padding,
            crc32=0,
        )
        crc = zlib.crc32(header.pack()[:CRC_OFFSET])
        for section, data_crc in self._sections:
            crc = zlib.crc32(_SECTION_HEADER.pack(section.section_type, 0, section.size), crc)
            crc = crc32_combine(crc, data_crc, section.size)
        self._out.seek(0)
        self._out.write(replace(header, crc32=crc).pack())


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """zlib.crc32(a + b) from crc32(a), crc32(b) and len(b), without the bytes of either.

    The writer learns the header (and so the CRC's first 544 bytes) only after streaming the
    sections; Python's zlib lacks crc32_combine, so this is zlib's GF(2) matrix method.
    """
    operator = _ONE_ZERO_BYTE
    while length2:
        if length2 & 1:
            crc1 = _gf2_apply(operator, crc1)
        operator = _gf2_square(operator)
        length2 >>= 1
    return crc1 ^ crc2


def _gf2_apply(matrix: Sequence[int], vector: int) -> int:
    result = 0
    row = 0
    while vector:
        if vector & 1:
            result ^= matrix[row]
        vector >>= 1
        row += 1
    return result


def _gf2_square(matrix: Sequence[int]) -> list[int]:
    return [_gf2_apply(matrix, row) for row in matrix]


def _zero_bytes_operator() -> list[int]:
    one_zero_bit = [0xEDB88320] + [1 << bit for bit in range(31)]
    operator = one_zero_bit
    for _ in range(3):
        operator = _gf2_square(operator)
    return operator


_ONE_ZERO_BYTE = _zero_bytes_operator()


@contextmanager
def _open_input(path: Path) -> Iterator[IO[bytes]]:
    try:
        eif = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by this context manager
    except OSError as err:
        raise EifError(f"cannot open {path}: {err.strerror}") from err
    with eif:
        yield eif


@contextmanager
def _open_source(source: Source) -> Iterator[IO[bytes]]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        with _open_input(Path(source)) as data:
            yield data
    else:
        yield source


@contextmanager
def _atomic_output(path: Path) -> Iterator[IO[bytes]]:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        out = open(temporary, "xb")  # noqa: SIM115 - closed or removed below
    except OSError as err:
        raise EifError(f"cannot create {path}: {err.strerror}") from err
    try:
        with out:
            yield out
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
