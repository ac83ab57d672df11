"""Conformance findings of issue 15: what a real NSM and real verifiers accept, we accept;
what they refuse, we refuse (docs/security.md, "Formats")."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclave_runtime.cli.attest_cmd import expected_pcr
from enclave_runtime.emulator.ca import EmulatorCA
from enclave_runtime.emulator.nsm_device import NsmDevice, NsmServer, boot_pcrs
from enclave_runtime.formats.attestation import (
    AttestationError,
    parse_attestation_document,
    verify_attestation_document,
)
from enclave_runtime.formats.cose import CoseSign1, sign1
from enclave_runtime.formats.nsm_messages import ErrorCode
from enclave_runtime.formats.pcr import Measurements, parse_pcr_index
from enclave_runtime.formats.service_unit import ServiceUnitError, parse_unit
from enclave_runtime.host.attestation_client import AttestationInputError, parse_expected_pcrs
from enclave_runtime.transport.nsm import NsmClient, NsmError

pytestmark = pytest.mark.security

MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
MEASUREMENTS = Measurements(*(hashlib.sha384(n).digest() for n in (b"0", b"1", b"2")), None)


@pytest.fixture
def ca(tmp_path: Path) -> EmulatorCA:
    return EmulatorCA(tmp_path / "ca")


@pytest.fixture
def nsm(ca: EmulatorCA, tmp_path: Path) -> Iterator[NsmClient]:
    device = NsmDevice(MODULE_ID, boot_pcrs(MEASUREMENTS, "i-0123456789abcdef0", False), ca)
    server = NsmServer(device, tmp_path / "nsm.sock").start()
    try:
        with NsmClient(str(tmp_path / "nsm.sock")) as client:
            yield client
    finally:
        server.close()


def test_genuine_document_shape_with_an_empty_public_key_is_well_formed(vectors_dir: Path) -> None:
    # Real NSMs send public_key = h'' (no such vector is published, so the genuine document's
    # payload is edited: the structure must pass, and only the signature may then fail).
    message = cbor2.loads((vectors_dir / "evervault-valid-attestation-doc.cbor").read_bytes())
    payload = cbor2.loads(message[2])
    payload["public_key"] = b""
    edited = cbor2.dumps([message[0], message[1], cbor2.dumps(payload), message[3]])
    assert parse_attestation_document(edited).public_key == b""


def test_empty_public_key_verifies(ca: EmulatorCA, nsm: NsmClient) -> None:
    document = nsm.attestation(public_key=b"", nonce=b"n")
    root = x509.load_pem_x509_certificate(ca.root_pem_path.read_bytes())
    verified = verify_attestation_document(document, root=root, expected_public_key=b"")
    assert verified.document.public_key == b""


def test_1024_byte_fields_round_trip_through_the_emulated_nsm(
    ca: EmulatorCA, nsm: NsmClient
) -> None:
    fields = {"user_data": b"\x80" * 1024, "nonce": b"\x81" * 1024, "public_key": b"\x82" * 1024}
    document = nsm.attestation(**fields)
    root = x509.load_pem_x509_certificate(ca.root_pem_path.read_bytes())
    verified = verify_attestation_document(
        document,
        root=root,
        expected_user_data=fields["user_data"],
        expected_nonce=fields["nonce"],
        expected_public_key=fields["public_key"],
    )
    assert verified.document.user_data == fields["user_data"]


@pytest.mark.parametrize("index", [0, 4, 8, 15])
def test_lock_pcr_on_a_boot_locked_pcr_is_refused(nsm: NsmClient, index: int) -> None:
    with pytest.raises(NsmError) as err:
        nsm.lock_pcr(index)
    assert err.value.code is ErrorCode.READ_ONLY_INDEX
    nsm.lock_pcr(16)  # the enclave's own PCRs still lock
    assert nsm.describe_pcr(16).lock


def _signed(ca: EmulatorCA, payload: bytes) -> tuple[bytes, x509.Certificate]:
    signer = ca.signer_for(MODULE_ID)
    return sign1(payload, signer.key).encode(), ca.root.certificate


def _payload_with_duplicate(ca: EmulatorCA, nsm: NsmClient, key: str, value: object) -> bytes:
    """The emulator's own document with one key repeated at the end of the definite map."""
    fields = cbor2.loads(cbor2.loads(nsm.attestation(nonce=b"n"))[2])
    body = cbor2.dumps(fields)
    count = len(fields)
    # 0xa9 = map of 9; append one more pair and raise the count to 10 (0xaa).
    assert body[0] == 0xA0 + count
    return bytes([0xA0 + count + 1]) + body[1:] + cbor2.dumps(key) + cbor2.dumps(value)


@pytest.mark.parametrize(("key", "value"), [("nonce", b"other"), ("module_id", "i-evil")])
def test_a_repeated_payload_key_is_refused_even_when_signed(
    ca: EmulatorCA, nsm: NsmClient, key: str, value: object
) -> None:
    document, root = _signed(ca, _payload_with_duplicate(ca, nsm, key, value))
    with pytest.raises(AttestationError, match=rf"payload: map key '{key}' .* appears twice"):
        verify_attestation_document(document, root=root)


def test_a_repeated_pcr_index_is_refused(ca: EmulatorCA) -> None:
    # {"pcrs": {0: h'00…', 0: h'01…'}} inside an otherwise valid payload map.
    pcrs = (
        b"\xa2"
        + cbor2.dumps(0)
        + cbor2.dumps(bytes(48))
        + cbor2.dumps(0)
        + cbor2.dumps(b"\x01" * 48)
    )
    signer = ca.signer_for(MODULE_ID)
    rest = {
        "module_id": MODULE_ID,
        "digest": "SHA384",
        "timestamp": 1,
        "certificate": signer.certificate.public_bytes(Encoding.DER),
        "cabundle": [cert.public_bytes(Encoding.DER) for cert in signer.cabundle],
    }
    body = bytes([0xA0 + len(rest) + 1]) + cbor2.dumps("pcrs") + pcrs + cbor2.dumps(rest)[1:]
    document, root = _signed(ca, body)
    with pytest.raises(AttestationError, match=r"map key 0 .* appears twice"):
        verify_attestation_document(document, root=root)


def test_a_repeated_protected_header_key_is_refused(ca: EmulatorCA, nsm: NsmClient) -> None:
    envelope = cbor2.loads(nsm.attestation())
    protected = b"\xa2\x01\x38\x22\x01\x38\x22"  # {1: -35, 1: -35}
    forged = CoseSign1(protected, envelope[2], envelope[3]).encode()
    with pytest.raises(AttestationError, match="protected header is refused: map key 1"):
        verify_attestation_document(forged, root=ca.root.certificate)


@pytest.mark.parametrize("text", ["PCR²", "٣", "²", "3\n", "+3", "-0", "32", "PCR", ""])
def test_pcr_indexes_are_ascii_decimal(text: str) -> None:
    with pytest.raises(ValueError, match="ASCII digits"):
        parse_pcr_index(text)
    with pytest.raises(AttestationInputError, match="ASCII digits"):
        parse_expected_pcrs({text: "00" * 48})


def test_cli_expect_pcr_refuses_unicode_digits() -> None:
    import argparse

    for text in ("PCR²=00", "٣=00"):
        with pytest.raises(argparse.ArgumentTypeError, match="ASCII digits"):
            expected_pcr(text)
    assert expected_pcr("PCR3=00") == (3, b"\x00")


@pytest.mark.parametrize("value", ["0.5", "1.0", "-1"])
def test_restart_sec_is_whole_seconds_as_enclave_init_reads_it(value: str) -> None:
    with pytest.raises(ServiceUnitError, match=r"RestartSec: .*(integer|at least 0)"):
        parse_unit(f'ExecStart = "/bin/true"\nRestartSec = {value}\n', "web")
    unit = parse_unit('ExecStart = "/bin/true"\nRestartSec = 2\n', "web")
    assert type(unit.restart_sec) is int
