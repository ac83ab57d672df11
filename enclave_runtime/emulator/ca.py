"""The emulator's certificate authority: root -> intermediate -> one short-lived leaf per document.

Shaped like AWS's chain (P-384 throughout, CA constraints, a leaf that lives three hours) so that
the same verifier checks both; only the root differs. The root and intermediate persist under
``<emulator root>/ca`` (keys mode 0600) so documents from every enclave of one emulator verify
against one ``root.pem``; a verifier must be told to trust it, it is never trusted by default.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=365)
LEAF_LIFETIME = timedelta(hours=3)  # as AWS's per-document certificates
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class Issuer:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class DocumentSigner:
    """What one attestation document is signed with: a fresh leaf, its key, and the bundle."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    cabundle: tuple[x509.Certificate, ...]  # root first, as NSM sends it


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EnclaveOps"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "nitro-emu"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(is_ca: bool) -> x509.KeyUsage:
    """CAs sign certificates; a leaf signs documents (what the verifier checks)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=is_ca,
        crl_sign=is_ca,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Issuer | None,
    *,
    lifetime: timedelta,
    path_length: int | None,
    now: datetime,
) -> x509.Certificate:
    """Sign a certificate for ``key``; ``path_length`` None makes a leaf, no issuer a root."""
    issuer_name = issuer.certificate.subject if issuer else _name(subject)
    signing_key = issuer.key if issuer else key
    is_ca = path_length is not None
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
        .add_extension(_key_usage(is_ca), critical=True)
    )
    return builder.sign(signing_key, hashes.SHA384())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _save(directory: Path, stem: str, issuer: Issuer) -> None:
    _write_private(
        directory / f"{stem}.key",
        issuer.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    tmp = directory / f".{stem}.pem.tmp"
    tmp.write_bytes(issuer.certificate.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, directory / f"{stem}.pem")


def _load(directory: Path, stem: str) -> Issuer | None:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    if not (cert_path.exists() and key_path.exists()):
        return None
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key; remove {directory} to recreate")
    return Issuer(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)


class EmulatorCA:
    """The CA of one emulator root directory; created on first use, then reused."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.root, self.intermediate = self._load_or_create()

    @property
    def root_pem_path(self) -> Path:
        return self.directory / "root.pem"

    def _load_or_create(self) -> tuple[Issuer, Issuer]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        with open(self.directory / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # several enclave processes may start at once
            root = _load(self.directory, "root")
            intermediate = _load(self.directory, "intermediate")
            now = datetime.now(timezone.utc)
            if root is None or root.certificate.not_valid_after_utc <= now + LEAF_LIFETIME:
                key = _new_key()
                root = Issuer(
                    _issue(
                        "nitro-emu root", key, None, lifetime=ROOT_LIFETIME, path_length=2, now=now
                    ),
                    key,
                )
                _save(self.directory, "root", root)
                intermediate = None
            if (
                intermediate is None
                or intermediate.certificate.issuer != root.certificate.subject
                or intermediate.certificate.not_valid_after_utc <= now + LEAF_LIFETIME
            ):
                key = _new_key()
                cert = _issue(
                    "nitro-emu intermediate",
                    key,
                    root,
                    lifetime=INTERMEDIATE_LIFETIME,
                    path_length=0,
                    now=now,
                )
                intermediate = Issuer(cert, key)
                _save(self.directory, "intermediate", intermediate)
            return root, intermediate

    def signer_for(self, module_id: str, now: datetime | None = None) -> DocumentSigner:
        """A fresh leaf for one document, named after the enclave as AWS names its leaves."""
        moment = now or datetime.now(timezone.utc)
        key = _new_key()
        leaf = _issue(
            f"{module_id}.nitro-emu",
            key,
            self.intermediate,
            lifetime=LEAF_LIFETIME,
            path_length=None,
            now=moment,
        )
        return DocumentSigner(key, leaf, (self.root.certificate, self.intermediate.certificate))
