"""EIF v4: byte layout, CRC, measurements, signature and metadata sections, errors and CLI.

Expected values are computed independently (struct, zlib, hashlib, cbor2, cryptography), or
come from AWS's own sources where they publish exact bytes.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import random
import struct
import sys
import zlib
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.cli import eif_cmd
from enclave_runtime.emulator import cli as emulator_cli
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.cose import decode_sign1
from enclave_runtime.formats.eif import (
    HEADER_SIZE,
    EifError,
    SectionType,
    build_eif,
    crc32_combine,
    measure,
    read_eif,
    verify_eif,
)
from enclave_runtime.formats.eif_metadata import EifBuildInfo, EifIdentity
from enclave_runtime.formats.eif_signature import (
    PcrSignature,
    decode_signature_section,
    encode_signature_section,
    pcr_info_payload,
)
from enclave_runtime.formats.pcr import pcr_of

CMDLINE = "reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on"
# aws-nitro-enclaves-image-format src/utils/cbor.rs: bytes written by serde_cbor 0.11 (the
# encoder of every released nitro-cli) for PcrInfo { 0, 0x00..=0x2f } and for one PcrSignature.
AWS_PCR_INFO = bytes.fromhex(
    "a26e72656769737465725f696e646578006e72656769737465725f76616c75659830000102030405060708"
    "090a0b0c0d0e0f101112131415161718181819181a181b181c181d181e181f182018211822182318241825"
    "1826182718281829182a182b182c182d182e182f"
)
AWS_SIGNATURE_SECTION = bytes.fromhex(
    "81a2737369676e696e675f6365727469666963617465983b182d182d182d182d182d184218451847184918"
    "4e182018431845185218541849184618491843184118541845182d182d182d182d182d0a184d1849184918"
    "420a182d182d182d182d182d1845184e1844182018431845185218541849184618491843184118541845"
    "182d182d182d182d182d0a697369676e61747572658a18d21884184418a1011838182218a018401840"
)
AWS_SIGNATURE_CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
AWS_SIGNATURE_COSE = bytes([0xD2, 0x84, 0x44, 0xA1, 0x01, 0x38, 0x22, 0xA0, 0x40, 0x40])
# nitro-cli describe-eif field order (src/common/json_output.rs, EifDescribeInfo).
DESCRIBE_KEYS_SIGNED = [
    "EifVersion",
    "Measurements",
    "IsSigned",
    "SigningCertificate",
    "CheckCRC",
    "SignatureCheck",
    "ImageName",
    "ImageVersion",
    "Metadata",
]


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def parts(tmp_path: Path) -> dict[str, Path]:
    files = {"kernel": 70_001, "bootstrap": 20_003, "customer": 300_007}
    paths = {}
    for seed, (name, size) in enumerate(files.items()):
        paths[name] = tmp_path / name
        paths[name].write_bytes(random_bytes(size, seed))
    return paths


def write_signing_pair(
    directory: Path,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_after: datetime.datetime = datetime.datetime(2040, 1, 1),
) -> tuple[Path, Path, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EnclaveOps Test"),
            x509.NameAttribute(NameOID.COMMON_NAME, "eif signer"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(datetime.datetime(2024, 3, 5, 6, 7, 8))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA384())
    )
    cert_path = directory / "signer.pem"
    key_path = directory / "signer.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, key


@pytest.fixture
def signing(tmp_path: Path) -> tuple[Path, Path, ec.EllipticCurvePrivateKey]:
    return write_signing_pair(tmp_path)


def build(parts: dict[str, Path], output: Path, **options) -> Path:
    build_eif(parts["kernel"], CMDLINE, [parts["bootstrap"], parts["customer"]], output, **options)
    return output


def expected_pcrs(parts: dict[str, Path]) -> tuple[str, str, str]:
    kernel, bootstrap, customer = (parts[n].read_bytes() for n in parts)
    cmdline = CMDLINE.encode()

    def pcr(data: bytes) -> str:
        return hashlib.sha384(bytes(48) + hashlib.sha384(data).digest()).hexdigest()

    return (
        pcr(kernel + cmdline + bootstrap + customer),
        pcr(kernel + cmdline + bootstrap),
        pcr(customer),
    )


def section_table(data: bytes) -> list[tuple[int, int, int, int]]:
    """(type, flags, offset, size) of every section, walking the file independently."""
    sections = []
    offset = HEADER_SIZE
    while offset < len(data):
        kind, flags, size = struct.unpack_from(">HHQ", data, offset)
        sections.append((kind, flags, offset, size))
        offset += 12 + size
    return sections


def rewrite_crc(data: bytearray) -> None:
    struct.pack_into(">I", data, 544, zlib.crc32(bytes(data[:544] + data[548:])))


# --- building and measuring -------------------------------------------------------------


def test_built_image_measures_like_nitro_cli(parts, tmp_path):
    eif = build(parts, tmp_path / "app.eif")
    pcr0, pcr1, pcr2 = expected_pcrs(parts)
    measurements = measure(eif).to_nitro_cli()
    assert measurements == {
        "HashAlgorithm": "Sha384 { ... }",
        "PCR0": pcr0,
        "PCR1": pcr1,
        "PCR2": pcr2,
    }


def test_build_returns_the_measurements_describe_finds(parts, tmp_path):
    returned = build_eif(
        parts["kernel"], CMDLINE, [parts["bootstrap"], parts["customer"]], tmp_path / "a.eif"
    )
    assert returned == read_eif(tmp_path / "a.eif").measurements


def test_header_layout_is_the_548_byte_big_endian_v4_header(parts, tmp_path):
    data = build(parts, tmp_path / "app.eif").read_bytes()
    kernel, bootstrap, customer = (parts[n].stat().st_size for n in parts)
    metadata_size = section_table(data)[2][3]
    assert data[0:4] == b".eif"
    assert struct.unpack_from(">HHQQHH", data, 4) == (4, 0, 1 << 30, 2, 0, 5)
    offsets = struct.unpack_from(">32Q", data, 28)
    sizes = struct.unpack_from(">32Q", data, 284)
    expected_sizes = [kernel, len(CMDLINE), metadata_size, bootstrap, customer]
    expected_offsets = [548]
    for size in expected_sizes[:-1]:
        expected_offsets.append(expected_offsets[-1] + 12 + size)
    assert list(sizes) == [*expected_sizes, *[0] * 27]
    assert list(offsets) == [*expected_offsets, *[0] * 27]
    assert struct.unpack_from(">I", data, 540) == (0,)
    # CRC-32 (zlib) of everything but the CRC field itself.
    assert struct.unpack_from(">I", data, 544) == (zlib.crc32(data[:544] + data[548:]),)
    assert len(data) == expected_offsets[-1] + 12 + customer


def test_sections_are_written_in_nitro_cli_order(parts, tmp_path, signing):
    cert, key, _ = signing
    data = build(parts, tmp_path / "s.eif", signing_certificate=cert, private_key=key).read_bytes()
    kinds = [kind for kind, _flags, _offset, _size in section_table(data)]
    assert kinds == [1, 2, 5, 3, 3, 4]  # Kernel, Cmdline, Metadata, Ramdisk, Ramdisk, Signature
    assert all(flags == 0 for _kind, flags, _offset, _size in section_table(data))
    image = read_eif(tmp_path / "s.eif")
    assert [s.section_type for s in image.sections] == [
        SectionType.KERNEL,
        SectionType.CMDLINE,
        SectionType.METADATA,
        SectionType.RAMDISK,
        SectionType.RAMDISK,
        SectionType.SIGNATURE,
    ]
    assert image.cmdline == CMDLINE.encode()


def test_aarch64_images_set_header_flag_bit_0(parts, tmp_path):
    data = build(parts, tmp_path / "arm.eif", arch="aarch64").read_bytes()
    assert struct.unpack_from(">H", data, 6) == (1,)
    assert read_eif(tmp_path / "arm.eif").arch == "aarch64"


def test_single_ramdisk_image_has_pcr1_equal_pcr0_and_empty_pcr2(parts, tmp_path):
    build_eif(parts["kernel"], CMDLINE, [parts["bootstrap"]], tmp_path / "one.eif")
    measurements = measure(tmp_path / "one.eif")
    assert measurements.pcr0 == measurements.pcr1
    assert measurements.pcr2 == pcr_of(b"")


def test_three_ramdisks_measure_the_later_two_in_pcr2(parts, tmp_path):
    extra = random_bytes(5000, 9)
    build_eif(
        parts["kernel"],
        CMDLINE,
        [parts["bootstrap"], parts["customer"], extra],
        tmp_path / "three.eif",
    )
    measurements = measure(tmp_path / "three.eif")
    assert measurements.pcr2 == pcr_of(parts["customer"].read_bytes(), extra)


def test_sources_may_be_paths_bytes_or_streams_with_identical_output(parts, tmp_path):
    build(parts, tmp_path / "paths.eif")
    customer = parts["customer"].read_bytes()
    build_eif(
        parts["kernel"].read_bytes(),
        CMDLINE.encode(),
        [parts["bootstrap"].read_bytes(), io.BufferedReader(io.BytesIO(customer))],
        tmp_path / "mixed.eif",
        metadata=EifIdentity("kernel", "1.0", EifBuildInfo()),
    )
    assert (tmp_path / "paths.eif").read_bytes() == (tmp_path / "mixed.eif").read_bytes()


def test_build_is_reproducible_even_when_signed(parts, tmp_path, signing):
    cert, key, _ = signing
    first = build(parts, tmp_path / "1.eif", signing_certificate=cert, private_key=key)
    second = build(parts, tmp_path / "2.eif", signing_certificate=cert, private_key=key)
    assert first.read_bytes() == second.read_bytes()


def test_failed_build_leaves_no_output(parts, tmp_path):
    with pytest.raises(EifError, match="cannot open"):
        build_eif(parts["kernel"], CMDLINE, [tmp_path / "missing"], tmp_path / "out.eif")
    assert list(tmp_path.glob("*out.eif*")) == []


@given(
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=1 << 40),
)
def test_crc32_combine_matches_zlib_on_the_concatenation(first, second, zeros):
    assert crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second)) == zlib.crc32(
        first + second
    )
    padded = second + bytes(zeros % 2000)
    assert crc32_combine(zlib.crc32(first), zlib.crc32(padded), len(padded)) == zlib.crc32(
        first + padded
    )


# --- metadata section ------------------------------------------------------------------


def test_metadata_section_is_serde_json_of_eif_identity_info(parts, tmp_path):
    identity = EifIdentity(
        image_name="demo",
        image_version="2.1",
        build_info=EifBuildInfo(build_time="2024-05-06T07:08:09+00:00", build_tool_version="9"),
        docker_info={"Id": "sha256:ab", "Config": {"Env": ["A=1"], "Cmd": ["/app"]}},
        custom_metadata={"zeta": "é\n", "alpha": [1.5, None, True]},
    )
    data = build(parts, tmp_path / "m.eif", metadata=identity).read_bytes()
    _kind, _flags, offset, size = section_table(data)[2]
    assert (
        data[offset + 12 : offset + 12 + size]
        == (
            '{"ImageName":"demo","ImageVersion":"2.1","BuildMetadata":{"BuildTime":'
            '"2024-05-06T07:08:09+00:00","BuildTool":"enclaveops","BuildToolVersion":"9",'
            '"OperatingSystem":"OS","KernelVersion":"kernel"},"DockerInfo":{"Config":{"Cmd":'
            '["/app"],"Env":["A=1"]},"Id":"sha256:ab"},"CustomMetadata":{"alpha":[1.5,null,true],'
            '"zeta":"é\\n"}}'
        ).encode()
    )
    assert read_eif(tmp_path / "m.eif").metadata == EifIdentity(
        "demo",
        "2.1",
        identity.build_info,
        {"Config": {"Cmd": ["/app"], "Env": ["A=1"]}, "Id": "sha256:ab"},
        {"alpha": [1.5, None, True], "zeta": "é\n"},
    )


def test_describe_flattens_custom_metadata_like_nitro_cli(parts, tmp_path):
    build(parts, tmp_path / "m.eif", metadata={"team": "payments", "build": 42})
    described = read_eif(tmp_path / "m.eif").describe()
    assert described["ImageName"] == "kernel"
    assert described["ImageVersion"] == "1.0"
    assert described["Metadata"] == {
        "BuildTime": "1970-01-01T00:00:00+00:00",
        "BuildTool": "enclaveops",
        "BuildToolVersion": described["Metadata"]["BuildToolVersion"],
        "OperatingSystem": "OS",
        "KernelVersion": "kernel",
        "DockerInfo": None,
        "build": 42,
        "team": "payments",
    }


def test_metadata_that_json_cannot_hold_is_refused(parts, tmp_path):
    with pytest.raises(EifError, match="metadata cannot be written as JSON"):
        build(parts, tmp_path / "nan.eif", metadata={"ratio": float("nan")})


# --- signature section -----------------------------------------------------------------


def test_pcr_info_and_signature_section_encode_as_aws_does():
    assert pcr_info_payload(bytes(range(48))) == AWS_PCR_INFO
    section = [PcrSignature(AWS_SIGNATURE_CERT, AWS_SIGNATURE_COSE)]
    assert encode_signature_section(section) == AWS_SIGNATURE_SECTION
    assert decode_signature_section(AWS_SIGNATURE_SECTION) == section


def test_signed_image_passes_signature_check_and_has_pcr8(parts, tmp_path, signing):
    cert, key, _ = signing
    eif = build(parts, tmp_path / "s.eif", signing_certificate=cert, private_key=key)
    image = verify_eif(eif)
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert image.measurements.pcr8 == pcr_of(der)
    assert image.measurements.pcr0.hex() == expected_pcrs(parts)[0]
    described = image.describe()
    assert list(described) == DESCRIBE_KEYS_SIGNED
    assert described["IsSigned"] is True
    assert described["SignatureCheck"] is True
    assert described["CheckCRC"] is True
    assert described["Measurements"]["PCR8"] == pcr_of(der).hex()
    assert described["SigningCertificate"]["IssuerName"] == {
        "commonName": "eif signer",
        "countryName": "DE",
        "organizationName": "EnclaveOps Test",
    }
    assert described["SigningCertificate"]["Algorithm"] == "ecdsa-with-SHA384"
    assert described["SigningCertificate"]["NotBefore"] == "Mar  5 06:07:08 2024 GMT"
    assert described["SigningCertificate"]["NotAfter"] == "Jan  1 00:00:00 2040 GMT"
    signature_hex = described["SigningCertificate"]["Signature"]
    assert (
        bytes.fromhex(signature_hex.replace(":", ""))
        == x509.load_pem_x509_certificate(cert.read_bytes()).signature
    )


def test_signature_section_holds_pem_and_untagged_cose_over_pcr0(parts, tmp_path, signing):
    cert, key, private_key = signing
    data = build(parts, tmp_path / "s.eif", signing_certificate=cert, private_key=key).read_bytes()
    _kind, _flags, offset, size = section_table(data)[-1]
    section = cbor2.loads(data[offset + 12 : offset + 12 + size])
    assert isinstance(section, list) and len(section) == 1
    entry = section[0]
    assert list(entry) == ["signing_certificate", "signature"]
    assert all(isinstance(v, list) for v in entry.values())  # arrays of ints, not byte strings
    assert bytes(entry["signing_certificate"]) == cert.read_bytes()
    cose_bytes = bytes(entry["signature"])
    assert cose_bytes[0] == 0x84  # untagged COSE_Sign1
    cose = decode_sign1(cose_bytes)
    assert cose.protected == bytes.fromhex("a1013822")  # {1: -35}: ES384
    cose.verify(private_key.public_key())
    assert cose.payload == pcr_info_payload(bytes.fromhex(expected_pcrs(parts)[0]))


@pytest.mark.parametrize(("curve", "algorithm"), [(ec.SECP256R1(), -7), (ec.SECP521R1(), -36)])
def test_other_nist_curves_sign_with_their_cose_algorithm(parts, tmp_path, curve, algorithm):
    cert, key, _ = write_signing_pair(tmp_path, ec.generate_private_key(curve))
    image = verify_eif(build(parts, tmp_path / "c.eif", signing_certificate=cert, private_key=key))
    assert decode_sign1(image.signatures[0].signature).algorithm == algorithm


def test_image_modified_after_signing_fails_signature_check(parts, tmp_path, signing):
    cert, key, _ = signing
    data = bytearray(
        build(parts, tmp_path / "s.eif", signing_certificate=cert, private_key=key).read_bytes()
    )
    _kind, _flags, offset, _size = section_table(bytes(data))[4]
    data[offset + 100] ^= 0xFF  # customer ramdisk, with the CRC fixed up by the attacker
    rewrite_crc(data)
    (tmp_path / "evil.eif").write_bytes(data)
    image = read_eif(tmp_path / "evil.eif")
    assert image.crc_ok
    assert image.describe()["SignatureCheck"] is False
    with pytest.raises(EifError, match="signature check failed: the signature signs PCR0 = "):
        verify_eif(tmp_path / "evil.eif")


def _signed_by_another_key(parts, tmp_path, signing) -> Path:
    """A signed EIF whose certificate is swapped for another key's (CRC fixed up)."""
    cert, key, _ = signing
    data = bytearray(
        build(parts, tmp_path / "s.eif", signing_certificate=cert, private_key=key).read_bytes()
    )
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_cert, _other_key, _ = write_signing_pair(other_dir)
    _kind, _flags, offset, size = section_table(bytes(data))[-1]
    entry = decode_signature_section(bytes(data[offset + 12 : offset + 12 + size]))[0]
    swapped = encode_signature_section([PcrSignature(other_cert.read_bytes(), entry.signature)])
    data = data[:offset] + struct.pack(">HHQ", 4, 0, len(swapped)) + swapped
    struct.pack_into(">Q", data, 284 + 5 * 8, len(swapped))
    rewrite_crc(data)
    (tmp_path / "swapped.eif").write_bytes(data)
    return tmp_path / "swapped.eif"


def test_signature_by_another_key_fails_signature_check(parts, tmp_path, signing):
    swapped = _signed_by_another_key(parts, tmp_path, signing)
    with pytest.raises(EifError, match="does not verify against the signer's key"):
        verify_eif(swapped)
    assert read_eif(swapped).describe()["SignatureCheck"] is False  # enclaveops eif describe


@pytest.mark.security
def test_nitro_emu_describe_eif_fails_on_another_key_as_nitro_cli_does(
    parts, tmp_path, signing, monkeypatch, capsys
):
    # aws-nitro-enclaves-image-format's get_certificate_info cannot extract the payload of a
    # signature that does not verify, so nitro-cli describe-eif errors out (docs/eif.md).
    swapped = _signed_by_another_key(parts, tmp_path, signing)
    monkeypatch.setenv("NITRO_EMU_ROOT", str(tmp_path / "emu"))
    assert emulator_cli.main(["describe-eif", "--eif-path", str(swapped)]) == 35
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Failed to get certificate sigining info" in captured.err


def test_verify_checks_certificate_validity_when_given_a_time(parts, tmp_path):
    cert, key, _ = write_signing_pair(tmp_path, not_after=datetime.datetime(2025, 1, 1))
    eif = build(parts, tmp_path / "s.eif", signing_certificate=cert, private_key=key)
    verify_eif(eif, at=datetime.datetime(2024, 6, 1, tzinfo=datetime.timezone.utc))
    with pytest.raises(EifError, match="signing certificate expired"):
        verify_eif(eif, at=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))


@pytest.mark.parametrize(
    ("certificate", "key", "message"),
    [
        ("signer.pem", None, "needs both"),
        (None, "signer.key", "needs both"),
        ("signer.pem", "arn:aws:kms:us-east-1:123456789012:key/abcd", "KMS key ARN"),
        ("signer.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n", "not a PEM private key"),
        ("signer.pem", "absent.key", "cannot read the private key"),
        ("absent.pem", "signer.key", "cannot read the signing certificate"),
    ],
)
@pytest.mark.usefixtures("signing")
def test_signing_inputs_are_checked(parts, tmp_path, certificate, key, message):
    def locate(value):
        return (
            tmp_path / value if isinstance(value, str) and value.endswith(("pem", "key")) else value
        )

    with pytest.raises(EifError, match=message):
        build(
            parts,
            tmp_path / "x.eif",
            signing_certificate=locate(certificate),
            private_key=locate(key),
        )


def test_key_must_belong_to_the_certificate(parts, tmp_path, signing):
    cert, _key, _ = signing
    with pytest.raises(EifError, match="does not belong to the signing certificate"):
        build(
            parts,
            tmp_path / "x.eif",
            signing_certificate=cert,
            private_key=ec.generate_private_key(ec.SECP384R1()),
        )


def test_rsa_keys_are_refused_as_nitro_cli_does(parts, tmp_path, signing):
    cert, _key, _ = signing
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(EifError, match="must be an EC key"):
        build(parts, tmp_path / "x.eif", signing_certificate=cert, private_key=pem)


def test_der_certificates_are_refused_with_a_hint(parts, tmp_path, signing):
    cert, key, _ = signing
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    with pytest.raises(EifError, match="PEM"):
        build(parts, tmp_path / "x.eif", signing_certificate=der, private_key=key)


# --- integrity: CRC, truncation, malformed files ---------------------------------------


@pytest.mark.parametrize("section", range(6))
def test_flipping_a_byte_of_any_section_is_a_crc_mismatch(parts, tmp_path, signing, section):
    cert, key, _ = signing
    data = bytearray(
        build(parts, tmp_path / "s.eif", signing_certificate=cert, private_key=key).read_bytes()
    )
    sections = section_table(bytes(data))
    _kind, _flags, offset, size = sections[section]
    if SectionType(sections[section][0]) in (SectionType.METADATA, SectionType.SIGNATURE):
        position = offset + 2  # the section header's flags: the parsed content stays valid
    else:
        position = offset + 12 + size // 2
    data[position] ^= 0x01
    (tmp_path / "bad.eif").write_bytes(data)
    image = read_eif(tmp_path / "bad.eif")
    assert image.describe()["CheckCRC"] is False
    with pytest.raises(EifError, match=r"CRC mismatch: the header \(offset 544\) says 0x"):
        verify_eif(tmp_path / "bad.eif")


def test_changing_a_header_field_is_a_crc_mismatch(parts, tmp_path):
    data = bytearray(build(parts, tmp_path / "a.eif").read_bytes())
    struct.pack_into(">Q", data, 16, 4)  # default_cpus
    (tmp_path / "bad.eif").write_bytes(data)
    assert read_eif(tmp_path / "bad.eif").crc_ok is False


def test_truncation_anywhere_is_a_clean_error(tmp_path):
    build_eif(b"K" * 40, "c", [b"R" * 30, b"S" * 20], tmp_path / "tiny.eif")
    data = (tmp_path / "tiny.eif").read_bytes()
    truncated = tmp_path / "cut.eif"
    for length in range(len(data)):
        truncated.write_bytes(data[:length])
        with pytest.raises(EifError):
            read_eif(truncated)


def test_truncation_messages_say_what_is_missing(parts, tmp_path):
    data = build(parts, tmp_path / "a.eif").read_bytes()
    cases = {
        100: "shorter than the 548-byte EIF header",
        len(data) - 5: r"section 4 \(Ramdisk\) at offset \d+ declares 300007 bytes but only",
        section_table(data)[4][2]: "announces 5 sections but the file holds 4",
        section_table(data)[4][2] + 7: "7 stray bytes at offset",
    }
    for length, message in cases.items():
        (tmp_path / "cut.eif").write_bytes(data[:length])
        with pytest.raises(EifError, match=message):
            read_eif(tmp_path / "cut.eif")


def corrupt(data: bytes, changes: dict[int, bytes]) -> bytes:
    changed = bytearray(data)
    for offset, value in changes.items():
        changed[offset : offset + len(value)] = value
    return bytes(changed)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({0: b"\x7fELF"}, r"not an EIF: bytes 0-3 are b'\\x7fELF'"),
        ({4: b"\x00\x05"}, "EIF version 5 .* is not supported"),
        ({4: b"\x00\x00"}, "EIF version 0"),
        ({26: b"\x00\x00"}, "num_sections .* is 0"),
        ({26: b"\x00\x21"}, "num_sections .* is 33"),
        ({548: b"\x00\x07"}, "section 0 at offset 548 has type 7, not an EIF section type"),
        ({548: b"\x00\x00"}, "has type 0"),
        ({28: struct.pack(">Q", 600)}, "header table says offset 600"),
        ({284 + 8: struct.pack(">Q", 5)}, r"section 1 \(Cmdline\) .* header table says .* 5 bytes"),
    ],
)
def test_malformed_headers_are_named(parts, tmp_path, change, message):
    data = build(parts, tmp_path / "a.eif").read_bytes()
    (tmp_path / "bad.eif").write_bytes(corrupt(data, change))
    with pytest.raises(EifError, match=message):
        read_eif(tmp_path / "bad.eif")


def test_unparseable_metadata_section_is_an_error(parts, tmp_path):
    data = build(parts, tmp_path / "a.eif").read_bytes()
    _kind, _flags, offset, _size = section_table(data)[2]
    (tmp_path / "bad.eif").write_bytes(corrupt(data, {offset + 12: b"["}))
    with pytest.raises(EifError, match=r"section 2 \(Metadata\) at \d+: metadata section"):
        read_eif(tmp_path / "bad.eif")


def test_signature_section_with_byte_strings_is_refused(parts, tmp_path, signing):
    cert, key, _ = signing
    data = build(parts, tmp_path / "s.eif", signing_certificate=cert, private_key=key).read_bytes()
    _kind, _flags, offset, size = section_table(data)[-1]
    entry = decode_signature_section(data[offset + 12 : offset + 12 + size])[0]
    wrong = cbor2.dumps(
        [{"signing_certificate": entry.signing_certificate, "signature": entry.signature}]
    )
    rebuilt = bytearray(data[:offset] + struct.pack(">HHQ", 4, 0, len(wrong)) + wrong)
    struct.pack_into(">Q", rebuilt, 284 + 5 * 8, len(wrong))
    (tmp_path / "bad.eif").write_bytes(rebuilt)
    with pytest.raises(EifError, match="must be a CBOR array of integers 0-255"):
        read_eif(tmp_path / "bad.eif")


def test_missing_file_is_an_eif_error(tmp_path):
    with pytest.raises(EifError, match=r"cannot open .*missing\.eif: No such file"):
        read_eif(tmp_path / "missing.eif")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"ramdisks": []}, "at least one ramdisk"),
        ({"cmdline": "a\0b"}, "NUL byte"),
        ({"ramdisks": [b"r"] * 30}, "30 ramdisks make 33 sections"),
        ({"arch": "riscv64"}, "not an EIF architecture"),
    ],
)
def test_impossible_images_are_refused(tmp_path, arguments, message):
    options = {"kernel": b"k", "cmdline": "c", "ramdisks": [b"r"], "arch": "x86_64"} | arguments
    with pytest.raises(EifError, match=message):
        build_eif(
            options["kernel"],
            options["cmdline"],
            options["ramdisks"],
            tmp_path / "x.eif",
            arch=options["arch"],
        )


# --- command line ----------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, object, str]:
    """Run an ``enclaveops eif`` command as enclaveops' main does; (status, JSON, stderr)."""
    parser = argparse.ArgumentParser(prog="enclaveops")
    eif_cmd.register(parser.add_subparsers(required=True))
    args = parser.parse_args(["eif", *argv])
    try:
        status = args.run(args)
    except EnclaveOpsError as err:
        print(f"enclaveops: {err}", file=sys.stderr)
        status = 1
    out, err = capsys.readouterr()
    return status, json.loads(out) if out else None, err


def test_cli_build_prints_measurements_like_build_enclave(parts, tmp_path, signing, capsys):
    cert, key, _ = signing
    status, output, _ = run_cli(
        capsys,
        "build",
        "--kernel", str(parts["kernel"]),
        "--cmdline", CMDLINE,
        "--ramdisk", str(parts["bootstrap"]),
        "--ramdisk", str(parts["customer"]),
        "--signing-certificate", str(cert),
        "--private-key", str(key),
        "--name", "demo",
        "--version", "3",
        "--output", str(tmp_path / "cli.eif"),
    )  # fmt: skip
    assert status == 0
    assert list(output) == ["Measurements"]
    assert output["Measurements"] == measure(tmp_path / "cli.eif").to_nitro_cli()
    status, described, _ = run_cli(capsys, "describe", str(tmp_path / "cli.eif"))
    assert status == 0
    assert list(described) == DESCRIBE_KEYS_SIGNED
    assert (described["ImageName"], described["ImageVersion"]) == ("demo", "3")
    assert described["Measurements"] == output["Measurements"]


def test_cli_build_records_metadata_and_source_date_epoch(parts, tmp_path, capsys, monkeypatch):
    (tmp_path / "meta.json").write_text('{"owner": "team-a"}')
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    status, _, _ = run_cli(
        capsys,
        "build",
        "--kernel", str(parts["kernel"]),
        "--cmdline", CMDLINE,
        "--ramdisk", str(parts["bootstrap"]),
        "--metadata", str(tmp_path / "meta.json"),
        "--output", str(tmp_path / "m.eif"),
    )  # fmt: skip
    assert status == 0
    status, described, _ = run_cli(capsys, "describe", "--eif-path", str(tmp_path / "m.eif"))
    assert described["Metadata"]["BuildTime"] == "2023-11-14T22:13:20+00:00"
    assert described["Metadata"]["owner"] == "team-a"
    assert described["ImageName"] == "kernel"


def test_cli_refuses_oversized_metadata_like_nitro_cli(parts, tmp_path, capsys):
    (tmp_path / "meta.json").write_text(json.dumps({"blob": "x" * 5000}))
    status, _, err = run_cli(
        capsys,
        "build",
        "--kernel", str(parts["kernel"]),
        "--cmdline", CMDLINE,
        "--ramdisk", str(parts["bootstrap"]),
        "--metadata", str(tmp_path / "meta.json"),
        "--output", str(tmp_path / "m.eif"),
    )  # fmt: skip
    assert status == 1
    assert "larger than 4096 bytes" in err


def test_cli_pcr_matches_nitro_cli_pcr(parts, tmp_path, signing, capsys):
    cert, _key, _ = signing
    status, output, _ = run_cli(capsys, "pcr", "--input", str(parts["kernel"]))
    assert status == 0
    assert output == {"PCR": pcr_of(parts["kernel"].read_bytes()).hex()}
    status, output, _ = run_cli(capsys, "pcr", "--signing-certificate", str(cert))
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert output == {"PCR8": pcr_of(der).hex()}


def test_cli_bad_files_exit_1_with_one_line(tmp_path, capsys):
    (tmp_path / "junk.eif").write_bytes(b"MZ" + bytes(1000))
    for argv in (
        ["describe", str(tmp_path / "junk.eif")],
        ["verify", str(tmp_path / "junk.eif")],
        ["describe", str(tmp_path / "absent.eif")],
        ["pcr", "--input", str(tmp_path / "absent")],
        ["pcr", "--signing-certificate", str(tmp_path / "junk.eif")],
        ["describe"],
    ):
        status, output, err = run_cli(capsys, *argv)
        assert status == 1, argv
        assert output is None
        assert err.startswith("enclaveops: ") and err.count("\n") == 1, err


def test_cli_verify_reports_crc_mismatch(parts, tmp_path, capsys):
    data = bytearray(build(parts, tmp_path / "a.eif").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad.eif").write_bytes(data)
    status, output, _ = run_cli(capsys, "describe", str(tmp_path / "bad.eif"))
    assert status == 0 and output["CheckCRC"] is False
    status, _, err = run_cli(capsys, "verify", str(tmp_path / "bad.eif"))
    assert status == 1 and "CRC mismatch" in err


def test_enclaveops_main_runs_eif_commands(parts, tmp_path, capsys):
    enclaveops = pytest.importorskip(
        "enclave_runtime.cli.enclaveops", reason="other command groups not in the tree yet"
    )
    build(parts, tmp_path / "a.eif")
    assert enclaveops.main(["eif", "describe", str(tmp_path / "a.eif")]) == 0
    assert json.loads(capsys.readouterr().out)["CheckCRC"] is True
    assert enclaveops.main(["eif", "describe", str(tmp_path / "none.eif")]) == 1
    assert capsys.readouterr().err.startswith("enclaveops: cannot open")
