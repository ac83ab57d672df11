"""The contract between the control server and the service manager, and the errors it raises.

The control server (and anything else that controls services: tests, odyn's SIGHUP handler)
talks to a :class:`ServiceController`. Failures a client can act on are :class:`InitError`
subclasses; the server sends them as the protocol's ``Error`` variant with the message and the
``kind`` below, and the client turns the ``kind`` back into the same exception class.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.init_protocol import ReloadChanges, ServiceInfo, SystemStatus


class InitError(EnclaveOpsError):
    """A control request that could not be carried out; the message says why and what to do."""

    kind: ClassVar[str] = "Init"


class UnknownServiceError(InitError):
    """No service of that name is loaded."""

    kind = "UnknownService"

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"service '{name}' not found: no unit {name}.service or {name}.service.disabled "
            "in the services directory and none in the manifest; `initctl list` shows the "
            "loaded services, `initctl reload` picks up new unit files"
        )
        self.name = name


class ServiceStateError(InitError):
    """The request does not fit the service's current state (already running, disabled, ...)."""

    kind = "ServiceState"


class DependencyError(InitError):
    """The service is blocked by its dependency graph: a cycle, a missing or failed Requires."""

    kind = "Dependency"


class ServiceStartError(InitError):
    """The service's process could not be started (program not found, bad user, timeout)."""

    kind = "ServiceStart"


class UnitFileError(InitError):
    """A unit file could not be read, parsed, renamed or removed."""

    kind = "UnitFile"


class ShutdownInProgressError(InitError):
    """The init is shutting down and accepts no more changes."""

    kind = "ShutdownInProgress"


class InvalidRequestError(InitError):
    """The request itself was malformed, oversized or of an unknown variant."""

    kind = "InvalidRequest"


class UnsupportedError(InitError):
    """An enclave-init request EnclaveOps refuses on purpose (process control, reboot, ...)."""

    kind = "Unsupported"


class ServerBusyError(InitError):
    """The control server is already serving its maximum number of connections."""

    kind = "Busy"


class InternalError(InitError):
    """The controller failed unexpectedly; the init's log has the details."""

    kind = "Internal"


ERROR_KINDS: dict[str, type[InitError]] = {
    cls.kind: cls
    for cls in (
        InitError,
        UnknownServiceError,
        ServiceStateError,
        DependencyError,
        ServiceStartError,
        UnitFileError,
        ShutdownInProgressError,
        InvalidRequestError,
        UnsupportedError,
        ServerBusyError,
        InternalError,
    )
}


class ServiceController(Protocol):
    """What the control server needs from the service manager.

    Every method that names a service raises :class:`UnknownServiceError` for a name that is
    not loaded. State-changing methods return once the change is done (``stop``: after the
    process has ended) with the service's state after it: the client is answered then.
    """

    async def list_services(self) -> list[ServiceInfo]: ...

    async def service_status(self, name: str) -> ServiceInfo: ...

    async def start(self, name: str) -> ServiceInfo: ...

    async def stop(self, name: str) -> ServiceInfo: ...

    async def restart(self, name: str) -> ServiceInfo: ...

    async def enable(self, name: str, now: bool = False) -> ServiceInfo:
        """Rename NAME.service.disabled to NAME.service (persists), optionally start it."""
        ...

    async def disable(self, name: str) -> ServiceInfo:
        """Stop the service and rename NAME.service to NAME.service.disabled (persists)."""
        ...

    async def logs(self, name: str, lines: int) -> list[str]:
        """The last ``lines`` lines of the service's log, oldest first."""
        ...

    async def clear_logs(self, name: str) -> None: ...

    async def system_status(self) -> SystemStatus: ...

    async def reload(self) -> ReloadChanges:
        """Re-read unit files: start new services, stop removed ones, restart changed ones."""
        ...

    async def shutdown(self) -> None:
        """Begin stopping every service and odyn itself; return once shutdown has begun.

        It must not wait for the control server to close: the server answers this request
        before it closes.
        """
        ...
