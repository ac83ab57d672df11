"""The emulated NSM, driven through the real NSM client over its Unix socket."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from enclave_runtime.emulator.ca import EmulatorCA
from enclave_runtime.emulator.nsm_device import NsmDevice, NsmServer, boot_pcrs
from enclave_runtime.formats.attestation import (
    AttestationError,
    parse_attestation_document,
    verify_attestation_document,
)
from enclave_runtime.formats.nsm_messages import ErrorCode
from enclave_runtime.formats.pcr import ZERO_PCR, Measurements
from enclave_runtime.transport.nsm import NsmClient, NsmError

INSTANCE = "i-0123456789abcdef0"
MODULE_ID = f"{INSTANCE}-enc0123456789abcdef"
MEASUREMENTS = Measurements(
    pcr0=hashlib.sha384(b"pcr0").digest(),
    pcr1=hashlib.sha384(b"pcr1").digest(),
    pcr2=hashlib.sha384(b"pcr2").digest(),
    pcr8=hashlib.sha384(b"pcr8").digest(),
)


@pytest.fixture
def ca(tmp_path: Path) -> EmulatorCA:
    return EmulatorCA(tmp_path / "ca")


def _serve(ca: EmulatorCA, debug_mode: bool, sock: Path) -> Iterator[NsmClient]:
    device = NsmDevice(MODULE_ID, boot_pcrs(MEASUREMENTS, INSTANCE, debug_mode), ca)
    server = NsmServer(device, sock).start()
    try:
        with NsmClient(str(sock)) as client:
            yield client
    finally:
        server.close()


@pytest.fixture
def nsm(ca: EmulatorCA, tmp_path: Path) -> Iterator[NsmClient]:
    yield from _serve(ca, False, tmp_path / "nsm.sock")


@pytest.fixture
def debug_nsm(ca: EmulatorCA, tmp_path: Path) -> Iterator[NsmClient]:
    yield from _serve(ca, True, tmp_path / "nsm-debug.sock")


def test_boot_pcrs_are_the_eif_measurements_and_locked(nsm: NsmClient) -> None:
    described = nsm.describe_nsm()
    assert described.module_id == MODULE_ID
    assert described.max_pcrs == 32
    assert tuple(described.locked_pcrs) == tuple(range(16))
    pcr0 = nsm.describe_pcr(0)
    assert (pcr0.lock, pcr0.data) == (True, MEASUREMENTS.pcr0)
    assert nsm.describe_pcr(8).data == MEASUREMENTS.pcr8
    assert nsm.describe_pcr(4).data == hashlib.sha384(ZERO_PCR + INSTANCE.encode()).digest()


def test_debug_mode_zeroes_the_image_measurements(debug_nsm: NsmClient) -> None:
    assert [debug_nsm.describe_pcr(i).data for i in (0, 1, 2)] == [ZERO_PCR] * 3
    assert debug_nsm.describe_pcr(4).data != ZERO_PCR


def test_locked_pcrs_refuse_extension(nsm: NsmClient) -> None:
    with pytest.raises(NsmError) as err:
        nsm.extend_pcr(0, b"tamper")
    assert err.value.code is ErrorCode.READ_ONLY_INDEX


def test_free_pcrs_extend_then_lock(nsm: NsmClient) -> None:
    assert nsm.extend_pcr(16, b"config") == hashlib.sha384(ZERO_PCR + b"config").digest()
    nsm.lock_pcr(16)
    with pytest.raises(NsmError) as err:
        nsm.extend_pcr(16, b"more")
    assert err.value.code is ErrorCode.READ_ONLY_INDEX
    nsm.lock_pcrs(20)
    assert nsm.describe_pcr(19).lock


def test_locking_every_pcr_freezes_the_last_one(nsm: NsmClient) -> None:
    nsm.extend_pcr(31, b"before")
    nsm.lock_pcrs(32)
    assert nsm.describe_nsm().locked_pcrs == tuple(range(32))
    with pytest.raises(NsmError) as err:
        nsm.extend_pcr(31, b"after")
    assert err.value.code is ErrorCode.READ_ONLY_INDEX


def test_random_bytes_are_fresh(nsm: NsmClient) -> None:
    first, second = nsm.get_random(), nsm.get_random()
    assert len(first) == 256
    assert first != second


def test_attestation_verifies_against_the_emulator_root_only(
    nsm: NsmClient, ca: EmulatorCA
) -> None:
    document = nsm.attestation(nonce=b"n" * 32, user_data=b"hello", public_key=b"k" * 97)
    verified = verify_attestation_document(
        document,
        root=ca.root.certificate,
        expected_pcrs=MEASUREMENTS.as_pcrs(),
        expected_nonce=b"n" * 32,
    )
    assert verified.document.module_id == MODULE_ID
    assert verified.document.user_data == b"hello"
    assert sorted(verified.document.pcrs) == list(range(16))
    with pytest.raises(AttestationError):
        verify_attestation_document(document)  # the AWS root is the default


def test_documents_expire_like_aws_ones(nsm: NsmClient, ca: EmulatorCA) -> None:
    document = nsm.attestation(nonce=b"x")
    issued = parse_attestation_document(document).timestamp
    later = datetime.fromtimestamp(issued.timestamp() + 4 * 3600, timezone.utc)
    with pytest.raises(AttestationError, match=r"not valid after|expired"):
        verify_attestation_document(document, root=ca.root.certificate, at=later)


def test_the_ca_persists_across_enclaves(tmp_path: Path) -> None:
    first = EmulatorCA(tmp_path / "ca")
    second = EmulatorCA(tmp_path / "ca")
    assert first.root.certificate == second.root.certificate
    assert (tmp_path / "ca" / "root.key").stat().st_mode & 0o077 == 0
    assert second.root_pem_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
