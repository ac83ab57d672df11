"""PCR arithmetic against real AWS values and against an independent hashlib computation."""

from __future__ import annotations

import base64
import hashlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.eif_signature import certificate_pcr
from enclave_runtime.formats.pcr import (
    NITRO_CLI_HASH_ALGORITHM,
    ZERO_PCR,
    Measurements,
    PcrHasher,
    extend,
    pcr_differences,
    pcr_from_hex,
    pcr_of,
)

# Printed by `nitro-cli build-enclave --signing-certificate ...` in aws-nitro-enclaves-cli,
# docs/image_signing.md: real output, used to check that we parse and print the same JSON.
NITRO_CLI_MEASUREMENTS = {
    "HashAlgorithm": "Sha384 { ... }",
    "PCR0": (
        "55c0acc442fd815e161f100c45810298f5c37ce9f61b675e"
        "4f8ba82e32b9bab3b674a6ef557eaa7db7577221683bbe9f"
    ),
    "PCR1": (
        "aca6e62ffbf5f7deccac452d7f8cee1b94048faf62afc16c"
        "8ab68c9fed8c38010c73a669f9a36e596032f0b973d21895"
    ),
    "PCR2": (
        "41e46bdda449ee3fd792772e5b766cb090d2a4a1b0e5a0c5"
        "e52c84d426c76cfd298ea725500a107e71399697df2ae2eb"
    ),
    "PCR8": (
        "70da58334a884328944cd806127c7784677ab60a154249fd"
        "21546a217299ccfa1ebfe4fa96a163bf41d3bcfaebe68f6f"
    ),
}


def test_extend_reproduces_pcr4_of_a_real_attestation_document(vectors_dir):
    document = cbor2.loads((vectors_dir / "evervault-valid-attestation-doc.cbor").read_bytes())
    pcrs = cbor2.loads(document[2])["pcrs"]
    # Nitro extends PCR4 with the parent instance ID (vectors README).
    assert extend(ZERO_PCR, b"i-0918f6c55e3b61d89") == pcrs[4]


def test_boot_measurement_is_zero_register_extended_by_content_digest():
    content = b"kernel" + b"cmdline" + b"ramdisk"
    expected = hashlib.sha384(bytes(48) + hashlib.sha384(content).digest()).digest()
    assert pcr_of(b"kernel", b"cmdline", b"ramdisk") == expected
    assert pcr_of(content) == expected


def test_pcr_of_nothing_is_the_extended_empty_digest():
    # What nitro-cli reports as PCR2 of an image with a single ramdisk.
    assert pcr_of() == hashlib.sha384(bytes(48) + hashlib.sha384(b"").digest()).digest()


@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0, max_value=4096), max_size=8))
def test_streaming_hasher_matches_one_shot_for_any_split(content, cuts):
    hasher = PcrHasher()
    previous = 0
    for cut in sorted(cut % (len(content) + 1) for cut in cuts):
        hasher.update(content[previous:cut])
        previous = cut
    hasher.update(content[previous:])
    assert hasher.pcr() == pcr_of(content)


def test_copied_hasher_continues_independently():
    hasher = PcrHasher()
    hasher.update(b"kernel")
    prefix = hasher.copy()
    hasher.update(b"more")
    assert prefix.pcr() == pcr_of(b"kernel")
    assert hasher.pcr() == pcr_of(b"kernelmore")


def test_extend_refuses_a_register_of_the_wrong_size():
    with pytest.raises(FormatError, match="48 bytes"):
        extend(bytes(32), b"data")


def test_pcr8_of_the_aws_root_certificate_measures_its_der(vectors_dir):
    pem = (vectors_dir / "aws-nitro-enclaves-root-g1.pem").read_bytes()
    der_lines = [line for line in pem.decode().splitlines() if not line.startswith("-----")]
    der = base64.b64decode("".join(der_lines))
    # The DER whose SHA-256 the vectors README publishes.
    assert hashlib.sha256(der).hexdigest().startswith("641a0321a3e244ef")
    assert certificate_pcr(pem) == pcr_of(der)


def test_measurements_parse_and_print_nitro_cli_json_unchanged():
    measurements = Measurements.from_nitro_cli(NITRO_CLI_MEASUREMENTS)
    assert measurements.to_nitro_cli() == NITRO_CLI_MEASUREMENTS
    assert list(measurements.to_nitro_cli()) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert measurements.as_pcrs()[8].hex() == NITRO_CLI_MEASUREMENTS["PCR8"]


def test_unsigned_measurements_have_no_pcr8():
    measurements = Measurements(pcr_of(b"a"), pcr_of(b"b"), pcr_of(b"c"))
    printed = measurements.to_nitro_cli()
    assert "PCR8" not in printed
    assert printed["HashAlgorithm"] == NITRO_CLI_HASH_ALGORITHM
    assert printed["PCR0"] == pcr_of(b"a").hex()
    assert sorted(measurements.as_pcrs()) == [0, 1, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"PCR1": None}, "lacks PCR1"),
        ({"PCR0": "00" * 47}, "Measurements.PCR0 must be 96 hexadecimal digits"),
        ({"PCR2": "zz" * 48}, "Measurements.PCR2 must be 96 hexadecimal digits"),
        ({"PCR8": 5}, "Measurements.PCR8 must be 96 hexadecimal digits"),
    ],
)
def test_malformed_nitro_cli_measurements_name_the_field(change, message):
    measurements = dict(NITRO_CLI_MEASUREMENTS)
    for key, value in change.items():
        if value is None:
            del measurements[key]
        else:
            measurements[key] = value
    with pytest.raises(FormatError, match=message):
        Measurements.from_nitro_cli(measurements)


def test_pcr_differences_name_each_missing_or_different_pcr_in_index_order() -> None:
    a, b = bytes(48), b"\x01" * 48
    differences = pcr_differences({8: a, 0: a, 2: b}, {0: a, 2: a})
    assert differences == [(2, b, a), (8, a, None)]
    assert pcr_differences({0: a}, {0: a, 1: b}) == []


def test_pcr_from_hex_takes_exactly_96_hex_digits() -> None:
    assert pcr_from_hex("ab" * 48) == b"\xab" * 48
    for bad in ("ab" * 47, "zz" * 48, "ab " * 48, 7, None):
        with pytest.raises(ValueError, match="96 hexadecimal digits"):
            pcr_from_hex(bad)
