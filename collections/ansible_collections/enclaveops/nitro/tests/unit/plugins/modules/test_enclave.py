"""enclaveops.nitro.enclave: started once, left alone, replaced on change, predicted in check mode.

nitro-cli is the stateful fake (fake_nitro_cli), pointed at its state by emulator_root exactly as
nitro-emu is; the EIFs are real.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from ansible_collections.enclaveops.nitro.plugins.modules import enclave
from ansible_collections.enclaveops.nitro.tests.unit.plugins.modules import fake_nitro_cli

from enclave_runtime.formats.eif import build_eif


@pytest.fixture
def common(tmp_path):
    """The options module_defaults would set: the fake nitro-cli and its state directory."""
    root = tmp_path / "emu"
    root.mkdir()
    return dict(nitro_cli_path=str(fake_nitro_cli.install(tmp_path)), emulator_root=str(root))


@pytest.fixture
def eif(tmp_path):
    path = tmp_path / "app.eif"
    build_eif(b"kernel", "console=ttyS0", [b"bootstrap", b"app"], path)
    return str(path)


def app(common, eif, **changes):
    return {**common, "name": "app", "eif_path": eif, "cpu_count": 2, "memory_mib": 512, **changes}


def test_starts_then_leaves_a_matching_enclave_alone(run_module, common, eif) -> None:
    first = run_module(enclave.main, app(common, eif))
    assert first["changed"] is True
    assert first["action"] == "start"
    assert first["enclave"]["EnclaveName"] == "app"
    assert first["enclave"]["State"] == "RUNNING"
    assert first["enclave"]["MemoryMiB"] == 512
    second = run_module(enclave.main, app(common, eif))
    assert second["changed"] is False
    assert second["replaced"] is False
    assert second["enclave"]["EnclaveID"] == first["enclave"]["EnclaveID"]


def test_changing_memory_replaces_and_says_why(run_module, common, eif) -> None:
    first = run_module(enclave.main, app(common, eif))
    result = run_module(enclave.main, app(common, eif, memory_mib=1024), diff=True)
    assert result["changed"] is True
    assert result["replaced"] is True
    assert result["reasons"] == ["memory_mib is 512, wanted 1024"]
    assert result["previous"]["EnclaveID"] == first["enclave"]["EnclaveID"]
    assert result["diff"]["before"]["MemoryMiB"] == 512
    assert result["diff"]["after"]["MemoryMiB"] == 1024


def test_check_mode_predicts_a_replacement_and_runs_nothing(run_module, common, eif) -> None:
    first = run_module(enclave.main, app(common, eif))
    predicted = run_module(enclave.main, app(common, eif, cpu_count=4), check_mode=True)
    assert predicted["changed"] is True
    assert predicted["replaced"] is True
    assert predicted["enclave"]["NumberOfCPUs"] == 4
    now = run_module(enclave.main, app(common, eif))
    assert now["changed"] is False
    assert now["enclave"]["EnclaveID"] == first["enclave"]["EnclaveID"]


def test_absent_terminates_once(run_module, common, eif) -> None:
    run_module(enclave.main, app(common, eif))
    gone = run_module(enclave.main, dict(common, name="app", state="absent"))
    assert gone["changed"] is True
    assert gone["enclave"] is None
    assert run_module(enclave.main, dict(common, name="app", state="absent"))["changed"] is False


def test_running_needs_the_eif_and_resources(run_module, common) -> None:
    result = run_module(enclave.main, dict(common, name="app"))
    assert result["failed"]
    assert "state is running but all of the following are missing" in result["msg"]


def test_a_nitro_cli_failure_returns_the_command_and_its_output(
    run_module, common, eif, tmp_path
) -> None:
    (tmp_path / "emu" / "fail-run").write_text("[ E27 ] Insufficient memory available.\n")
    result = run_module(enclave.main, app(common, eif))
    assert result["failed"]
    assert result["msg"].startswith("enclave app: ")
    assert "[ E27 ] Insufficient memory available." in result["msg"]
    assert "raise memory_mib in /etc/nitro_enclaves/allocator.yaml" in result["msg"]
    assert result["rc"] == 26
    assert result["cmd"][1] == "run-enclave"
    assert "E27" in result["stderr"]


def test_a_missing_nitro_cli_says_how_to_point_at_it(run_module, eif, tmp_path) -> None:
    result = run_module(
        enclave.main,
        dict(name="app", eif_path=eif, cpu_count=2, memory_mib=512, nitro_cli_path="/nope/cli"),
    )
    assert result["failed"]
    assert "nitro_cli_path in Ansible" in result["msg"]


def test_an_eif_with_the_recorded_sha384_runs(run_module, common, eif) -> None:
    recorded = hashlib.sha384(Path(eif).read_bytes()).hexdigest()
    started = run_module(enclave.main, app(common, eif, expected_sha384=recorded.upper()))
    assert (started["failed"], started["changed"]) == (False, True)


def test_another_eif_is_refused_before_anything_is_terminated(run_module, common, eif) -> None:
    first = run_module(enclave.main, app(common, eif))
    recorded = hashlib.sha384(Path(eif).read_bytes()).hexdigest()
    build_eif(b"kernel", "console=ttyS0", [b"bootstrap", b"another app"], Path(eif))
    for check_mode in (True, False):
        refused = run_module(
            enclave.main, app(common, eif, expected_sha384=recorded), check_mode=check_mode
        )
        assert refused["failed"] is True
        assert f"but expected_sha384 is {recorded}" in refused["msg"]
        assert "not the recorded build's EIF" in refused["msg"]
    still = run_module(enclave.main, {**common, "name": "app", "state": "absent"}, check_mode=True)
    assert still["changed"] is True  # the first enclave still runs
    assert first["enclave"]["State"] == "RUNNING"
