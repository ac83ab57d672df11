"""Init control from the parent (issue 15): only a privileged source port is served, and a
client that cannot bind one says why (docs/init.md, "Who may control the init")."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclave_runtime.init.control_server import ControlServer
from enclave_runtime.transport import vsock
from enclave_runtime.transport.init_client import InitClient, InitConnectionError, InitctlConfig
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.unit.init_support import FakeController
from tests.unit.odyn_support import ENCLAVE_CID, in_executor, run_async

pytestmark = pytest.mark.security

PORT = 9001


def _client(root: Path) -> InitClient:
    config = InitctlConfig(protocol="vsock", vsock_cid=ENCLAVE_CID, vsock_port=PORT, timeout=5)
    return InitClient(config, fabric=EmulatedFabric(root, 3))


def _ping_through_server(root: Path) -> object:
    async def scenario() -> object:
        server = ControlServer(FakeController(), unix_socket=None, vsock_port=PORT)
        await server.start()
        try:
            return await in_executor(_client(root).ping)
        finally:
            await server.close()

    return run_async(scenario())


def test_root_on_the_parent_is_served(enclave_fabric_root: Path) -> None:
    _ping_through_server(enclave_fabric_root)  # raises if refused


def test_an_unprivileged_parent_process_is_refused_and_told_why(
    enclave_fabric_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vsock, "_has_effective_capability", lambda _bit: False)
    with pytest.raises(InitConnectionError, match="could not bind a privileged source port"):
        _ping_through_server(enclave_fabric_root)


def test_the_fabric_refuses_a_privileged_port_without_the_capability(
    fabric_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vsock, "_has_effective_capability", lambda _bit: False)
    with pytest.raises(PermissionError, match="needs CAP_NET_BIND_SERVICE"):
        EmulatedFabric(fabric_root, 3).connect(ENCLAVE_CID, PORT, 1, local_port=1023)
