"""odyn's supervisor: the start order, the application's lifetime, and the way out.

Start order (each step only after the previous one succeeded):

1. status server (vsock 17000), so even a failure of what follows can be reported;
2. console: the log ring served on vsock 17001, capturing the application's stdout and stderr;
3. ``DIR/enclaver.yaml`` loaded and checked (its ``runtime.log_buffer_size`` sizes the ring);
4. bootstrap, unless disabled: ``lo`` up, kernel RNG seeded from the NSM;
5. egress proxy, KMS proxy, API and aux API, ingress: only those the manifest configures,
   and each service module is imported only then;
6. the application.

Any failure before the application starts publishes ``{"status":"fatal","error":...}``; the
application never runs, the services already started are closed and odyn exits with status 1.
Once the application runs, its end is published as ``exited`` or ``signaled`` and odyn exits
with its code (128 + the signal number when it was killed). Before exiting odyn lingers, at most
``linger`` seconds, until a status client has been sent the final line and the connected log
clients have been sent the whole log, so the host learns how the application ended.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.manifest import Manifest, ManifestError, load_manifest
from enclave_runtime.formats.protocol import (
    AppStatus,
    StatusExited,
    StatusFatal,
    StatusRunning,
    StatusSignaled,
)
from enclave_runtime.formats.vsock_ports import APP_LOG_PORT, STATUS_PORT
from enclave_runtime.odyn.bootstrap import bootstrap
from enclave_runtime.odyn.console import Console
from enclave_runtime.odyn.launcher import (
    DEFAULT_GRACE_PERIOD,
    App,
    ChildReaper,
    Credentials,
    LaunchSpec,
    app_environment,
    resolve_user,
    start_app,
)
from enclave_runtime.odyn.status import StatusServer
from enclave_runtime.transport.nsm import DEFAULT_NSM_PATH

LOG = logging.getLogger("odyn")

MANIFEST_FILE = "enclaver.yaml"
EXIT_FATAL = 1
DEFAULT_LINGER = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Passed on to the application as they are, like tini and dumb-init do.
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

T = TypeVar("T")


class SupervisorError(EnclaveOpsError):
    """odyn itself cannot go on (a service module missing, stopped before the launch)."""


@dataclass(frozen=True)
class SupervisorOptions:
    """What ``odyn`` was asked to do; ``env`` None means odyn's own environment."""

    config_dir: Path
    argv: tuple[str, ...]
    bootstrap: bool = True
    console: bool = True
    capture_own_stdio: bool = False
    workdir: str | None = None
    user: str | None = None
    env: Mapping[str, str] | None = None
    nsm_path: str = DEFAULT_NSM_PATH
    grace_period: float = DEFAULT_GRACE_PERIOD
    linger: float = DEFAULT_LINGER
    status_port: int = STATUS_PORT
    log_port: int = APP_LOG_PORT


class _Closable(Protocol):
    """What every service start function returns: something with ``async close()``."""

    async def close(self) -> None: ...


def exit_code(status: AppStatus) -> int:
    """odyn's own exit status for the application's end, as a shell reports it."""
    if isinstance(status, StatusExited):
        return status.code
    if isinstance(status, StatusSignaled):
        return 128 + status.signal
    return EXIT_FATAL


class Supervisor:
    """One run of odyn; :meth:`run` returns odyn's exit status. Run it in the main thread."""

    def __init__(self, options: SupervisorOptions) -> None:
        self.options = options
        self.status = StatusServer(options.status_port)
        self.console: Console | None = Console(port=options.log_port) if options.console else None
        self._reaper = ChildReaper()
        self._services: list[tuple[str, _Closable]] = []
        self._app: App | None = None
        self._stop_signal: int | None = None
        self._stop_requested: asyncio.Event | None = None
        self._handled_signals: list[int] = []
        self._init: Any = None  # the init's ServiceManager, when the enclave has services
        self._reloads: set[asyncio.Future[Any]] = set()

    async def run(self) -> int:
        self._stop_requested = asyncio.Event()
        try:
            await self.status.start()
        except OSError as err:
            raise SupervisorError(
                f"cannot serve the status port {self.options.status_port}: {err}"
            ) from err
        try:
            self._install_signal_handlers()
            self._reaper.install()
            try:
                app = await self._unless_stopped(self._start())
            except Exception as err:
                return await self._fail(err)
            return await self._supervise(app)
        finally:
            await self._teardown()

    # --- starting ------------------------------------------------------------------------------

    async def _start(self) -> App:
        options = self.options
        if self.console is not None:
            await self.console.start(options.capture_own_stdio)
        manifest = _load_manifest(options.config_dir / MANIFEST_FILE)
        if self.console is not None:
            self.console.resize(manifest.runtime.log_buffer_size)
        credentials = resolve_user(options.user) if options.user else None
        if options.bootstrap:
            await asyncio.get_running_loop().run_in_executor(None, bootstrap, options.nsm_path)
        proxy_env = await self._start_services(manifest)
        LOG.info("starting the application %s", list(options.argv))
        self._app = start_app(self._launch_spec(credentials, proxy_env), self._reaper)
        LOG.debug("the application's process group is %d", self._app.pid)
        return self._app

    async def _start_services(self, manifest: Manifest) -> dict[str, str]:
        """Egress, KMS proxy, API, ingress; returns the proxy variables for the application."""
        proxy_env: dict[str, str] = {}
        egress = None
        if manifest.egress is not None:
            egress = await _service("egress").start_egress_proxy(manifest.egress)
            if egress is not None:
                self._services.append(("egress proxy", egress))
                proxy_env = dict(egress.env())
        if manifest.kms_proxy is not None:
            kms = await _service("kms_proxy").start_from_manifest(
                manifest.kms_proxy, egress, self.options.nsm_path
            )
            self._services.append(("KMS proxy", kms))
            proxy_env.update(kms.env())
        if manifest.api is not None:
            api = await _service("api").start_api(
                manifest.api, manifest.aux_api, self.options.nsm_path
            )
            if api is not None:
                self._services.append(("API", api))
        await self._start_init(manifest, proxy_env)
        if manifest.ingress:
            ingress = await _service("ingress").start_ingress(
                manifest.ingress, self.options.config_dir
            )
            self._services.append(("ingress", ingress))
        return proxy_env

    async def _start_init(self, manifest: Manifest, proxy_env: dict[str, str]) -> None:
        """The init's services and its control server, when the enclave defines any service.

        Services start from the application's environment (proxy variables included); their
        output joins the app log stream. SystemShutdown stops odyn as SIGTERM does.
        """
        services = manifest.services
        if not services.units and not Path(services.directory).is_dir():
            return
        from enclave_runtime.init.control_server import ControlServer  # noqa: PLC0415
        from enclave_runtime.init.manager import ServiceManager  # noqa: PLC0415
        from enclave_runtime.init.service_logs import forward_to_fd  # noqa: PLC0415

        output = self.console.app_output if self.console is not None else None
        base_env = os.environ if self.options.env is None else self.options.env
        manager = ServiceManager(
            services,
            self._reaper,
            base_env=app_environment(base_env, proxy_env, None),
            app_log=forward_to_fd(output if output is not None else 1),
            on_shutdown=lambda: self._on_signal(signal.SIGTERM),
        )
        self._services.append(("services", manager))
        self._init = manager
        await manager.start_all()
        control = ControlServer.from_manifest(manager, manifest.control)
        await control.start()
        self._services.append(("init control server", control))

    def _launch_spec(
        self, credentials: Credentials | None, proxy_env: dict[str, str]
    ) -> LaunchSpec:
        options = self.options
        base_env = os.environ if options.env is None else options.env
        return LaunchSpec(
            argv=options.argv,
            env=app_environment(base_env, proxy_env, credentials),
            cwd=options.workdir,
            credentials=credentials,
            output=self.console.app_output if self.console is not None else None,
        )

    async def _unless_stopped(self, work: Awaitable[T]) -> T:
        """Await ``work``, unless a stop signal comes first: then cancel it and fail."""
        assert self._stop_requested is not None
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            name = signal.Signals(self._stop_signal or signal.SIGTERM).name
            raise SupervisorError(f"odyn received {name} before the application was started")
        return task.result()

    # --- running -------------------------------------------------------------------------------

    async def _supervise(self, app: App) -> int:
        self.status.publish(StatusRunning())
        if self._stop_signal is not None and not app.stopping:
            app.stop(self._stop_signal, self.options.grace_period)
        result = await app.wait()
        self.status.publish(result)
        LOG.info("the application %s", _describe_end(result))
        await self._close_services()
        return await self._finish(exit_code(result))

    async def _fail(self, err: Exception) -> int:
        message = _describe_error(err)
        LOG.error("fatal: %s", message)
        if not isinstance(err, EnclaveOpsError):
            LOG.debug("details", exc_info=err)
        self.status.publish(StatusFatal(message))
        await self._close_services()
        return await self._finish(EXIT_FATAL)

    async def _finish(self, code: int) -> int:
        """Linger until the host has the final status and the whole log, or ``linger`` runs out."""
        waits = [self.status.wait_delivered()]
        if self.console is not None:
            self.console.end_input()
            waits.append(self.console.wait_drained())
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.options.linger)
        except asyncio.TimeoutError:
            LOG.debug("no status client read the final status within %.1f s", self.options.linger)
        return code

    # --- signals and cleanup -------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (*STOP_SIGNALS, *FORWARDED_SIGNALS):
            loop.add_signal_handler(signum, self._on_signal, signum)
            self._handled_signals.append(signum)

    def _on_signal(self, signum: int) -> None:
        if signum in STOP_SIGNALS:
            assert self._stop_requested is not None
            if self._stop_signal is None:
                LOG.info("received %s: stopping", signal.Signals(signum).name)
                self._stop_signal = signum
            self._stop_requested.set()
            if self._app is not None:
                self._app.stop(signum, self.options.grace_period)
        elif signum == signal.SIGHUP and self._init is not None:
            reload = asyncio.ensure_future(self._init.reload())  # re-read the unit files
            self._reloads.add(reload)
            reload.add_done_callback(self._reloaded)
        elif self._app is not None:
            self._app.forward(signum)

    def _reloaded(self, reload: asyncio.Future[Any]) -> None:
        self._reloads.discard(reload)
        if not reload.cancelled() and reload.exception() is not None:
            LOG.warning("reloading the services failed: %s", _describe_error(reload.exception()))

    async def _close_services(self) -> None:
        while self._services:
            name, service = self._services.pop()
            try:
                await service.close()
            except Exception as err:
                LOG.warning("closing the %s failed: %s", name, _describe_error(err))

    async def _teardown(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._handled_signals:
            loop.remove_signal_handler(signum)
        self._handled_signals.clear()
        self._reaper.remove()
        await self._close_services()
        if self.console is not None:
            await self.console.close()
        await self.status.close()


async def run_supervisor(options: SupervisorOptions) -> int:
    """Run odyn to the end; its exit status."""
    return await Supervisor(options).run()


def _load_manifest(path: Path) -> Manifest:
    try:
        return load_manifest(path)
    except ManifestError as err:
        raise SupervisorError(f"the manifest {path} is not valid:\n{err}") from err


def _service(name: str) -> Any:
    """The service module, imported only when the manifest configures the service."""
    module_name = f"enclave_runtime.odyn.{name}"
    try:
        module: ModuleType = importlib.import_module(module_name)
    except ImportError as err:
        raise SupervisorError(
            f"the manifest configures {name}, but this odyn cannot load {module_name} ({err}); "
            "rebuild the image with a complete enclave runtime"
        ) from err
    return module


def _describe_error(err: BaseException) -> str:
    if isinstance(err, (EnclaveOpsError, OSError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _describe_end(status: AppStatus) -> str:
    if isinstance(status, StatusExited):
        return f"exited with code {status.code}"
    if isinstance(status, StatusSignaled):
        return f"was killed by {status.name} (signal {status.signal})"
    return str(status)
