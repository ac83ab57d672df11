"""The EIF signature section: PCR0 signed by the developer, and the certificate behind PCR8.

Format (aws-nitro-enclaves-image-format src/defs/mod.rs and src/utils/eif_signer.rs):

* the section is the CBOR of ``Vec<PcrSignature>``; nitro-cli writes one entry, for PCR0, and
  reads only the first;
* ``PcrSignature`` is a map ``{"signing_certificate": ..., "signature": ...}`` whose values are
  ``Vec<u8>``, which serde encodes as CBOR *arrays of unsigned integers*, not byte strings;
* ``signing_certificate`` is the certificate file exactly as given to nitro-cli (PEM);
* ``signature`` is an untagged COSE_Sign1 (empty unprotected header, protected ``{1: alg}``)
  whose payload is the CBOR of ``PcrInfo {"register_index": 0, "register_value": PCR0}``,
  again with the value as an array of integers;
* the key is EC: P-256, P-384 or P-521 (aws-nitro-enclaves-cose refuses anything else).

PCR8 is the boot measurement of the certificate's DER encoding.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.cose import CoseError, algorithm_for_key, decode_sign1, sign1
from enclave_runtime.formats.pcr import pcr_of

SIGNED_PCR_INDEX = 0
_KMS_ARN = re.compile(r"arn:aws[a-z-]*:kms:")

# OpenSSL's long names, which nitro-cli prints for the issuer and the signature algorithm.
_OPENSSL_NAMES = {
    NameOID.COMMON_NAME: "commonName",
    NameOID.COUNTRY_NAME: "countryName",
    NameOID.LOCALITY_NAME: "localityName",
    NameOID.STATE_OR_PROVINCE_NAME: "stateOrProvinceName",
    NameOID.STREET_ADDRESS: "streetAddress",
    NameOID.ORGANIZATION_NAME: "organizationName",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "organizationalUnitName",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.DOMAIN_COMPONENT: "domainComponent",
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ecdsa-with-SHA512",
    SignatureAlgorithmOID.RSA_WITH_SHA256: "sha256WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA384: "sha384WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA512: "sha512WithRSAEncryption",
}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class EifSignatureError(FormatError):
    """A signature section, signing certificate or signing key that cannot be used."""


@dataclass(frozen=True)
class PcrSignature:
    """One entry of the signature section: the certificate (as stored) and a COSE_Sign1."""

    signing_certificate: bytes
    signature: bytes


@dataclass(frozen=True)
class SignatureVerdict:
    """Whether the first signature of a section signs this image's PCR0, and if not, why."""

    valid: bool
    reason: str = ""
    # False when the COSE signature itself does not verify with the certificate's key (as
    # opposed to a valid signature over another PCR0): nitro-cli's describe-eif then fails.
    signature_verifies: bool = True


def pcr_info_payload(pcr_value: bytes, register_index: int = SIGNED_PCR_INDEX) -> bytes:
    """The CBOR of ``PcrInfo``: what nitro-cli signs and compares, byte for byte."""
    return cbor2.dumps({"register_index": register_index, "register_value": list(pcr_value)})


def encode_signature_section(signatures: Sequence[PcrSignature]) -> bytes:
    return cbor2.dumps(
        [
            {
                "signing_certificate": list(entry.signing_certificate),
                "signature": list(entry.signature),
            }
            for entry in signatures
        ]
    )


def decode_signature_section(data: bytes) -> list[PcrSignature]:
    """Decode a signature section; only what nitro-cli's serde decoder accepts passes."""
    document = _decode_single_cbor(data)
    if not isinstance(document, list):
        raise EifSignatureError(
            f"signature section must be a CBOR array of PcrSignature, got {type(document).__name__}"
        )
    if not document:
        raise EifSignatureError("signature section holds no signature (empty array)")
    return [_decode_pcr_signature(index, entry) for index, entry in enumerate(document)]


def _decode_single_cbor(data: bytes) -> Any:
    stream = io.BytesIO(data)
    try:
        document = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise EifSignatureError(f"signature section is not valid CBOR: {err}") from err
    if stream.tell() != len(data):
        raise EifSignatureError(
            f"signature section has {len(data) - stream.tell()} bytes after its CBOR value"
        )
    return document


def _decode_pcr_signature(index: int, entry: object) -> PcrSignature:
    if not isinstance(entry, dict):
        raise EifSignatureError(f"signature[{index}] must be a CBOR map (PcrSignature)")
    return PcrSignature(
        signing_certificate=_byte_vector(entry, "signing_certificate", index),
        signature=_byte_vector(entry, "signature", index),
    )


def _byte_vector(entry: dict[Any, Any], key: str, index: int) -> bytes:
    if key not in entry:
        raise EifSignatureError(f"signature[{index}].{key} is missing")
    value = entry[key]
    if not isinstance(value, list) or not all(
        type(item) is int and 0 <= item <= 255 for item in value
    ):
        raise EifSignatureError(
            f"signature[{index}].{key} must be a CBOR array of integers 0-255 "
            "(how nitro-cli encodes byte vectors)"
        )
    return bytes(value)


def load_certificate(pem: bytes) -> x509.Certificate:
    """The first certificate of a PEM file, as nitro-cli's ``X509::from_pem`` reads it."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise EifSignatureError(
            f"signing certificate is not a PEM X.509 certificate ({err}); "
            "nitro-cli stores and expects '-----BEGIN CERTIFICATE-----' PEM"
        ) from err


def certificate_pcr(pem: bytes) -> bytes:
    """PCR8 of images signed with this certificate (``nitro-cli pcr --signing-certificate``)."""
    der = load_certificate(pem).public_bytes(serialization.Encoding.DER)
    return pcr_of(der)


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as err:
        raise EifSignatureError(
            "the private key is encrypted; decrypt it first (openssl ec -in KEY -out PLAIN)"
        ) from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise EifSignatureError(f"private key is not a PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EifSignatureError(
            "the private key must be an EC key on P-256, P-384 or P-521 "
            "(nitro-cli signs with COSE ECDSA only); P-384 is the usual choice"
        )
    try:
        algorithm_for_key(key)
    except CoseError as err:
        raise EifSignatureError(str(err)) from err
    return key


@dataclass(frozen=True)
class EifSigner:
    """A signing certificate (PEM bytes as stored in the image) and its private key."""

    certificate_pem: bytes
    private_key: ec.EllipticCurvePrivateKey

    def __post_init__(self) -> None:
        certificate = load_certificate(self.certificate_pem)
        try:
            certificate_key = _public_der(certificate.public_key())
        except (ValueError, UnsupportedAlgorithm) as err:
            raise EifSignatureError(
                f"the signing certificate's public key is unusable: {err}"
            ) from err
        if certificate_key != _public_der(self.private_key.public_key()):
            raise EifSignatureError(
                "the private key does not belong to the signing certificate "
                "(their public keys differ); pass the key the certificate was issued for"
            )

    @classmethod
    def from_pem(cls, certificate_pem: bytes, private_key_pem: bytes) -> EifSigner:
        return cls(certificate_pem, load_private_key(private_key_pem))

    @classmethod
    def from_files(cls, certificate_path: str | Path, private_key_path: str | Path) -> EifSigner:
        return cls(read_signing_certificate(certificate_path), read_private_key(private_key_path))

    @property
    def pcr8(self) -> bytes:
        return certificate_pcr(self.certificate_pem)

    def signature_section(self, pcr0: bytes) -> bytes:
        """The signature section for an image whose PCR0 is ``pcr0``."""
        cose = sign1(pcr_info_payload(pcr0), self.private_key, deterministic=True)
        return encode_signature_section([PcrSignature(self.certificate_pem, cose.encode())])


def read_signing_certificate(path: str | Path) -> bytes:
    """The certificate file's bytes, which the image stores verbatim, once checked to be PEM."""
    pem = _read(path, "signing certificate")
    load_certificate(pem)
    return pem


def read_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    if _KMS_ARN.match(str(path)):
        raise EifSignatureError(
            f"{path} is a KMS key ARN; enclaveops signs with a local PEM key only "
            "(use nitro-cli sign-eif for KMS keys)"
        )
    return load_private_key(_read(path, "private key"))


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise EifSignatureError(f"cannot read the {what} {path}: {err.strerror}") from err


def _public_der(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_pcr0_signature(entry: PcrSignature, pcr0: bytes) -> SignatureVerdict:
    """nitro-cli's SignatureCheck: the COSE signature verifies and its payload signs ``pcr0``."""
    certificate = load_certificate(entry.signing_certificate)
    try:
        public_key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as err:
        return SignatureVerdict(
            False, f"the signing certificate's public key is unusable: {err}", False
        )
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return SignatureVerdict(False, "the signing certificate's key is not an EC key", False)
    try:
        cose = decode_sign1(entry.signature)
        cose.verify(public_key)
    except CoseError as err:
        return SignatureVerdict(False, f"PCR0 signature: {err}", False)
    if cose.payload != pcr_info_payload(pcr0):
        return SignatureVerdict(
            False,
            f"the signature signs {_describe_payload(cose.payload)}, "
            f"not PCR0 {pcr0.hex()} of this image (the image changed after signing)",
        )
    return SignatureVerdict(True)


def _describe_payload(payload: bytes) -> str:
    try:
        info = cbor2.loads(payload)
        return f"PCR{info['register_index']} = {bytes(info['register_value']).hex()}"
    except (cbor2.CBORDecodeError, ValueError, TypeError, KeyError, OverflowError, RecursionError):
        return "a payload that is not a PcrInfo"


def check_certificate_validity(pem: bytes, at: datetime) -> SignatureVerdict:
    """nitro-cli run-enclave refuses images whose signing certificate is not valid now."""
    certificate = load_certificate(pem)
    moment = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    if moment < certificate.not_valid_before_utc:
        return SignatureVerdict(
            False, f"the signing certificate is not valid before {certificate.not_valid_before_utc}"
        )
    if moment > certificate.not_valid_after_utc:
        return SignatureVerdict(
            False, f"the signing certificate expired at {certificate.not_valid_after_utc}"
        )
    return SignatureVerdict(True)


def certificate_info(pem: bytes) -> dict[str, Any]:
    """The ``SigningCertificate`` object of ``nitro-cli describe-eif``."""
    certificate = load_certificate(pem)
    issuer = {
        _openssl_name(attribute.oid): _rust_debug_unquoted(attribute.value)
        for attribute in certificate.issuer
    }
    return {
        "IssuerName": dict(sorted(issuer.items())),
        "Algorithm": _openssl_name(certificate.signature_algorithm_oid),
        "NotBefore": _asn1_time_print(certificate.not_valid_before_utc),
        "NotAfter": _asn1_time_print(certificate.not_valid_after_utc),
        "Signature": ":".join(f"{byte:02X}" for byte in certificate.signature),
    }


def _openssl_name(oid: x509.ObjectIdentifier) -> str:
    return _OPENSSL_NAMES.get(oid, oid.dotted_string)


def _rust_debug_unquoted(value: str | bytes) -> str:
    """nitro-cli prints ``format!("{:?}", value)`` with the double quotes removed."""
    text = value if isinstance(value, str) else value.decode("utf-8", "replace")
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return escaped.replace("\t", "\\t").replace('"', "\\")


def _asn1_time_print(moment: datetime) -> str:
    """OpenSSL's ASN1_TIME_print, e.g. ``Oct 28 13:28:05 2019 GMT``."""
    return (
        f"{_MONTHS[moment.month - 1]} {moment.day:2d} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {moment.year} GMT"
    )
