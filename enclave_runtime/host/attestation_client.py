"""Fetch an attestation document from a running enclave and verify it, from the host side.

Two ways to reach an enclave's ``POST /v1/attestation`` (docs/api.md):

- a URL: the aux API (or API) base URL as published on the host, e.g. ``http://127.0.0.1:18001``
  (a sleeve's published port, or a host proxy);
- an enclave CID and port: HTTP over a vsock connection to (CID, port), which odyn's ingress
  forwards to ``127.0.0.1:port`` inside the enclave; for enclaves without published ports. The
  transport is :mod:`enclave_runtime.transport.vsock` (the nitro-emu fabric when asked for).

The caller's nonce (random by default) goes into the request and must come back in the document;
verification pins a root the caller chooses and never trusts the document's own bundle.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from cryptography import x509

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.attestation import (
    MAX_DOCUMENT_BYTES,
    PCR_COUNT,
    PCR_LENGTH,
    VerifiedAttestation,
    aws_root_certificate,
    load_root_certificate,
    verify_attestation_document,
)
from enclave_runtime.formats.attestation import (
    MAX_NONCE_BYTES as MAX_DOCUMENT_NONCE_BYTES,
)
from enclave_runtime.formats.pcr import Measurements, parse_pcr_index, pcr_from_hex
from enclave_runtime.transport import vsock
from enclave_runtime.waiting import poll

ATTESTATION_PATH = "/v1/attestation"
DEFAULT_NONCE_BYTES = 32
# The API and the document format both allow 1024 bytes per field (docs/api.md).
MAX_NONCE_BYTES = MAX_DOCUMENT_NONCE_BYTES
DEFAULT_TIMEOUT = 30.0
_MEASUREMENT_ALGORITHM_KEY = "HashAlgorithm"


# Between two attempts of a waiting attestation (the enclave role asked every 2 s too).
WAIT_DELAY = 2.0


class AttestationFetchError(EnclaveOpsError):
    """The enclave could not be asked for a document, or answered something else.

    Worth retrying: an enclave that has just booted answers once odyn listens.
    """

    retryable = True


class AttestationInputError(EnclaveOpsError, ValueError):
    """An expected PCR, a nonce or a root certificate the caller gave cannot be used."""


@dataclass(frozen=True)
class AttestationSource:
    """Where the document comes from: a base URL, or a vsock (cid, port)."""

    url: str | None = None
    enclave_cid: int | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        by_address = self.enclave_cid is not None or self.port is not None
        if (self.url is not None) == by_address:
            raise AttestationInputError(
                "give either url (the aux API base URL) or enclave_cid and port, not both"
            )
        if by_address and (self.enclave_cid is None or self.port is None):
            raise AttestationInputError("enclave_cid and port go together: give both")

    def address(self) -> tuple[int, int]:
        """(cid, port) of a vsock source."""
        if self.enclave_cid is None or self.port is None:
            raise AttestationInputError("this attestation source is a URL, not a (cid, port)")
        return self.enclave_cid, self.port

    def __str__(self) -> str:
        if self.url is not None:
            return self.url.rstrip("/") + ATTESTATION_PATH
        return f"vsock({self.enclave_cid}:{self.port}){ATTESTATION_PATH}"


@dataclass(frozen=True)
class AttestationResult:
    """A fetched and verified document, the nonce it was asked with, and where it came from."""

    verified: VerifiedAttestation
    nonce: bytes
    source: str

    def summary(self) -> dict[str, Any]:
        return self.verified.summary()


def new_nonce() -> bytes:
    return secrets.token_bytes(DEFAULT_NONCE_BYTES)


def parse_nonce(text: str) -> bytes:
    """A nonce given as hex (``0x`` optional)."""
    digits = text[2:] if text.lower().startswith("0x") else text
    try:
        nonce = bytes.fromhex(digits)
    except ValueError:
        raise AttestationInputError(
            f"nonce {text!r} is not hex (two hex digits per byte, e.g. 0a1b)"
        ) from None
    if not 1 <= len(nonce) <= MAX_NONCE_BYTES:
        raise AttestationInputError(
            f"nonce is {len(nonce)} bytes; give 1 to {MAX_NONCE_BYTES} bytes"
        )
    return nonce


def parse_expected_pcrs(expected: Mapping[Any, Any] | Measurements) -> dict[int, bytes]:
    """Expected PCRs from ``{index: hex}``; keys may be 0, "0" or "PCR0".

    nitro-cli's Measurements (``{"HashAlgorithm": ..., "PCR0": ...}``, as the eif and
    eif_info modules return them) are accepted as they are; ``HashAlgorithm`` is skipped. A
    :class:`~enclave_runtime.formats.pcr.Measurements` gives its PCRs as they are.
    """
    if isinstance(expected, Measurements):
        return expected.as_pcrs()
    pcrs: dict[int, bytes] = {}
    for key, value in expected.items():
        if key == _MEASUREMENT_ALGORITHM_KEY:
            continue
        index = _pcr_index(key)
        pcrs[index] = _pcr_value(index, value)
    return pcrs


def _pcr_index(key: Any) -> int:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise AttestationInputError(
            f"expected_pcrs key {key!r:.40} is a {type(key).__name__}; write 0 to "
            f"{PCR_COUNT - 1} or PCR0 ..."
        )
    try:
        return parse_pcr_index(str(key))
    except ValueError as err:
        raise AttestationInputError(f"expected_pcrs key {err}") from None


def _pcr_value(index: int, value: Any) -> bytes:
    try:
        return pcr_from_hex(value)
    except ValueError:
        raise AttestationInputError(
            f"expected PCR {index} is not {PCR_LENGTH * 2} hex digits (a SHA-384 value): {value!r}"
        ) from None


def load_root(path: str | os.PathLike[str] | None) -> x509.Certificate:
    """The root to pin: the PEM/DER certificate at ``path``, or the AWS Nitro root."""
    if path is None:
        return aws_root_certificate()
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise AttestationInputError(
            f"cannot read root_certificate {path}: {err.strerror or err}; for the emulator it is "
            "<emulator_root>/ca/root.pem (created when the first enclave attests)"
        ) from None
    return load_root_certificate(data)


def fetch_document(
    source: AttestationSource,
    nonce: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    fabric: vsock.Backend | None = None,
) -> bytes:
    """POST /v1/attestation with ``nonce`` and return the raw document (COSE_Sign1 bytes)."""
    body = json.dumps({"nonce": base64.b64encode(nonce).decode("ascii")}).encode()
    connection, path = _connection(source, timeout, fabric)
    try:
        connection.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/json", "Accept": "application/cbor"},
        )
        response = connection.getresponse()
        data = response.read(MAX_DOCUMENT_BYTES + 1)
    except (OSError, http.client.HTTPException) as err:
        raise AttestationFetchError(_unreachable(source, err)) from None
    finally:
        connection.close()
    if response.status != 200:
        raise AttestationFetchError(
            f"{source} answered {response.status} {response.reason}: {_error_text(data)}"
        )
    if len(data) > MAX_DOCUMENT_BYTES:
        raise AttestationFetchError(
            f"{source} sent more than {MAX_DOCUMENT_BYTES} bytes: not an attestation document; "
            "is this the enclave's API or aux API port?"
        )
    return data


def _connection(
    source: AttestationSource, timeout: float, fabric: vsock.Backend | None
) -> tuple[http.client.HTTPConnection, str]:
    if source.url is None:
        cid, port = source.address()
        return _VsockHTTPConnection(cid, port, timeout, fabric), ATTESTATION_PATH
    parts = urlsplit(source.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AttestationInputError(
            f"url {source.url!r} is not an http:// or https:// URL with a host, e.g. "
            "http://127.0.0.1:18001 (the aux API's published port)"
        )
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = parts.path.rstrip("/") + ATTESTATION_PATH
    return kind(parts.hostname, parts.port, timeout=timeout), path


class _VsockHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a vsock stream to (cid, port); the Host header names the enclave."""

    def __init__(self, cid: int, port: int, timeout: float, fabric: vsock.Backend | None) -> None:
        super().__init__(f"enclave-{cid}", port, timeout=timeout)
        self._address = (cid, port)
        self._fabric = fabric

    def connect(self) -> None:
        backend = self._fabric or vsock.backend()
        self.sock = backend.connect(*self._address, timeout=self.timeout)


def _unreachable(source: AttestationSource, err: BaseException) -> str:
    if isinstance(err, socket.timeout):
        reason = f"no answer in time ({err})"
    else:
        reason = (err.strerror if isinstance(err, OSError) else None) or str(err) or repr(err)
    hint = (
        "check that the enclave runs (enclaveops.nitro.enclave_info) and that this port is the "
        "aux API's (aux_api.listen_port) or the API's published port"
    )
    if source.url is None:
        hint = (
            "check the CID (enclaveops.nitro.enclave_info) and that the port is an ingress "
            "listen_port that forwards to the aux API (aux_api.listen_port in enclaver.yaml); "
            "for the emulator set emulator_root"
        )
    return f"cannot fetch an attestation from {source}: {reason}; {hint}"


def _error_text(data: bytes) -> str:
    try:
        message = json.loads(data).get("error")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, str):
        return message
    return repr(data[:200]) if data else "(empty body)"


def attest(
    source: AttestationSource,
    *,
    nonce: bytes | None = None,
    expected_pcrs: Mapping[int, bytes] | None = None,
    root: x509.Certificate | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    fabric: vsock.Backend | None = None,
) -> AttestationResult:
    """Fetch a fresh document from ``source`` and verify chain, signature, nonce and PCRs.

    Raises :class:`AttestationFetchError` when the enclave cannot be asked and
    :class:`~enclave_runtime.formats.attestation.AttestationError` (naming the failed check)
    when the document does not verify.
    """
    nonce = new_nonce() if nonce is None else nonce
    document = fetch_document(source, nonce, timeout=timeout, fabric=fabric)
    verified = verify_attestation_document(
        document,
        root=aws_root_certificate() if root is None else root,
        expected_pcrs=expected_pcrs or {},
        expected_nonce=nonce,
    )
    return AttestationResult(verified=verified, nonce=nonce, source=str(source))


def attest_waiting(
    source: AttestationSource,
    wait_timeout: float,
    *,
    delay: float = WAIT_DELAY,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    **options: Any,
) -> AttestationResult:
    """:func:`attest`, asked again every ``delay`` s while the enclave cannot be reached, until
    ``wait_timeout``; a document that does not verify fails at once, the last reach error at the
    end."""
    last: list[AttestationFetchError] = []

    def attempt() -> AttestationResult | None:
        try:
            return attest(source, **options)
        except AttestationFetchError as err:
            last[:] = [err]
            return None

    return poll(attempt, wait_timeout, delay, lambda: last[0], clock=clock, sleep=sleep)


__all__ = [
    "AttestationFetchError",
    "AttestationInputError",
    "AttestationResult",
    "AttestationSource",
    "attest",
    "attest_waiting",
    "fetch_document",
    "load_root",
    "new_nonce",
    "parse_expected_pcrs",
    "parse_nonce",
]
