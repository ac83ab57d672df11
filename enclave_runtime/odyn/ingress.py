"""Ingress inside the enclave: vsock (ANY, P) -> 127.0.0.1:P, optionally terminating TLS.

For each ``ingress[].listen_port`` P, odyn listens on vsock port P and relays every connection to
the app on 127.0.0.1:P, as enclaver's odyn does (``enclaver/src/proxy/ingress.rs``). With ``tls``
in the manifest, odyn terminates TLS with ``DIR/tls/server/P/cert.pem`` and ``key.pem`` (where
``enclaver build`` puts them, ``enclaver/src/bin/odyn/config.rs``) and the app sees plain TCP.

TLS runs over :class:`ssl.MemoryBIO` rather than ``loop.start_tls``: the vsock preamble is read
through a stream, and a ClientHello that arrived with it must not be lost in that stream's buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.manifest import Ingress
from enclave_runtime.transport import vsock
from enclave_runtime.transport.relay import (
    BACKLOG,
    READ_SIZE,
    Connections,
    Endpoint,
    ListenerLimits,
    StreamEndpoint,
    open_tcp,
    relay,
)

log = logging.getLogger(__name__)

TLS_DIRECTORY = ("tls", "server")
DEFAULT_HANDSHAKE_TIMEOUT = 30.0


class IngressError(EnclaveOpsError):
    """An ingress listener that cannot start (missing or invalid TLS files, port in use)."""


@dataclass
class IngressServers:
    """The running ingress listeners; ``close()`` stops them and their connections."""

    servers: dict[int, asyncio.AbstractServer] = field(default_factory=dict)
    connections: dict[int, Connections] = field(default_factory=dict)  # per listener

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(sorted(self.servers))

    async def close(self) -> None:
        for server in self.servers.values():
            server.close()
        for connections in self.connections.values():
            await connections.close()
        for server in self.servers.values():
            await server.wait_closed()


def tls_files(config_dir: str | Path, port: int) -> tuple[Path, Path]:
    """``(cert.pem, key.pem)`` for ingress port ``port`` under odyn's config directory."""
    directory = Path(config_dir).joinpath(*TLS_DIRECTORY, str(port))
    return directory / "cert.pem", directory / "key.pem"


def load_tls_context(config_dir: str | Path, port: int) -> ssl.SSLContext:
    """A TLS 1.2+ server context from the port's certificate chain and key, or a clear error."""
    cert, key = tls_files(config_dir, port)
    missing = [str(path) for path in (cert, key) if not path.is_file()]
    if missing:
        raise IngressError(
            f"ingress port {port} has tls set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing; enclaver build copies "
            "ingress[].tls.cert_file and key_file there: rebuild the image, or put the PEM files "
            "in place"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as err:
        raise IngressError(
            f"ingress port {port}: cannot use {cert} with {key}: {err}; the certificate must be "
            "PEM (leaf first, then intermediates) and the key an unencrypted PEM key that "
            "matches it"
        ) from err
    return context


async def start_ingress(
    ingress: Iterable[Ingress],
    config_dir: str | Path,
    *,
    backend: vsock.Backend | None = None,
    target_host: str = "127.0.0.1",
    idle_timeout: float | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> IngressServers:
    """Listen on vsock port P for every ingress entry and relay to ``target_host``:P.

    Each listener relays at most the entry's ``max_connections`` at once and closes a
    connection idle for its ``idle_timeout`` (``idle_timeout`` here overrides every entry's).

    Every TLS entry's files are checked before any listener starts, so a bad configuration
    fails as a whole. Raises :class:`IngressError`.
    """
    entries = list(ingress)
    contexts = {
        entry.listen_port: load_tls_context(config_dir, entry.listen_port)
        for entry in entries
        if entry.tls is not None
    }
    fabric = backend if backend is not None else vsock.backend()
    servers = IngressServers()
    try:
        for entry in entries:
            port = entry.listen_port
            limits = ListenerLimits.of(entry.max_connections, entry.idle_timeout)
            servers.connections[port] = Connections(f"ingress {port}", limits.max_connections)
            handler = _Handler(
                servers,
                target_host,
                port,
                contexts.get(port),
                limits.idle_timeout if idle_timeout is None else idle_timeout,
                handshake_timeout,
            )
            try:
                servers.servers[port] = await fabric.start_server(handler, port, backlog=BACKLOG)
            except OSError as err:
                raise IngressError(
                    f"cannot listen on vsock port {port} for ingress: {err}"
                ) from err
            log.info("ingress: vsock port %d -> %s:%d%s", port, target_host, port, _tls_note(entry))
    except BaseException:
        await servers.close()
        raise
    return servers


def _tls_note(entry: Ingress) -> str:
    return " (TLS terminated)" if entry.tls is not None else ""


@dataclass
class _Handler:
    servers: IngressServers
    target_host: str
    port: int
    context: ssl.SSLContext | None
    idle_timeout: float | None
    handshake_timeout: float

    async def __call__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: vsock.VsockAddress
    ) -> None:
        connections = self.servers.connections[self.port]
        await connections.serve(self._serve(reader, writer, peer), writer)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: vsock.VsockAddress
    ) -> None:
        outside: Endpoint = StreamEndpoint(reader, writer)
        if self.context is not None:
            tls = TlsServerEndpoint(reader, writer, self.context)
            try:
                await asyncio.wait_for(tls.handshake(), self.handshake_timeout)
            except (OSError, asyncio.TimeoutError) as err:
                log.info("ingress %d: TLS handshake with %s failed: %s", self.port, peer, err)
                return
            outside = tls
        try:
            app = await open_tcp(self.target_host, self.port)
        except OSError as err:
            log.warning(
                "ingress %d: the app does not accept on %s:%d (%s); closing the connection from %s",
                self.port,
                self.target_host,
                self.port,
                err,
                peer,
            )
            return
        await relay(outside, app, self.idle_timeout)


class TlsServerEndpoint:
    """The server side of TLS over an existing stream, as a relay endpoint (plaintext I/O)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                await self._writer.drain()
                if not await self._receive():
                    raise ConnectionResetError(
                        "the client closed during the TLS handshake"
                    ) from None
        self._flush()
        await self._writer.drain()

    async def read(self) -> bytes:
        while True:
            try:
                return self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                self._flush()  # TLS 1.3 may owe the client a record (session ticket, key update)
                if not await self._receive():
                    return b""  # a close without close_notify still ends the stream
            except ssl.SSLZeroReturnError:
                return b""

    def write(self, data: bytes) -> None:
        self._tls.write(data)
        self._flush()

    async def drain(self) -> None:
        await self._writer.drain()

    def write_eof(self) -> None:
        """Send close_notify and half-close the stream; the client can still send."""
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        self._flush()
        if self._writer.can_write_eof() and not self._writer.is_closing():
            self._writer.write_eof()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _receive(self) -> bool:
        data = await self._reader.read(READ_SIZE)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending and not self._writer.is_closing():
            self._writer.write(pending)


__all__ = [
    "IngressError",
    "IngressServers",
    "TlsServerEndpoint",
    "load_tls_context",
    "start_ingress",
    "tls_files",
]
