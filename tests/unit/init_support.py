"""A fake service controller and a control server on a background loop, for the init tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from enclave_runtime.formats.init_errors import ServiceStateError, UnknownServiceError
from enclave_runtime.formats.init_protocol import (
    ReloadChanges,
    ServiceDependencies,
    ServiceInfo,
    ServiceState,
    SystemStatus,
)
from enclave_runtime.init.control_server import ControlServer


def service(name: str, **changes: Any) -> ServiceInfo:
    info = ServiceInfo(
        name=name,
        enabled=True,
        active=False,
        state=ServiceState.INACTIVE,
        pid=None,
        restart_policy="on-failure",
        restart_count=0,
        exit_status=None,
        dependencies=ServiceDependencies(after=("db",) if name == "web" else ()),
        exec_start=f"/usr/bin/{name} --serve",
    )
    return replace(info, **changes)


class FakeController:
    """Services in memory; enough behaviour for the server and client to be exercised."""

    def __init__(self) -> None:
        self.services = {"db": service("db"), "web": service("web")}
        self.log_lines = {"db": [], "web": [f"2025-01-01T00:00:0{i}Z line {i}" for i in range(5)]}
        self.calls: list[tuple[str, Any]] = []
        self.shutdown_requested = threading.Event()
        self.release: asyncio.Event | None = None

    def _get(self, name: str) -> ServiceInfo:
        if name == "boom":
            raise RuntimeError("a bug in the controller")
        if name not in self.services:
            raise UnknownServiceError(name)
        return self.services[name]

    def _set(self, name: str, **changes: Any) -> ServiceInfo:
        self.services[name] = replace(self.services[name], **changes)
        return self.services[name]

    async def list_services(self) -> list[ServiceInfo]:
        self.calls.append(("list", None))
        return list(self.services.values())

    async def service_status(self, name: str) -> ServiceInfo:
        self.calls.append(("status", name))
        return self._get(name)

    async def start(self, name: str) -> ServiceInfo:
        self.calls.append(("start", name))
        info = self._get(name)
        if info.active:
            raise ServiceStateError(f"service '{name}' is already running")
        if not info.enabled:
            raise ServiceStateError(f"service '{name}' is disabled; enable it first")
        return self._set(name, active=True, state=ServiceState.RUNNING, pid=4242)

    async def stop(self, name: str) -> ServiceInfo:
        self.calls.append(("stop", name))
        if self.release is not None:
            await self.release.wait()
        self._get(name)
        return self._set(name, active=False, state=ServiceState.INACTIVE, pid=None)

    async def restart(self, name: str) -> ServiceInfo:
        self.calls.append(("restart", name))
        info = self._get(name)
        return self._set(name, active=True, pid=4243, restart_count=info.restart_count + 1)

    async def enable(self, name: str, now: bool = False) -> ServiceInfo:
        self.calls.append(("enable", (name, now)))
        self._get(name)
        self._set(name, enabled=True)
        return await self.start(name) if now else self.services[name]

    async def disable(self, name: str) -> ServiceInfo:
        self.calls.append(("disable", name))
        self._get(name)
        return self._set(name, enabled=False, active=False, state=ServiceState.INACTIVE)

    async def logs(self, name: str, lines: int) -> list[str]:
        self.calls.append(("logs", (name, lines)))
        self._get(name)
        return self.log_lines[name][-lines:] if lines else []

    async def clear_logs(self, name: str) -> None:
        self.calls.append(("logs-clear", name))
        self._get(name)
        self.log_lines[name] = []

    async def system_status(self) -> SystemStatus:
        self.calls.append(("system-status", None))
        return SystemStatus(
            uptime_secs=3725,
            total_services=len(self.services),
            active_services=sum(info.active for info in self.services.values()),
            enabled_services=sum(info.enabled for info in self.services.values()),
            total_processes=3,
            log_dir="/var/log/enclave-services",
            service_dir="/etc/enclaver/services",
            errors=("cycle: a -> b -> a; a and b are not started",),
        )

    async def reload(self) -> ReloadChanges:
        self.calls.append(("reload", None))
        self.services["cache"] = service("cache")
        return ReloadChanges(added=("cache",), restarted=("web",))

    async def shutdown(self) -> None:
        self.calls.append(("shutdown", None))
        self.shutdown_requested.set()


class BackgroundServer:
    """A ControlServer on its own event loop thread, so blocking clients can talk to it."""

    def __init__(self, controller: FakeController, **options: Any) -> None:
        self.controller = controller
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(controller, **options)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coroutine: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        self.run(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextmanager
def unix_server(socket_path: Path, **options: Any) -> Iterator[BackgroundServer]:
    options.setdefault("vsock_port", None)
    with BackgroundServer(FakeController(), unix_socket=socket_path, **options) as server:
        yield server
