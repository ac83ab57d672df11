"""Self-signed certificates for the tests that terminate or check TLS."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from enclave_runtime.emulator.aws_services import self_signed_certificate


def write_self_signed(cert_path: Path, key_path: Path, name: str) -> Path:
    """A P-256 certificate for ``name`` (CN and SAN), valid for a day, and its key, as PEM."""
    cert_pem, key_pem = self_signed_certificate([name], lifetime=timedelta(days=1))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path
