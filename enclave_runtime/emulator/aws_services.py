"""``nitro-emu aws-services``: the emulated parent's IMDS and KMS as one long-running process.

It serves both on loopback and writes ``$NITRO_EMU_ROOT/aws/endpoints.json``; a sleeve running
on the emulator reads that file (:func:`emulated_routes`) and has its egress broker connect
``169.254.169.254:80`` and ``kms.<region>.amazonaws.com:443`` to them (docs/kms.md). The KMS's
TLS certificate is ``$NITRO_EMU_ROOT/aws/ca.pem``: put it in the image and point
``AWS_CA_BUNDLE`` at it so odyn's KMS proxy verifies the emulated KMS as it verifies AWS.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave_runtime.emulator.aws_endpoints import AwsEndpoints, routes_for, start_aws_endpoints
from enclave_runtime.emulator.aws_kms import KmsService
from enclave_runtime.emulator.ca import EmulatorCA

ENDPOINTS_FILE = "endpoints.json"
TLS_LIFETIME = timedelta(days=30)


def aws_directory(root: Path) -> Path:
    return Path(root) / "aws"


def self_signed_certificate(
    names: list[str], lifetime: timedelta = TLS_LIFETIME
) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for ``names`` (and 127.0.0.1) and its key, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.now(timezone.utc)
    alternative: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternative.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_tls_certificate(directory: Path, names: list[str]) -> tuple[Path, Path]:
    """The KMS's certificate (``ca.pem``, what clients trust) and key in ``directory``."""
    cert_pem, key_pem = self_signed_certificate(names)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "kms.key"
    cert_path.write_bytes(cert_pem)
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)
    return cert_path, key_path


def start_emulated_aws(root: Path, region: str) -> AwsEndpoints:
    """IMDS and KMS for the emulator at ``root``; documents verify against its CA root."""
    directory = aws_directory(root)
    cert, key = write_tls_certificate(directory, [f"kms.{region}.amazonaws.com", "localhost"])
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    ca = EmulatorCA(Path(root) / "ca")
    endpoints = start_aws_endpoints(KmsService(ca.root.certificate, region), tls)
    description = {
        "region": region,
        "imds_port": endpoints.imds_port,
        "kms_port": endpoints.kms_port,
        "ca": str(cert),
        "access_key_id": endpoints.imds.credentials.access_key,
    }
    (directory / ENDPOINTS_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return endpoints


def serve_until_signalled(root: Path, region: str) -> int:
    """Run the services until SIGTERM or SIGINT; the endpoints file is removed on the way out."""
    endpoints = start_emulated_aws(root, region)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(
        json.dumps({"imds_port": endpoints.imds_port, "kms_port": endpoints.kms_port}), flush=True
    )
    stop.wait()
    (aws_directory(root) / ENDPOINTS_FILE).unlink(missing_ok=True)
    endpoints.close()
    return 0


def emulated_routes(root: Path) -> dict[tuple[str, int], tuple[str, int]]:
    """The egress broker's routes to running emulated services; empty when none run."""
    path = aws_directory(root) / ENDPOINTS_FILE
    if not path.is_file():
        return {}
    description = json.loads(path.read_text())
    return routes_for(
        description["region"], int(description["imds_port"]), int(description["kms_port"])
    )
