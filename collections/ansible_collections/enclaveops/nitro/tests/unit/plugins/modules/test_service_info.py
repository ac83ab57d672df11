# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""enclaveops.nitro.service_info against a real init on the emulator's fabric (see test_service)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from ansible_collections.enclaveops.nitro.plugins.modules import service_info
from ansible_collections.enclaveops.nitro.tests.unit.plugins.modules.test_service import (
    ENCLAVE_CID,
    SLEEPER,
    Enclave,
    FailJson,
    described,
    enclave_on_fabric,
    fake_nitro_cli,
    run_module,
)


@pytest.fixture
def enclave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Enclave]:
    with enclave_on_fabric(tmp_path, monkeypatch) as running:
        yield running


def test_every_service_is_listed_and_nothing_changes(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)
    enclave.unit("worker", SLEEPER, suffix=".service.disabled")

    async def scenario(call: Callable[..., Any], manager: Any) -> Any:
        return await call(service_info, enclave.args(_ansible_check_mode=True))

    result = enclave.run(scenario)
    assert result["changed"] is False and result["enclave_cid"] == ENCLAVE_CID
    states = [(s["name"], s["enabled"], s["state"]) for s in result["services"]]
    assert states == [("web", True, "running"), ("worker", False, "inactive")]
    assert result["services"][0]["exec_start"] == "sleep 60"


def test_one_service_by_name_in_the_enclave_named(enclave: Enclave, tmp_path: Path) -> None:
    enclave.unit("web", SLEEPER)
    enclave.unit("worker", SLEEPER)
    nitro_cli = fake_nitro_cli(tmp_path, [described("hello", ENCLAVE_CID)])
    args = dict(
        enclave_name="hello",
        name="worker",
        nitro_cli_path=nitro_cli,
        emulator_root=str(enclave.fabric_root),
    )

    async def scenario(call: Callable[..., Any], manager: Any) -> Any:
        return await call(service_info, args)

    result = enclave.run(scenario)
    assert [s["name"] for s in result["services"]] == ["worker"]


def test_an_unknown_service_fails_with_the_inits_message(enclave: Enclave) -> None:
    enclave.unit("web", SLEEPER)

    async def scenario(call: Callable[..., Any], manager: Any) -> Any:
        return await call(service_info, enclave.args(name="nope"))

    with pytest.raises(FailJson) as failed:
        enclave.run(scenario)
    message = failed.value.result["msg"]
    assert message.startswith("cannot read the enclave's services: service 'nope' not found")


def test_an_enclave_is_needed() -> None:
    with pytest.raises(FailJson) as failed:
        run_module(service_info, {})
    assert (
        "one of the following is required: enclave_cid, enclave_name" in failed.value.result["msg"]
    )
