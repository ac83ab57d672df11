"""The emulated parent's AWS endpoints: IMDSv2 and KMS (HTTPS, SigV4 checked), on loopback.

The egress broker routes ``169.254.169.254:80`` and the KMS endpoint's name to these servers
(``routes()``), so an enclave's KMS proxy runs its real code path and nothing is dialled outside
this machine (docs/kms.md). IMDS hands out one set of role credentials; KMS accepts requests
signed with exactly those, and checks the SigV4 signature with botocore's signer.
"""

from __future__ import annotations

import hmac
import http.server
import json
import re
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from enclave_runtime.emulator.aws_kms import KmsFault, KmsService

ROLE_NAME = "nitro-emu-parent"
CREDENTIAL_LIFETIME = timedelta(hours=6)
MAX_BODY = 1 << 20
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([a-z0-9-]+)/kms/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})\Z"
)


@dataclass(frozen=True)
class RoleCredentials:
    access_key: str
    secret_key: str
    token: str
    expiration: datetime


def new_credentials(now: datetime | None = None) -> RoleCredentials:
    moment = now or datetime.now(timezone.utc)
    return RoleCredentials(
        "ASIA" + secrets.token_hex(8).upper(),
        secrets.token_urlsafe(30),
        secrets.token_urlsafe(60),
        moment + CREDENTIAL_LIFETIME,
    )


@dataclass
class Imds:
    """IMDSv2: a token from PUT /latest/api/token is required on every GET."""

    credentials: RoleCredentials
    region: str = "us-east-1"
    tokens: set[str] = field(default_factory=set)

    def answer(self, method: str, path: str, headers: Any) -> tuple[int, bytes]:
        if method == "PUT" and path == "/latest/api/token":
            if not headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return 400, b"missing X-aws-ec2-metadata-token-ttl-seconds"
            token = secrets.token_urlsafe(32)
            self.tokens.add(token)
            return 200, token.encode()
        if method != "GET":
            return 405, b""
        if headers.get("X-aws-ec2-metadata-token") not in self.tokens:
            return 401, b""
        base = "/latest/meta-data/iam/security-credentials/"
        documents = {
            base: ROLE_NAME.encode(),
            base + ROLE_NAME: self._credentials_document(),
            "/latest/meta-data/placement/region": self.region.encode(),
        }
        found = documents.get(path)
        return (200, found) if found is not None else (404, b"")

    def _credentials_document(self) -> bytes:
        creds = self.credentials
        return json.dumps(
            {
                "Code": "Success",
                "Type": "AWS-HMAC",
                "AccessKeyId": creds.access_key,
                "SecretAccessKey": creds.secret_key,
                "Token": creds.token,
                "Expiration": creds.expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        ).encode()


def check_signature(
    method: str,
    url: str,
    headers: Any,
    body: bytes,
    *,
    credentials: RoleCredentials,
    now: datetime | None = None,
) -> str:
    """The region a valid SigV4 request is signed for; KmsFault otherwise."""
    from botocore.auth import SigV4Auth  # noqa: PLC0415
    from botocore.awsrequest import AWSRequest  # noqa: PLC0415
    from botocore.credentials import Credentials  # noqa: PLC0415

    received = {name.lower(): value for name, value in headers.items()}
    found = _AUTHORIZATION.match(received.get("authorization", ""))
    if found is None:
        raise KmsFault("MissingAuthenticationTokenException", "the request is not SigV4-signed")
    access_key, day, region, signed, signature = found.groups()
    if access_key != credentials.access_key:
        raise KmsFault("UnrecognizedClientException", "The security token included is invalid.")
    if received.get("x-amz-security-token") != credentials.token:
        raise KmsFault("UnrecognizedClientException", "The security token included is invalid.")
    stamp = received.get("x-amz-date", "")
    _check_clock(stamp, day, now or datetime.now(timezone.utc))
    names = signed.split(";")
    request = AWSRequest(
        method=method, url=url, data=body, headers={n: received.get(n, "") for n in names}
    )
    request.context["timestamp"] = stamp
    signer = SigV4Auth(
        Credentials(credentials.access_key, credentials.secret_key, credentials.token),
        "kms",
        region,
    )
    expected = signer.signature(
        signer.string_to_sign(request, signer.canonical_request(request)), request
    )
    if not hmac.compare_digest(expected, signature):
        raise KmsFault(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided.",
        )
    return region


def _check_clock(stamp: str, day: str, now: datetime) -> None:
    try:
        moment = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError as err:
        raise KmsFault("InvalidSignatureException", "X-Amz-Date is missing or malformed") from err
    if stamp[:8] != day or abs(now - moment) > timedelta(minutes=5):
        raise KmsFault("InvalidSignatureException", "Signature expired or not yet valid")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are two writes: without TCP_NODELAY, Nagle and delayed ACKs add 40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(min(length, MAX_BODY))

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


class _ImdsHandler(_Handler):
    def _answer(self) -> None:
        self._body()
        status, body = self.server.imds.answer(self.command, self.path, self.headers)
        self._send(status, body, "text/plain")

    do_GET = do_PUT = do_POST = _answer


class _KmsHandler(_Handler):
    def do_POST(self) -> None:
        body = self._body()
        try:
            host = self.headers.get("Host") or "localhost"
            check_signature(
                "POST",
                f"https://{host}/",
                self.headers,
                body,
                credentials=self.server.imds.credentials,
            )
            target = self.headers.get("X-Amz-Target") or ""
            if not target.startswith("TrentService."):
                raise KmsFault("UnknownOperationException", f"X-Amz-Target {target!r}")
            fields = json.loads(body or b"{}")
            with self.server.lock:
                answer = self.server.kms.handle(target.split(".", 1)[1], fields)
            self._send(200, json.dumps(answer).encode(), "application/x-amz-json-1.1")
        except KmsFault as fault:
            error = {"__type": fault.kind, "message": str(fault)}
            self._send(fault.status, json.dumps(error).encode(), "application/x-amz-json-1.1")
        except ValueError as err:
            error = {"__type": "SerializationException", "message": str(err)}
            self._send(400, json.dumps(error).encode(), "application/x-amz-json-1.1")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    imds: Imds
    kms: KmsService
    lock: threading.Lock


@dataclass
class AwsEndpoints:
    """Running IMDS and KMS servers on loopback; ``close()`` stops both."""

    imds: Imds
    kms: KmsService
    imds_server: _Server
    kms_server: _Server
    threads: list[threading.Thread]

    @property
    def imds_port(self) -> int:
        return int(self.imds_server.server_address[1])

    @property
    def kms_port(self) -> int:
        return int(self.kms_server.server_address[1])

    def routes(self) -> dict[tuple[str, int], tuple[str, int]]:
        """What the egress broker connects to instead of the AWS addresses."""
        return routes_for(self.kms.region, self.imds_port, self.kms_port)

    def close(self) -> None:
        for server in (self.imds_server, self.kms_server):
            server.shutdown()
            server.server_close()
        for thread in self.threads:
            thread.join()


def routes_for(
    region: str, imds_port: int, kms_port: int
) -> dict[tuple[str, int], tuple[str, int]]:
    """IMDS's address and the region's KMS name, routed to the loopback servers."""
    return {
        ("169.254.169.254", 80): ("127.0.0.1", imds_port),
        (f"kms.{region}.amazonaws.com", 443): ("127.0.0.1", kms_port),
    }


def start_aws_endpoints(
    kms: KmsService, tls: ssl.SSLContext, host: str = "127.0.0.1"
) -> AwsEndpoints:
    """Serve IMDS (HTTP) and ``kms`` (HTTPS with ``tls``) on ``host``, on free ports."""
    imds = Imds(new_credentials(), kms.region)
    lock = threading.Lock()
    servers = []
    for handler, context in ((_ImdsHandler, None), (_KmsHandler, tls)):
        server = _Server((host, 0), handler)
        server.imds, server.kms, server.lock = imds, kms, lock
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        servers.append(server)
    threads = [threading.Thread(target=s.serve_forever, args=(0.1,), daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    return AwsEndpoints(imds, kms, servers[0], servers[1], threads)
