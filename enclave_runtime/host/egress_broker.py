"""The egress broker on the parent: vsock port 17002, TCP connections on the enclave's behalf.

Wire-compatible with enclaver's ``HostHttpProxy`` (``enclaver/src/proxy/egress_http.rs``): one
vsock connection per upstream connection; the enclave sends a framed ``{"host", "port"}``
request, the broker resolves the name, connects, answers ``"Ok"`` or ``{"Err": {...}}``, and then
relays raw bytes both ways. The name ``host`` means the parent's own loopback (127.0.0.1).

What it adds:

- when the request says ``"report_peer": true`` (EnclaveOps' odyn does), the answer is
  ``{"Ok": {"peer": "IP:PORT"}}`` so the enclave can apply its IP deny rules to the address a
  name resolved to;
- an optional host-side allowlist (the same rule language as the manifest's ``egress``): names
  are judged before resolving, every resolved address against the deny rules before connecting,
  so the parent never opens a connection its operator forbade; refusals are ``EACCES``;
- bounded waits: the request must arrive in time, the connect attempt is limited, idle relays end.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Callable

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.egress_policy import EgressPolicy, EgressPolicyError
from enclave_runtime.formats.protocol import (
    ConnectErr,
    ConnectOk,
    ConnectRequest,
    EgressProtocolError,
    Peer,
    decode_connect_request,
    read_egress_frame,
)
from enclave_runtime.formats.vsock_ports import EGRESS_BROKER_PORT
from enclave_runtime.transport import vsock
from enclave_runtime.transport.relay import BACKLOG, Connections, StreamEndpoint, relay

log = logging.getLogger(__name__)

# enclaver's OUTSIDE_HOST (enclaver/src/constants.rs): the parent as seen from the enclave.
OUTSIDE_HOST = "host"
OUTSIDE_HOST_ADDRESS = "127.0.0.1"

Resolver = Callable[[str, int], Awaitable["list[str]"]]
# (host, port) asked for -> (address, port) connected to instead: how the emulated parent serves
# IMDS and KMS itself (docs/kms.md). Empty on a real parent.
Routes = Mapping[tuple[str, int], tuple[str, int]]


class EgressBrokerError(EnclaveOpsError):
    """The broker cannot start (its vsock port is taken)."""


@dataclass(frozen=True)
class BrokerTimeouts:
    request: float = 10.0  # for the enclave's request to arrive
    connect: float = 20.0  # DNS and TCP connect together
    idle: float | None = 600.0


DEFAULT_BROKER_TIMEOUTS = BrokerTimeouts()


class _Refused(Exception):
    """The broker cannot connect; ``answer`` is what the enclave is told."""

    def __init__(self, answer: ConnectErr) -> None:
        super().__init__(answer.message)
        self.answer = answer


async def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to for TCP, in the resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass
class EgressBroker:
    """The running broker; ``close()`` stops listening and ends every relayed connection."""

    server: asyncio.AbstractServer
    allowlist: EgressPolicy | None
    resolver: Resolver
    timeouts: BrokerTimeouts
    routes: Routes = field(default_factory=dict)
    connections: Connections = field(default_factory=lambda: Connections("egress broker"))

    async def close(self) -> None:
        self.server.close()
        await self.connections.close()
        await self.server.wait_closed()

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: vsock.VsockAddress
    ) -> None:
        await self.connections.serve(self._serve(reader, writer, peer), writer)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: vsock.VsockAddress
    ) -> None:
        try:
            payload = await asyncio.wait_for(read_egress_frame(reader), self.timeouts.request)
            request = decode_connect_request(payload)
        except (asyncio.TimeoutError, EgressProtocolError) as err:
            reason = "no request in time" if isinstance(err, asyncio.TimeoutError) else str(err)
            log.info("egress broker: bad request from %s: %s", peer, reason)
            writer.write(ConnectErr(errno.EINVAL, reason).encode())
            return
        try:
            upstream, address = await asyncio.wait_for(
                self._connect(request), self.timeouts.connect
            )
        except asyncio.TimeoutError:
            reason = f"no connection within {self.timeouts.connect:g} s"
            self._refuse(writer, peer, ConnectErr(errno.ETIMEDOUT, reason))
            return
        except _Refused as refused:
            self._refuse(writer, peer, refused.answer)
            return
        log.debug("egress broker: %s -> %s:%d via %s", peer, request.host, request.port, address)
        writer.write(ConnectOk(address if request.report_peer else None).encode())
        await relay(StreamEndpoint(reader, writer), upstream, self.timeouts.idle)

    def _refuse(
        self, writer: asyncio.StreamWriter, peer: vsock.VsockAddress, answer: ConnectErr
    ) -> None:
        log.info("egress broker: refused %s: %s", peer, answer.message)
        writer.write(answer.encode())

    async def _connect(self, request: ConnectRequest) -> tuple[StreamEndpoint, Peer]:
        bracketed = request.host.startswith("[") and request.host.endswith("]")
        host = request.host[1:-1] if bracketed else request.host  # enclaver's odyn sends "[::1]"
        if self.allowlist is not None:
            self._check_name(host)
        port = request.port
        routed = self.routes.get((host.lower(), port))
        if routed is not None:
            addresses, port = [routed[0]], routed[1]
        else:
            addresses = await self._addresses(host, port)
        last_error: OSError | None = None
        for address in addresses:
            try:
                reader, writer = await asyncio.open_connection(address, port)
            except OSError as err:
                last_error = err
                continue
            peer_address, peer_port = writer.get_extra_info("peername")[:2]
            return StreamEndpoint(reader, writer), Peer(
                ipaddress.ip_address(peer_address), peer_port
            )
        assert last_error is not None
        reason = os.strerror(last_error.errno) if last_error.errno else str(last_error)
        raise _Refused(ConnectErr(last_error.errno or 0, reason))

    def _check_name(self, host: str) -> None:
        assert self.allowlist is not None
        try:
            decision = self.allowlist.check_host(host)
        except EgressPolicyError as err:
            raise _Refused(ConnectErr(errno.EINVAL, str(err))) from err
        if not decision:
            raise _Refused(
                ConnectErr(
                    errno.EACCES, f"denied by the parent's egress allowlist: {decision.reason}"
                )
            )

    async def _addresses(self, host: str, port: int) -> list[str]:
        """Where ``host`` may be reached: resolved, and filtered by the allowlist's deny rules."""
        if host.lower() == OUTSIDE_HOST:
            candidates = [OUTSIDE_HOST_ADDRESS]
        else:
            try:
                ipaddress.ip_address(host)
                candidates = [host]
            except ValueError:
                candidates = await self._resolve(host, port)
        if self.allowlist is None:
            return candidates
        allowed = [address for address in candidates if self.allowlist.check_peer(address)]
        if not allowed:
            reason = self.allowlist.check_peer(candidates[0]).reason
            raise _Refused(
                ConnectErr(errno.EACCES, f"denied by the parent's egress allowlist: {reason}")
            )
        return allowed

    async def _resolve(self, host: str, port: int) -> list[str]:
        try:
            addresses = await self.resolver(host, port)
        except (OSError, UnicodeError) as err:
            raise _Refused(ConnectErr(0, f"cannot resolve {host}: {err}")) from err
        if not addresses:
            raise _Refused(ConnectErr(0, f"cannot resolve {host}: no addresses"))
        return addresses


async def start_egress_broker(
    *,
    port: int = EGRESS_BROKER_PORT,
    backend: vsock.Backend | None = None,
    allowlist: EgressPolicy | None = None,
    resolver: Resolver = resolve,
    timeouts: BrokerTimeouts = DEFAULT_BROKER_TIMEOUTS,
    routes: Routes | None = None,
) -> EgressBroker:
    """Listen on vsock (ANY, ``port``) and broker connections for enclaves.

    ``allowlist`` restricts what the parent connects to whatever the enclave's own policy says;
    ``resolver`` (``async (host, port) -> [address, ...]``) replaces DNS, for tests;
    ``routes`` sends chosen destinations elsewhere (the emulator's IMDS and KMS).
    """
    fabric = backend if backend is not None else vsock.backend()
    broker: EgressBroker | None = None

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: vsock.VsockAddress
    ) -> None:
        assert broker is not None
        await broker.handle(reader, writer, peer)

    try:
        server = await fabric.start_server(handle, port, backlog=BACKLOG)
    except OSError as err:
        raise EgressBrokerError(
            f"cannot listen on vsock port {port} for the egress broker: {err}; is another "
            "sleeve or enclaver-run already running on this parent?"
        ) from err
    broker = EgressBroker(server, allowlist, resolver, timeouts, dict(routes or {}))
    log.info("egress broker: listening on vsock port %d", port)
    return broker


__all__ = [
    "DEFAULT_BROKER_TIMEOUTS",
    "OUTSIDE_HOST",
    "BrokerTimeouts",
    "EgressBroker",
    "EgressBrokerError",
    "Resolver",
    "Routes",
    "resolve",
    "start_egress_broker",
]
