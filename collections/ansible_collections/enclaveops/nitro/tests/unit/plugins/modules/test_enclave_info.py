"""enclaveops.nitro.enclave_info: the running enclaves, all or by name."""

from __future__ import annotations

from ansible_collections.enclaveops.nitro.plugins.modules import enclave, enclave_info
from ansible_collections.enclaveops.nitro.tests.unit.plugins.modules import fake_nitro_cli

from enclave_runtime.formats.eif import build_eif


def test_lists_all_or_the_one_named(run_module, tmp_path) -> None:
    root = tmp_path / "emu"
    root.mkdir()
    common = dict(nitro_cli_path=str(fake_nitro_cli.install(tmp_path)), emulator_root=str(root))
    eif = tmp_path / "app.eif"
    build_eif(b"kernel", "console=ttyS0", [b"bootstrap", b"app"], eif)
    assert run_module(enclave_info.main, common)["enclaves"] == []
    for name in ("web", "worker"):
        run_module(
            enclave.main, dict(common, name=name, eif_path=str(eif), cpu_count=1, memory_mib=64)
        )
    everything = run_module(enclave_info.main, common, check_mode=True)
    assert everything["changed"] is False
    assert [item["EnclaveName"] for item in everything["enclaves"]] == ["web", "worker"]
    worker = run_module(enclave_info.main, dict(common, name="worker"))["enclaves"]
    assert len(worker) == 1
    assert worker[0]["EnclaveCID"] == 17
    assert worker[0]["Measurements"]["PCR0"]
    assert run_module(enclave_info.main, dict(common, name="none"))["enclaves"] == []
