"""The init control protocol's errors: one class per ``Error`` ``kind`` (docs/init.md).

Failures a client can act on are :class:`InitError` subclasses; the server sends them as the
protocol's ``Error`` variant with the message and the ``kind`` below, and the client turns the
``kind`` back into the same exception class. Both sides import them from here.
"""

from __future__ import annotations

from typing import ClassVar

from enclave_runtime.errors import EnclaveOpsError


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
