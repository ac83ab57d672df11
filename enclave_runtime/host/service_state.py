"""Bring an in-enclave init service to a desired state, from the parent, over the control port.

The Ansible ``service`` and ``service_info`` modules are thin over this: find the enclave (by CID,
or by name through ``describe-enclaves``), read the service's state from its init
(:class:`~enclave_runtime.transport.init_client.InitClient`), work out the few requests that
close the gap, and send them only when something differs, so a second run changes nothing.

The init's own rules shape the plan: a disabled service cannot be started, and disabling a
service also stops it (see :mod:`enclave_runtime.init.manager`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.init_protocol import ServiceInfo, ServiceState
from enclave_runtime.formats.vsock_ports import INIT_CONTROL_PORT, PARENT_CID
from enclave_runtime.host.nitro_cli import EnclaveInfo, NitroCli
from enclave_runtime.transport.init_client import DEFAULT_TIMEOUT, InitClient, InitctlConfig
from enclave_runtime.transport.vsock import EmulatedFabric

STATES = ("started", "stopped", "restarted")

# Up, or on its way up: asking to start it again would change nothing.
_STARTED = frozenset({ServiceState.RUNNING, ServiceState.STARTING})
# Not supervised by the init: nothing runs and nothing will restart it.
_STOPPED = frozenset(
    {ServiceState.INACTIVE, ServiceState.EXITED, ServiceState.FAILED, ServiceState.BLOCKED}
)


class ServiceRequestError(EnclaveOpsError, ValueError):
    """The desired state asks for something the init cannot do."""


class ServiceChangeError(EnclaveOpsError):
    """A request failed after others had changed the service; ``sent`` lists those."""

    def __init__(self, message: str, sent: tuple[str, ...]) -> None:
        super().__init__(message)
        self.sent = sent


class EnclaveNotFoundError(EnclaveOpsError):
    """No running enclave has the name asked for, or more than one has it."""


@dataclass(frozen=True)
class DesiredService:
    """What the operator wants of one service; None leaves that aspect as it is."""

    name: str
    state: str | None = None
    enabled: bool | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ServiceRequestError("the service name is empty; give the unit's name")
        if self.state is not None and self.state not in STATES:
            raise ServiceRequestError(
                f"service '{self.name}': state is {self.state!r}; use one of {', '.join(STATES)}"
            )
        if self.enabled is False and self.state in ("started", "restarted"):
            raise ServiceRequestError(
                f"service '{self.name}': state {self.state} with enabled false cannot hold: the "
                "init does not start a disabled service; use state stopped, or enabled true"
            )


@dataclass(frozen=True)
class ServiceResult:
    """The requests sent (or, in check mode, that would be sent) and the service around them."""

    name: str
    actions: tuple[str, ...]
    before: ServiceInfo
    after: ServiceInfo

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def plan_actions(current: ServiceInfo, desired: DesiredService) -> tuple[str, ...]:
    """The requests, in order, that take ``current`` to ``desired``; empty when it is there."""
    actions: list[str] = []
    if desired.enabled is True and not current.enabled:
        actions.append("enable")
    elif desired.enabled is False and current.enabled:
        actions.append("disable")
    stopped = current.state in _STOPPED or "disable" in actions
    if desired.state == "restarted":
        actions.append("restart")
    elif desired.state == "started" and current.state not in _STARTED:
        actions.append("start")
    elif desired.state == "stopped" and not stopped:
        actions.append("stop")
    return tuple(actions)


def apply_service_state(
    client: InitClient, desired: DesiredService, check_mode: bool = False
) -> ServiceResult:
    """Read the service, send what differs (nothing in check mode), and read it again.

    A start that fails raises the init's error (e.g. ServiceStartError), which says why; when
    an earlier request had already changed the service, a ServiceChangeError that says so.
    """
    before = client.service_status(desired.name)
    actions = plan_actions(before, desired)
    if check_mode or not actions:
        return ServiceResult(desired.name, actions, before, before)
    for done, action in enumerate(actions):
        try:
            _send(client, action, desired.name)
        except EnclaveOpsError as err:
            if not done:
                raise
            sent = actions[:done]
            raise ServiceChangeError(f"{err} (already done: {', '.join(sent)})", sent) from err
    return ServiceResult(desired.name, actions, before, client.service_status(desired.name))


def _send(client: InitClient, action: str, name: str) -> None:
    requests = {
        "enable": client.enable,
        "disable": client.disable,
        "start": client.start,
        "stop": client.stop,
        "restart": client.restart,
    }
    requests[action](name)


def read_services(client: InitClient, name: str | None = None) -> list[ServiceInfo]:
    """Every service the init has loaded, or only ``name`` (an unknown name is an error)."""
    if name is not None:
        return [client.service_status(name)]
    return client.list_services()


def target_cid(cli: NitroCli, enclave_cid: int | None, enclave_name: str | None) -> int:
    """``enclave_cid`` when given (nitro-cli is not run), else the CID of ``enclave_name``."""
    if enclave_cid is not None:
        return enclave_cid
    if not enclave_name:
        raise ServiceRequestError("give the enclave's CID (enclave_cid) or its name (enclave_name)")
    return resolve_enclave_cid(cli, enclave_name)


def resolve_enclave_cid(cli: NitroCli, name: str) -> int:
    """The CID of the one running enclave called ``name`` (nitro-cli's EnclaveName)."""
    enclaves = [info for info in cli.describe_enclaves() if info.state.upper() == "RUNNING"]
    matches = [info for info in enclaves if info.enclave_name == name]
    if len(matches) == 1:
        return matches[0].enclave_cid
    if not matches:
        raise EnclaveNotFoundError(
            f"no running enclave is named {name!r}; running: {_describe(enclaves)}. Give "
            "enclave_name as `nitro-cli describe-enclaves` shows EnclaveName, or enclave_cid"
        )
    raise EnclaveNotFoundError(
        f"{len(matches)} running enclaves are named {name!r} ({_describe(matches)}); give "
        "enclave_cid to choose one"
    )


def _describe(enclaves: list[EnclaveInfo]) -> str:
    if not enclaves:
        return "none"
    return ", ".join(
        f"{info.enclave_name or '(unnamed)'} (CID {info.enclave_cid})" for info in enclaves
    )


def enclave_init_client(
    cid: int,
    port: int | None = None,
    *,
    emulator_root: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> InitClient:
    """A client for the init of enclave ``cid``, as the parent (the emulator's fabric if given).

    ``port`` None is the init control port every EnclaveOps enclave serves (INIT_CONTROL_PORT).
    """
    vsock_port = INIT_CONTROL_PORT if port is None else port
    config = InitctlConfig(protocol="vsock", vsock_cid=cid, vsock_port=vsock_port, timeout=timeout)
    fabric = EmulatedFabric(Path(emulator_root), PARENT_CID) if emulator_root else None
    return InitClient(config, fabric=fabric)


__all__ = [
    "STATES",
    "DesiredService",
    "EnclaveNotFoundError",
    "ServiceChangeError",
    "ServiceRequestError",
    "ServiceResult",
    "apply_service_state",
    "enclave_init_client",
    "plan_actions",
    "read_services",
    "resolve_enclave_cid",
    "target_cid",
]
