# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""enclaveops.nitro.service against a real init: odyn's service manager with real processes,
serving its control port as enclave CID 16 on the emulator's fabric; the module is the parent.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.enclaveops.nitro.plugins.modules import service

# The modules need enclave_runtime on the target; these tests need it here.
pytest.importorskip("enclave_runtime")

from enclave_runtime.formats.manifest import Services
from enclave_runtime.init.control_server import ControlServer
from enclave_runtime.init.manager import ServiceManager
from enclave_runtime.process.launcher import ChildReaper

ENCLAVE_CID = 16
SLEEPER = 'ExecStart = "sleep 60"\n'


class ExitJson(Exception):
    """exit_json was called; ``result`` is what the module returned."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result)
        self.result = result


class FailJson(ExitJson):
    """fail_json was called."""


def _exit_json(_module: Any, **result: Any) -> None:
    raise ExitJson(result)


def _fail_json(_module: Any, msg: str, **result: Any) -> None:
    raise FailJson(dict(result, msg=msg, failed=True))


def run_module(module: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``module.main()`` with ``args``; its result, or raise FailJson."""
    exits = mock.patch.multiple(basic.AnsibleModule, exit_json=_exit_json, fail_json=_fail_json)
    with patch_module_args(args), exits:
        try:
            module.main()
        except FailJson:
            raise
        except ExitJson as done:
            return done.result
    raise AssertionError("the module returned without exit_json")


class Enclave:
    """The init of an enclave: unit files, a running service manager, its control server."""

    def __init__(self, fabric_root: Path, root: Path) -> None:
        self.fabric_root = fabric_root
        self.units = root / "services"
        self.logs = root / "logs"
        self.units.mkdir()

    def unit(self, name: str, text: str, suffix: str = ".service") -> None:
        (self.units / f"{name}{suffix}").write_text(text)

    def args(self, **options: Any) -> dict[str, Any]:
        return dict(enclave_cid=ENCLAVE_CID, emulator_root=str(self.fabric_root), **options)

    def run(self, scenario: Callable[[Callable[..., Any], ServiceManager], Any]) -> Any:
        """Run ``scenario(call, manager)``; ``await call(module, args)`` runs the module aside.

        The manager lives on this (main) thread's loop, as in odyn; the module, which blocks,
        runs on a worker thread.
        """

        async def main() -> Any:
            reaper = ChildReaper()
            reaper.install()
            services = Services(directory=str(self.units), log_directory=str(self.logs))
            manager = ServiceManager(services, reaper, base_env={"PATH": os.environ["PATH"]})
            server = ControlServer(manager, unix_socket=None, vsock_port=9001)
            loop = asyncio.get_running_loop()

            async def call(module: Any, args: dict[str, Any]) -> Any:
                return await loop.run_in_executor(None, run_module, module, args)

            try:
                await manager.start_all()
                await server.start()
                return await asyncio.wait_for(scenario(call, manager), 30)
            finally:
                await server.close()
                await manager.stop_all()
                reaper.remove()

        return asyncio.run(main())


@contextmanager
def short_fabric_root() -> Iterator[Path]:
    """A short emulator root: fabric sockets are Unix socket paths (107 bytes at most)."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="svc"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def enclave_on_fabric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Enclave]:
    """An Enclave on a fresh fabric; the control server finds its side from the environment,
    as odyn does."""
    with short_fabric_root() as root:
        monkeypatch.setenv("NITRO_EMU_ROOT", str(root))
        monkeypatch.setenv("NITRO_EMU_CID", str(ENCLAVE_CID))
        yield Enclave(root, tmp_path)


@pytest.fixture
def enclave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Enclave]:
    with enclave_on_fabric(tmp_path, monkeypatch) as running:
        yield running


def fake_nitro_cli(directory: Path, enclaves: list[dict[str, Any]]) -> str:
    """A nitro-cli whose describe-enclaves prints ``enclaves`` (nitro-cli's JSON keys)."""
    script = directory / "nitro-cli"
    script.write_text(f"#!{sys.executable}\nprint({json.dumps(json.dumps(enclaves))})\n")
    script.chmod(0o755)
    return str(script)


def described(name: str, cid: int) -> dict[str, Any]:
    pcr = "ab" * 48
    return {
        "EnclaveName": name,
        "EnclaveID": f"i-0123456789abcdef0-enc{cid:016x}",
        "ProcessID": 1000 + cid,
        "EnclaveCID": cid,
        "NumberOfCPUs": 2,
        "CPUIDs": [1, 3],
        "MemoryMiB": 1024,
        "State": "RUNNING",
        "Flags": "NONE",
        "Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": pcr, "PCR1": pcr, "PCR2": pcr},
    }


def test_a_running_service_is_left_alone(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(call: Callable[..., Any], manager: ServiceManager) -> Any:
        return await call(service, enclave.args(name="web", state="started", enabled=True))

    result = enclave.run(scenario)
    assert result["changed"] is False and result["actions"] == []
    assert result["service"]["state"] == "running" and result["enclave_cid"] == ENCLAVE_CID


def test_stop_changes_once_and_then_not(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(call: Callable[..., Any], manager: ServiceManager) -> Any:
        first = await call(service, enclave.args(name="web", state="stopped"))
        return first, await call(service, enclave.args(name="web", state="stopped"))

    first, second = enclave.run(scenario)
    assert first["changed"] is True and first["actions"] == ["stop"]
    assert first["service"]["state"] == "inactive" and first["service"]["pid"] is None
    assert second["changed"] is False


def test_check_mode_predicts_and_changes_nothing(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(call: Callable[..., Any], manager: ServiceManager) -> Any:
        args = enclave.args(name="web", state="stopped", enabled=False, _ansible_check_mode=True)
        return await call(service, args), await manager.service_status("web")

    result, now = enclave.run(scenario)
    assert result["changed"] is True and result["actions"] == ["disable"]
    assert now.active and now.enabled


def test_enable_and_start_a_disabled_service(enclave: Enclave) -> None:
    enclave.unit("worker", SLEEPER, suffix=".service.disabled")

    async def scenario(call: Callable[..., Any], manager: ServiceManager) -> Any:
        return await call(service, enclave.args(name="worker", state="started", enabled=True))

    result = enclave.run(scenario)
    assert result["changed"] is True and result["actions"] == ["enable", "start"]
    assert result["service"]["enabled"] is True and result["service"]["state"] == "running"


def test_the_enclave_is_found_by_name(enclave: Enclave, tmp_path: Path) -> None:
    enclave.unit("web", SLEEPER)
    nitro_cli = fake_nitro_cli(tmp_path, [described("db", 17), described("hello", ENCLAVE_CID)])
    args = dict(
        enclave_name="hello",
        name="web",
        state="stopped",
        nitro_cli_path=nitro_cli,
        emulator_root=str(enclave.fabric_root),
    )

    async def scenario(call: Callable[..., Any], manager: ServiceManager) -> Any:
        return await call(service, args)

    result = enclave.run(scenario)
    assert result["enclave_cid"] == ENCLAVE_CID and result["actions"] == ["stop"]


def test_an_unknown_enclave_name_fails_with_the_running_ones(tmp_path: Path) -> None:
    nitro_cli = fake_nitro_cli(tmp_path, [described("db", 17)])
    args = dict(enclave_name="hello", name="web", state="started", nitro_cli_path=nitro_cli)
    with pytest.raises(FailJson) as failed:
        run_module(service, args)
    assert failed.value.result["msg"] == (
        "service 'web': no running enclave is named 'hello'; running: db (CID 17). Give "
        "enclave_name as `nitro-cli describe-enclaves` shows EnclaveName, or enclave_cid"
    )


def test_an_unknown_service_fails_with_the_inits_message(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(call: Callable[..., Any], manager: ServiceManager) -> Any:
        return await call(service, enclave.args(name="nope", state="started"))

    with pytest.raises(FailJson) as failed:
        enclave.run(scenario)
    assert failed.value.result["msg"].startswith("service 'nope': service 'nope' not found")
    assert failed.value.result["changed"] is False


def test_a_failed_start_after_enable_reports_the_change(enclave: Enclave) -> None:
    enclave.unit("db", 'ExecStart = "/nonexistent/postgres"\n', suffix=".service.disabled")

    async def scenario(call: Callable[..., Any], manager: ServiceManager) -> Any:
        return await call(service, enclave.args(name="db", state="started", enabled=True))

    with pytest.raises(FailJson) as failed:
        enclave.run(scenario)
    result = failed.value.result
    assert "program '/nonexistent/postgres' not found" in result["msg"]
    assert result["changed"] is True and result["actions"] == ["enable"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            dict(enclave_cid=16, name="web", state="started", enabled=False),
            "service 'web': service 'web': state started with enabled false cannot hold",
        ),
        (dict(name="web", state="started"), "one of the following is required: enclave_cid"),
        (dict(enclave_cid=16, name="web"), "one of the following is required: state, enabled"),
    ],
)
def test_requests_that_cannot_hold_are_refused(args: dict[str, Any], message: str) -> None:
    with pytest.raises(FailJson) as failed:
        run_module(service, args)
    assert message in failed.value.result["msg"]


def test_an_enclave_without_an_init_is_explained() -> None:
    with short_fabric_root() as root, pytest.raises(FailJson) as failed:
        args = dict(enclave_cid=ENCLAVE_CID, emulator_root=str(root), name="web", state="started")
        run_module(service, args)
    assert "cannot reach the init at vsock(16:9001)" in failed.value.result["msg"]
