"""enclaveops.nitro.eif_info: what describe-eif says, read without nitro-cli."""

from __future__ import annotations

from ansible_collections.enclaveops.nitro.plugins.modules import eif_info

from enclave_runtime.formats.eif import build_eif


def test_measurements_size_and_crc_of_a_real_eif(run_module, tmp_path) -> None:
    path = tmp_path / "app.eif"
    measurements = build_eif(b"kernel", "console=ttyS0", [b"bootstrap", b"app"], path)
    result = run_module(eif_info.main, dict(path=str(path)), check_mode=True)
    assert result["changed"] is False
    assert result["measurements"] == measurements.to_nitro_cli()
    assert result["size"] == path.stat().st_size
    assert result["crc_ok"] is True
    assert result["signed"] is False
    assert result["signature_valid"] is None
    assert result["eif_version"] == 4
    assert result["metadata"]["BuildTool"]


def test_a_corrupt_eif_is_reported_and_refused_with_verify(run_module, tmp_path) -> None:
    path = tmp_path / "app.eif"
    build_eif(b"kernel", "console=ttyS0", [b"bootstrap", b"app"], path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    reported = run_module(eif_info.main, dict(path=str(path)))
    assert reported["crc_ok"] is False
    refused = run_module(eif_info.main, dict(path=str(path), verify=True))
    assert refused["failed"]
    assert "CRC mismatch" in refused["msg"]


def test_a_missing_file_names_it(run_module, tmp_path) -> None:
    result = run_module(eif_info.main, dict(path=str(tmp_path / "none.eif")))
    assert result["failed"]
    assert f"cannot open {tmp_path / 'none.eif'}" in result["msg"]
