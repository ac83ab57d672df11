"""Desired service state from the parent: plans, idempotence, check mode, enclave lookup by name.

The init under test is the real one: odyn's ServiceManager with real processes, behind its
ControlServer on the emulated fabric as enclave CID 16. The parent side (CID 3) talks to it
with the library the ``service`` modules use, from a worker thread, as a module would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.init_errors import ServiceStartError, UnknownServiceError
from enclave_runtime.formats.init_protocol import ServiceInfo, ServiceState
from enclave_runtime.formats.manifest import Services
from enclave_runtime.host.nitro_cli import NitroCli
from enclave_runtime.host.service_state import (
    DesiredService,
    EnclaveNotFoundError,
    ServiceChangeError,
    ServiceRequestError,
    ServiceResult,
    apply_service_state,
    enclave_init_client,
    plan_actions,
    read_services,
    resolve_enclave_cid,
    target_cid,
)
from enclave_runtime.init.control_server import ControlServer
from enclave_runtime.init.manager import ServiceManager
from enclave_runtime.process.launcher import ChildReaper
from tests.unit.odyn_support import ENCLAVE_CID, in_executor, run_async

SLEEPER = 'ExecStart = "sleep 60"\n'
Parent = Callable[..., Any]


class Enclave:
    """An init with unit files in ``root``, serving its control port on the fabric."""

    def __init__(self, fabric_root: Path, root: Path) -> None:
        self.fabric_root = fabric_root
        self.units = root / "services"
        self.logs = root / "logs"
        self.units.mkdir()

    def unit(self, name: str, text: str, suffix: str = ".service") -> None:
        (self.units / f"{name}{suffix}").write_text(text)

    def run(self, scenario: Callable[[ServiceManager, Parent], Any]) -> Any:
        """Run ``scenario(manager, parent)``; ``parent(f, *a)`` runs ``f(client, *a)`` aside."""

        async def main() -> Any:
            reaper = ChildReaper()
            reaper.install()
            services = Services(directory=str(self.units), log_directory=str(self.logs))
            manager = ServiceManager(services, reaper, base_env={"PATH": os.environ["PATH"]})
            server = ControlServer(manager, unix_socket=None, vsock_port=9001)
            client = enclave_init_client(ENCLAVE_CID, emulator_root=str(self.fabric_root))

            async def parent(function: Callable[..., Any], *args: Any) -> Any:
                return await in_executor(function, client, *args)

            try:
                await manager.start_all()
                await server.start()
                return await scenario(manager, parent)
            finally:
                await server.close()
                await manager.stop_all()
                reaper.remove()

        return run_async(main())


@pytest.fixture
def enclave(enclave_fabric_root: Path, tmp_path: Path) -> Enclave:
    return Enclave(enclave_fabric_root, tmp_path)


def desired(name: str, state: str | None = None, enabled: bool | None = None) -> DesiredService:
    return DesiredService(name, state, enabled)


async def apply(parent: Parent, wanted: DesiredService, check_mode: bool = False) -> ServiceResult:
    return await parent(apply_service_state, wanted, check_mode)


# --- against the init ----------------------------------------------------------------------------


def test_a_running_enabled_service_is_left_alone(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(manager: ServiceManager, parent: Parent) -> ServiceResult:
        return await apply(parent, desired("web", "started", True))

    result = enclave.run(scenario)
    assert not result.changed and result.actions == ()
    assert result.after.state is ServiceState.RUNNING and result.after.pid == result.before.pid


def test_stop_then_start_each_change_once(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(manager: ServiceManager, parent: Parent) -> list[ServiceResult]:
        return [
            await apply(parent, desired("web", "stopped")),
            await apply(parent, desired("web", "stopped")),
            await apply(parent, desired("web", "started")),
            await apply(parent, desired("web", "started")),
        ]

    stop, stop_again, start, start_again = enclave.run(scenario)
    assert stop.actions == ("stop",) and stop.after.state is ServiceState.INACTIVE
    assert not stop_again.changed
    assert start.actions == ("start",) and start.after.state is ServiceState.RUNNING
    assert not start_again.changed


def test_check_mode_predicts_the_change_and_makes_none(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(manager: ServiceManager, parent: Parent) -> tuple[ServiceResult, Any]:
        result = await apply(parent, desired("web", "stopped", False), check_mode=True)
        return result, await manager.service_status("web")

    result, now = enclave.run(scenario)
    assert result.changed and result.actions == ("disable",)
    assert now.state is ServiceState.RUNNING and now.enabled
    assert (enclave.units / "web.service").exists()


def test_enabling_a_disabled_service_persists_and_starts_it(enclave: Enclave) -> None:
    enclave.unit("worker", SLEEPER, suffix=".service.disabled")

    async def scenario(manager: ServiceManager, parent: Parent) -> list[ServiceResult]:
        return [
            await apply(parent, desired("worker", "started", True)),
            await apply(parent, desired("worker", "started", True)),
        ]

    first, second = enclave.run(scenario)
    assert first.actions == ("enable", "start")
    assert not first.before.enabled and first.before.state is ServiceState.INACTIVE
    assert first.after.enabled and first.after.state is ServiceState.RUNNING
    assert not second.changed
    assert (enclave.units / "worker.service").exists()


def test_disabling_also_stops_so_no_separate_stop_is_sent(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(manager: ServiceManager, parent: Parent) -> list[ServiceResult]:
        return [
            await apply(parent, desired("web", "stopped", False)),
            await apply(parent, desired("web", "stopped", False)),
        ]

    first, second = enclave.run(scenario)
    assert first.actions == ("disable",)
    assert not first.after.enabled and first.after.state is ServiceState.INACTIVE
    assert (enclave.units / "web.service.disabled").exists()
    assert not second.changed


def test_restarted_always_restarts(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(manager: ServiceManager, parent: Parent) -> ServiceResult:
        return await apply(parent, desired("web", "restarted"))

    result = enclave.run(scenario)
    assert result.actions == ("restart",)
    assert result.after.state is ServiceState.RUNNING and result.after.pid != result.before.pid


def test_a_service_that_cannot_start_fails_with_the_inits_reason(enclave: Enclave) -> None:
    enclave.unit("db", 'ExecStart = "/nonexistent/postgres"\nServiceEnable = true\n')

    async def scenario(manager: ServiceManager, parent: Parent) -> None:
        await apply(parent, desired("db", "started"))

    with pytest.raises(ServiceStartError, match="program '/nonexistent/postgres' not found"):
        enclave.run(scenario)


def test_a_failure_after_a_change_says_what_was_done(enclave: Enclave) -> None:
    enclave.unit("db", 'ExecStart = "/nonexistent/postgres"\n', suffix=".service.disabled")

    async def scenario(manager: ServiceManager, parent: Parent) -> None:
        await apply(parent, desired("db", "started", True))

    with pytest.raises(ServiceChangeError, match=r"not found.*\(already done: enable\)") as caught:
        enclave.run(scenario)
    assert caught.value.sent == ("enable",)
    assert (enclave.units / "db.service").exists()


def test_an_unknown_service_is_named_in_the_error(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(manager: ServiceManager, parent: Parent) -> None:
        await apply(parent, desired("nope", "started"), check_mode=True)

    with pytest.raises(UnknownServiceError, match="service 'nope' not found"):
        enclave.run(scenario)


def test_read_services_lists_all_or_one(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)
    enclave.unit("worker", SLEEPER, suffix=".service.disabled")

    async def scenario(manager: ServiceManager, parent: Parent) -> tuple[Any, Any]:
        return await parent(read_services), await parent(read_services, "worker")

    every, one = enclave.run(scenario)
    assert [(info.name, info.enabled) for info in every] == [("web", True), ("worker", False)]
    assert [info.name for info in one] == ["worker"]


# --- the plan ----------------------------------------------------------------------------------


def info(state: ServiceState, enabled: bool = True) -> ServiceInfo:
    active = state in (ServiceState.RUNNING, ServiceState.STARTING, ServiceState.STOPPING)
    return ServiceInfo("web", enabled, active, state, None, "always", 0, None)


@pytest.mark.parametrize(
    ("state", "wanted", "actions"),
    [
        (ServiceState.EXITED, "started", ("start",)),
        (ServiceState.FAILED, "started", ("start",)),
        (ServiceState.STARTING, "started", ()),
        (ServiceState.RESTARTING, "started", ("start",)),
        (ServiceState.RESTARTING, "stopped", ("stop",)),
        (ServiceState.STOPPING, "stopped", ("stop",)),
        (ServiceState.BLOCKED, "stopped", ()),
        (ServiceState.RUNNING, None, ()),
    ],
)
def test_the_plan_follows_the_inits_states(
    state: ServiceState, wanted: str | None, actions: tuple[str, ...]
) -> None:
    assert plan_actions(info(state), desired("web", wanted)) == actions


@pytest.mark.parametrize(
    ("state", "enabled", "message"),
    [
        ("started", False, "state started with enabled false cannot hold"),
        ("restarted", False, "the init does not start a disabled service"),
        ("running", None, "state is 'running'; use one of started, stopped, restarted"),
    ],
)
def test_a_desired_state_the_init_cannot_reach_is_refused(
    state: str, enabled: bool | None, message: str
) -> None:
    with pytest.raises(ServiceRequestError, match=rf"^service 'web': .*{message}"):
        desired("web", state, enabled)


# --- enclave lookup by name ----------------------------------------------------------------------

PCR = "ab" * 48


def enclave_entry(name: str, cid: int, state: str = "RUNNING") -> dict[str, Any]:
    """A describe-enclaves entry as nitro-cli prints it (json_output.rs EnclaveDescribeInfo)."""
    return {
        "EnclaveName": name,
        "EnclaveID": f"i-0123456789abcdef0-enc{cid:016x}",
        "ProcessID": 1000 + cid,
        "EnclaveCID": cid,
        "NumberOfCPUs": 2,
        "CPUIDs": [1, 3],
        "MemoryMiB": 1024,
        "State": state,
        "Flags": "NONE",
        "Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": PCR, "PCR1": PCR, "PCR2": PCR},
    }


def fake_nitro_cli(tmp_path: Path, enclaves: list[dict[str, Any]]) -> NitroCli:
    script = tmp_path / "nitro-cli"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nassert sys.argv[1:] == ['describe-enclaves']\n"
        f"print({json.dumps(json.dumps(enclaves))})\n"
    )
    script.chmod(0o755)
    return NitroCli(str(script))


def test_the_enclave_is_found_by_name(tmp_path: Path) -> None:
    cli = fake_nitro_cli(
        tmp_path,
        [
            enclave_entry("hello", 16, "TERMINATING"),
            enclave_entry("hello", 17),
            enclave_entry("db", 18),
        ],
    )
    assert resolve_enclave_cid(cli, "hello") == 17


def test_an_absent_name_lists_the_running_enclaves(tmp_path: Path) -> None:
    cli = fake_nitro_cli(tmp_path, [enclave_entry("db", 18)])
    with pytest.raises(
        EnclaveNotFoundError, match=r"no running enclave is named 'hello'; running: db \(CID 18\)"
    ):
        resolve_enclave_cid(cli, "hello")


def test_a_shared_name_asks_for_the_cid(tmp_path: Path) -> None:
    cli = fake_nitro_cli(
        tmp_path, [enclave_entry("application", 16), enclave_entry("application", 17)]
    )
    with pytest.raises(
        EnclaveNotFoundError,
        match=r"2 running enclaves are named 'application' .*CID 16.*CID 17.*give enclave_cid",
    ):
        resolve_enclave_cid(cli, "application")


def test_an_init_that_is_not_there_is_explained(fabric_root: Path) -> None:
    client = enclave_init_client(ENCLAVE_CID, emulator_root=str(fabric_root), timeout=5)
    with pytest.raises(EnclaveOpsError, match=r"cannot reach the init at vsock\(16:9001\)"):
        read_services(client)


def test_a_cid_given_is_used_without_running_nitro_cli(tmp_path: Path) -> None:
    assert target_cid(NitroCli(str(tmp_path / "absent-nitro-cli")), 21, None) == 21
    cli = fake_nitro_cli(tmp_path, [enclave_entry("hello", 17)])
    assert target_cid(cli, None, "hello") == 17
