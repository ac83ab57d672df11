"""The service manager: runs the init's services and answers the control protocol's requests.

It implements :class:`~enclave_runtime.init.controller.ServiceController`. Units come from the
manifest's ``services.units`` and the services directory (a unit file replaces a manifest unit
of the same name; see :mod:`enclave_runtime.formats.service_unit`).

**Starting.** :meth:`ServiceManager.start_all` starts every enabled service in the order of
:func:`~enclave_runtime.init.graph.plan_start`; services on a cycle or with an unmet
``Requires`` are *blocked* and never started. A service waits for the services it is ordered
after; one whose ``Requires`` failed to start is blocked too. Each service runs in its own
session (its pid is its process group), with its unit's ``Environment`` over odyn's (the
application's) environment, ``WorkingDirectory``, and ``User``/``Group``; stdout and stderr go
to its log (:mod:`enclave_runtime.init.service_logs`). When the main process ends, whatever it
left in its process group is killed.

**TimeoutStartSec.** Without a readiness protocol (enclave-init has none), a start is complete
once the process runs. With ``TimeoutStartSec = S`` the service is *starting* for S seconds: an
exit within them is a failed start (so services that require it are not started), and only
after them do the services ordered after it start.

**Stopping.** ``KillSignal`` (SIGTERM) goes to the service's process group; if the service is
still running ``TimeoutStopSec`` (10) seconds later, the group gets SIGKILL.

**Restarting.** ``Restart`` is enclave-init's: ``always``; ``on-failure`` (an exit status other
than 0, or a signal); ``on-success`` (exit status 0); ``no``. A stop request never restarts.
The delay doubles from ``RestartSec`` (at least :data:`MIN_RESTART_DELAY`) with each quick exit,
up to ``backoff_cap`` (or ``RestartSec`` if larger), and falls back to ``RestartSec`` after a run
of at least ``stable_after`` seconds: a crash loop costs a start every few minutes, not a CPU.

**Exits** are learnt from the process layer's
:class:`~enclave_runtime.process.launcher.ChildReaper`, which reaps every child; the manager never
waits for a process itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from enclave_runtime.formats.init_errors import (
    DependencyError,
    ServiceStartError,
    ServiceStateError,
    ShutdownInProgressError,
    UnitFileError,
    UnknownServiceError,
)
from enclave_runtime.formats.init_protocol import (
    ACTIVE_STATES,
    MAX_LOG_LINES,
    ReloadChanges,
    ServiceDependencies,
    ServiceInfo,
    ServiceState,
    SystemStatus,
)
from enclave_runtime.formats.manifest import Services, ServiceUnit
from enclave_runtime.formats.service_unit import (
    UnitDefinition,
    UnitSet,
    command_line,
    load_unit_directory,
    manifest_units,
    merge_units,
    unit_file_name,
    unit_file_path,
)
from enclave_runtime.init.graph import StartPlan, plan_start
from enclave_runtime.init.service_logs import Forward, ServiceLog
from enclave_runtime.process.launcher import (
    ChildReaper,
    Credentials,
    LaunchError,
    resolve_user,
    switch_arguments,
)
from enclave_runtime.process.streams import Broadcast

LOG = logging.getLogger("odyn")

MIN_RESTART_DELAY = 0.1
DEFAULT_BACKOFF_CAP = 300.0
DEFAULT_STABLE_AFTER = 10.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# After a service's main process ends, how long its output may take to reach the log.
_OUTPUT_DRAIN_SECONDS = 1.0
_MAX_ID = 2**32 - 2


# --- one process -------------------------------------------------------------------------------


class _OutputReader(asyncio.Protocol):
    """Moves a service's output pipe into its log."""

    def __init__(self, log: ServiceLog, closed: asyncio.Future[None]) -> None:
        self._log = log
        self._closed = closed

    def data_received(self, data: bytes) -> None:
        self._log.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._log.end_of_output()
        if not self._closed.done():
            self._closed.set_result(None)


class _Process:
    """A running service process (leader of its own process group)."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        exited: asyncio.Future[int],
        output_closed: asyncio.Future[None],
    ) -> None:
        # Kept so that subprocess never polls (and so reaps) the pid behind the reaper's back.
        self._popen = popen
        self.pid = popen.pid
        self.exited = exited
        self.output_closed = output_closed
        self.started = time.monotonic()

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def signal_group(self, signum: int) -> bool:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def wait(self) -> int:
        """The wait status, once the main process has ended, its group is gone, output read."""
        wait_status = await asyncio.shield(self.exited)
        self._popen.returncode = os.waitstatus_to_exitcode(wait_status)
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.output_closed), _OUTPUT_DRAIN_SECONDS)
        return wait_status


# --- one service -------------------------------------------------------------------------------


@dataclass
class _Service:
    """Everything the manager keeps about one service across starts and reloads."""

    name: str
    log: ServiceLog
    changes: Broadcast
    definition: UnitDefinition | None = None
    load_error: str | None = None
    broken_path: Path | None = None
    enabled_override: bool | None = None
    _state: ServiceState = ServiceState.INACTIVE
    error: str | None = None
    process: _Process | None = None
    runner: asyncio.Task[None] | None = None
    started: asyncio.Future[bool] | None = None
    stop_requested: bool = False
    wake: asyncio.Event | None = None
    restart_count: int = 0
    quick_exits: int = 0
    exit_status: int | None = None
    exit_signal: int | None = None

    @property
    def state(self) -> ServiceState:
        return self._state

    @state.setter
    def state(self, state: ServiceState) -> None:
        self._state = state
        self.changes.bump()

    @property
    def unit(self) -> ServiceUnit | None:
        return self.definition.unit if self.definition is not None else None

    @property
    def path(self) -> Path | None:
        if self.definition is not None and self.definition.path is not None:
            return self.definition.path
        return self.broken_path

    @property
    def enabled(self) -> bool:
        if self.definition is None:
            return self.broken_path is not None and _file_enabled(self.broken_path)
        if self.definition.path is None and self.enabled_override is not None:
            return self.enabled_override
        return self.definition.enabled

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def supervised(self) -> bool:
        return self.runner is not None and not self.runner.done()

    @property
    def source(self) -> str:
        if self.definition is not None:
            return self.definition.source
        return str(self.broken_path) if self.broken_path is not None else "the manifest"


def _file_enabled(path: Path) -> bool:
    parsed = unit_file_name(path.name)
    return parsed is not None and parsed[1]


# --- the manager -------------------------------------------------------------------------------


class ServiceManager:
    """The init's services; a :class:`ServiceController` for the control server.

    ``services`` is the manifest's ``services:`` section (directory, log settings, units).
    ``base_env`` is the environment every service starts from (odyn's by default; the
    supervisor passes the application's, proxy variables included). ``app_log`` receives each
    output line, prefixed with the service name, for odyn's app log stream. ``on_shutdown`` is
    called when a client asks the system to shut down.
    """

    def __init__(
        self,
        services: Services,
        reaper: ChildReaper,
        *,
        base_env: Mapping[str, str] | None = None,
        app_log: Forward | None = None,
        on_shutdown: Callable[[], None] | None = None,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        stable_after: float = DEFAULT_STABLE_AFTER,
    ) -> None:
        self.settings = services
        self._reaper = reaper
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._app_log = app_log
        self._on_shutdown = on_shutdown
        self._backoff_cap = backoff_cap
        self._stable_after = stable_after
        self._services: dict[str, _Service] = {}
        self._plan = StartPlan()
        self._unit_notes: tuple[str, ...] = ()
        self._notes: tuple[str, ...] = ()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._lock_instance: asyncio.Lock | None = None
        self._changes = Broadcast()
        self._shutting_down = False
        self._born = time.monotonic()

    @property
    def _lock(self) -> asyncio.Lock:
        """Serialises changes; made on first use (Python 3.9 binds a lock to the loop then)."""
        if self._lock_instance is None:
            self._lock_instance = asyncio.Lock()
        return self._lock_instance

    # --- lifecycle, for odyn's supervisor ------------------------------------------------------

    async def start_all(self) -> None:
        """Load the units and start every enabled service that may start."""
        async with self._lock:
            self._apply_units(self._read_units())
            await self._start_round([s.name for s in self._services.values() if s.enabled])

    async def stop_all(self) -> None:
        """Stop every service, each after those ordered after it; no restarts from now on."""
        self._shutting_down = True
        async with self._lock:
            await self._stop_in_order(list(self._services.values()))
            for service in self._services.values():
                service.log.close()

    async def close(self) -> None:
        """What odyn's supervisor calls on every service it started: here, stop_all."""
        await self.stop_all()

    # --- ServiceController: queries ------------------------------------------------------------

    async def list_services(self) -> list[ServiceInfo]:
        return [self._info(self._services[name]) for name in sorted(self._services)]

    async def service_status(self, name: str) -> ServiceInfo:
        return self._info(self._get(name))

    async def wait_until(self, name: str, condition: Callable[[ServiceInfo], bool]) -> ServiceInfo:
        """The service's state once ``condition`` holds for it; bound it with a timeout."""
        while True:
            seen = self._changes.version
            info = self._info(self._get(name))
            if condition(info):
                return info
            await self._changes.wait_past(seen)

    async def logs(self, name: str, lines: int) -> list[str]:
        service = self._get(name)
        count = max(0, min(lines, MAX_LOG_LINES))
        return await asyncio.get_running_loop().run_in_executor(None, service.log.tail, count)

    async def clear_logs(self, name: str) -> None:
        self._get(name).log.clear()

    async def system_status(self) -> SystemStatus:
        services = list(self._services.values())
        return SystemStatus(
            uptime_secs=int(time.monotonic() - self._born),
            total_services=len(services),
            active_services=sum(1 for s in services if s.active),
            enabled_services=sum(1 for s in services if s.enabled),
            total_processes=_process_count(),
            log_dir=self.settings.log_directory,
            service_dir=self.settings.directory,
            failed_services=sum(
                1 for s in services if s.state in (ServiceState.FAILED, ServiceState.BLOCKED)
            ),
            errors=self._notes,
        )

    # --- ServiceController: changes ------------------------------------------------------------

    async def start(self, name: str) -> ServiceInfo:
        """Start the service; one waiting out its restart back-off is restarted at once."""
        async with self._changing(name) as service:
            if service.state is ServiceState.RESTARTING and service.wake is not None:
                service.wake.set()
                await self.wait_until(name, lambda info: info.state is not ServiceState.RESTARTING)
            elif not service.supervised:
                await self._start_one(service)
            return self._info(service)

    async def stop(self, name: str) -> ServiceInfo:
        async with self._changing(name) as service:
            await self._stop(service)
            return self._info(service)

    async def restart(self, name: str) -> ServiceInfo:
        async with self._changing(name) as service:
            was_running = service.supervised
            self._check_startable(service)
            await self._stop(service)
            await self._start_one(service)
            if was_running:
                service.restart_count += 1
            return self._info(service)

    async def enable(self, name: str, now: bool = False) -> ServiceInfo:
        async with self._changing(name) as service:
            unit = service.unit
            if unit is not None and not unit.enable:
                raise ServiceStateError(
                    f"service '{name}' sets ServiceEnable = false in {service.source}; set it "
                    "to true (or remove the key) and run `initctl reload`"
                )
            self._set_enabled(service, True)
            self._replan()
            if now and not service.supervised:
                await self._start_one(service)
            return self._info(service)

    async def disable(self, name: str) -> ServiceInfo:
        async with self._changing(name) as service:
            await self._stop(service)
            self._set_enabled(service, False)
            self._replan()
            return self._info(service)

    async def reload(self) -> ReloadChanges:
        """Re-read the unit files: start new services, stop removed ones, restart changed ones.

        A running service that is unchanged keeps running with its state and counters. A
        changed unit whose new file is invalid keeps its running definition; the error shows
        in its status until the file is fixed.
        """
        self._refuse_during_shutdown()
        async with self._lock:
            units = await asyncio.get_running_loop().run_in_executor(None, self._read_units)
            return await self._reload(units)

    async def shutdown(self) -> None:
        """Stop restarting services and tell odyn to shut down; odyn then calls stop_all."""
        self._shutting_down = True
        LOG.info("init: shutdown requested")
        if self._on_shutdown is not None:
            self._on_shutdown()
        elif self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self.stop_all())

    # --- loading and planning ------------------------------------------------------------------

    def _read_units(self) -> UnitSet:
        return merge_units(
            manifest_units(self.settings.units), load_unit_directory(self.settings.directory)
        )

    def _apply_units(self, units: UnitSet) -> None:
        for name, definition in units.units.items():
            service = self._service(name)
            if service.load_error is not None and not service.supervised:
                service.state, service.error = ServiceState.INACTIVE, None
            service.definition, service.load_error, service.broken_path = definition, None, None
        for name, error in units.errors.items():
            service = self._service(name)
            service.definition, service.load_error = None, str(error)
            service.broken_path = _broken_path(error.source)
            service.state, service.error = ServiceState.FAILED, str(error)
        for warning in units.warnings:
            LOG.warning("init: %s", warning)
        self._unit_notes = (*units.warnings, *(str(e) for e in units.errors.values()))
        self._replan()

    def _service(self, name: str) -> _Service:
        if name not in self._services:
            log = ServiceLog(
                self.settings.log_directory,
                name,
                self.settings.max_log_size,
                self.settings.max_log_files,
                forward=self._app_log,
            )
            self._services[name] = _Service(name, log, self._changes)
        return self._services[name]

    def _replan(self) -> None:
        units: dict[str, ServiceUnit] = {}
        unavailable: dict[str, str] = {}
        for name, service in self._services.items():
            if service.unit is None:
                unavailable[name] = "has an invalid unit (see its status)"
            elif not service.enabled:
                unavailable[name] = "is disabled"
            else:
                units[name] = service.unit
        previous = self._plan
        self._plan = plan_start(units, unavailable)
        for problem in self._plan.problems:
            if problem not in previous.problems:
                LOG.error("init: %s", problem)
        for warning in self._plan.warnings:
            if warning not in previous.warnings:
                LOG.warning("init: %s", warning)
        self._notes = (*self._unit_notes, *self._plan.problems)
        for name, reason in self._plan.blocked.items():
            service = self._services[name]
            service.error = f"blocked: {reason}"
            if not service.active:
                service.state = ServiceState.BLOCKED
        for name in set(previous.blocked) - set(self._plan.blocked):
            service = self._services.get(name)
            if service is not None and service.error and service.error.startswith("blocked: "):
                service.error = None
                if service.state is ServiceState.BLOCKED:
                    service.state = ServiceState.INACTIVE

    async def _reload(self, units: UnitSet) -> ReloadChanges:
        known = set(self._services)
        found = set(units.units) | set(units.errors)
        removed = sorted(known - found)
        added = sorted(found - known)
        changed = sorted(
            name for name in known & set(units.units) if self._differs(name, units.units[name])
        )
        await self._stop_in_order([self._services[name] for name in removed])
        for name in removed:
            self._services.pop(name).log.close()
        was_running = {name for name in changed if self._services[name].supervised}
        was_enabled = {name for name in changed if self._services[name].enabled}
        for name in changed:
            await self._stop(self._services[name])
        kept_errors = {
            name: error
            for name, error in units.errors.items()
            if name in known and self._services[name].supervised
        }
        self._apply_units(
            UnitSet(
                units.units,
                {n: e for n, e in units.errors.items() if n not in kept_errors},
                units.warnings,
            )
        )
        for name, error in kept_errors.items():
            kept = self._services[name]
            kept.error = f"{error}\n(still running the previous definition; fix it and reload)"
        never_started = {name for name, s in self._services.items() if s.started is None}
        wanted = {*added, *was_running, *(set(changed) - was_enabled), *never_started}
        await self._start_round(
            name
            for name in wanted
            if self._services[name].enabled and not self._services[name].supervised
        )
        LOG.info("init: reloaded (added %s, removed %s, changed %s)", added, removed, changed)
        return ReloadChanges(tuple(added), tuple(removed), tuple(changed))

    def _differs(self, name: str, definition: UnitDefinition) -> bool:
        service = self._services[name]
        if service.definition is None:
            return True
        enabled = definition.enabled
        if definition.path is None and service.enabled_override is not None:
            enabled = service.enabled_override
        return (service.unit, service.enabled) != (definition.unit, enabled)

    # --- starting ------------------------------------------------------------------------------

    async def _start_round(self, names: Iterable[str]) -> None:
        """Start ``names`` in plan order; each waits for those it is ordered after."""
        wanted = set(names)
        order = [name for name in self._plan.order if name in wanted]
        outcomes = {name: asyncio.get_running_loop().create_future() for name in order}
        await asyncio.gather(*(self._start_when_ready(name, outcomes) for name in order))

    async def _start_when_ready(self, name: str, outcomes: dict[str, asyncio.Future[bool]]) -> None:
        service = self._services[name]
        outcome = outcomes[name]
        try:
            for earlier in self._plan.starts_after.get(name, ()):
                if earlier in outcomes:
                    await asyncio.shield(outcomes[earlier])
            unmet = self._unmet_requirement(name, outcomes)
            if unmet is not None:
                service.state, service.error = ServiceState.BLOCKED, f"not started: {unmet}"
                LOG.error("init: %s is not started: %s", name, unmet)
                service.log.note(f"Service {name} not started: {unmet}")
                return
            started = self._launch(service)
            outcome.set_result(await asyncio.shield(started))
        finally:
            if not outcome.done():
                outcome.set_result(False)

    def _unmet_requirement(
        self, name: str, outcomes: dict[str, asyncio.Future[bool]]
    ) -> str | None:
        for required in self._plan.requires.get(name, ()):
            other = self._services[required]
            if required in outcomes:
                if not outcomes[required].result():
                    return f"requires {required}, which failed to start: {other.error}"
            elif not (other.active or other.state is ServiceState.EXITED):
                return (
                    f"requires {required}, which is not running ({other.state.value}); "
                    f"start {required} first"
                )
        return None

    def _check_startable(self, service: _Service) -> None:
        """Raise, saying why, when the service may not start now."""
        if service.unit is None:
            raise UnitFileError(
                f"service '{service.name}' cannot start, its unit is invalid:\n{service.load_error}"
            )
        if not service.enabled:
            raise ServiceStateError(
                f"service '{service.name}' is disabled; enable it first (`initctl enable "
                f"{service.name} --now`)"
            )
        if service.name in self._plan.blocked:
            raise DependencyError(
                f"service '{service.name}' cannot start: {self._plan.blocked[service.name]}"
            )
        unmet = self._unmet_requirement(service.name, {})
        if unmet is not None:
            raise DependencyError(f"service '{service.name}' cannot start: it {unmet}")

    async def _start_one(self, service: _Service) -> None:
        """Start one service on request; raises when it does not (fully) start."""
        self._check_startable(service)
        if not await asyncio.shield(self._launch(service)):
            raise ServiceStartError(service.error or f"service '{service.name}' did not start")

    def _launch(self, service: _Service) -> asyncio.Future[bool]:
        """Begin supervising: a future resolved with whether the first start succeeded."""
        loop = asyncio.get_running_loop()
        service.started = loop.create_future()
        service.stop_requested = False
        service.wake = asyncio.Event()
        service.error = None
        service.quick_exits = 0
        service.runner = loop.create_task(self._supervise(service, service.started))
        return service.started

    async def _supervise(self, service: _Service, started: asyncio.Future[bool]) -> None:
        """Start the service and keep it going as its Restart policy says, until stopped."""
        try:
            while not service.stop_requested:
                try:
                    process = await self._spawn(service)
                except ServiceStartError as err:
                    self._start_failed(service, str(err))
                    return
                up = await self._settle(service, process)
                if not started.done():
                    started.set_result(up)
                if up:
                    service.state = ServiceState.RUNNING
                wait_status = await process.wait()
                self._record_exit(service, process, wait_status, during_start=not up)
                if not await self._restart_wanted(service, wait_status):
                    return
            service.state = ServiceState.INACTIVE
        except Exception:
            LOG.exception("init: supervising %s failed", service.name)
            self._start_failed(
                service,
                f"service '{service.name}' is no longer supervised after an internal error; "
                "odyn's log has the details",
            )
        finally:
            if not started.done():
                started.set_result(False)

    async def _spawn(self, service: _Service) -> _Process:
        unit = service.unit
        assert unit is not None
        argv = command_line(unit)
        credentials = _credentials(unit, service.source)
        env = self._environment(unit, credentials)
        service.log.note(f"Starting service {service.name}")
        read_fd, write_fd = os.pipe()
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                cwd=unit.working_directory,
                env=env,
                start_new_session=True,
                **switch_arguments(credentials),
            )
        except (OSError, ValueError) as err:
            os.close(read_fd)
            raise ServiceStartError(_spawn_failure(service, argv, env, credentials, err)) from err
        finally:
            os.close(write_fd)
        # Watched, and visible to a stop request, before anything else can run.
        exited = self._reaper.watch(popen.pid)
        loop = asyncio.get_running_loop()
        output_closed: asyncio.Future[None] = loop.create_future()
        process = service.process = _Process(popen, exited, output_closed)
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: _OutputReader(service.log, output_closed), pipe)
        if not service.stop_requested:
            starting = bool(unit.timeout_start_sec)
            service.state = ServiceState.STARTING if starting else ServiceState.RUNNING
        LOG.info("init: service %s started (pid %d)", service.name, popen.pid)
        service.log.note(f"Service {service.name} started with PID {popen.pid}")
        return process

    async def _settle(self, service: _Service, process: _Process) -> bool:
        """Whether the process is still running at the end of its TimeoutStartSec."""
        timeout = service.unit.timeout_start_sec if service.unit is not None else None
        if timeout:
            await asyncio.wait({process.exited}, timeout=timeout)
        return process.running

    def _start_failed(self, service: _Service, message: str) -> None:
        service.state, service.error, service.process = ServiceState.FAILED, message, None
        LOG.error("init: %s", message)
        service.log.note(message)

    def _record_exit(
        self, service: _Service, process: _Process, wait_status: int, during_start: bool
    ) -> None:
        service.process = None
        if os.WIFSIGNALED(wait_status):
            service.exit_status, service.exit_signal = None, os.WTERMSIG(wait_status)
            how = f"was killed by {_signal_name(service.exit_signal)}"
        else:
            service.exit_status, service.exit_signal = os.WEXITSTATUS(wait_status), None
            how = f"exited with code {service.exit_status}"
        if time.monotonic() - process.started >= self._stable_after:
            service.quick_exits = 0
        if during_start and not service.stop_requested:
            timeout = service.unit.timeout_start_sec if service.unit is not None else 0
            service.error = (
                f"service '{service.name}' {how} during its start (TimeoutStartSec = "
                f"{timeout:g}); its log has its output (`initctl logs {service.name}`)"
            )
        LOG.info("init: service %s %s", service.name, how)
        service.log.note(f"Service {service.name} {how}")

    async def _restart_wanted(self, service: _Service, wait_status: int) -> bool:
        """Wait out the back-off and say True when the service is to run again."""
        unit = service.unit
        if service.stop_requested or unit is None:
            service.state = ServiceState.INACTIVE
            service.log.note(f"Service {service.name} stopped")
            return False
        clean = os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0
        if self._shutting_down or not _policy_restarts(unit.restart, clean):
            service.state = ServiceState.EXITED if clean else ServiceState.FAILED
            if not clean and service.error is None:
                service.error = f"service '{service.name}' {_describe_status(wait_status)}"
            return False
        service.quick_exits += 1
        delay = restart_delay(unit.restart_sec, service.quick_exits, self._backoff_cap)
        service.state = ServiceState.RESTARTING
        LOG.info("init: restarting %s in %.1f s (Restart=%s)", service.name, delay, unit.restart)
        service.log.note(f"Service {service.name} will be restarted in {delay:g} s")
        assert service.wake is not None
        if not service.stop_requested:
            service.wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(service.wake.wait(), delay)
        if service.stop_requested or self._shutting_down:
            service.state = ServiceState.INACTIVE
            return False
        service.restart_count += 1
        return True

    def _environment(self, unit: ServiceUnit, credentials: Credentials | None) -> dict[str, str]:
        env = {**self._base_env, **unit.environment_map}
        env.setdefault("PATH", DEFAULT_PATH)
        if credentials is not None and "HOME" not in unit.environment_map:
            env["HOME"] = credentials.home
        return env

    # --- stopping ------------------------------------------------------------------------------

    async def _stop(self, service: _Service) -> None:
        """Stop supervising: KillSignal, then SIGKILL after TimeoutStopSec; wait for the end."""
        if not service.supervised:
            return
        service.stop_requested = True
        assert service.wake is not None and service.runner is not None
        service.wake.set()
        process = service.process
        unit = service.unit
        if process is not None and process.running and unit is not None:
            service.state = ServiceState.STOPPING
            signum = signal.Signals[unit.kill_signal]
            LOG.info("init: stopping %s (%s)", service.name, signum.name)
            process.signal_group(signum)
            done, _ = await asyncio.wait({process.exited}, timeout=unit.timeout_stop_sec)
            if not done:
                LOG.warning(
                    "init: %s still runs %g s after %s; sending SIGKILL",
                    service.name,
                    unit.timeout_stop_sec,
                    signum.name,
                )
                service.log.note(f"Service {service.name} did not stop in time: SIGKILL")
                process.signal_group(signal.SIGKILL)
        await asyncio.shield(service.runner)

    async def _stop_in_order(self, services: list[_Service]) -> None:
        """Stop ``services`` together, each only after the ones ordered after it have stopped."""
        stopping = {service.name: service for service in services}
        done = {name: asyncio.get_running_loop().create_future() for name in stopping}
        later: dict[str, list[str]] = {name: [] for name in stopping}
        for name, earlier in self._plan.starts_after.items():
            for first in earlier:
                if first in later and name in stopping:
                    later[first].append(name)

        async def stop_after_followers(name: str) -> None:
            try:
                for follower in later[name]:
                    await asyncio.shield(done[follower])
                await self._stop(stopping[name])
            finally:
                done[name].set_result(None)

        await asyncio.gather(*(stop_after_followers(name) for name in stopping))

    # --- enable/disable ------------------------------------------------------------------------

    def _set_enabled(self, service: _Service, enabled: bool) -> None:
        """Persist by renaming NAME.service <-> NAME.service.disabled (manifest units: memory)."""
        path = service.path
        if path is None:
            service.enabled_override = enabled
            return
        target = unit_file_path(path.parent, service.name, enabled)
        if path != target:
            try:
                os.rename(path, target)
            except OSError as err:
                raise UnitFileError(
                    f"cannot rename {path} to {target}: {err.strerror or err}; check that the "
                    "services directory is writable"
                ) from err
            LOG.info("init: renamed %s to %s", path, target)
        if service.definition is not None:
            service.definition = UnitDefinition(service.definition.unit, target, enabled)
        else:
            service.broken_path = target

    # --- helpers -------------------------------------------------------------------------------

    def _get(self, name: str) -> _Service:
        service = self._services.get(name)
        if service is None:
            raise UnknownServiceError(name)
        return service

    def _refuse_during_shutdown(self) -> None:
        if self._shutting_down:
            raise ShutdownInProgressError("the init is shutting down; no more changes")

    @contextlib.asynccontextmanager
    async def _changing(self, name: str) -> AsyncIterator[_Service]:
        """The service, under the lock that serialises changes; refused during shutdown."""
        self._refuse_during_shutdown()
        self._get(name)
        async with self._lock:
            self._refuse_during_shutdown()
            yield self._get(name)

    def _info(self, service: _Service) -> ServiceInfo:
        unit = service.unit
        process = service.process
        return ServiceInfo(
            name=service.name,
            enabled=service.enabled,
            active=service.active,
            state=service.state,
            pid=process.pid if process is not None and process.running else None,
            restart_policy=unit.restart if unit is not None else "no",
            restart_count=service.restart_count,
            exit_status=service.exit_status,
            dependencies=ServiceDependencies(
                before=unit.before if unit else (),
                after=unit.after if unit else (),
                requires=unit.requires if unit else (),
                required_by=unit.required_by if unit else (),
            ),
            error=service.error or service.log.error,
            restart_sec=unit.restart_sec if unit is not None else 0,
            exec_start=unit.exec_start if unit is not None else "",
            working_directory=unit.working_directory if unit is not None else None,
            exit_signal=service.exit_signal,
        )


# --- module helpers ----------------------------------------------------------------------------


def restart_delay(restart_sec: float, quick_exits: int, cap: float = DEFAULT_BACKOFF_CAP) -> float:
    """The wait before restart number ``quick_exits`` (1, 2, ...) of a crash loop."""
    base = max(float(restart_sec), MIN_RESTART_DELAY)
    limit = max(cap, float(restart_sec))
    return min(limit, base * 2.0 ** min(quick_exits - 1, 64))


def _policy_restarts(policy: str, clean: bool) -> bool:
    if policy == "always":
        return True
    if policy == "on-failure":
        return not clean
    if policy == "on-success":
        return clean
    return False


def _describe_status(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"was killed by {_signal_name(os.WTERMSIG(wait_status))}"
    return f"exited with code {os.WEXITSTATUS(wait_status)}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _broken_path(source: str) -> Path | None:
    path = Path(source)
    return path if unit_file_name(path.name) is not None and path.is_absolute() else None


def _process_count() -> int:
    try:
        return sum(1 for entry in os.listdir("/proc") if entry.isdigit())
    except OSError:
        return 0


def _credentials(unit: ServiceUnit, source: str) -> Credentials | None:
    """Who the service runs as: ``User`` (name or uid) and ``Group`` (name or gid)."""
    if unit.user is None and unit.group is None:
        return None
    user = str(os.getuid() if unit.user is None else unit.user)
    spec = user if unit.group is None else f"{user}:{unit.group}"
    try:
        return resolve_user(spec, label=f"service '{unit.name}' (User/Group in {source})")
    except LaunchError as err:
        raise ServiceStartError(str(err)) from None


def _spawn_failure(
    service: _Service,
    argv: list[str],
    env: Mapping[str, str],
    credentials: Credentials | None,
    err: Exception,
) -> str:
    unit = service.unit
    assert unit is not None
    lead = f"cannot start service '{service.name}' ({service.source})"
    if isinstance(err, ValueError):
        return f"{lead}: {err}; remove NUL characters from ExecStart and Environment"
    assert isinstance(err, OSError)
    reason = err.strerror or str(err)
    if err.errno == errno.EPERM and switch_arguments(credentials):
        assert credentials is not None
        return (
            f"{lead}: cannot switch to uid {credentials.uid} gid {credentials.gid}: {reason}; "
            "odyn must run as root to use User/Group"
        )
    if unit.working_directory is not None and err.filename == unit.working_directory:
        return (
            f"{lead}: WorkingDirectory {unit.working_directory!r}: {reason}; create it in the "
            "image or fix WorkingDirectory"
        )
    if err.errno == errno.ENOENT:
        return (
            f"{lead}: program {argv[0]!r} not found (PATH={env.get('PATH', '')}); "
            "fix ExecStart or install the program"
        )
    if err.errno == errno.EACCES:
        return (
            f"{lead}: program {argv[0]!r}: permission denied; make it executable for the user "
            "the service runs as"
        )
    return f"{lead}: {reason}"
