"""The vsock transport: the emulated fabric, and how the backend is chosen (no real vsock here)."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from pathlib import Path

import pytest

from enclave_runtime.transport import vsock
from enclave_runtime.transport.vsock import EmulatedFabric, VsockAddress, VsockError


def _serve_once(parent: EmulatedFabric, listener: socket.socket) -> dict[str, object]:
    """Accept one connection in a thread, echo what it sends until EOF, record the peer."""
    seen: dict[str, object] = {}

    def run() -> None:
        conn, peer = parent.accept(listener)
        with conn:
            seen["peer"] = peer
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            seen["data"] = data
            conn.sendall(b"echo:" + data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    seen["thread"] = thread
    return seen


def test_listener_learns_the_connectors_cid(fabric_root: Path) -> None:
    parent = EmulatedFabric(fabric_root, cid=3)
    enclave = EmulatedFabric(fabric_root, cid=16)
    with parent.listen(17002) as listener:
        seen = _serve_once(parent, listener)
        with enclave.connect(3, 17002, timeout=5) as conn:
            conn.sendall(b"hello")
            conn.shutdown(socket.SHUT_WR)  # half-close: the peer sees EOF and can still answer
            assert conn.recv(100) == b"echo:hello"
        seen["thread"].join(5)  # type: ignore[attr-defined]
    peer = seen["peer"]
    assert isinstance(peer, VsockAddress)
    assert peer.cid == 16
    assert peer.port >= 49152


def test_cid_2_reaches_the_parent_as_enclaver_dials_it(fabric_root: Path) -> None:
    parent = EmulatedFabric(fabric_root, cid=3)
    with parent.listen(9000) as listener:
        seen = _serve_once(parent, listener)
        with EmulatedFabric(fabric_root, cid=20).connect(2, 9000, timeout=5) as conn:
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b"echo:"
        seen["thread"].join(5)  # type: ignore[attr-defined]
    assert seen["peer"].cid == 20  # type: ignore[union-attr]


def test_connecting_where_nothing_listens_is_refused(fabric_root: Path) -> None:
    with pytest.raises(ConnectionRefusedError, match=r"vsock\(16:5000\)"):
        EmulatedFabric(fabric_root).connect(16, 5000)


def test_an_enclave_cannot_listen_on_another_cid(fabric_root: Path) -> None:
    with pytest.raises(VsockError, match="this process is CID 16"):
        EmulatedFabric(fabric_root, cid=16).listen(9000, cid=3)


def test_a_dead_listeners_socket_file_is_replaced(fabric_root: Path) -> None:
    parent = EmulatedFabric(fabric_root)
    parent.listen(4000).close()  # the socket file stays, as after a crash
    assert parent.socket_path(3, 4000).exists()
    with parent.listen(4000) as listener:
        assert listener.getsockname()


def test_a_live_listener_keeps_its_port(fabric_root: Path) -> None:
    parent = EmulatedFabric(fabric_root)
    with parent.listen(4001), pytest.raises(OSError) as err:
        parent.listen(4001)
    assert err.value.errno == errno.EADDRINUSE


def test_a_connection_without_preamble_is_dropped_not_accepted(fabric_root: Path) -> None:
    parent = EmulatedFabric(fabric_root)
    with parent.listen(4002) as listener:
        seen = _serve_once(parent, listener)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(str(parent.socket_path(3, 4002)))
        raw.sendall(b"GET / HTTP/1.1\r\n")  # 12+ bytes that are not a preamble
        raw.close()
        with EmulatedFabric(fabric_root, cid=17).connect(3, 4002, timeout=5) as conn:
            conn.sendall(b"real")
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b"echo:real"
        seen["thread"].join(5)  # type: ignore[attr-defined]
    assert seen["peer"].cid == 17  # type: ignore[union-attr]


def test_async_server_and_connection(fabric_root: Path) -> None:
    parent = EmulatedFabric(fabric_root, cid=3)
    enclave = EmulatedFabric(fabric_root, cid=42)
    peers: list[VsockAddress] = []

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: VsockAddress
    ) -> None:
        peers.append(peer)
        writer.write((await reader.read()).upper())
        await writer.drain()
        writer.close()

    async def scenario() -> bytes:
        server = await parent.start_server(handler, 17000)
        async with server:
            reader, writer = await enclave.open_connection(3, 17000)
            writer.write(b"status?")
            writer.write_eof()
            answer = await reader.read()
            writer.close()
            return answer

    assert asyncio.run(scenario()) == b"STATUS?"
    assert [p.cid for p in peers] == [42]


def test_backend_follows_the_environment(
    fabric_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(vsock.ENV_ROOT, str(fabric_root))
    monkeypatch.setenv(vsock.ENV_CID, "16")
    chosen = vsock.backend()
    assert isinstance(chosen, EmulatedFabric)
    assert (chosen.root, chosen.local_cid()) == (fabric_root, 16)

    monkeypatch.delenv(vsock.ENV_CID)
    assert vsock.local_cid() == 3  # no CID given: this is the parent


def test_bad_cid_in_the_environment_is_named(
    fabric_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(vsock.ENV_ROOT, str(fabric_root))
    monkeypatch.setenv(vsock.ENV_CID, "enclave")
    with pytest.raises(VsockError, match="NITRO_EMU_CID='enclave' is not a CID"):
        vsock.backend()


def test_outside_nitro_and_the_emulator_vsock_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vsock.ENV_ROOT, raising=False)
    monkeypatch.setattr(vsock.os.path, "exists", lambda path: False)
    monkeypatch.setattr(vsock, "_is_char_device", lambda path: False)
    with pytest.raises(vsock.VsockUnavailableError, match="set NITRO_EMU_ROOT"):
        vsock.connect(3, 9000)


def test_a_nitro_parent_gets_real_vsock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vsock.ENV_ROOT, raising=False)
    monkeypatch.setattr(vsock.os.path, "exists", lambda path: path == "/dev/nitro_enclaves")
    assert isinstance(vsock.backend(), vsock.RealVsock)  # chosen, never opened here


def test_a_root_too_long_for_unix_sockets_is_explained(tmp_path: Path) -> None:
    with pytest.raises(VsockError, match="use a shorter NITRO_EMU_ROOT"):
        EmulatedFabric(tmp_path / ("x" * 120)).socket_path(3, 9000)
