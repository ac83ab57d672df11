"""EIFs arrive from registries and build hosts we do not control: whatever the bytes, reading
one may only fail with EifError (never another exception, never a hang), and a changed byte
never passes verification unnoticed."""

from __future__ import annotations

import datetime
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.eif import EifError, EifImage, build_eif, read_eif, verify_eif


def _signed_tiny_eif(directory: Path) -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2024, 1, 1))
        .not_valid_after(datetime.datetime(2034, 1, 1))
        .sign(key, hashes.SHA384())
    )
    build_eif(
        b"K" * 300,
        "console=ttyS0",
        [b"B" * 200, b"C" * 100],
        directory / "base.eif",
        metadata={"fuzz": [1, "two"]},
        signing_certificate=certificate.public_bytes(serialization.Encoding.PEM),
        private_key=key,
    )
    return (directory / "base.eif").read_bytes()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="eif-fuzz-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def base(workdir: Path) -> bytes:
    return _signed_tiny_eif(workdir)


def _read_or_reject(workdir: Path, data: bytes) -> EifImage | None:
    path = workdir / "case.eif"
    path.write_bytes(data)
    try:
        image = read_eif(path)
    except EifError:
        return None
    image.describe()
    return image


def _verifies(workdir: Path, data: bytes) -> bool:
    path = workdir / "case.eif"
    path.write_bytes(data)
    try:
        verify_eif(path)
    except EifError:
        return False
    return True


def test_base_image_verifies(workdir: Path, base: bytes) -> None:
    assert _verifies(workdir, base)


@given(st.binary(max_size=4000))
def test_random_bytes_only_raise_eif_error(workdir: Path, data: bytes) -> None:
    with pytest.raises(EifError):
        read_eif(_write(workdir, data))


@given(st.binary(min_size=548, max_size=4000))
def test_random_bytes_behind_a_plausible_magic_only_raise_eif_error(
    workdir: Path, data: bytes
) -> None:
    plausible = b".eif\x00\x04" + data[6:]
    _read_or_reject(workdir, plausible)


@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_images_are_rejected_or_fail_verification(
    workdir: Path, base: bytes, changes: list[tuple[int, int]]
) -> None:
    mutated = bytearray(base)
    for position, value in changes:
        mutated[position % len(base)] = value
    image = _read_or_reject(workdir, bytes(mutated))
    if bytes(mutated) != base:
        assert image is None or not image.crc_ok or not _verifies(workdir, bytes(mutated))


@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutations_with_a_repaired_crc_still_never_crash(
    workdir: Path, base: bytes, changes: list[tuple[int, int]]
) -> None:
    mutated = bytearray(base)
    for position, value in changes:
        mutated[548 + position % (len(base) - 548)] = value
    struct.pack_into(">I", mutated, 544, zlib.crc32(bytes(mutated[:544] + mutated[548:])))
    image = _read_or_reject(workdir, bytes(mutated))
    if image is not None and bytes(mutated) != base:
        # PCR0 cannot change undetected: the signature covers it. The format signs nothing
        # else (as in nitro-cli): moving the boundary between two ramdisks keeps their
        # concatenation, hence PCR0 and a valid signature, while PCR1 and PCR2 change; and PCR8
        # measures certificate bytes the signature does not cover. Verifiers compare all PCRs.
        original = read_eif(_write(workdir, base)).measurements
        assert image.measurements.pcr0 == original.pcr0 or (
            image.signature_check is not None and not image.signature_check.valid
        )


@given(st.integers(min_value=0), st.binary(min_size=1, max_size=64))
def test_insertions_and_truncations_only_raise_eif_error(
    workdir: Path, base: bytes, position: int, inserted: bytes
) -> None:
    cut = position % len(base)
    _read_or_reject(workdir, base[:cut] + inserted + base[cut:])
    _read_or_reject(workdir, base[:cut])


def _write(workdir: Path, data: bytes) -> Path:
    path = workdir / "case.eif"
    path.write_bytes(data)
    return path
