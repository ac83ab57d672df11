"""The KMS proxy: the application's AWS KMS calls, attested and re-signed (docs/kms.md).

Compatible with enclaver's odyn (``enclaver/src/proxy/kms.rs``): it listens on
``127.0.0.1:kms_proxy.listen_port`` and the application finds it through ``AWS_KMS_ENDPOINT``
and the SDK-standard ``AWS_ENDPOINT_URL_KMS``. For each request it

1. reads the region and service from the SigV4 credential scope the SDK signed with (the
   application's own credentials are never used: an enclave has none worth trusting);
2. for the attesting operations adds ``Recipient`` with a fresh attestation document whose
   ``public_key`` is an RSA-2048 key that never leaves this process;
3. re-signs with SigV4 (botocore's signer) using the parent role's IMDSv2 credentials, fetched
   through egress and cached until shortly before they expire;
4. sends it to ``https://<kms_proxy.endpoints[region] or kms.<region>.amazonaws.com>/`` through
   the egress proxy (CONNECT; TLS is verified here, inside the enclave);
5. opens ``CiphertextForRecipient`` (:mod:`enclave_runtime.formats.kms_envelope`) and answers
   with the plaintext in the field KMS would have used. Non-200 answers pass through unchanged;
   a 200 answer without a valid envelope for our key is a 502, never ciphertext.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Protocol

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.kms_envelope import EnvelopeError, open_envelope
from enclave_runtime.formats.manifest import KmsProxy
from enclave_runtime.odyn.egress import EgressProxy
from enclave_runtime.odyn.http import DEFAULT_LIMITS, HttpError, Request, read_request
from enclave_runtime.transport.relay import BACKLOG, Connections

LOG = logging.getLogger("odyn")

# Operation -> the response field KMS fills with the plaintext when there is no Recipient.
ATTESTING_OPERATIONS = {
    "Decrypt": "Plaintext",
    "GenerateDataKey": "Plaintext",
    "GenerateDataKeyPair": "PrivateKeyPlaintext",
    "GenerateRandom": "Plaintext",
    "DeriveSharedSecret": "SharedSecret",
}
KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
TARGET_PREFIX = "TrentService."
JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
IMDS_HOST = "169.254.169.254"
IMDS_TOKEN_TTL_SECONDS = 21600
# Credentials are replaced this long before their Expiration, so a request never carries
# credentials that expire while it is on the way.
CREDENTIAL_MARGIN_SECONDS = 300
UPSTREAM_TIMEOUT_SECONDS = 30.0
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request")
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}\Z")


class KmsProxyError(EnclaveOpsError):
    """The KMS proxy cannot start, or cannot get what a request needs."""


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class RoleCredentials:
    access_key: str
    secret_key: str
    token: str
    expires_at: float  # seconds since the epoch


class Upstream(Protocol):
    """How the proxy reaches IMDS and KMS (the egress proxy in an enclave)."""

    def imds(self, method: str, path: str, headers: dict[str, str]) -> UpstreamResponse: ...

    def kms(self, authority: str, headers: dict[str, str], body: bytes) -> UpstreamResponse: ...


@dataclass(frozen=True)
class EgressUpstream:
    """IMDS and KMS through odyn's egress proxy: absolute-form HTTP, and CONNECT for TLS."""

    proxy_host: str
    proxy_port: int
    tls: ssl.SSLContext = field(default_factory=ssl.create_default_context)
    timeout: float = UPSTREAM_TIMEOUT_SECONDS

    def imds(self, method: str, path: str, headers: dict[str, str]) -> UpstreamResponse:
        conn = http.client.HTTPConnection(self.proxy_host, self.proxy_port, timeout=self.timeout)
        return _exchange(conn, method, f"http://{IMDS_HOST}{path}", headers, b"")

    def kms(self, authority: str, headers: dict[str, str], body: bytes) -> UpstreamResponse:
        host, _, port = authority.partition(":")
        conn = http.client.HTTPSConnection(
            self.proxy_host, self.proxy_port, timeout=self.timeout, context=self.tls
        )
        conn.set_tunnel(host, int(port) if port else 443)
        return _exchange(conn, "POST", "/", headers, body)


def _exchange(
    conn: http.client.HTTPConnection, method: str, url: str, headers: dict[str, str], body: bytes
) -> UpstreamResponse:
    try:
        conn.request(method, url, body=body or None, headers=headers)
        response = conn.getresponse()
        return UpstreamResponse(response.status, tuple(response.getheaders()), response.read())
    except (OSError, http.client.HTTPException) as err:
        raise KmsProxyError(f"cannot reach {url} through egress: {err}") from err
    finally:
        conn.close()


class CredentialCache:
    """The parent role's credentials from IMDSv2, reused until shortly before they expire."""

    def __init__(self, upstream: Upstream, clock: Callable[[], float] = time.time) -> None:
        self.upstream = upstream
        self.clock = clock
        self._current: RoleCredentials | None = None

    def get(self) -> RoleCredentials:
        current = self._current
        if current is None or current.expires_at - CREDENTIAL_MARGIN_SECONDS <= self.clock():
            current = self._current = self._fetch()
        return current

    def _fetch(self) -> RoleCredentials:
        ttl = {"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL_SECONDS)}
        token = self._imds("PUT", "/latest/api/token", ttl).decode()
        auth = {"X-aws-ec2-metadata-token": token}
        base = "/latest/meta-data/iam/security-credentials/"
        roles = self._imds("GET", base, auth).decode().split()
        if not roles:
            raise KmsProxyError("IMDS lists no IAM role: attach an instance profile to the parent")
        try:
            doc = json.loads(self._imds("GET", base + roles[0], auth))
            return RoleCredentials(
                doc["AccessKeyId"],
                doc["SecretAccessKey"],
                doc["Token"],
                _epoch(doc["Expiration"]),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise KmsProxyError(f"IMDS credentials for {roles[0]} are malformed: {err}") from err

    def _imds(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        response = self.upstream.imds(method, path, headers)
        if response.status != 200:
            raise KmsProxyError(
                f"IMDS answered {response.status} to {method} {path}: allow {IMDS_HOST} in "
                "egress.allow and use IMDSv2 on the parent"
            )
        return response.body


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc).timestamp()


def credential_scope(authorization: str | None) -> tuple[str, str]:
    """Region and service from a SigV4 Authorization header; HttpError 400 otherwise."""
    found = _CREDENTIAL.search(authorization or "")
    if found is None:
        raise HttpError(400, "the request is not SigV4-signed: sign it for service kms")
    region, service = found.group(3), found.group(4)
    if service != "kms":
        raise HttpError(400, f"the request is signed for service {service}; this proxy is kms")
    if not _REGION.match(region):
        raise HttpError(400, f"the credential scope's region {region!r} is not an AWS region")
    return region, service


def operation_of(target: str | None) -> str:
    """The KMS operation in ``X-Amz-Target``; HttpError 400 when it is not TrentService."""
    if not target or not target.startswith(TARGET_PREFIX):
        raise HttpError(400, f"X-Amz-Target {target!r} is not a KMS (TrentService) operation")
    return target[len(TARGET_PREFIX) :]


def with_recipient(body: bytes, attestation_document: bytes) -> bytes:
    """The request body with our Recipient (any Recipient the application sent is replaced)."""
    try:
        fields = json.loads(body or b"{}")
    except ValueError as err:
        raise HttpError(400, f"the request body is not JSON: {err}") from err
    if not isinstance(fields, dict):
        raise HttpError(400, "the request body must be a JSON object")
    fields["Recipient"] = {
        "AttestationDocument": base64.b64encode(attestation_document).decode("ascii"),
        "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
    }
    return json.dumps(fields).encode()


def revealed(operation: str, body: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """KMS's answer with CiphertextForRecipient opened into the operation's plaintext field."""
    try:
        fields = json.loads(body)
        sealed = base64.b64decode(fields.pop("CiphertextForRecipient"), validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as err:
        raise KmsProxyError(
            f"KMS answered {operation} without a CiphertextForRecipient for this enclave"
        ) from err
    try:
        plaintext = open_envelope(sealed, private_key)
    except EnvelopeError as err:
        raise KmsProxyError(f"KMS's {operation} answer is refused: {err}") from err
    fields[ATTESTING_OPERATIONS[operation]] = base64.b64encode(plaintext).decode("ascii")
    return json.dumps(fields).encode()


def signed_headers(
    authority: str,
    region: str,
    target: str,
    body: bytes,
    credentials: RoleCredentials,
) -> dict[str, str]:
    """The headers of the request to KMS, signed with SigV4 by botocore's signer."""
    # botocore is imported here: it is large and only a manifest with kms_proxy needs it.
    from botocore.auth import SigV4Auth  # noqa: PLC0415
    from botocore.awsrequest import AWSRequest  # noqa: PLC0415
    from botocore.credentials import Credentials  # noqa: PLC0415

    request = AWSRequest(
        method="POST",
        url=f"https://{authority}/",
        data=body,
        headers={"Content-Type": JSON_CONTENT_TYPE, "X-Amz-Target": target},
    )
    keys = Credentials(credentials.access_key, credentials.secret_key, credentials.token)
    SigV4Auth(keys, "kms", region).add_auth(request)
    return dict(request.headers.items())


Attest = Callable[[bytes], Awaitable[bytes]]


@dataclass
class KmsProxyServer:
    """The running proxy; ``env()`` tells the application where it is."""

    config: KmsProxy
    server: asyncio.AbstractServer
    upstream: Upstream
    attest: Attest
    private_key: rsa.RSAPrivateKey
    credentials: CredentialCache
    connections: Connections = field(default_factory=lambda: Connections("kms proxy"))

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    def env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.port}"
        return {"AWS_KMS_ENDPOINT": url, "AWS_ENDPOINT_URL_KMS": url}

    async def close(self) -> None:
        self.server.close()
        await self.connections.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.connections.serve(self._serve(reader, writer), writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader, DEFAULT_LIMITS, writer)
            except HttpError as err:
                await _write(writer, _kms_error(err.status, "ValidationException", str(err)))
                return
            if request is None:
                return
            await _write(writer, await self.answer(request))

    async def answer(self, request: Request) -> UpstreamResponse:
        """KMS's answer to one request from the application."""
        try:
            region, _ = credential_scope(request.headers.get("authorization"))
            operation = operation_of(request.headers.get("x-amz-target"))
            body = request.body
            if operation in ATTESTING_OPERATIONS:
                spki = self.private_key.public_key().public_bytes(
                    Encoding.DER, PublicFormat.SubjectPublicKeyInfo
                )
                body = with_recipient(body, await self.attest(spki))
            loop = asyncio.get_running_loop()
            response = await loop.run_in_executor(
                None, self._forward, region, TARGET_PREFIX + operation, body
            )
            if response.status != 200 or operation not in ATTESTING_OPERATIONS:
                return response
            return UpstreamResponse(200, response.headers, self._open(operation, response.body))
        except HttpError as err:
            return _kms_error(err.status, "ValidationException", str(err))
        except (KmsProxyError, EnvelopeError) as err:
            LOG.warning("kms proxy: %s", err)
            return _kms_error(502, "KMSProxyException", str(err))

    def _forward(self, region: str, target: str, body: bytes) -> UpstreamResponse:
        authority = self.config.endpoint_for(region)
        headers = signed_headers(authority, region, target, body, self.credentials.get())
        return self.upstream.kms(authority, headers, body)

    def _open(self, operation: str, body: bytes) -> bytes:
        return revealed(operation, body, self.private_key)


def _kms_error(status: int, kind: str, message: str) -> UpstreamResponse:
    body = json.dumps({"__type": kind, "message": message}).encode()
    return UpstreamResponse(status, (("Content-Type", JSON_CONTENT_TYPE),), body)


_RELAYED_HEADERS = frozenset(("content-type", "x-amzn-requestid", "x-amzn-query-error"))


async def _write(writer: asyncio.StreamWriter, response: UpstreamResponse) -> None:
    reason = http.client.responses.get(response.status, "Unknown")
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    lines += [f"{k}: {v}" for k, v in response.headers if k.lower() in _RELAYED_HEADERS]
    lines.append(f"Content-Length: {len(response.body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body)
    await writer.drain()


def nsm_attest(nsm_path: str) -> Attest:
    """An attestation document from the NSM at ``nsm_path`` binding the proxy's public key."""
    from enclave_runtime.odyn.api import NsmAccess  # noqa: PLC0415

    access: NsmAccess | None = None

    async def attest(public_key: bytes) -> bytes:
        nonlocal access
        if access is None:
            access = await NsmAccess.open(nsm_path)
        return await access.attestation(user_data=None, nonce=None, public_key=public_key)

    return attest


async def start_kms_proxy(
    config: KmsProxy | None,
    upstream: Upstream | None,
    attest: Attest,
    *,
    port: int | None = None,
) -> KmsProxyServer | None:
    """Start the proxy on 127.0.0.1:``config.listen_port``; None when it is not configured."""
    if config is None:
        return None
    if upstream is None:
        raise KmsProxyError(
            "kms_proxy needs egress: add egress.allow with 169.254.169.254 and the KMS endpoint"
        )
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    proxy: KmsProxyServer | None = None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert proxy is not None
        await proxy.handle(reader, writer)

    listen = config.listen_port if port is None else port
    try:
        server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=BACKLOG)
    except OSError as err:
        raise KmsProxyError(
            f"cannot listen on 127.0.0.1:{listen} for the KMS proxy: {err.strerror or err}; "
            "choose another kms_proxy.listen_port"
        ) from err
    proxy = KmsProxyServer(config, server, upstream, attest, private_key, CredentialCache(upstream))
    LOG.info("kms proxy: listening on 127.0.0.1:%d", proxy.port)
    return proxy


def tls_context(environ: Mapping[str, str] = os.environ) -> ssl.SSLContext:
    """The system's trust store, or ``AWS_CA_BUNDLE`` (the SDKs' variable) when it is set."""
    bundle = environ.get("AWS_CA_BUNDLE")
    return ssl.create_default_context(cafile=bundle) if bundle else ssl.create_default_context()


async def start_from_manifest(
    config: KmsProxy, egress: EgressProxy | None, nsm_path: str
) -> KmsProxyServer | None:
    """The proxy odyn runs: upstream through ``egress``, attested by the NSM at ``nsm_path``."""
    upstream = None if egress is None else EgressUpstream("127.0.0.1", egress.port, tls_context())
    return await start_kms_proxy(config, upstream, nsm_attest(nsm_path))


__all__ = [
    "ATTESTING_OPERATIONS",
    "CredentialCache",
    "EgressUpstream",
    "KmsProxyError",
    "KmsProxyServer",
    "Upstream",
    "UpstreamResponse",
    "credential_scope",
    "nsm_attest",
    "revealed",
    "start_from_manifest",
    "start_kms_proxy",
    "tls_context",
    "with_recipient",
]
