"""odyn --init without root: arguments, the PID 1 guards, the heartbeat, the mount plan."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from enclave_runtime.emulator.sandbox import is_raw_init
from enclave_runtime.odyn import cli, raw_init
from enclave_runtime.transport.vsock import ENV_CID, ENV_ROOT
from tests.unit.odyn_support import ENCLAVE_CID, fabric_environment, parent_side, write_manifest


def test_init_option_gives_raw_init_options(tmp_path: Path) -> None:
    options, _verbosity, init = cli.parse_command_line(
        ["--init", "--rootfs", "/rootfs", "--config-dir", str(tmp_path), "--", "app", "--x"]
    )
    assert init == raw_init.InitOptions(rootfs=Path("/rootfs"))
    assert options.argv == ("app", "--x")


def test_without_init_there_are_no_raw_init_options(tmp_path: Path) -> None:
    _options, _verbosity, init = cli.parse_command_line(["--config-dir", str(tmp_path), "--", "a"])
    assert init is None


def test_rootfs_without_init_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_command_line(["--rootfs", "/r", "--config-dir", str(tmp_path), "--", "app"])
    assert exit_info.value.code == 2
    assert "--rootfs is only meaningful with --init" in capsys.readouterr().err


def test_init_refuses_to_run_unless_pid_1(tmp_path: Path) -> None:
    """On a host, odyn --init must not mount anything or start the app: it exits 1 at once."""
    write_manifest(tmp_path)
    marker = tmp_path / "started"
    odyn = [sys.executable, "-m", "enclave_runtime.odyn.cli", "--init"]
    result = subprocess.run(
        [*odyn, "--config-dir", str(tmp_path), "--", "touch", str(marker)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "odyn --init must be the enclave's PID 1" in result.stderr
    assert not marker.exists()


def test_power_off_refuses_unless_pid_1(monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    monkeypatch.setattr(os, "sync", lambda: synced.append(True))
    with pytest.raises(raw_init.RawInitError, match="must be the enclave's PID 1"):
        raw_init.power_off()
    assert not synced


def test_power_off_refuses_under_the_emulator_even_as_pid_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setenv(ENV_ROOT, "/run/nitro-emu")
    monkeypatch.setattr(os, "sync", lambda: pytest.fail("must not sync"))
    with pytest.raises(raw_init.RawInitError, match="under nitro-emu"):
        raw_init.power_off()


def test_finish_under_the_emulator_returns_the_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """PID 1 of the sandbox's namespace exits with the status: the namespace ends, not the host."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setenv(ENV_ROOT, "/run/nitro-emu")
    monkeypatch.setattr(raw_init, "power_off", lambda: pytest.fail("must not power off"))
    assert raw_init.finish(7) == 7


def test_finish_outside_an_enclave_returns_the_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ROOT, raising=False)
    monkeypatch.setattr(raw_init, "power_off", lambda: pytest.fail("must not power off"))
    assert raw_init.finish(3) == 3


def _echo_heartbeat(listener: object, parent: object, answer: bytes, seen: list[bytes]) -> None:
    conn, peer = parent.accept(listener)  # type: ignore[attr-defined]
    with conn:
        seen.append(conn.recv(1))
        seen.append(str(peer.cid).encode())
        conn.sendall(answer)


@pytest.mark.parametrize("answer", [b"\xb7", b"\x00"])
def test_heartbeat_over_the_emulated_fabric(monkeypatch: pytest.MonkeyPatch, answer: bytes) -> None:
    with fabric_environment() as (root, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        parent = parent_side(root)
        listener = parent.listen(raw_init.HEARTBEAT_PORT)
        seen: list[bytes] = []
        thread = threading.Thread(target=_echo_heartbeat, args=(listener, parent, answer, seen))
        thread.start()
        try:
            if answer == raw_init.HEARTBEAT:
                raw_init.send_heartbeat(timeout=10)
            else:
                with pytest.raises(raw_init.RawInitError, match="answered the boot heartbeat"):
                    raw_init.send_heartbeat(timeout=10)
        finally:
            thread.join(10)
            listener.close()
        assert seen == [b"\xb7", str(ENCLAVE_CID).encode()]


def test_heartbeat_without_a_parent_names_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with fabric_environment() as (_root, env):
        monkeypatch.setenv(ENV_ROOT, env[ENV_ROOT])
        monkeypatch.setenv(ENV_CID, env[ENV_CID])
        with pytest.raises(raw_init.RawInitError, match=r"vsock \(3, 9000\)"):
            raw_init.send_heartbeat(timeout=1)


def test_mounts_already_present_are_skipped() -> None:
    present = {"/dev", "/dev/pts", "/dev/shm", "/run"}
    planned = [entry.target for entry in raw_init.mounts_to_make(present.__contains__)]
    assert planned == ["/proc", "/sys", "/tmp"]


def test_everything_is_mounted_on_a_bare_ramdisk_dev_first() -> None:
    planned = [entry.target for entry in raw_init.mounts_to_make(lambda _path: False)]
    assert planned.index("/dev") < planned.index("/dev/pts") < planned.index("/dev/shm")
    assert set(planned) == {"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/run", "/tmp"}


def test_nsm_module_is_never_loaded_under_the_emulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "nsm.ko"
    module.write_bytes(b"\x7fELF")
    monkeypatch.setenv(ENV_ROOT, str(tmp_path))
    monkeypatch.setattr(raw_init, "_finit_module", lambda _module: pytest.fail("must not load"))
    assert not raw_init.load_nsm_module(str(module), str(tmp_path / "no-nsm"))


def test_no_nsm_module_means_nothing_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_ROOT, raising=False)
    monkeypatch.setattr(raw_init, "_finit_module", lambda _module: pytest.fail("must not load"))
    assert not raw_init.load_nsm_module(str(tmp_path / "nsm.ko"), str(tmp_path / "no-nsm"))


def test_nsm_module_without_ctypes_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "nsm.ko"
    module.write_bytes(b"\x7fELF")
    monkeypatch.delenv(ENV_ROOT, raising=False)
    monkeypatch.setattr(raw_init, "_libc", lambda: None)
    with pytest.raises(raw_init.RawInitError, match="no ctypes to call finit_module"):
        raw_init.load_nsm_module(str(module), str(tmp_path / "no-nsm"))


def test_the_emulator_recognises_a_raw_init_layout(tmp_path: Path) -> None:
    init = tmp_path / "init"
    init.write_text("#!/bin/sh\n")
    init.chmod(0o755)
    assert is_raw_init(tmp_path)
    (tmp_path / "cmd").write_text("app\n")
    assert not is_raw_init(tmp_path), "the AWS layout (cmd, env, rootfs/) keeps AWS's path"
    (tmp_path / "cmd").unlink()
    init.chmod(0o644)
    assert not is_raw_init(tmp_path)
