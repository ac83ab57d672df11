"""The egress proxy inside the enclave: HTTP/1.1 on 127.0.0.1:proxy_port, out through the parent.

An enclave has no network. The app reaches the outside through this proxy, which the launcher
announces with ``http_proxy``/``https_proxy`` (and ``no_proxy=localhost,127.0.0.1``), as enclaver
does (``enclaver/src/bin/odyn/egress.rs``). For each request the proxy:

1. reads the head: ``CONNECT host:port`` (tunnels, e.g. HTTPS) or an absolute-form request
   (``GET http://host[:port]/path``); anything else is 400;
2. judges the host by the egress policy (docs/networking.md): denied is 403;
3. opens one vsock connection to the parent's broker (CID 3, port 17002) and asks it, in
   enclaver's framing (:mod:`enclave_runtime.formats.protocol`), to connect to host:port;
   a failure is 502, no answer in time 504;
4. checks the address the broker actually reached against the IP deny rules, so a name cannot
   lead to a denied address (403);
5. tunnels bytes both ways (CONNECT), or forwards the request in origin form with
   ``Connection: close`` and relays the response (absolute form): one upstream connection per
   request, half-closes propagated, idle connections closed.

Unlike enclaver, a denied request is 403 (enclaver answers 401) and upstream failures are 502/504
(enclaver answers 503 for both).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.egress_policy import EgressPolicy, EgressPolicyError, parse_destination
from enclave_runtime.formats.manifest import Egress
from enclave_runtime.formats.protocol import (
    ConnectErr,
    ConnectRequest,
    EgressProtocolError,
    Peer,
    decode_connect_response,
    read_egress_frame,
)
from enclave_runtime.formats.vsock_ports import EGRESS_BROKER_PORT, PARENT_CID
from enclave_runtime.odyn.http import (
    DEFAULT_LIMITS,
    HttpError,
    Limits,
    Request,
    ResponseHead,
    copy_body,
    encode_response_head,
    read_request_head,
    read_response_head,
    write_response,
)
from enclave_runtime.transport import vsock
from enclave_runtime.transport.relay import (
    BACKLOG,
    Activity,
    Connections,
    StreamEndpoint,
    close_all,
    pump,
    relay,
    supervise,
)

log = logging.getLogger(__name__)

NO_PROXY = "localhost,127.0.0.1"
_ABSOLUTE_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([/?][^#]*)?\Z")
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]@]+)(?::([0-9]{1,5}))?\Z")
# Hop-by-hop fields (RFC 9110 §7.6.1) a proxy must not forward. Transfer-Encoding stays: the
# body is forwarded exactly as framed.
_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade")
)
_FRAMING = frozenset(("transfer-encoding", "content-length", "host"))
_RESPONSE_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "upgrade"))


class EgressError(EnclaveOpsError):
    """The egress proxy cannot start (its port is taken)."""


@dataclass(frozen=True)
class EgressTimeouts:
    """Seconds allowed for each stage; ``idle`` ends a connection that moves no bytes."""

    request_head: float = 30.0
    connect: float = 30.0  # the broker's answer: DNS and TCP connect on the parent
    response_head: float = 120.0
    idle: float | None = 600.0


DEFAULT_TIMEOUTS = EgressTimeouts()
DEFAULT_BROKER = vsock.VsockAddress(PARENT_CID, EGRESS_BROKER_PORT)


@dataclass(frozen=True)
class ProxyTarget:
    """Where a request goes: ``host`` as the policy and the broker see it, and the port."""

    host: str
    port: int
    origin_form: str | None = None  # None for CONNECT
    authority: str = ""


@dataclass
class EgressProxy:
    """The running proxy; ``env()`` gives the app its proxy variables."""

    policy: EgressPolicy
    server: asyncio.AbstractServer
    fabric: vsock.Backend
    broker: vsock.VsockAddress
    timeouts: EgressTimeouts
    limits: Limits
    connections: Connections = field(default_factory=lambda: Connections("egress"))

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables enclaver sets for the app, in both spellings tools look for."""
        return {
            "http_proxy": self.url,
            "https_proxy": self.url,
            "HTTP_PROXY": self.url,
            "HTTPS_PROXY": self.url,
            "no_proxy": NO_PROXY,
            "NO_PROXY": NO_PROXY,
        }

    async def close(self) -> None:
        self.server.close()
        await self.connections.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.connections.serve(self._serve_or_refuse(reader, writer), writer)

    async def _serve_or_refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await self._serve(reader, writer)
        except HttpError as refusal:
            log.info("egress: %d %s", refusal.status, refusal)
            await _answer(writer, refusal.status, str(refusal))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await self._read_head(reader)
        if head is None:
            return
        target = proxy_target(head)
        self._check_policy(target)
        upstream = await self._dial(target)
        client = StreamEndpoint(reader, writer)
        if target.origin_form is None:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await relay(client, upstream, self.timeouts.idle)
        else:
            await self._forward(head, target, client, upstream)

    async def _read_head(self, reader: asyncio.StreamReader) -> Request | None:
        limits = Limits(
            max_line=self.limits.max_line,
            max_head=self.limits.max_head,
            max_headers=self.limits.max_headers,
            head_timeout=self.timeouts.request_head,
        )
        return await read_request_head(reader, limits)

    def _check_policy(self, target: ProxyTarget) -> None:
        try:
            decision = self.policy.check_host(target.host)
        except EgressPolicyError as err:
            raise HttpError(400, str(err)) from err
        if not decision:
            raise HttpError(
                403, f"egress to {target.host}:{target.port} is denied: {decision.reason}"
            )

    async def _dial(self, target: ProxyTarget) -> StreamEndpoint:
        """One broker connection, connected by the parent to the target, with the peer checked."""
        try:
            reader, writer = await asyncio.wait_for(
                self.fabric.open_connection(self.broker.cid, self.broker.port),
                self.timeouts.connect,
            )
        except asyncio.TimeoutError as err:
            raise HttpError(504, f"the egress broker at {self.broker} did not accept") from err
        except OSError as err:
            raise HttpError(502, f"cannot reach the egress broker at {self.broker}: {err}") from err
        upstream = StreamEndpoint(reader, writer)
        try:
            await self._request_connection(upstream, target)
        except BaseException:
            await close_all((upstream,))
            raise
        return upstream

    async def _request_connection(self, upstream: StreamEndpoint, target: ProxyTarget) -> None:
        upstream.write(ConnectRequest(target.host, target.port, report_peer=True).encode())
        where = f"{target.host}:{target.port}"
        try:
            payload = await asyncio.wait_for(
                read_egress_frame(upstream.reader), self.timeouts.connect
            )
            response = decode_connect_response(payload)
        except asyncio.TimeoutError as err:
            raise HttpError(504, f"connecting to {where} timed out") from err
        except EgressProtocolError as err:
            raise HttpError(
                502, f"the egress broker failed while connecting to {where}: {err}"
            ) from err
        if isinstance(response, ConnectErr):
            raise HttpError(_status_for(response), f"cannot connect to {where}: {response.message}")
        self._check_peer(target, response.peer)

    def _check_peer(self, target: ProxyTarget, peer: Peer | None) -> None:
        where = f"{target.host}:{target.port}"
        if peer is not None:
            decision = self.policy.check_peer(peer.address, target.host)
            if not decision:
                raise HttpError(403, f"egress to {where} is denied: {decision.reason}")
        elif self.policy.denies_addresses and parse_destination(target.host).name is not None:
            raise HttpError(
                502,
                f"the egress broker did not say which address {target.host} resolved to, so the "
                "IP deny rules cannot be enforced; run EnclaveOps' host side (sleeve), whose "
                "broker reports it",
            )

    async def _forward(
        self, head: Request, target: ProxyTarget, client: StreamEndpoint, upstream: StreamEndpoint
    ) -> None:
        """Send the request in origin form, stream its body, relay the response; then close.

        The body and the response run together: a server may answer before reading the body
        (413, or 100 Continue that the client waits for before it sends the body).
        """
        upstream.write(_origin_request(head, target))
        activity = Activity()
        exchange = _Exchange()
        body = _task(self._send_body(client, upstream, head, activity))
        response = _task(self._relay_response(upstream, client, activity, exchange))
        try:
            await supervise((body, response), activity, self.timeouts.idle, (response,))
        finally:
            await close_all((upstream,))
        failure = _failure(response) or _failure(body)
        if isinstance(failure, HttpError) and not exchange.answered:
            raise failure

    async def _send_body(
        self, client: StreamEndpoint, upstream: StreamEndpoint, head: Request, activity: Activity
    ) -> None:
        try:
            await copy_body(client.reader, _Touching(upstream, activity), head, self.limits)
        except (ConnectionError, BrokenPipeError):
            return  # the upstream stopped reading (an early response): the response still counts

    async def _relay_response(
        self,
        upstream: StreamEndpoint,
        client: StreamEndpoint,
        activity: Activity,
        exchange: _Exchange,
    ) -> None:
        limits = Limits(
            max_line=self.limits.max_line,
            max_head=self.limits.max_head,
            max_headers=self.limits.max_headers,
            head_timeout=self.timeouts.response_head,
        )
        while True:
            response = await read_response_head(upstream.reader, limits)
            activity.touch()
            interim = 100 <= response.status < 200 and response.status != 101
            exchange.answered = not interim
            client.write(_response_head(response, final=not interim))
            if not interim:
                break
        await pump(upstream, client, activity)


@dataclass
class _Exchange:
    """Whether the client already has a final response head (then no error can be sent)."""

    answered: bool = False


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    if task.done() and not task.cancelled():
        return task.exception()
    return None


class _Touching:
    """A writer that records activity, so a long upload is not mistaken for an idle one."""

    def __init__(self, endpoint: StreamEndpoint, activity: Activity) -> None:
        self.endpoint = endpoint
        self.activity = activity

    def write(self, data: bytes) -> None:
        self.activity.touch()
        self.endpoint.write(data)

    async def drain(self) -> None:
        await self.endpoint.drain()


async def start_egress_proxy(
    egress: Egress | None,
    *,
    backend: vsock.Backend | None = None,
    broker: vsock.VsockAddress = DEFAULT_BROKER,
    timeouts: EgressTimeouts = DEFAULT_TIMEOUTS,
    limits: Limits = DEFAULT_LIMITS,
) -> EgressProxy | None:
    """Start the proxy on 127.0.0.1:``egress.proxy_port``; None when egress is not configured.

    As in enclaver, egress is on only when ``egress.allow`` has an entry.
    """
    if egress is None or not egress.enabled:
        return None
    policy = EgressPolicy.from_manifest(egress)
    fabric = backend if backend is not None else vsock.backend()
    proxy: EgressProxy | None = None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert proxy is not None
        await proxy.handle(reader, writer)

    try:
        server = await asyncio.start_server(handle, "127.0.0.1", egress.proxy_port, backlog=BACKLOG)
    except OSError as err:
        raise EgressError(
            f"cannot listen on 127.0.0.1:{egress.proxy_port} for the egress proxy: "
            f"{err.strerror or err}; choose another egress.proxy_port"
        ) from err
    proxy = EgressProxy(policy, server, fabric, broker, timeouts, limits)
    log.info("egress: proxy on %s via the broker at %s", proxy.url, broker)
    return proxy


def proxy_target(head: Request) -> ProxyTarget:
    """Where a proxy request goes; :class:`HttpError` (400) for anything but the two forms."""
    if head.method == "CONNECT":
        host, port = _split_authority(head.target, default_port=None)
        return ProxyTarget(host, port, None, head.target)
    match = _ABSOLUTE_FORM.match(head.target)
    if not match:
        raise HttpError(
            400,
            "this is a forward proxy: send 'CONNECT host:port' or an absolute URL "
            "('GET http://host/path')",
        )
    scheme, authority, rest = match.groups()
    if scheme.lower() != "http":
        raise HttpError(400, f"cannot forward {scheme}:// URLs; use CONNECT for https")
    host, port = _split_authority(authority, default_port=80)
    if not rest:
        origin = "*" if head.method == "OPTIONS" else "/"
    else:
        origin = rest if rest.startswith("/") else "/" + rest
    return ProxyTarget(host, port, origin, authority)


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    match = _AUTHORITY.match(authority)
    if not match:
        raise HttpError(400, f"{authority[:100]!r} is not host:port")
    host, port_text = match.groups()
    if port_text is None:
        if default_port is None:
            raise HttpError(400, f"CONNECT {authority[:100]!r} needs a port")
        return _wire_host(host), default_port
    port = int(port_text)
    if not 0 < port <= 0xFFFF:
        raise HttpError(400, f"port {port_text} is out of range")
    return _wire_host(host), port


def _wire_host(host: str) -> str:
    """The host as policy and broker see it: bare IPv6 (Rust parses it), lower-case names."""
    try:
        destination = parse_destination(host)
    except EgressPolicyError as err:
        raise HttpError(400, str(err)) from err
    return str(destination)


def _origin_request(head: Request, target: ProxyTarget) -> bytes:
    named = {token for token in head.headers.tokens("Connection") if token not in _FRAMING}
    fields: list[tuple[str, str]] = [("Host", target.authority)]
    for name, value in head.headers:
        lowered = name.lower()
        if lowered in _HOP_BY_HOP or lowered in named or lowered == "host":
            continue
        fields.append((name, value))
    fields.append(("Connection", "close"))
    lines = [f"{head.method} {target.origin_form} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in fields)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _response_head(response: ResponseHead, final: bool) -> bytes:
    """The upstream's head for the client; a final one says the connection will close."""
    named = set(response.headers.tokens("Connection"))
    fields = [
        (name, value)
        for name, value in response.headers
        if name.lower() not in _RESPONSE_HOP_BY_HOP and name.lower() not in named
    ]
    if final:
        fields.append(("Connection", "close"))
    return encode_response_head(response.status, fields, reason=response.reason or None)


def _status_for(error: ConnectErr) -> int:
    if error.os_code == errno.ETIMEDOUT:
        return 504
    if error.os_code in (errno.EACCES, errno.EPERM):
        return 403  # the parent's own allowlist refused
    return 502


async def _answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    if writer.is_closing():
        return
    try:
        await write_response(
            writer,
            status,
            {"Content-Type": "text/plain; charset=utf-8"},
            (message + "\n").encode("utf-8"),
            close=True,
        )
    except OSError:
        return


def _task(coroutine: Any) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coroutine)


__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_TIMEOUTS",
    "NO_PROXY",
    "EgressError",
    "EgressProxy",
    "EgressTimeouts",
    "ProxyTarget",
    "proxy_target",
    "start_egress_proxy",
]
