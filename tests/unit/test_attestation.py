"""Attestation documents: real AWS vectors, documents we build, `enclaveops attest verify`."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from enclave_runtime.cli import attest_cmd
from enclave_runtime.cli.enclaveops import main as enclaveops_main
from enclave_runtime.formats.attestation import (
    AttestationError,
    aws_root_certificate,
    build_attestation_document,
    load_root_certificate,
    parse_attestation_document,
    verify_attestation_document,
)
from enclave_runtime.formats.cose import decode_sign1, sign1

UTC = timezone.utc
AWS_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
VALID_DOC = "evervault-valid-attestation-doc.cbor"
BETA_DOC = "evervault-beta-debug-mode-attestation-doc.cbor"
# Leaf certificate windows from the vectors' README (the shortest-lived certificate in each chain).
VALID_WINDOW = (
    datetime(2023, 9, 18, 14, 37, 9, tzinfo=UTC),
    datetime(2023, 9, 18, 17, 37, 12, tzinfo=UTC),
)
BETA_WINDOW = (
    datetime(2022, 10, 12, 13, 49, 51, tzinfo=UTC),
    datetime(2022, 10, 12, 16, 49, 54, tzinfo=UTC),
)
VALID_AT = datetime(2023, 9, 18, 15, 0, tzinfo=UTC)
BETA_AT = datetime(2022, 10, 12, 15, 0, tzinfo=UTC)
ZERO_PCR = bytes(48)


def extend(data: bytes) -> bytes:
    """NSM ExtendPCR on a fresh register: SHA384(48 zero bytes || data)."""
    return hashlib.sha384(ZERO_PCR + data).digest()


@pytest.fixture(scope="module")
def valid_doc(vectors_dir: Path) -> bytes:
    return (vectors_dir / VALID_DOC).read_bytes()


@pytest.fixture(scope="module")
def beta_doc(vectors_dir: Path) -> bytes:
    return (vectors_dir / BETA_DOC).read_bytes()


def _check_of(excinfo: pytest.ExceptionInfo[AttestationError]) -> str:
    return excinfo.value.check


# --- the real AWS documents ---------------------------------------------------------------


def test_shipped_root_is_the_aws_nitro_root_g1(vectors_dir: Path) -> None:
    root = aws_root_certificate()
    vector_root = (vectors_dir / "aws-nitro-enclaves-root-g1.pem").read_bytes()
    assert hashlib.sha256(root.public_bytes(Encoding.DER)).hexdigest() == AWS_ROOT_SHA256
    assert load_root_certificate(vector_root) == root


def test_valid_document_verifies_inside_its_window(valid_doc: bytes) -> None:
    verified = verify_attestation_document(valid_doc, at=VALID_AT)
    doc = verified.document
    assert doc.module_id == "i-0918f6c55e3b61d89-enc018aa8b8e2285d13"
    assert doc.digest == "SHA384"
    assert sorted(doc.pcrs) == list(range(16))
    assert doc.pcrs[0] == doc.pcrs[1] == doc.pcrs[2] == ZERO_PCR  # debug mode
    assert (len(doc.user_data or b""), len(doc.nonce or b""), doc.public_key) == (91, 256, None)
    assert len(doc.cabundle) == 4
    assert verified.root_sha256 == AWS_ROOT_SHA256
    assert VALID_WINDOW[0] <= doc.timestamp <= VALID_WINDOW[1]


def test_beta_document_verifies_inside_its_window(beta_doc: bytes) -> None:
    doc = verify_attestation_document(beta_doc, at=BETA_AT).document
    assert doc.public_key == b"my super secret key"
    assert doc.user_data == b"hello, world!"
    assert doc.nonce is None


@pytest.mark.parametrize("doc_name", [VALID_DOC, BETA_DOC])
def test_pcr4_is_the_parent_instance_id_extended(vectors_dir: Path, doc_name: str) -> None:
    doc = parse_attestation_document((vectors_dir / doc_name).read_bytes())
    instance_id = doc.module_id.split("-enc")[0]
    assert doc.pcrs[4] == extend(instance_id.encode())


@pytest.mark.parametrize(
    ("doc_name", "window"), [(VALID_DOC, VALID_WINDOW), (BETA_DOC, BETA_WINDOW)]
)
def test_window_bounds_are_inclusive_and_exact(
    vectors_dir: Path, doc_name: str, window: tuple[datetime, datetime]
) -> None:
    data = (vectors_dir / doc_name).read_bytes()
    not_before, not_after = window
    verify_attestation_document(data, at=not_before)
    verify_attestation_document(data, at=not_after)
    second = timedelta(seconds=1)
    with pytest.raises(AttestationError, match=r"leaf certificate not valid until") as early:
        verify_attestation_document(data, at=not_before - second)
    with pytest.raises(AttestationError, match=r"leaf certificate expired at") as late:
        verify_attestation_document(data, at=not_after + second)
    assert _check_of(early) == _check_of(late) == "certificate chain"


def test_expiry_message_names_certificate_and_both_times(valid_doc: bytes) -> None:
    with pytest.raises(AttestationError) as excinfo:
        verify_attestation_document(valid_doc, at=datetime(2023, 9, 19, tzinfo=UTC))
    assert str(excinfo.value) == (
        "certificate chain: leaf certificate expired at 2023-09-18T17:37:12Z "
        "(verification time 2023-09-19T00:00:00Z)"
    )


def test_intermediate_not_yet_valid_is_named(valid_doc: bytes) -> None:
    with pytest.raises(AttestationError) as excinfo:
        verify_attestation_document(valid_doc, at=datetime(2023, 9, 17, tzinfo=UTC))
    assert str(excinfo.value) == (
        "certificate chain: intermediate 1 not valid until 2023-09-17T02:07:45Z "
        "(verification time 2023-09-17T00:00:00Z)"
    )


def test_default_time_is_now_so_old_documents_are_rejected(valid_doc: bytes) -> None:
    with pytest.raises(AttestationError, match="expired at") as excinfo:
        verify_attestation_document(valid_doc)
    assert excinfo.value.check == "certificate chain"


def test_naive_verification_time_is_refused(valid_doc: bytes) -> None:
    with pytest.raises(AttestationError, match="no time zone"):
        verify_attestation_document(valid_doc, at=datetime(2023, 9, 18, 15, 0))


def test_another_root_is_refused_even_if_the_chain_is_intact(valid_doc: bytes) -> None:
    other_root = make_chain().root
    with pytest.raises(AttestationError, match=r"cabundle\[0\] .* is not the pinned root"):
        verify_attestation_document(valid_doc, root=other_root.cert, at=VALID_AT)


def test_expected_pcrs_match(valid_doc: bytes) -> None:
    doc = parse_attestation_document(valid_doc)
    expected = {index: doc.pcrs[index] for index in (0, 1, 2, 3, 4, 8)}
    verify_attestation_document(valid_doc, at=VALID_AT, expected_pcrs=expected)


def test_wrong_expected_pcr_names_the_pcr_and_both_values(valid_doc: bytes) -> None:
    wanted = bytes.fromhex("ab12" * 24)
    with pytest.raises(AttestationError) as excinfo:
        verify_attestation_document(valid_doc, at=VALID_AT, expected_pcrs={0: wanted})
    assert excinfo.value.check == "pcr 0"
    assert str(excinfo.value) == f"pcr 0: expected {wanted.hex()}, document has {'00' * 48}"


def test_expected_pcr_missing_from_document(valid_doc: bytes) -> None:
    with pytest.raises(AttestationError, match="document has no PCR 20"):
        verify_attestation_document(valid_doc, at=VALID_AT, expected_pcrs={20: ZERO_PCR})


def test_expected_nonce_user_data_and_public_key(valid_doc: bytes, beta_doc: bytes) -> None:
    doc = parse_attestation_document(valid_doc)
    verify_attestation_document(
        valid_doc, at=VALID_AT, expected_nonce=doc.nonce, expected_user_data=doc.user_data
    )
    verify_attestation_document(beta_doc, at=BETA_AT, expected_public_key=b"my super secret key")
    with pytest.raises(AttestationError, match=r"^nonce: expected 00") as wrong:
        verify_attestation_document(valid_doc, at=VALID_AT, expected_nonce=bytes(256))
    assert wrong.value.check == "nonce"
    with pytest.raises(AttestationError, match=r"^nonce: .* document has none"):
        verify_attestation_document(beta_doc, at=BETA_AT, expected_nonce=b"n")
    with pytest.raises(AttestationError, match=r"^user_data: "):
        verify_attestation_document(beta_doc, at=BETA_AT, expected_user_data=b"hello")
    with pytest.raises(AttestationError, match=r"^public_key: .* document has none"):
        verify_attestation_document(valid_doc, at=VALID_AT, expected_public_key=b"k")


# --- every flipped bit is rejected --------------------------------------------------------


def _regions(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of the parts of a real document, found by their exact bytes."""
    envelope = decode_sign1(data)
    doc = parse_attestation_document(data)
    regions = {
        "protected header": (data.index(envelope.protected), len(envelope.protected)),
        "signature": (len(data) - len(envelope.signature), len(envelope.signature)),
        "leaf certificate": (data.index(doc.certificate), len(doc.certificate)),
        "pcrs": (data.index(b"dpcrs"), 16 * 51),
        "nonce/user_data/public_key": (data.index(b"jpublic_key"), 0),
    }
    tail_start = regions["nonce/user_data/public_key"][0]
    regions["nonce/user_data/public_key"] = (tail_start, len(data) - 98 - tail_start)
    for position, cert in enumerate(doc.cabundle):
        regions[f"cabundle[{position}]"] = (data.index(cert), len(cert))
    framing_end = data.index(envelope.payload)
    regions["envelope framing"] = (0, framing_end)
    regions["module_id/digest/timestamp"] = (framing_end, regions["pcrs"][0] - framing_end)
    return regions


REGIONS = (
    "envelope framing",
    "protected header",
    "module_id/digest/timestamp",
    "pcrs",
    "leaf certificate",
    "cabundle[0]",
    "cabundle[1]",
    "cabundle[2]",
    "cabundle[3]",
    "nonce/user_data/public_key",
    "signature",
)


@pytest.mark.parametrize("doc_name", [VALID_DOC, BETA_DOC])
@pytest.mark.parametrize("region", REGIONS)
def test_every_flipped_bit_in_a_region_is_rejected(
    vectors_dir: Path, doc_name: str, region: str
) -> None:
    data = (vectors_dir / doc_name).read_bytes()
    at = VALID_AT if doc_name == VALID_DOC else BETA_AT
    start, length = _regions(data)[region]
    assert length > 0
    accepted = []
    for offset in range(start, start + length):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << (offset % 8)
        try:
            verify_attestation_document(bytes(flipped), at=at)
        except AttestationError:
            continue
        accepted.append(offset)
    assert accepted == [], f"bit flips at offsets {accepted} verified"


# --- documents we build -------------------------------------------------------------------


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@dataclass
class Chain:
    root: Issued
    intermediate: Issued
    leaf: Issued

    @property
    def cabundle(self) -> list[x509.Certificate]:
        return [self.root.cert, self.intermediate.cert]


NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
BUILD_AT = datetime(2024, 1, 1, 1, 0, tzinfo=UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, sign_certs: bool, digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    name: str,
    issuer: Issued | None,
    *,
    ca: bool,
    path_length: int | None = None,
    key_cert_sign: bool | None = None,
    digital_signature: bool = True,
    curve: ec.EllipticCurve | None = None,
    not_before: datetime = NOT_BEFORE,
    lifetime: timedelta = timedelta(days=1),
    issuer_name: str | None = None,
    extra_critical: bool = False,
) -> Issued:
    key = ec.generate_private_key(curve or ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(issuer_name or (name if issuer is None else _cn(issuer.cert))))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            _key_usage(
                sign_certs=ca if key_cert_sign is None else key_cert_sign,
                digital_signature=digital_signature,
            ),
            critical=True,
        )
    )
    if extra_critical:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
            critical=True,
        )
    signer = key if issuer is None else issuer.key
    return Issued(key, builder.sign(signer, hashes.SHA384()))


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def make_chain(**intermediate_options: Any) -> Chain:
    root = issue("test-root", None, ca=True, lifetime=timedelta(days=3650))
    intermediate = issue("test-intermediate", root, ca=True, **intermediate_options)
    leaf = issue("test-leaf", intermediate, ca=False, lifetime=timedelta(hours=3))
    return Chain(root, intermediate, leaf)


@pytest.fixture(scope="module")
def chain() -> Chain:
    return make_chain(path_length=0)


PCRS = {0: extend(b"image"), 1: extend(b"kernel"), 2: extend(b"app"), 4: extend(b"i-0123")}


def build(chain: Chain, **overrides: Any) -> bytes:
    options: dict[str, Any] = {
        "signing_key": chain.leaf.key,
        "certificate": chain.leaf.cert,
        "cabundle": chain.cabundle,
        "module_id": "i-0123-enc0456",
        "timestamp_ms": int(BUILD_AT.timestamp() * 1000),
        "pcrs": PCRS,
        "nonce": b"fresh nonce",
    }
    options.update(overrides)
    return build_attestation_document(**options)


def test_built_document_round_trips_with_its_root(chain: Chain) -> None:
    data = build(chain, public_key=b"\x04key", user_data=b"hello")
    verified = verify_attestation_document(
        data,
        root=chain.root.cert,
        at=BUILD_AT,
        expected_pcrs=PCRS,
        expected_nonce=b"fresh nonce",
        expected_user_data=b"hello",
        expected_public_key=b"\x04key",
    )
    assert verified.document.timestamp == BUILD_AT
    assert verified.leaf == chain.leaf.cert
    assert data[0] == 0x84  # untagged COSE_Sign1, like NSM
    assert decode_sign1(data).protected_header == {1: -35}


def test_built_document_is_rejected_under_the_aws_root(chain: Chain) -> None:
    with pytest.raises(AttestationError, match="is not the pinned root"):
        verify_attestation_document(build(chain), at=BUILD_AT)


def _indefinite_map(fields: dict[str, Any]) -> bytes:
    body = b"".join(cbor2.dumps(key) + cbor2.dumps(value) for key, value in fields.items())
    return b"\xbf" + body + b"\xff"


def _resign(chain: Chain, payload: bytes) -> bytes:
    return sign1(payload, chain.leaf.key).encode()


@pytest.mark.parametrize("encoding", ["definite", "indefinite"])
def test_definite_and_indefinite_payload_maps_verify(chain: Chain, encoding: str) -> None:
    fields = cbor2.loads(decode_sign1(build(chain)).payload)
    payload = cbor2.dumps(fields) if encoding == "definite" else _indefinite_map(fields)
    assert payload[0] == (0xA9 if encoding == "definite" else 0xBF)
    verified = verify_attestation_document(
        _resign(chain, payload), root=chain.root.cert, at=BUILD_AT, expected_pcrs=PCRS
    )
    assert verified.document.envelope.payload == payload


def test_tagged_cose_sign1_is_accepted(chain: Chain) -> None:
    envelope = decode_sign1(build(chain))
    verify_attestation_document(envelope.encode(tagged=True), root=chain.root.cert, at=BUILD_AT)


def test_build_refuses_a_key_that_does_not_match_the_certificate(chain: Chain) -> None:
    with pytest.raises(AttestationError, match="does not match"):
        build(chain, signing_key=chain.intermediate.key)
    with pytest.raises(AttestationError, match="P-384"):
        build(chain, signing_key=ec.generate_private_key(ec.SECP256R1()))


def test_build_refuses_what_verification_would_reject(chain: Chain) -> None:
    with pytest.raises(AttestationError, match=r"payload\.pcrs\[0\]: must be 48 bytes"):
        build(chain, pcrs={0: bytes(32)})
    with pytest.raises(AttestationError, match=r"payload\.nonce: is 1025 bytes, must be 0\.\.1024"):
        build(chain, nonce=bytes(1025))


# --- structure: each rule names its field -------------------------------------------------


def _payload_fields(chain: Chain) -> dict[str, Any]:
    return dict(cbor2.loads(decode_sign1(build(chain)).payload))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"digest": "SHA256"}, r"^payload\.digest: is 'SHA256'"),
        ({"module_id": ""}, r"^payload\.module_id: must be non-empty text"),
        ({"timestamp": 0}, r"^payload\.timestamp: must be milliseconds"),
        ({"timestamp": True}, r"^payload\.timestamp: "),
        ({"pcrs": {}}, r"^payload\.pcrs: must be a map of 1\.\.32 PCRs, got 0"),
        ({"pcrs": {32: ZERO_PCR}}, r"^payload\.pcrs: index 32 is not an integer in 0\.\.31"),
        ({"pcrs": {"0": ZERO_PCR}}, r"^payload\.pcrs: index '0'"),
        ({"pcrs": {3: bytes(64)}}, r"^payload\.pcrs\[3\]: must be 48 bytes \(SHA-384\), got 64"),
        ({"pcrs": {i: ZERO_PCR for i in range(33)}}, r"^payload\.pcrs: .* got 33"),
        ({"certificate": b""}, r"^payload\.certificate: is 0 bytes, must be 1\.\.1024"),
        ({"cabundle": []}, r"^payload\.cabundle: must be a non-empty array"),
        ({"cabundle": [b"x" * 1025]}, r"^payload\.cabundle\[0\]: is 1025 bytes"),
        ({"public_key": bytes(1025)}, r"^payload\.public_key: is 1025 bytes, must be 0\.\.1024"),
        ({"user_data": bytes(1025)}, r"^payload\.user_data: is 1025 bytes, must be 0\.\.1024"),
        ({"nonce": "text"}, r"^payload\.nonce: must be a byte string, got str"),
        ({"extra": 1}, r"^payload: unexpected field\(s\) \['extra'\]"),
        ({"cabundle": None}, r"^payload\.cabundle: "),
    ],
)
def test_malformed_payload_fields_are_named(
    chain: Chain, change: dict[str, Any], message: str
) -> None:
    fields = _payload_fields(chain)
    fields.update(change)
    with pytest.raises(AttestationError, match=message):
        parse_attestation_document(_resign(chain, cbor2.dumps(fields)))


def test_missing_mandatory_field_is_named(chain: Chain) -> None:
    fields = _payload_fields(chain)
    del fields["digest"]
    with pytest.raises(AttestationError, match=r"mandatory field\(s\) \['digest'\] missing"):
        parse_attestation_document(_resign(chain, cbor2.dumps(fields)))


def test_empty_user_data_and_nonce_are_allowed(chain: Chain) -> None:
    doc = parse_attestation_document(build(chain, user_data=b"", nonce=b""))
    assert (doc.user_data, doc.nonce) == (b"", b"")


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda data: data + b"\x00", r"^document: has 1 trailing bytes"),
        (lambda data: b"", r"^document: is empty"),
        (lambda data: bytes(40000), r"^document: is 40000 bytes"),
        (lambda data: cbor2.dumps({"not": "cose"}), r"^COSE_Sign1: "),
        (lambda data: data[:-5], r"^document: is not valid CBOR"),
    ],
)
def test_malformed_envelopes_are_named(chain: Chain, mangle: Any, message: str) -> None:
    with pytest.raises(AttestationError, match=message):
        parse_attestation_document(mangle(build(chain)))


def test_envelope_headers_are_pinned(chain: Chain) -> None:
    envelope = decode_sign1(build(chain))
    smuggled = cbor2.dumps([envelope.protected, {"x": 1}, envelope.payload, envelope.signature])
    with pytest.raises(AttestationError, match="unprotected header must be empty"):
        parse_attestation_document(smuggled)
    p256_leaf = issue("leaf-256", chain.intermediate, ca=False, curve=ec.SECP256R1())
    es256 = sign1(envelope.payload, p256_leaf.key).encode()
    with pytest.raises(AttestationError, match=r"protected header is \{1: -7\}"):
        parse_attestation_document(es256)


def test_signature_by_another_key_is_rejected(chain: Chain) -> None:
    payload = decode_sign1(build(chain)).payload
    forged = sign1(payload, chain.intermediate.key).encode()
    with pytest.raises(AttestationError, match=r"^signature: ") as excinfo:
        verify_attestation_document(forged, root=chain.root.cert, at=BUILD_AT)
    assert excinfo.value.check == "signature"


# --- certificate chain rules --------------------------------------------------------------


def _signed_by(leaf: Issued, cas: list[Issued], signer: Issued | None = None) -> bytes:
    """A well-formed ES384 document for ``leaf`` whatever its chain; the chain rules decide."""
    fields = {
        "module_id": "i-0123-enc0456",
        "digest": "SHA384",
        "timestamp": int(BUILD_AT.timestamp() * 1000),
        "pcrs": PCRS,
        "certificate": leaf.cert.public_bytes(Encoding.DER),
        "cabundle": [ca.cert.public_bytes(Encoding.DER) for ca in cas],
    }
    return sign1(cbor2.dumps(fields), (signer or leaf).key).encode()


def _document_for(chain: Chain, leaf: Issued | None = None) -> bytes:
    leaf = leaf or chain.leaf
    # A P-384 signer keeps the envelope ES384 even when the leaf's own key is not P-384.
    signer = leaf if isinstance(leaf.key.curve, ec.SECP384R1) else chain.leaf
    return _signed_by(leaf, [chain.root, chain.intermediate], signer)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ca": False}, r"intermediate 1 is not a CA"),
        ({"key_cert_sign": False}, r"intermediate 1 keyUsage does not allow keyCertSign"),
        (
            {"extra_critical": True},
            r"intermediate 1 has critical extension 1\.3\.6\.1\.4\.1\.99999\.1",
        ),
        ({"issuer_name": "someone-else"}, r"intermediate 1 was issued by 'CN=someone-else'"),
        ({"not_before": NOT_BEFORE + timedelta(hours=2)}, r"intermediate 1 not valid until"),
    ],
)
def test_intermediate_rules(options: dict[str, Any], message: str) -> None:
    ca_flag = options.pop("ca", True)
    root = issue("test-root", None, ca=True, lifetime=timedelta(days=3650))
    intermediate = issue("test-intermediate", root, ca=ca_flag, **options)
    leaf = issue("test-leaf", intermediate, ca=False, lifetime=timedelta(days=2))
    data = _document_for(Chain(root, intermediate, leaf))
    with pytest.raises(AttestationError, match=message) as excinfo:
        verify_attestation_document(data, root=root.cert, at=BUILD_AT)
    assert excinfo.value.check == "certificate chain"


def test_path_length_constraint_is_enforced() -> None:
    root = issue("test-root", None, ca=True, lifetime=timedelta(days=3650))
    first = issue("ca-1", root, ca=True, path_length=0)
    second = issue("ca-2", first, ca=True)
    leaf = issue("test-leaf", second, ca=False)
    data = _signed_by(leaf, [root, first, second])
    with pytest.raises(AttestationError, match=r"intermediate 1 allows 0 CA\(s\) below it"):
        verify_attestation_document(data, root=root.cert, at=BUILD_AT)


@pytest.mark.parametrize(
    ("leaf_options", "message"),
    [
        ({"ca": True}, r"leaf certificate is a CA"),
        ({"ca": False, "curve": ec.SECP256R1()}, r"leaf certificate key is not P-384"),
    ],
)
def test_leaf_rules(chain: Chain, leaf_options: dict[str, Any], message: str) -> None:
    leaf = issue("bad-leaf", chain.intermediate, **leaf_options)
    with pytest.raises(AttestationError, match=message):
        verify_attestation_document(_document_for(chain, leaf), root=chain.root.cert, at=BUILD_AT)


def test_leaf_without_digital_signature_usage_is_rejected(chain: Chain) -> None:
    leaf = issue("bad-leaf", chain.intermediate, ca=False, digital_signature=False)
    with pytest.raises(AttestationError, match="keyUsage does not allow digitalSignature"):
        verify_attestation_document(_document_for(chain, leaf), root=chain.root.cert, at=BUILD_AT)


# --- enclaveops attest verify -------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    """Parse like `enclaveops` does and run the handler; JSON stdout is decoded."""
    parser = argparse.ArgumentParser(prog="enclaveops")
    attest_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status = args.run(args)
    out = capsys.readouterr().out
    return status, json.loads(out) if out else None


def test_cli_verifies_a_real_document(
    vectors_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["attest", "verify", str(vectors_dir / VALID_DOC), "--at", "2023-09-18T15:00:00Z"]
    argv += [
        "--expect-pcr",
        f"4={extend(b'i-0918f6c55e3b61d89').hex()}",
        "--expect-pcr",
        f"0={'00' * 48}",
    ]
    status, summary = run_cli(argv, capsys)
    assert status == 0
    assert summary["valid"] is True
    assert summary["module_id"] == "i-0918f6c55e3b61d89-enc018aa8b8e2285d13"
    assert summary["timestamp_ms"] == 1695049410860
    assert summary["timestamp"] == "2023-09-18T15:03:30.860Z"
    assert summary["digest"] == "SHA384"
    assert len(summary["pcrs"]) == 16 and summary["pcrs"]["0"] == "00" * 48
    assert summary["public_key"] is None and len(summary["nonce"]) == 512
    assert summary["certificate"]["not_after"] == "2023-09-18T17:37:12Z"
    assert summary["root"]["sha256"] == AWS_ROOT_SHA256


def test_cli_failure_raises_one_line_naming_the_check(
    vectors_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["attest", "verify", str(vectors_dir / VALID_DOC), "--at", "2023-09-18T15:00:00+00:00"]
    with pytest.raises(AttestationError) as excinfo:
        run_cli([*argv, "--expect-pcr", f"0={'11' * 48}"], capsys)
    assert str(excinfo.value).startswith("pcr 0: expected 1111")
    assert "\n" not in str(excinfo.value)


def test_cli_json_failure_verdict(vectors_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["attest", "verify", str(vectors_dir / VALID_DOC), "--json", "--nonce", "00"]
    status, verdict = run_cli([*argv, "--at", "2023-09-18T16:00:00+02:00"], capsys)
    assert status == 1
    assert verdict == {
        "valid": False,
        "check": "certificate chain",
        "error": "certificate chain: leaf certificate not valid until 2023-09-18T14:37:09Z "
        "(verification time 2023-09-18T14:00:00Z)",
    }
    status, verdict = run_cli([*argv, "--at", "2023-09-18T15:00:00Z"], capsys)
    assert (status, verdict["check"]) == (1, "nonce")


def test_cli_reads_base64_from_stdin_and_takes_a_root(
    chain: Chain,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(chain.root.cert.public_bytes(Encoding.PEM))
    encoded = base64.encodebytes(build(chain))  # wrapped in lines, as tools print it
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(encoded)))
    argv = ["attest", "verify", "-", "--root", str(root_pem), "--at", "2024-01-01T01:00:00Z"]
    status, summary = run_cli([*argv, "--nonce", b"fresh nonce".hex()], capsys)
    assert status == 0
    assert summary["root"]["subject"] == "CN=test-root"


def test_cli_unreadable_inputs_are_clear(
    vectors_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(AttestationError, match=r"^document: cannot read .*missing\.cbor"):
        run_cli(["attest", "verify", str(tmp_path / "missing.cbor")], capsys)
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("not a document!")
    with pytest.raises(AttestationError, match=r"neither a raw COSE_Sign1 .* nor base64"):
        run_cli(["attest", "verify", str(garbage)], capsys)
    bad_root = tmp_path / "root.pem"
    bad_root.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    argv = ["attest", "verify", str(vectors_dir / VALID_DOC), "--root", str(bad_root), "--json"]
    status, verdict = run_cli(argv, capsys)
    assert (status, verdict["check"]) == (1, "root certificate")


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (["--expect-pcr", "0=zz"], "PCR value is not hex"),
        (["--expect-pcr", "zero=00"], "is not a PCR index"),
        (["--expect-pcr", "00"], "is not N=HEX"),
        (["--expect-pcr", "PCR²=00"], "in ASCII digits"),
        (["--expect-pcr", "٣=00"], "in ASCII digits"),
        (["--expect-pcr", "32=00"], "write 0 to 31"),
        (["--nonce", "xyz"], "is not hex"),
        (["--at", "2023-09-18 15:00"], "has no UTC offset"),
        (["--at", "yesterday"], "is not an RFC 3339 time"),
    ],
)
def test_cli_bad_arguments_are_usage_errors(
    argument: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        run_cli(["attest", "verify", "doc.cbor", *argument], capsys)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_enclaveops_main_exit_status_and_one_error_line(
    vectors_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["attest", "verify", str(vectors_dir / BETA_DOC), "--at", "2022-10-12T15:00:00Z"]
    assert enclaveops_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["user_data"] == b"hello, world!".hex()
    assert enclaveops_main([*argv, "--user-data", "00ff"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"enclaveops: user_data: expected 00ff, document has {b'hello, world!'.hex()}\n"
    )
