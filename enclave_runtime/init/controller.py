"""The contract between the control server and the service manager.

The control server (and anything else that controls services: tests, odyn's SIGHUP handler)
talks to a :class:`ServiceController`. Failures a client can act on are the
:mod:`enclave_runtime.formats.init_errors` classes.
"""

from __future__ import annotations

from typing import Protocol

from enclave_runtime.formats.init_protocol import ReloadChanges, ServiceInfo, SystemStatus


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
