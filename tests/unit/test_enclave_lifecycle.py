"""Ensuring an enclave by name: left alone, started, replaced, restarted, terminated, waited for.

nitro-cli is the collection's stateful fake (it keeps enclaves in a JSON file and measures real
EIFs with enclave_runtime), so every decision goes through the real NitroCli and its parsing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from enclave_runtime.formats.eif import build_eif
from enclave_runtime.host.enclave_lifecycle import (
    EnclaveBootError,
    EnclaveLifecycleError,
    EnclaveReplacementError,
    EnclaveSpec,
    ensure_enclave,
    find_enclave,
    plan_enclave,
    predicted,
    wait_until_running,
)
from enclave_runtime.host.nitro_cli import NitroCli
from tests.conftest import REPO_ROOT

FAKE_PATH = (
    REPO_ROOT
    / "collections/ansible_collections/enclaveops/nitro/tests/unit/plugins/modules"
    / "fake_nitro_cli.py"
)
_spec = importlib.util.spec_from_file_location("fake_nitro_cli", FAKE_PATH)
assert _spec is not None and _spec.loader is not None
fake_nitro_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_nitro_cli)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "emu"
    directory.mkdir()
    return directory


@pytest.fixture
def cli(tmp_path: Path, state: Path) -> NitroCli:
    return NitroCli(str(fake_nitro_cli.install(tmp_path)), env={"NITRO_EMU_ROOT": str(state)})


@pytest.fixture
def eifs(tmp_path: Path) -> tuple[Path, Path]:
    """Two real EIFs that differ only in their application ramdisk (so in PCR0 and PCR2)."""
    paths = tmp_path / "v1.eif", tmp_path / "v2.eif"
    for version, path in enumerate(paths, start=1):
        build_eif(b"kernel", "console=ttyS0", [b"bootstrap", b"app v%d" % version], path)
    return paths


def spec(eif: Path, **changes: object) -> EnclaveSpec:
    settings: dict = dict(name="app", eif_path=str(eif), cpu_count=2, memory_mib=512)
    settings.update(changes)
    return EnclaveSpec(**settings)


def commands(state: Path) -> list[str]:
    return [call[0] for call in fake_nitro_cli.calls(state)]


def test_an_absent_enclave_is_started_with_its_name_and_resources(cli, state, eifs) -> None:
    result = ensure_enclave(cli, spec(eifs[0], debug_mode=True, enclave_cid=21))
    assert result.changed and not result.replaced
    assert result.enclave is not None
    assert (result.enclave.enclave_name, result.enclave.state) == ("app", "RUNNING")
    assert result.enclave.enclave_cid == 21
    run = next(call for call in fake_nitro_cli.calls(state) if call[0] == "run-enclave")
    assert run[run.index("--memory") + 1] == "512"
    assert run[run.index("--cpu-count") + 1] == "2"
    assert run[run.index("--enclave-name") + 1] == "app"
    assert "--debug-mode" in run


def test_a_matching_enclave_is_left_alone(cli, state, eifs) -> None:
    ensure_enclave(cli, spec(eifs[0]))
    again = ensure_enclave(cli, spec(eifs[0]))
    assert not again.changed
    assert commands(state).count("run-enclave") == 1
    assert "terminate-enclave" not in commands(state)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"memory_mib": 1024}, "memory_mib is 512, wanted 1024"),
        ({"cpu_count": 4}, "cpu_count is 2, wanted 4"),
        ({"debug_mode": True}, "debug_mode is False, wanted True"),
        ({"enclave_cid": 40}, "enclave_cid is 16, wanted 40"),
    ],
)
def test_different_resources_replace_the_enclave(cli, eifs, changes, reason) -> None:
    first = ensure_enclave(cli, spec(eifs[0])).enclave
    result = ensure_enclave(cli, spec(eifs[0], **changes))
    assert result.changed and result.replaced
    assert result.plan.reasons == (reason,)
    assert result.previous == first
    assert result.enclave is not None and result.enclave.enclave_id != first.enclave_id


def test_another_eif_replaces_the_enclave_naming_the_pcrs_that_differ(cli, eifs) -> None:
    ensure_enclave(cli, spec(eifs[0]))
    result = ensure_enclave(cli, spec(eifs[1]))
    assert result.replaced
    assert [reason.split(" ")[0] for reason in result.plan.reasons] == ["PCR0", "PCR2"]
    assert result.enclave is not None and result.enclave.measurements is not None
    assert result.enclave.measurements == cli.describe_eif(eifs[1]).measurements


def test_restarted_always_replaces(cli, eifs) -> None:
    ensure_enclave(cli, spec(eifs[0]))
    result = ensure_enclave(cli, spec(eifs[0]), "restarted")
    assert result.changed and result.replaced
    assert result.plan.action == "restart"


def test_absent_terminates_and_then_does_nothing(cli, state, eifs) -> None:
    ensure_enclave(cli, spec(eifs[0]))
    gone = ensure_enclave(cli, EnclaveSpec(name="app"), "absent")
    assert gone.changed and gone.enclave is None
    assert find_enclave(cli, "app") is None
    assert not ensure_enclave(cli, EnclaveSpec(name="app"), "absent").changed


def test_planning_changes_nothing_and_predicts_the_new_enclave(cli, state, eifs) -> None:
    ensure_enclave(cli, spec(eifs[0]))
    before = commands(state)
    plan = plan_enclave(cli, spec(eifs[0], memory_mib=1024))
    assert plan.changed and plan.replaces
    assert set(commands(state)[len(before) :]) == {"describe-enclaves", "describe-eif"}
    assert find_enclave(cli, "app").memory_mib == 512
    shown = predicted(spec(eifs[0], memory_mib=1024), plan)
    assert shown["MemoryMiB"] == 1024
    assert shown["Measurements"] == cli.describe_eif(eifs[0]).measurements.to_nitro_cli()


def test_starting_needs_the_eif_and_resources(cli) -> None:
    with pytest.raises(EnclaveLifecycleError) as caught:
        ensure_enclave(cli, EnclaveSpec(name="app", cpu_count=2))
    assert "needs eif_path, memory_mib" in str(caught.value)


def test_a_missing_eif_says_to_build_it(cli, tmp_path) -> None:
    with pytest.raises(EnclaveLifecycleError, match="is not a file; build the EIF first"):
        ensure_enclave(cli, spec(tmp_path / "nothing.eif"))


def test_a_failed_replacement_says_the_previous_enclave_is_gone(cli, state, eifs) -> None:
    first = ensure_enclave(cli, spec(eifs[0])).enclave
    (state / "fail-run").write_text("[ E26 ] Insufficient memory requested.\n")
    with pytest.raises(EnclaveReplacementError) as caught:
        ensure_enclave(cli, spec(eifs[0], memory_mib=4))
    message = str(caught.value)
    assert "[ E26 ] Insufficient memory requested." in message
    assert f"The previous enclave {first.enclave_id} was terminated first" in message
    assert caught.value.rc == 26
    assert caught.value.command[1] == "run-enclave"


def test_waiting_ends_with_the_last_state_seen(cli, state, eifs) -> None:
    (state / "boot-state").write_text("BOOTING")
    slept: list[float] = []
    with pytest.raises(EnclaveBootError) as caught:
        ensure_enclave(cli, spec(eifs[0]), wait_timeout=0, sleep=slept.append)
    assert "did not reach RUNNING within 0 s (last state BOOTING)" in str(caught.value)


def test_waiting_returns_once_running(cli, state, eifs) -> None:
    (state / "boot-state").write_text("BOOTING")
    ensure_enclave(cli, spec(eifs[0]), wait=False)
    state_file = state / "fake-state.json"

    def boot(_delay: float) -> None:
        document = json.loads(state_file.read_text())
        document["enclaves"][0]["State"] = "RUNNING"
        state_file.write_text(json.dumps(document))

    assert wait_until_running(cli, "app", 60, sleep=boot).state == "RUNNING"


def test_an_enclave_that_goes_away_while_booting_is_reported(cli, state, eifs) -> None:
    (state / "boot-state").write_text("BOOTING")
    ensure_enclave(cli, spec(eifs[0]), wait=False)
    enclave_id = find_enclave(cli, "app").enclave_id

    with pytest.raises(EnclaveBootError, match="went away while booting"):
        wait_until_running(
            cli, "app", 60, sleep=lambda _delay: cli.terminate_enclave(enclave_id=enclave_id)
        )


def test_two_enclaves_with_one_name_are_refused(cli, state, eifs) -> None:
    ensure_enclave(cli, spec(eifs[0]))
    cli.run_enclave(eifs[0], 512, cpu_count=2, enclave_name="app")
    with pytest.raises(EnclaveLifecycleError, match="2 enclaves are called 'app'"):
        ensure_enclave(cli, spec(eifs[0]))
