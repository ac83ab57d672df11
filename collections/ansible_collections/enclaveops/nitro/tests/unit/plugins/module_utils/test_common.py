"""module_utils.common: what a missing runtime and a failed nitro-cli look like to the user."""

from __future__ import annotations

import sys

from ansible_collections.enclaveops.nitro.plugins.modules import enclave_info


def test_a_target_without_enclave_runtime_is_told_what_to_install(run_module, monkeypatch) -> None:
    # A None entry makes the import fail as it does on a target without the package.
    monkeypatch.setitem(sys.modules, "enclave_runtime.errors", None)
    result = run_module(enclave_info.main, {})
    assert result["failed"]
    assert result["msg"].startswith(
        "enclave_runtime is required on the target: install enclave-runtime "
        "(the nitro_host role does it)"
    )
    assert sys.executable in result["msg"]


def test_a_failed_command_returns_cmd_rc_stdout_and_stderr(run_module, tmp_path) -> None:
    cli = tmp_path / "nitro-cli"
    cli.write_text(
        "#!/bin/sh\necho partial\necho '[ E39 ] Enclave process connection failure.' >&2\nexit 39\n"
    )
    cli.chmod(0o755)
    result = run_module(enclave_info.main, {"nitro_cli_path": str(cli)})
    assert result["failed"]
    assert result["cmd"] == [str(cli), "describe-enclaves"]
    assert result["rc"] == 39
    assert result["stdout"] == "partial\n"
    assert "[ E39 ]" in result["stderr"]
    assert "What to do: nitro-cli could not reach its enclave process" in result["msg"]


def test_emulator_root_reaches_nitro_emu_as_nitro_emu_root(run_module, tmp_path) -> None:
    cli = tmp_path / "nitro-cli"
    cli.write_text('#!/bin/sh\nprintf \'[]\' > "$NITRO_EMU_ROOT/seen"; echo "[]"\n')
    cli.chmod(0o755)
    result = run_module(
        enclave_info.main, {"nitro_cli_path": str(cli), "emulator_root": str(tmp_path)}
    )
    assert result["enclaves"] == []
    assert (tmp_path / "seen").read_text() == "[]"


def test_the_emulator_pool_under_emulator_root_is_the_one_nitro_emu_reads(
    run_module, tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("NITRO_EMU_ALLOCATOR", raising=False)
    (tmp_path / "allocator.yaml").write_text("---\nmemory_mib: 4096\ncpu_count: 2\n")
    cli = tmp_path / "nitro-cli"
    cli.write_text(
        '#!/bin/sh\nprintf "%s" "$NITRO_EMU_ALLOCATOR" > "$NITRO_EMU_ROOT/seen"\necho "[]"\n'
    )
    cli.chmod(0o755)
    run_module(enclave_info.main, {"nitro_cli_path": str(cli), "emulator_root": str(tmp_path)})
    assert (tmp_path / "seen").read_text() == str(tmp_path / "allocator.yaml")
