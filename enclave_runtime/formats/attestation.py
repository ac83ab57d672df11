"""NSM attestation documents: build (for the emulator), parse and verify (for everyone else).

A document is an untagged COSE_Sign1 (ES384) whose payload is a CBOR map (module_id, digest,
timestamp, pcrs, certificate, cabundle, public_key, user_data, nonce), as specified in
aws-nitro-enclaves-nsm-api docs/attestation_process.md. Verification trusts nothing the document
says about itself until the certificate chain has been rebuilt from a root the caller pins, and
checks the signature over the payload bytes exactly as received (AWS sends definite- and
indefinite-length maps; a re-encoding would not match the signature).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from importlib import resources
from typing import Any, Union

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.cbor_maps import DuplicateKeyError, reject_duplicate_keys
from enclave_runtime.formats.cose import HEADER_ALG, CoseError, CoseSign1, decode_sign1, sign1
from enclave_runtime.formats.pcr import PCR_COUNT, PCR_SIZE, pcr_differences

ES384 = -35
DIGEST = "SHA384"
PCR_LENGTH = PCR_SIZE
MAX_CERTIFICATE_BYTES = 1024
MAX_PUBLIC_KEY_BYTES = 1024
# AWS's attestation spec and its nsm-check test: user_data, nonce and public_key are each
# 0..1024 bytes (docs/nsm.md); real NSMs send an empty public_key.
MAX_USER_DATA_BYTES = 1024
MAX_NONCE_BYTES = 1024
# AWS's CDDL bounds the payload at 16 KiB; the envelope adds ~110 bytes. Anything far larger is
# not a Nitro document, and refusing it before decoding bounds the work an attacker can cause.
MAX_PAYLOAD_BYTES = 16384
MAX_DOCUMENT_BYTES = 2 * MAX_PAYLOAD_BYTES
# 9999-12-31T23:59:59.999Z: later instants have no datetime, so no document can claim them.
MAX_TIMESTAMP_MS = 253402300799999
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

MANDATORY_FIELDS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
OPTIONAL_FIELDS = ("public_key", "user_data", "nonce")
# Extensions whose meaning the chain check enforces; any other extension marked critical makes a
# certificate unusable (RFC 5280 §4.2).
PROCESSED_CRITICAL_EXTENSIONS = (
    x509.oid.ExtensionOID.BASIC_CONSTRAINTS,
    x509.oid.ExtensionOID.KEY_USAGE,
)
ROOT_FILE = "aws-nitro-enclaves-root-g1.pem"

CBOR_ERRORS = (
    cbor2.CBORError,
    ValueError,
    TypeError,
    LookupError,
    OverflowError,
    RecursionError,
)

# What cryptography raises for malformed DER, including parts it decodes only when first read
# (older releases raise KeyError for unknown string tags in names).
CERTIFICATE_ERRORS = (ValueError, TypeError, LookupError, UnsupportedAlgorithm, x509.InvalidVersion)

CertificateInput = Union[bytes, x509.Certificate]


class AttestationError(FormatError):
    """An attestation document that is malformed or fails a verification check.

    ``check`` names what failed (``payload.pcrs``, ``certificate chain``, ``signature``,
    ``pcr 0``, ``nonce`` ...) so callers can report it without parsing the message.
    """

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


@dataclass(frozen=True)
class AttestationDocument:
    """The payload fields of a document, plus the COSE envelope exactly as received."""

    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    envelope: CoseSign1

    @property
    def timestamp(self) -> datetime:
        return EPOCH + timedelta(milliseconds=self.timestamp_ms)


@dataclass(frozen=True)
class VerifiedAttestation:
    """A document whose chain, signature and expectations all checked out at ``verified_at``."""

    document: AttestationDocument
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # pinned root first, leaf last
    verified_at: datetime

    @property
    def root(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def root_sha256(self) -> str:
        return certificate_sha256(self.root)

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts an operator or a playbook acts on (bytes as lowercase hex)."""
        doc = self.document
        return {
            "valid": True,
            "module_id": doc.module_id,
            "digest": doc.digest,
            "timestamp_ms": doc.timestamp_ms,
            "timestamp": rfc3339(doc.timestamp),
            "pcrs": {str(index): value.hex() for index, value in sorted(doc.pcrs.items())},
            "public_key": _hex_or_none(doc.public_key),
            "user_data": _hex_or_none(doc.user_data),
            "nonce": _hex_or_none(doc.nonce),
            "certificate": {
                "subject": self.leaf.subject.rfc4514_string(),
                "issuer": self.leaf.issuer.rfc4514_string(),
                "not_before": rfc3339(self.leaf.not_valid_before_utc),
                "not_after": rfc3339(self.leaf.not_valid_after_utc),
            },
            "root": {"subject": self.root.subject.rfc4514_string(), "sha256": self.root_sha256},
            "verified_at": rfc3339(self.verified_at),
        }


def rfc3339(moment: datetime) -> str:
    """UTC with a ``Z`` suffix; milliseconds only when present (document timestamps have them)."""
    utc = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return f"{utc.isoformat(timespec='milliseconds' if utc.microsecond else 'seconds')}Z"


def certificate_sha256(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


@lru_cache(maxsize=1)
def aws_root_certificate() -> x509.Certificate:
    """The AWS Nitro Enclaves Root G1 shipped with the package: the default trust anchor."""
    data_dir = resources.files("enclave_runtime.formats").joinpath("data")
    pem = data_dir.joinpath(ROOT_FILE).read_bytes()
    return x509.load_pem_x509_certificate(pem)


def load_root_certificate(data: bytes) -> x509.Certificate:
    """A root certificate from PEM or DER bytes (what ``--root`` and playbooks hand over)."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return _fully_parsed(x509.load_pem_x509_certificate(data))
        return _fully_parsed(x509.load_der_x509_certificate(data))
    except CERTIFICATE_ERRORS as err:
        raise AttestationError(
            "root certificate",
            f"not a PEM or DER X.509 certificate ({err}); pass the CA's root.pem",
        ) from err


# --- building -----------------------------------------------------------------------------


def build_attestation_document(
    *,
    signing_key: ec.EllipticCurvePrivateKey,
    certificate: CertificateInput,
    cabundle: Sequence[CertificateInput],
    module_id: str,
    digest: str = DIGEST,
    timestamp_ms: int,
    pcrs: Mapping[int, bytes],
    public_key: bytes | None = None,
    user_data: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """An untagged COSE_Sign1 (ES384) document in AWS's field order, definite-length map.

    ``cabundle`` is root first, as NSM sends it. The result is parsed back before it is
    returned, so the emulator can never hand out a document this module would reject.
    """
    leaf_der = _der(certificate)
    _require_matching_signing_key(signing_key, leaf_der)
    payload = {
        "module_id": module_id,
        "digest": digest,
        "timestamp": timestamp_ms,
        "pcrs": {index: bytes(pcrs[index]) for index in sorted(pcrs)},
        "certificate": leaf_der,
        "cabundle": [_der(cert) for cert in cabundle],
        "public_key": _bytes_or_none(public_key),
        "user_data": _bytes_or_none(user_data),
        "nonce": _bytes_or_none(nonce),
    }
    document = sign1(cbor2.dumps(payload), signing_key).encode(tagged=False)
    parse_attestation_document(document)
    return document


def _bytes_or_none(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _der(certificate: CertificateInput) -> bytes:
    if isinstance(certificate, x509.Certificate):
        return certificate.public_bytes(Encoding.DER)
    return bytes(certificate)


def _require_matching_signing_key(signing_key: ec.EllipticCurvePrivateKey, leaf_der: bytes) -> None:
    if not isinstance(signing_key, ec.EllipticCurvePrivateKey) or not isinstance(
        signing_key.curve, ec.SECP384R1
    ):
        raise AttestationError("signing key", "must be a P-384 (secp384r1) EC private key")
    leaf = _load_der_certificate(leaf_der, "certificate")
    if _spki(leaf.public_key()) != _spki(signing_key.public_key()):
        raise AttestationError(
            "signing key", "does not match the public key of the leaf certificate it claims"
        )


# --- parsing ------------------------------------------------------------------------------


def parse_attestation_document(data: bytes) -> AttestationDocument:
    """Decode and check the structure of a document; nothing here is authenticated yet."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AttestationError("document", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise AttestationError("document", "is empty")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise AttestationError(
            "document",
            f"is {len(data)} bytes; Nitro attestation documents are at most {MAX_DOCUMENT_BYTES}",
        )
    _decode_cbor_exactly(data, "document")
    try:
        envelope = decode_sign1(data)
    except CoseError as err:
        raise AttestationError("COSE_Sign1", str(err)) from err
    _check_envelope(envelope)
    return _document_from_payload(envelope)


def _decode_cbor_exactly(data: bytes, check: str) -> Any:
    """One CBOR item and nothing after it: trailing bytes would be unsigned smuggled data."""
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except CBOR_ERRORS as err:
        raise AttestationError(check, f"is not valid CBOR ({err})") from err
    if stream.tell() != len(data):
        raise AttestationError(
            check,
            f"has {len(data) - stream.tell()} trailing bytes after the CBOR item "
            f"at offset {stream.tell()}",
        )
    return item


def _check_envelope(envelope: CoseSign1) -> None:
    try:
        header = envelope.protected_header
    except CoseError as err:
        raise AttestationError("COSE_Sign1", str(err)) from err
    alg = header.get(HEADER_ALG)
    if type(alg) is not int or alg != ES384 or len(header) != 1:
        raise AttestationError(
            "COSE_Sign1",
            f"protected header is {header!r:.80}; Nitro documents carry exactly {{1: -35}} (ES384)",
        )
    if envelope.unprotected:
        # Nothing in it is signed; Nitro sends an empty map, so content here can only be smuggled.
        raise AttestationError(
            "COSE_Sign1", f"unprotected header must be empty, got {envelope.unprotected!r:.80}"
        )
    if len(envelope.signature) != 96:
        raise AttestationError(
            "COSE_Sign1", f"signature is {len(envelope.signature)} bytes, ES384 needs 96 (r || s)"
        )
    if not 0 < len(envelope.payload) <= MAX_PAYLOAD_BYTES:
        raise AttestationError(
            "COSE_Sign1",
            f"payload is {len(envelope.payload)} bytes, must be 1..{MAX_PAYLOAD_BYTES}",
        )


def _document_from_payload(envelope: CoseSign1) -> AttestationDocument:
    fields = _decode_cbor_exactly(envelope.payload, "payload")
    try:
        reject_duplicate_keys(envelope.payload)
    except DuplicateKeyError as err:
        raise AttestationError("payload", f"{err}; a signed map must have one meaning") from err
    if not isinstance(fields, dict):
        raise AttestationError("payload", f"must be a CBOR map, got {type(fields).__name__}")
    unknown = [key for key in fields if key not in MANDATORY_FIELDS + OPTIONAL_FIELDS]
    if unknown:
        raise AttestationError("payload", f"unexpected field(s) {unknown!r:.120}")
    missing = [key for key in MANDATORY_FIELDS if key not in fields]
    if missing:
        raise AttestationError("payload", f"mandatory field(s) {missing} missing")
    return AttestationDocument(
        module_id=_module_id(fields["module_id"]),
        digest=_digest(fields["digest"]),
        timestamp_ms=_timestamp(fields["timestamp"]),
        pcrs=_pcrs(fields["pcrs"]),
        certificate=_bytes_field(fields["certificate"], "certificate", 1, MAX_CERTIFICATE_BYTES),
        cabundle=_cabundle(fields["cabundle"]),
        public_key=_optional_bytes(fields, "public_key", 0, MAX_PUBLIC_KEY_BYTES),
        user_data=_optional_bytes(fields, "user_data", 0, MAX_USER_DATA_BYTES),
        nonce=_optional_bytes(fields, "nonce", 0, MAX_NONCE_BYTES),
        envelope=envelope,
    )


def _module_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise AttestationError("payload.module_id", f"must be non-empty text, got {value!r:.80}")
    return value


def _digest(value: Any) -> str:
    if not isinstance(value, str) or value != DIGEST:
        raise AttestationError("payload.digest", f"is {value!r:.80}, Nitro documents use 'SHA384'")
    return value


def _timestamp(value: Any) -> int:
    if type(value) is not int or not 0 < value <= MAX_TIMESTAMP_MS:
        raise AttestationError(
            "payload.timestamp",
            f"must be milliseconds since the epoch, 1..{MAX_TIMESTAMP_MS}, got {value!r:.80}",
        )
    return value


def _pcrs(value: Any) -> dict[int, bytes]:
    if not isinstance(value, dict) or not 1 <= len(value) <= PCR_COUNT:
        size = len(value) if isinstance(value, dict) else type(value).__name__
        raise AttestationError("payload.pcrs", f"must be a map of 1..{PCR_COUNT} PCRs, got {size}")
    pcrs = {}
    for index, pcr in value.items():
        if type(index) is not int or not 0 <= index < PCR_COUNT:
            raise AttestationError(
                "payload.pcrs", f"index {index!r:.40} is not an integer in 0..{PCR_COUNT - 1}"
            )
        if not isinstance(pcr, bytes) or len(pcr) != PCR_LENGTH:
            got = f"{len(pcr)} bytes" if isinstance(pcr, bytes) else type(pcr).__name__
            raise AttestationError(
                f"payload.pcrs[{index}]", f"must be {PCR_LENGTH} bytes (SHA-384), got {got}"
            )
        pcrs[index] = pcr
    return dict(sorted(pcrs.items()))


def _cabundle(value: Any) -> tuple[bytes, ...]:
    if not isinstance(value, list) or not value:
        raise AttestationError(
            "payload.cabundle", "must be a non-empty array of DER certificates, root first"
        )
    return tuple(
        _bytes_field(cert, f"cabundle[{position}]", 1, MAX_CERTIFICATE_BYTES)
        for position, cert in enumerate(value)
    )


def _optional_bytes(fields: dict[Any, Any], name: str, low: int, high: int) -> bytes | None:
    value = fields.get(name)
    return None if value is None else _bytes_field(value, name, low, high)


def _bytes_field(value: Any, name: str, low: int, high: int) -> bytes:
    if not isinstance(value, bytes):
        raise AttestationError(
            f"payload.{name}", f"must be a byte string, got {type(value).__name__}"
        )
    if not low <= len(value) <= high:
        raise AttestationError(f"payload.{name}", f"is {len(value)} bytes, must be {low}..{high}")
    return value


# --- verifying ----------------------------------------------------------------------------


def verify_attestation_document(
    data: bytes,
    *,
    root: x509.Certificate | None = None,
    at: datetime | None = None,
    expected_pcrs: Mapping[int, bytes] | None = None,
    expected_nonce: bytes | None = None,
    expected_user_data: bytes | None = None,
    expected_public_key: bytes | None = None,
) -> VerifiedAttestation:
    """Verify a document against a pinned root at time ``at``; raise :class:`AttestationError`.

    ``root`` defaults to the AWS Nitro Enclaves Root G1 and ``at`` to now (UTC). Expected
    values that are ``None`` are not checked; every given one must match exactly.
    """
    root = aws_root_certificate() if root is None else root
    at = _verification_time(at)
    document = parse_attestation_document(data)
    chain = _verify_chain(document, root, at)
    _verify_signature(document.envelope, chain[-1])
    _check_expected_pcrs(document.pcrs, expected_pcrs or {})
    _check_expected_bytes("nonce", document.nonce, expected_nonce)
    _check_expected_bytes("user_data", document.user_data, expected_user_data)
    _check_expected_bytes("public_key", document.public_key, expected_public_key)
    return VerifiedAttestation(document=document, leaf=chain[-1], chain=chain, verified_at=at)


def _verification_time(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(timezone.utc)
    if at.tzinfo is None or at.utcoffset() is None:
        raise AttestationError(
            "verification time", f"{at.isoformat()} has no time zone; pass an aware UTC datetime"
        )
    return at.astimezone(timezone.utc)


def _verify_chain(
    document: AttestationDocument, root: x509.Certificate, at: datetime
) -> tuple[x509.Certificate, ...]:
    """Rebuild root → intermediates → leaf from the pinned root and check every link.

    ``cabundle[0]`` must be the pinned root byte for byte: AWS always sends its root there, and
    a mismatch is the clearest sign the document comes from another CA (e.g. the emulator).
    """
    try:
        _fully_parsed(root)
    except CERTIFICATE_ERRORS as err:
        raise AttestationError("root certificate", f"is malformed ({err})") from err
    _require_pinned_root(document.cabundle[0], root)
    intermediates = [
        _load_der_certificate(der, f"cabundle[{position}]")
        for position, der in enumerate(document.cabundle[1:], start=1)
    ]
    leaf = _load_der_certificate(document.certificate, "certificate")
    chain = (root, *intermediates, leaf)
    labels = ["root", *(f"intermediate {n}" for n in range(1, len(chain) - 1)), "leaf certificate"]
    for position, (cert, label) in enumerate(zip(chain, labels)):
        if position > 0:
            _check_issued_by(cert, label, chain[position - 1], labels[position - 1])
        _check_validity(cert, label, at)
        _check_critical_extensions(cert, label)
        if cert is leaf:
            _check_leaf(cert)
        else:
            _check_ca(cert, label, cas_below=len(chain) - 2 - position)
    return chain


def _require_pinned_root(first_der: bytes, root: x509.Certificate) -> None:
    root_der = root.public_bytes(Encoding.DER)
    if first_der != root_der:
        raise AttestationError(
            "certificate chain",
            f"cabundle[0] (SHA-256 {hashlib.sha256(first_der).hexdigest()}) is not the pinned root "
            f"{root.subject.rfc4514_string()} (SHA-256 {hashlib.sha256(root_der).hexdigest()}); "
            "the document was issued under another CA (use --root for the emulator's root)",
        )


def _load_der_certificate(der: bytes, name: str) -> x509.Certificate:
    try:
        # cryptography warns about some malformations (non-positive serials, odd name lengths);
        # the error this raises, or the signature check that follows, is the one verdict to show.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _fully_parsed(x509.load_der_x509_certificate(der))
    except CERTIFICATE_ERRORS as err:
        raise AttestationError(
            "certificate chain", f"{name} is not a well-formed DER X.509 certificate ({err})"
        ) from err


def _fully_parsed(cert: x509.Certificate) -> x509.Certificate:
    """Read every part the checks use: cryptography parses names and extensions lazily, and a
    malformed one must fail here as a format error, not later as a stray ValueError."""
    _ = (
        cert.subject,
        cert.issuer,
        cert.extensions,
        cert.public_key(),
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )
    return cert


def _check_issued_by(
    cert: x509.Certificate, label: str, issuer: x509.Certificate, issuer_label: str
) -> None:
    if cert.issuer != issuer.subject:
        raise AttestationError(
            "certificate chain",
            f"{label} was issued by {cert.issuer.rfc4514_string()!r}, but the certificate above it "
            f"({issuer_label}) is {issuer.subject.rfc4514_string()!r}",
        )
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise AttestationError(
            "certificate chain", f"{label} signature does not verify with the {issuer_label} key"
        ) from err


def _check_validity(cert: x509.Certificate, label: str, at: datetime) -> None:
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if at < not_before:
        raise AttestationError(
            "certificate chain",
            f"{label} not valid until {rfc3339(not_before)} (verification time {rfc3339(at)})",
        )
    if at > not_after:
        raise AttestationError(
            "certificate chain",
            f"{label} expired at {rfc3339(not_after)} (verification time {rfc3339(at)})",
        )


def _check_critical_extensions(cert: x509.Certificate, label: str) -> None:
    for extension in cert.extensions:
        if extension.critical and extension.oid not in PROCESSED_CRITICAL_EXTENSIONS:
            raise AttestationError(
                "certificate chain",
                f"{label} has critical extension {extension.oid.dotted_string} "
                "that this verifier does not process",
            )


def _extension(cert: x509.Certificate, extension_type: type[Any]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(extension_type).value
    except x509.ExtensionNotFound:
        return None


def _check_ca(cert: x509.Certificate, label: str, cas_below: int) -> None:
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise AttestationError(
            "certificate chain", f"{label} is not a CA (basicConstraints cA is not set)"
        )
    if constraints.path_length is not None and cas_below > constraints.path_length:
        raise AttestationError(
            "certificate chain",
            f"{label} allows {constraints.path_length} CA(s) below it (pathLenConstraint), "
            f"the chain has {cas_below}",
        )
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise AttestationError("certificate chain", f"{label} keyUsage does not allow keyCertSign")


def _check_leaf(cert: x509.Certificate) -> None:
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise AttestationError(
            "certificate chain", "leaf certificate is a CA (basicConstraints cA is set)"
        )
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise AttestationError(
            "certificate chain", "leaf certificate keyUsage does not allow digitalSignature"
        )
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError(
            "certificate chain", "leaf certificate key is not P-384, which ES384 requires"
        )


def _verify_signature(envelope: CoseSign1, leaf: x509.Certificate) -> None:
    try:
        envelope.verify(leaf.public_key())
    except CoseError as err:
        raise AttestationError(
            "signature", f"{err}: the payload or signature was altered, or signed by another key"
        ) from err


def _check_expected_pcrs(actual: Mapping[int, bytes], expected: Mapping[int, bytes]) -> None:
    for index, want, have in pcr_differences(expected, actual)[:1]:
        if have is None:
            raise AttestationError(
                f"pcr {index}", f"expected {want.hex()}, document has no PCR {index}"
            )
        raise AttestationError(f"pcr {index}", f"expected {want.hex()}, document has {have.hex()}")


def _check_expected_bytes(name: str, actual: bytes | None, expected: bytes | None) -> None:
    if expected is None:
        return
    if actual is None:
        raise AttestationError(name, f"expected {_preview(expected)}, document has none")
    if not hmac.compare_digest(bytes(expected), actual):
        raise AttestationError(
            name, f"expected {_preview(expected)}, document has {_preview(actual)}"
        )


def _preview(value: bytes) -> str:
    """Full hex for PCR-sized values, a prefix and the length for long ones (one-line errors)."""
    if len(value) <= PCR_LENGTH:
        return value.hex() or "(empty)"
    return f"{value[:16].hex()}… ({len(value)} bytes)"


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()
