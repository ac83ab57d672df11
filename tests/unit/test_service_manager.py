"""The service manager with real processes: order, refusals, restarts, stops, persistence, logs.

Every scenario runs on its own event loop with odyn's ChildReaper installed, as in odyn, and is
bounded in time. Waiting is on the manager's state changes (``wait_until``), not on sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import pytest

from enclave_runtime.formats.init_errors import (
    DependencyError,
    ServiceStartError,
    ServiceStateError,
    ShutdownInProgressError,
    UnknownServiceError,
)
from enclave_runtime.formats.init_protocol import ReloadChanges, ServiceInfo, ServiceState
from enclave_runtime.formats.manifest import Services, ServiceUnit
from enclave_runtime.init.controller import ServiceController
from enclave_runtime.init.manager import ServiceManager, restart_delay
from enclave_runtime.process.launcher import ChildReaper

Scenario = Callable[[ServiceManager, Path], Awaitable[Any]]


class Setup:
    """A services directory, a log directory and what the app log stream received."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.units = root / "services"
        self.logs = root / "logs"
        self.units.mkdir()
        self.app_log: list[bytes] = []
        self.shutdowns = 0
        self._output: asyncio.Event | None = None

    def unit(self, name: str, text: str, suffix: str = ".service") -> Path:
        path = self.units / f"{name}{suffix}"
        path.write_text(text)
        return path

    def run(
        self,
        scenario: Callable[[ServiceManager], Awaitable[Any]],
        manifest_units: tuple[ServiceUnit, ...] = (),
        timeout: float = 20.0,
        **options: Any,
    ) -> Any:
        async def main() -> Any:
            self._output = asyncio.Event()
            reaper = ChildReaper()
            reaper.install()
            services = Services(
                directory=str(self.units),
                log_directory=str(self.logs),
                max_log_size=64 * 1024,
                max_log_files=3,
                units=manifest_units,
            )
            manager = ServiceManager(
                services,
                reaper,
                base_env={"PATH": os.environ["PATH"], "FROM_ODYN": "odyn"},
                app_log=self._forwarded,
                on_shutdown=self._count_shutdown,
                **options,
            )
            try:
                return await asyncio.wait_for(scenario(manager), timeout)
            finally:
                await asyncio.wait_for(manager.stop_all(), 10)
                reaper.remove()

        return asyncio.run(main())

    def _count_shutdown(self) -> None:
        self.shutdowns += 1

    def _forwarded(self, line: bytes) -> None:
        self.app_log.append(line)
        assert self._output is not None
        self._output.set()

    async def output(self, line: bytes) -> None:
        """Return once a service has written ``line`` (as the app log stream shows it)."""
        assert self._output is not None
        while line not in self.app_log:
            self._output.clear()
            await self._output.wait()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def state_is(*states: ServiceState) -> Callable[[ServiceInfo], bool]:
    return lambda info: info.state in states


async def settled(manager: ServiceManager, name: str, timeout: float = 10.0) -> ServiceInfo:
    """The service once it has ended for good (exited, failed, blocked or stopped)."""
    done = state_is(
        ServiceState.EXITED, ServiceState.FAILED, ServiceState.BLOCKED, ServiceState.INACTIVE
    )
    return await asyncio.wait_for(manager.wait_until(name, done), timeout)


async def running(manager: ServiceManager, name: str, timeout: float = 10.0) -> ServiceInfo:
    return await asyncio.wait_for(manager.wait_until(name, state_is(ServiceState.RUNNING)), timeout)


def started_order(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.args[0]  # type: ignore[index]
        for record in caplog.records
        if record.msg == "init: service %s started (pid %d)"
    ]


SLEEPER = 'ExecStart = "sleep 30"\n'


# --- contract ----------------------------------------------------------------------------------


def test_the_manager_is_a_service_controller(setup: Setup) -> None:
    async def scenario(manager: ServiceManager) -> None:
        controller: ServiceController = manager
        assert await controller.list_services() == []

    setup.run(scenario)


# --- order and refusals ------------------------------------------------------------------------


def test_services_start_in_dependency_order(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "odyn")
    setup.unit("web", SLEEPER + 'Requires = ["db", "cache"]\n')
    setup.unit("cache", SLEEPER + 'After = ["db"]\n')
    setup.unit("db", SLEEPER + 'Before = ["zzz"]\n')
    setup.unit("zzz", SLEEPER)

    async def scenario(manager: ServiceManager) -> list[ServiceInfo]:
        await manager.start_all()
        return await manager.list_services()

    infos = setup.run(scenario)
    order = started_order(caplog)
    assert sorted(order) == ["cache", "db", "web", "zzz"]
    assert order.index("db") < order.index("cache") < order.index("web")
    assert order.index("db") < order.index("zzz")
    assert all(info.state is ServiceState.RUNNING and info.pid for info in infos)


def test_a_required_service_runs_its_start_timeout_before_dependents_start(setup: Setup) -> None:
    marker = setup.root / "db-ready"
    setup.unit(
        "db", f"ExecStart = \"sh -c 'touch {marker}; exec sleep 30'\"\nTimeoutStartSec = 0.5\n"
    )
    setup.unit("web", f'ExecStart = "test -e {marker}"\nRequires = ["db"]\n')

    async def scenario(manager: ServiceManager) -> ServiceInfo:
        await manager.start_all()
        return await settled(manager, "web")

    web = setup.run(scenario)
    assert (web.state, web.exit_status) == (ServiceState.EXITED, 0)


def test_a_cycle_and_a_missing_requirement_are_reported_and_refused(setup: Setup) -> None:
    setup.unit("a", SLEEPER + 'After = ["b"]\n')
    setup.unit("b", SLEEPER + 'Requires = ["a"]\n')
    setup.unit("web", SLEEPER + 'Requires = ["database"]\n')
    setup.unit("ok", SLEEPER)

    async def scenario(manager: ServiceManager) -> tuple[dict[str, ServiceInfo], Any]:
        await manager.start_all()
        infos = {info.name: info for info in await manager.list_services()}
        with pytest.raises(DependencyError, match="cannot start: is in the dependency cycle"):
            await manager.start("a")
        with pytest.raises(DependencyError, match="requires database, which is not defined"):
            await manager.start("web")
        return infos, await manager.system_status()

    infos, status = setup.run(scenario)
    assert infos["ok"].state is ServiceState.RUNNING
    for name in ("a", "b", "web"):
        assert infos[name].state is ServiceState.BLOCKED
        assert infos[name].pid is None
    assert infos["a"].error == "blocked: is in the dependency cycle a -> b -> a"
    assert infos["web"].error == "blocked: requires database, which is not defined"
    assert status.failed_services == 3
    assert any("dependency cycle a -> b -> a" in error for error in status.errors)
    assert any("web requires database" in error for error in status.errors)


def test_a_service_whose_requirement_failed_to_start_is_not_started(setup: Setup) -> None:
    setup.unit("db", 'ExecStart = "/nonexistent/postgres"\n')
    setup.unit("web", SLEEPER + 'Requires = ["db"]\n')

    async def scenario(manager: ServiceManager) -> tuple[ServiceInfo, ServiceInfo]:
        await manager.start_all()
        return await manager.service_status("db"), await manager.service_status("web")

    db, web = setup.run(scenario)
    assert db.state is ServiceState.FAILED
    assert db.error is not None and "program '/nonexistent/postgres' not found" in db.error
    assert web.state is ServiceState.BLOCKED
    assert web.error is not None and web.error.startswith(
        "not started: requires db, which failed to start: cannot start service 'db'"
    )


def test_a_requirement_that_dies_during_its_start_timeout_blocks_dependents(setup: Setup) -> None:
    setup.unit("db", "ExecStart = \"sh -c 'exit 7'\"\nTimeoutStartSec = 5\n")
    setup.unit("web", SLEEPER + 'Requires = ["db"]\n')

    async def scenario(manager: ServiceManager) -> tuple[ServiceInfo, ServiceInfo]:
        await manager.start_all()
        return await manager.service_status("db"), await manager.service_status("web")

    db, web = setup.run(scenario)
    assert (db.state, db.exit_status) == (ServiceState.FAILED, 7)
    assert db.error is not None and "exited with code 7 during its start" in db.error
    assert web.state is ServiceState.BLOCKED


def test_starting_a_service_whose_requirement_is_stopped_is_refused(setup: Setup) -> None:
    setup.unit("db", SLEEPER)
    setup.unit("web", SLEEPER + 'Requires = ["db"]\n')

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        await manager.stop("web")
        await manager.stop("db")
        with pytest.raises(
            DependencyError, match=r"requires db, which is not running \(inactive\)"
        ):
            await manager.start("web")
        await manager.start("db")
        assert (await manager.start("web")).state is ServiceState.RUNNING

    setup.run(scenario)


# --- restart policies and back-off ------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "exit_code", "restarts"),
    [
        ("always", 0, True),
        ("always", 3, True),
        ("on-failure", 3, True),
        ("on-failure", 0, False),
        ("on-success", 0, True),
        ("on-success", 3, False),
        ("no", 3, False),
        ("no", 0, False),
    ],
)
def test_restart_policies(setup: Setup, policy: str, exit_code: int, restarts: bool) -> None:
    setup.unit(
        "job",
        f'ExecStart = "sh -c \'exit {exit_code}\'"\nRestart = "{policy}"\nRestartSec = 0\n',
    )

    async def scenario(manager: ServiceManager) -> ServiceInfo:
        await manager.start_all()
        if restarts:
            return await manager.wait_until("job", lambda info: info.restart_count >= 2)
        return await settled(manager, "job")

    info = setup.run(scenario)
    assert info.exit_status == exit_code
    if not restarts:
        assert info.restart_count == 0
        assert info.state is (ServiceState.EXITED if exit_code == 0 else ServiceState.FAILED)


def test_a_service_killed_by_a_signal_counts_as_a_failure(setup: Setup) -> None:
    setup.unit("job", 'ExecStart = "sh -c \'kill -9 $$\'"\nRestart = "on-success"\n')

    async def scenario(manager: ServiceManager) -> ServiceInfo:
        await manager.start_all()
        return await settled(manager, "job")

    info = setup.run(scenario)
    assert (info.state, info.exit_status, info.exit_signal) == (ServiceState.FAILED, None, 9)
    assert info.error == "service 'job' was killed by SIGKILL"


def test_the_restart_delay_doubles_up_to_the_cap() -> None:
    assert [restart_delay(5, n, cap=60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert [restart_delay(0, n, cap=1) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1]
    assert restart_delay(600, 3, cap=300) == 600  # RestartSec above the cap is honoured
    assert restart_delay(1, 10_000) == 300  # no overflow however long the loop


def test_a_crash_loop_backs_off_instead_of_spinning(setup: Setup) -> None:
    setup.unit("crash", 'ExecStart = "false"\nRestart = "always"\nRestartSec = 0\n')

    async def scenario(manager: ServiceManager) -> tuple[list[float], list[str]]:
        await manager.start_all()
        starts = [time.monotonic()]
        for count in range(1, 5):
            await manager.wait_until("crash", lambda info, c=count: info.restart_count >= c)
            starts.append(time.monotonic())
        gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
        return gaps, await manager.logs("crash", 100)

    gaps, lines = setup.run(scenario, backoff_cap=0.4)
    delays = [line.split("restarted in ")[1] for line in lines if "will be restarted in" in line]
    assert delays[:4] == ["0.1 s", "0.2 s", "0.4 s", "0.4 s"]  # doubling, then the cap
    for gap, delay in zip(gaps, (0.1, 0.2, 0.4, 0.4)):
        assert gap >= delay


def test_the_back_off_resets_after_a_stable_run(setup: Setup) -> None:
    setup.unit(
        "flaky",
        'ExecStart = "sh -c \'sleep 0.3; exit 1\'"\nRestart = "on-failure"\nRestartSec = 0\n',
    )

    async def scenario(manager: ServiceManager) -> list[str]:
        await manager.start_all()
        await manager.wait_until("flaky", lambda info: info.restart_count >= 3)
        return await manager.logs("flaky", 100)

    lines = setup.run(scenario, stable_after=0.2)
    delays = [line.split("restarted in ")[1] for line in lines if "will be restarted in" in line]
    assert delays[:3] == ["0.1 s", "0.1 s", "0.1 s"]


# --- stopping ----------------------------------------------------------------------------------


def test_stop_sends_the_kill_signal_to_the_whole_group(setup: Setup) -> None:
    marker = setup.root / "got-int"
    setup.unit(
        "web",
        f'ExecStart = "sh -c \'trap \\"echo int > {marker}; exit 0\\" INT; echo ready; '
        "sleep 30 & wait'\"\n"
        'KillSignal = "SIGINT"\nRestart = "always"\n',
    )

    async def scenario(manager: ServiceManager) -> ServiceInfo:
        await manager.start_all()
        await setup.output(b"[web] ready\n")
        return await manager.stop("web")

    info = setup.run(scenario)
    assert info.state is ServiceState.INACTIVE
    assert (info.exit_status, info.pid, info.restart_count) == (0, None, 0)
    assert marker.read_text() == "int\n"


def test_a_service_that_ignores_its_stop_signal_is_killed_after_timeout_stop_sec(
    setup: Setup,
) -> None:
    setup.unit(
        "stubborn",
        'ExecStart = "sh -c \'trap \\"\\" TERM; echo ready; while :; do sleep 0.05; done\'"\n'
        "TimeoutStopSec = 0.5\n",
    )

    async def scenario(manager: ServiceManager) -> tuple[ServiceInfo, float]:
        await manager.start_all()
        await setup.output(b"[stubborn] ready\n")
        began = time.monotonic()
        info = await manager.stop("stubborn")
        return info, time.monotonic() - began

    info, took = setup.run(scenario)
    assert (info.state, info.exit_signal) == (ServiceState.INACTIVE, 9)
    assert 0.5 <= took < 3


def test_stop_during_the_back_off_ends_the_restarts(setup: Setup) -> None:
    setup.unit("crash", 'ExecStart = "false"\nRestart = "always"\nRestartSec = 30\n')

    async def scenario(manager: ServiceManager) -> ServiceInfo:
        await manager.start_all()
        await manager.wait_until("crash", state_is(ServiceState.RESTARTING))
        return await manager.stop("crash")

    info = setup.run(scenario, timeout=5)
    assert (info.state, info.restart_count) == (ServiceState.INACTIVE, 0)


def test_start_cuts_a_restart_back_off_short(setup: Setup) -> None:
    setup.unit(
        "crash", 'ExecStart = "sh -c \'echo run; exit 1\'"\nRestart = "always"\nRestartSec = 300\n'
    )

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        await manager.wait_until("crash", state_is(ServiceState.RESTARTING))
        await manager.start("crash")
        await manager.wait_until("crash", lambda info: info.restart_count == 1)

    setup.run(scenario, timeout=5)


def test_a_restart_that_cannot_start_again_leaves_the_service_running(setup: Setup) -> None:
    setup.unit("db", SLEEPER)
    setup.unit("web", SLEEPER + 'Requires = ["db"]\n')

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        await manager.stop("db")
        with pytest.raises(DependencyError, match="requires db"):
            await manager.restart("web")
        assert (await manager.service_status("web")).state is ServiceState.RUNNING

    setup.run(scenario)


def test_start_stop_and_restart_on_request(setup: Setup) -> None:
    setup.unit("web", SLEEPER)

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        first = await manager.service_status("web")
        assert (await manager.start("web")).pid == first.pid  # already running: nothing to do
        restarted = await manager.restart("web")
        assert restarted.pid not in (None, first.pid)
        assert restarted.restart_count == 1
        stopped = await manager.stop("web")
        assert stopped.state is ServiceState.INACTIVE
        assert (await manager.stop("web")).state is ServiceState.INACTIVE
        assert (await manager.start("web")).state is ServiceState.RUNNING

    setup.run(scenario)


def test_shutdown_stops_dependents_first_and_refuses_further_changes(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "odyn")
    setup.unit("db", SLEEPER)
    setup.unit("web", SLEEPER + 'Requires = ["db"]\n')

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        await manager.shutdown()
        with pytest.raises(ShutdownInProgressError):
            await manager.start("web")
        await manager.stop_all()

    setup.run(scenario)
    assert setup.shutdowns == 1
    stopping = [r.args[0] for r in caplog.records if r.msg == "init: stopping %s (%s)"]  # type: ignore[index]
    assert stopping == ["web", "db"]


# --- enable, disable, reload ------------------------------------------------------------------


def test_disable_and_enable_persist_by_renaming_and_survive_reload(setup: Setup) -> None:
    setup.unit("web", SLEEPER)

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        disabled = await manager.disable("web")
        assert (disabled.enabled, disabled.state) == (False, ServiceState.INACTIVE)
        assert sorted(p.name for p in setup.units.iterdir()) == ["web.service.disabled"]
        await manager.reload()
        assert not (await manager.service_status("web")).enabled
        with pytest.raises(ServiceStateError, match="is disabled; enable it first"):
            await manager.start("web")
        enabled = await manager.enable("web")
        assert (enabled.enabled, enabled.state) == (True, ServiceState.INACTIVE)
        assert sorted(p.name for p in setup.units.iterdir()) == ["web.service"]
        assert (await manager.enable("web", now=True)).state is ServiceState.RUNNING
        await manager.reload()
        assert (await manager.service_status("web")).state is ServiceState.RUNNING

    setup.run(scenario)


def test_a_disabled_unit_file_is_listed_and_not_started(setup: Setup) -> None:
    setup.unit("web", SLEEPER, suffix=".service.disabled")

    async def scenario(manager: ServiceManager) -> ServiceInfo:
        await manager.start_all()
        return await manager.service_status("web")

    info = setup.run(scenario)
    assert (info.enabled, info.state, info.pid) == (False, ServiceState.INACTIVE, None)


def test_service_enable_false_cannot_be_overridden_by_a_rename(setup: Setup) -> None:
    setup.unit("job", SLEEPER + "ServiceEnable = false\n")

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        with pytest.raises(
            ServiceStateError, match=r"sets ServiceEnable = false in .*job\.service"
        ):
            await manager.enable("job")

    setup.run(scenario)


def test_manifest_units_run_and_their_enable_state_survives_reload(setup: Setup) -> None:
    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        assert (await manager.service_status("cache")).state is ServiceState.RUNNING
        await manager.disable("cache")
        assert await manager.reload() == ReloadChanges()  # nothing changed on disk
        info = await manager.service_status("cache")
        assert (info.enabled, info.state) == (False, ServiceState.INACTIVE)

    setup.run(scenario, manifest_units=(ServiceUnit("cache", "sleep 30"),))


def test_reload_adds_removes_and_restarts_only_what_changed(setup: Setup) -> None:
    setup.unit("keep", SLEEPER)
    setup.unit("change", SLEEPER)
    setup.unit("remove", SLEEPER)
    setup.unit("crashy", 'ExecStart = "false"\nRestart = "on-failure"\nRestartSec = 0\n')

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        await manager.wait_until("crashy", lambda info: info.restart_count >= 1)
        before = {info.name: info for info in await manager.list_services()}
        setup.unit("change", 'ExecStart = "sleep 31"\n')
        (setup.units / "remove.service").unlink()
        setup.unit("new", SLEEPER)
        changes = await manager.reload()
        assert (changes.added, changes.removed, changes.restarted) == (
            ("new",),
            ("remove",),
            ("change",),
        )
        after = {info.name: info for info in await manager.list_services()}
        assert sorted(after) == ["change", "crashy", "keep", "new"]
        assert after["keep"].pid == before["keep"].pid
        assert after["crashy"].restart_count >= before["crashy"].restart_count  # state kept
        assert after["change"].pid not in (None, before["change"].pid)
        assert after["change"].exec_start == "sleep 31"
        assert after["new"].state is ServiceState.RUNNING
        with pytest.raises(UnknownServiceError):
            await manager.service_status("remove")

    setup.run(scenario)


def test_reload_starts_a_service_once_its_cycle_is_fixed(setup: Setup) -> None:
    setup.unit("a", SLEEPER + 'After = ["b"]\n')
    setup.unit("b", SLEEPER + 'After = ["a"]\n')

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        assert (await manager.service_status("a")).state is ServiceState.BLOCKED
        setup.unit("b", SLEEPER)
        await manager.reload()
        for name in ("a", "b"):
            info = await manager.service_status(name)
            assert (info.state, info.error) == (ServiceState.RUNNING, None)

    setup.run(scenario)


def test_a_broken_edit_keeps_the_running_definition_until_fixed(setup: Setup) -> None:
    setup.unit("web", SLEEPER)

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        pid = (await manager.service_status("web")).pid
        setup.unit("web", 'ExecStart = "sleep 30"\nRestart = "sometimes"\n')
        await manager.reload()
        info = await manager.service_status("web")
        assert (info.state, info.pid) == (ServiceState.RUNNING, pid)
        assert info.error is not None and "Restart: must be one of" in info.error

    setup.run(scenario)


def test_a_broken_unit_is_listed_with_its_error(setup: Setup) -> None:
    setup.unit("bad", "ExecStart = 1\n")

    async def scenario(manager: ServiceManager) -> ServiceInfo:
        await manager.start_all()
        with pytest.raises(Exception, match="its unit is invalid"):
            await manager.start("bad")
        return await manager.service_status("bad")

    info = setup.run(scenario)
    assert info.state is ServiceState.FAILED
    assert (
        info.error is not None and "bad.service: ExecStart: expected a string, got 1" in info.error
    )


# --- processes, environment, users -------------------------------------------------------------


def test_environment_working_directory_and_output(setup: Setup, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    setup.unit(
        "env",
        "ExecStart = \"sh -c 'echo $FROM_ODYN $PORT $(pwd); echo oops >&2'\"\n"
        f'Environment = ["PORT=8080"]\nWorkingDirectory = "{work}"\n',
    )

    async def scenario(manager: ServiceManager) -> list[str]:
        await manager.start_all()
        await settled(manager, "env")
        return await manager.logs("env", 10)

    lines = setup.run(scenario)
    output = [line.split("] ", 1)[1] for line in lines]
    assert f"odyn 8080 {work}" in output
    assert "oops" in output
    assert f"[env] odyn 8080 {work}\n".encode() in setup.app_log
    assert b"[env] oops\n" in setup.app_log


def test_logs_can_be_cleared(setup: Setup) -> None:
    setup.unit("talk", 'ExecStart = "echo hello"\n')

    async def scenario(manager: ServiceManager) -> list[str]:
        await manager.start_all()
        await settled(manager, "talk")
        assert any(line.endswith("] hello") for line in await manager.logs("talk", 50))
        await manager.clear_logs("talk")
        return await manager.logs("talk", 50)

    assert setup.run(scenario) == []


def test_a_missing_working_directory_is_named(setup: Setup) -> None:
    setup.unit("web", SLEEPER + 'WorkingDirectory = "/nonexistent/dir"\n')

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        with pytest.raises(ServiceStartError, match="WorkingDirectory '/nonexistent/dir': No such"):
            await manager.restart("web")

    setup.run(scenario)


def test_what_a_service_leaves_in_its_group_is_killed_and_nothing_stays_a_zombie(
    setup: Setup,
) -> None:
    pidfile = setup.root / "orphan.pid"
    setup.unit("parent", f"ExecStart = \"sh -c 'sleep 30 & echo $! > {pidfile}; exit 0'\"\n")

    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        await settled(manager, "parent")

    setup.run(scenario)
    orphan = int(pidfile.read_text())
    assert _gone(orphan)
    assert _zombie_children() == []


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """Killed: no such process, or a zombie that init (not we) is about to reap."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def _zombie_children() -> list[int]:
    me = os.getpid()
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] == "Z":
            zombies.append(int(entry))
    return zombies


@pytest.mark.root
def test_user_and_group_switch_without_roots_groups(setup: Setup) -> None:
    # nobody (65534) is in the image's /etc/passwd: its primary group and home apply.
    setup.unit(
        "who", "ExecStart = \"sh -c 'echo $(id -u) $(id -g) $(id -G) $HOME'\"\nUser = 65534\n"
    )
    setup.unit("grp", 'ExecStart = "sh -c \'echo $(id -u) $(id -G)\'"\nGroup = "nogroup"\n')
    setup.unit("num", "ExecStart = \"sh -c 'echo $(id -u) $(id -g)'\"\nUser = 4242\n")

    async def scenario(manager: ServiceManager) -> dict[str, list[str]]:
        await manager.start_all()
        output = {}
        for name in ("who", "grp", "num"):
            await settled(manager, name)
            output[name] = [line.split("] ", 1)[1] for line in await manager.logs(name, 10)]
        return output

    output = setup.run(scenario)
    passwd = pwd.getpwuid(65534)
    assert f"65534 {passwd.pw_gid} {passwd.pw_gid} {passwd.pw_dir}" in output["who"]
    assert f"{os.getuid()} 65534" in output["grp"]
    assert "4242 0" in output["num"]  # a uid without passwd entry runs with gid 0, as in Docker


def test_an_unknown_user_is_named(setup: Setup) -> None:
    setup.unit("who", SLEEPER + 'User = "no-such-user-here"\n')

    async def scenario(manager: ServiceManager) -> ServiceInfo:
        await manager.start_all()
        return await manager.service_status("who")

    info = setup.run(scenario)
    assert info.state is ServiceState.FAILED
    assert info.error is not None
    assert "user 'no-such-user-here'" in info.error and "/etc/passwd" in info.error
    assert "who.service" in info.error  # names the unit file to fix


def test_unknown_services_are_named(setup: Setup) -> None:
    async def scenario(manager: ServiceManager) -> None:
        await manager.start_all()
        for call in (manager.service_status, manager.start, manager.stop, manager.disable):
            with pytest.raises(UnknownServiceError, match="service 'ghost' not found"):
                await call("ghost")
        with pytest.raises(UnknownServiceError):
            await manager.logs("ghost", 10)

    setup.run(scenario)
