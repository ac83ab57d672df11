"""Host-side ingress: a TCP listener per ingress port P, relaying to the enclave's vsock (CID, P).

As enclaver-run does (``enclaver/src/proxy/ingress.rs``, ``HostProxy``), the host side relays raw
bytes: TLS, when configured, is terminated inside the enclave, so the parent never sees plaintext.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.transport import vsock
from enclave_runtime.transport.relay import (
    BACKLOG,
    Connections,
    ListenerLimits,
    StreamEndpoint,
    relay,
)

log = logging.getLogger(__name__)


class IngressProxyError(EnclaveOpsError):
    """A host ingress listener that cannot start (usually: the TCP port is taken)."""


@dataclass
class IngressProxy:
    """The running host listeners; ``bound`` maps each vsock port to the TCP port serving it."""

    cid: int
    servers: dict[int, asyncio.AbstractServer] = field(default_factory=dict)
    connections: dict[int, Connections] = field(default_factory=dict)  # per listener

    @property
    def bound(self) -> dict[int, int]:
        return {
            port: int(server.sockets[0].getsockname()[1]) for port, server in self.servers.items()
        }

    async def close(self) -> None:
        for server in self.servers.values():
            server.close()
        for connections in self.connections.values():
            await connections.close()
        for server in self.servers.values():
            await server.wait_closed()


async def start_ingress_proxy(
    cid: int,
    ports: Iterable[int],
    *,
    bind_host: str = "0.0.0.0",
    host_ports: Mapping[int, int] | None = None,
    backend: vsock.Backend | None = None,
    idle_timeout: float | None = None,
    limits: Mapping[int, ListenerLimits] | None = None,
) -> IngressProxy:
    """Listen on ``bind_host``:P for every P in ``ports`` and relay to vsock (``cid``, P).

    ``host_ports`` listens on another TCP port for some P (0: any free port), for tests and for
    running two enclaves with the same ingress port on one parent. Raises
    :class:`IngressProxyError` when a port cannot be bound; nothing is left listening then.
    ``limits`` caps each port's connections and idle time (default :class:`ListenerLimits`);
    ``idle_timeout`` overrides every port's idle time.
    """
    fabric = backend if backend is not None else vsock.backend()
    proxy = IngressProxy(cid)
    try:
        for port in ports:
            listen_port = (host_ports or {}).get(port, port)
            limit = (limits or {}).get(port, ListenerLimits())
            proxy.connections[port] = Connections(f"host ingress {port}", limit.max_connections)
            idle = limit.idle_timeout if idle_timeout is None else idle_timeout
            handler = _Handler(proxy, fabric, port, idle)
            try:
                proxy.servers[port] = await asyncio.start_server(
                    handler, bind_host, listen_port, backlog=BACKLOG
                )
            except OSError as err:
                raise IngressProxyError(
                    f"cannot listen on {bind_host}:{listen_port} for ingress port {port}: "
                    f"{err.strerror or err}; stop what uses that port or map it elsewhere"
                ) from err
            log.info("ingress: %s:%d -> vsock(%d:%d)", bind_host, listen_port, cid, port)
    except BaseException:
        await proxy.close()
        raise
    return proxy


@dataclass
class _Handler:
    proxy: IngressProxy
    fabric: vsock.Backend
    port: int
    idle_timeout: float | None

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.proxy.connections[self.port].serve(self._serve(reader, writer), writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = vsock.VsockAddress(self.proxy.cid, self.port)
        try:
            enclave_reader, enclave_writer = await self.fabric.open_connection(
                target.cid, target.port
            )
        except OSError as err:
            log.warning("ingress %d: cannot reach %s: %s", self.port, target, err)
            return
        await relay(
            StreamEndpoint(reader, writer),
            StreamEndpoint(enclave_reader, enclave_writer),
            self.idle_timeout,
        )


__all__ = ["IngressProxy", "IngressProxyError", "start_ingress_proxy"]
