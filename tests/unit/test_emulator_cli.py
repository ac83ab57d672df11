"""nitro-emu's command line against nitro-cli's: flags, JSON, stderr lines, [ Exx ] errors, exits.

The enclave launcher is replaced by a fake that starts a sleeping process as the "enclave
process", so these tests need neither root nor namespaces; everything else is real (EIFs built
with the EIF writer, the state directory, the allocator file).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave_runtime.emulator import cli
from enclave_runtime.emulator.launcher import LaunchRequest
from enclave_runtime.emulator.state import (
    STATE_RUNNING,
    EmulatorState,
    EnclaveRecord,
    ResourceRequest,
)
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats import nitro_cli_errors
from enclave_runtime.formats.allocator_config import AllocatorConfig
from enclave_runtime.formats.eif import build_eif, read_eif
from enclave_runtime.formats.eif_signature import certificate_pcr
from enclave_runtime.formats.pcr import Measurements, pcr_of

MIB = 1024 * 1024
HELP = "For more details, please visit https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html"
SUPPORT_LINE = re.compile(
    r'If you open a support ticket, please provide the error log found at "([^"]+)"'
)
E39_TAIL = (
    "Failed connections: 1\n"
    "[ E39 ] Enclave process connection failure. Such error appears when the enclave manager "
    "fails to connect to at least one enclave process for retrieving the description "
    f"information.\n\n{HELP}#E39\n\n"
)


class FakeLauncher:
    """The launcher's interface; each enclave is a sleeping child process."""

    def __init__(self) -> None:
        self.requests: list[LaunchRequest] = []
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.terminated: list[str] = []
        self.cleaned: list[EnclaveRecord] = []
        self.failure: Exception | None = None

    def module(self) -> ModuleType:
        module = ModuleType(cli.LAUNCHER_MODULE)
        module.LaunchRequest = LaunchRequest  # type: ignore[attr-defined]
        module.launch = self.launch  # type: ignore[attr-defined]
        module.terminate = self.terminate  # type: ignore[attr-defined]
        module.console_log_path = self.console_log_path  # type: ignore[attr-defined]
        module.cleanup = self.cleaned.append  # type: ignore[attr-defined]
        return module

    def launch(self, request: LaunchRequest) -> int:
        if self.failure is not None:
            raise self.failure
        self.requests.append(request)
        request.record.run_dir.mkdir(parents=True)
        self.console_log_path(request.root, request.record).write_text("Linux version 4.14\n")
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        self.processes[request.record.enclave_id] = process
        return process.pid

    def terminate(self, root: Path, record: EnclaveRecord) -> None:
        self.end(record.enclave_id)
        self.terminated.append(record.enclave_id)

    def end(self, enclave_id: str) -> None:
        """What happens when the enclave's command exits: the enclave process goes."""
        self.processes[enclave_id].kill()
        self.processes[enclave_id].wait()

    @staticmethod
    def console_log_path(root: Path, record: EnclaveRecord) -> Path:
        return record.run_dir / "console.log"

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait()


@dataclasses.dataclass
class Result:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Emu:
    def __init__(self, root: Path, tmp: Path, launcher: FakeLauncher, capsys) -> None:
        self.root = root
        self.tmp = tmp
        self.launcher = launcher
        self.capsys = capsys
        self.state = EmulatorState(root)

    def __call__(self, *argv: str) -> Result:
        status = cli.main(list(argv))
        captured = self.capsys.readouterr()
        return Result(status, captured.out, captured.err)

    def run(self, eif: Path, *extra: str, memory: str = "64") -> Result:
        return self("run-enclave", "--eif-path", str(eif), "--memory", memory, *extra)

    def config(self, **settings: Any) -> Path:
        path = self.tmp / "config.json"
        path.write_text(json.dumps(settings))
        return path


@pytest.fixture
def launcher(monkeypatch):
    fake = FakeLauncher()
    monkeypatch.setitem(sys.modules, cli.LAUNCHER_MODULE, fake.module())
    yield fake
    fake.stop_all()


@pytest.fixture
def emu(tmp_path, monkeypatch, launcher, capsys) -> Emu:
    allocator = tmp_path / "allocator.yaml"
    allocator.write_text(AllocatorConfig(memory_mib=256, cpu_count=2).render())
    monkeypatch.setenv("NITRO_EMU_ROOT", str(tmp_path / "emu"))
    monkeypatch.setenv("NITRO_EMU_ALLOCATOR", str(allocator))
    for variable in ("NITRO_EMU_BOOT_TIMEOUT", "BACKTRACE", "NITRO_CLI_BLOBS"):
        monkeypatch.delenv(variable, raising=False)
    return Emu(tmp_path / "emu", tmp_path, launcher, capsys)


@pytest.fixture(scope="module")
def eif(tmp_path_factory) -> Path:
    """A 1.5 MiB EIF with metadata: nitro-cli refuses less than 4 × that (E26 says "8 MB")."""
    path = tmp_path_factory.mktemp("eif") / "hello.eif"
    build_eif(
        b"kernel" * 1000,
        "console=ttyS0 reboot=k",
        [b"bootstrap" * 1000, bytes(3 * MIB // 2)],
        path,
        metadata={"team": "demo"},
    )
    return path


def strip_log_lines(text: str) -> str:
    return SUPPORT_LINE.sub("If you open a support ticket...", text)


def run_ok(emu: Emu, eif: Path, *extra: str, memory: str = "64") -> dict[str, Any]:
    result = emu.run(eif, *extra, memory=memory)
    assert result.status == 0, result.err
    return result.json()


# run-enclave


def test_run_enclave_prints_nitro_cli_json_and_progress(emu, eif) -> None:
    result = emu.run(eif, "--cpu-count", "2")

    assert result.status == 0
    info = result.json()
    assert list(info) == [
        "EnclaveName",
        "EnclaveID",
        "ProcessID",
        "EnclaveCID",
        "NumberOfCPUs",
        "CPUIDs",
        "MemoryMiB",
    ]
    assert info["EnclaveName"] == "hello"
    assert re.fullmatch(r"i-[0-9a-f]{17}-enc[0-9a-f]{16}", info["EnclaveID"])
    assert info["ProcessID"] == emu.launcher.processes[info["EnclaveID"]].pid
    assert (info["EnclaveCID"], info["NumberOfCPUs"], info["CPUIDs"]) == (16, 2, [1, 2])
    assert info["MemoryMiB"] == 64
    assert result.out.startswith('{\n  "EnclaveName": "hello",\n  "EnclaveID": ')
    assert result.err == (
        "Start allocating memory...\n"
        "Started enclave with enclave-cid: 16, memory: 64 MiB, cpu-ids: [1, 2]\n"
    )


def test_run_enclave_hands_the_launcher_the_booked_record(emu, eif) -> None:
    info = run_ok(emu, eif, "--cpu-ids", "2", "--debug-mode", "--enclave-name", "api")
    request = emu.launcher.requests[0]

    assert request.root == emu.root
    assert request.image.path == eif
    assert request.debug_mode is True
    assert request.record.enclave_id == info["EnclaveID"]
    assert request.record.cpu_ids == (2,)
    assert request.record.measurements == read_eif(eif).measurements.to_nitro_cli()
    assert request.heartbeat_timeout == 180.0  # nitro-cli: 90 s per 6 GiB of EIF + per 100 GiB


def test_boot_timeout_follows_nitro_cli_or_the_environment(emu, eif, monkeypatch) -> None:
    assert cli.boot_timeout(6 * 1024 * MIB, 1024) == 180.0
    assert cli.boot_timeout(6 * 1024 * MIB + 1, 100 * 1024 + 1) == 360.0

    monkeypatch.setenv("NITRO_EMU_BOOT_TIMEOUT", "2.5")
    run_ok(emu, eif, "--cpu-count", "1")
    assert emu.launcher.requests[0].heartbeat_timeout == 2.5

    monkeypatch.setenv("NITRO_EMU_BOOT_TIMEOUT", "soon")
    result = emu.run(eif, "--cpu-count", "1")
    assert result.status == 1
    assert "NITRO_EMU_BOOT_TIMEOUT='soon' is not a number of seconds" in result.err


@pytest.mark.parametrize(("memory", "mib"), [("100", 100), ("100M", 100), ("1g", 1024), ("63", 64)])
def test_memory_takes_nitro_cli_suffixes_and_whole_huge_pages(
    emu, eif, monkeypatch, memory, mib
) -> None:
    monkeypatch.setenv("NITRO_EMU_ALLOCATOR", str(emu.tmp / "big.yaml"))
    (emu.tmp / "big.yaml").write_text(AllocatorConfig(memory_mib=2048, cpu_count=2).render())

    assert run_ok(emu, eif, "--cpu-count", "1", memory=memory)["MemoryMiB"] == mib


def test_names_default_to_the_eif_and_are_made_unique(emu, eif) -> None:
    names = [run_ok(emu, eif, "--cpu-count", "1")["EnclaveName"] for _ in range(2)]

    assert names == ["hello", "hello_1"]


def test_cid_zero_means_pick_one(emu, eif) -> None:
    result = emu.run(eif, "--cpu-count", "1", "--enclave-cid", "0")

    assert result.json()["EnclaveCID"] == 16
    assert result.err.startswith(
        "The enclave CID will be auto-generated as the provided CID is 0\n"
    )


def test_requested_cid_is_used(emu, eif) -> None:
    assert run_ok(emu, eif, "--cpu-count", "1", "--enclave-cid", "42")["EnclaveCID"] == 42


def test_config_file_takes_nitro_cli_keys(emu, eif) -> None:
    config = emu.config(
        eif_path=str(eif),
        memory_mib=32,
        cpu_ids=[2],
        enclave_cid=77,
        debug_mode=True,
        enclave_name="from-config",
        unknown_key="ignored as serde does",
    )

    info = emu("run-enclave", "--config", str(config)).json()

    assert (info["EnclaveName"], info["EnclaveCID"], info["CPUIDs"]) == ("from-config", 77, [2])
    assert emu.launcher.requests[0].debug_mode is True


def test_emulator_options_work_after_the_subcommand_too(emu, eif, tmp_path) -> None:
    other_root = tmp_path / "other"

    result = emu("describe-enclaves", "--root", str(other_root))
    run_ok(emu, eif, "--cpu-count", "1", "--root", str(other_root))

    assert result.out == "[]\n"
    assert len(EmulatorState(other_root).running()) == 1
    assert emu.state.records() == []


# run-enclave errors: in the enclave process, so relayed and exit 39


def test_e26_memory_below_four_times_the_eif(emu, eif) -> None:
    result = emu.run(eif, "--cpu-count", "1", memory="6")

    assert result.status == 39
    assert strip_log_lines(result.err) == (
        "[ E26 ] Insufficient memory requested. User provided `memory` is 6 MB, but based on the "
        "EIF file size, the minimum memory should be 8 MB\n"
        "Reason: At least 8 MB must be allocated (which is 4 times the EIF file size)\n\n"
        f"{HELP}#E26\n\n"
        "If you open a support ticket...\n"
        f"{E39_TAIL}"
        "If you open a support ticket...\n"
    )
    assert result.out == ""
    assert emu.state.records() == []


def test_error_logs_hold_the_backtrace_like_nitro_cli(emu, eif) -> None:
    result = emu.run(eif, "--cpu-count", "1", memory="6")
    logs = [Path(path) for path in SUPPORT_LINE.findall(result.err)]

    assert len(logs) == 2
    assert all(log.parent == emu.root / "logs" for log in logs)
    assert logs[0].read_text().startswith("  Action: Run Enclave\n  Subactions:\n    At least 8 MB")


def test_backtrace_is_shown_with_backtrace_1(emu, eif, monkeypatch) -> None:
    monkeypatch.setenv("BACKTRACE", "1")

    err = emu.run(eif, "--cpu-count", "1", memory="6").err

    assert f"{HELP}#E26\n\nBacktrace:\n  Action: Run Enclave\n" in err


def test_e27_more_memory_than_the_pool(emu, eif) -> None:
    result = emu.run(eif, "--cpu-count", "1", memory="512")

    assert result.status == 39
    assert result.err.startswith(
        "Start allocating memory...\n"
        "[ E27 ] Insufficient memory available. User provided `memory` is 512 MB, which is more "
        "than the available hugepage memory.\nYou can increase the available memory by editing "
        "the `memory_mib` value from '/etc/nitro_enclaves/allocator.yaml' and then restart the "
        "nitro-enclaves-allocator.service.\nReason: the enclave memory pool has 256 MiB free\n\n"
    )
    assert E39_TAIL in result.err


def test_e27_counts_memory_of_running_enclaves(emu, eif) -> None:
    run_ok(emu, eif, "--cpu-count", "1", memory="200")

    result = emu.run(eif, "--cpu-count", "1", memory="100")

    assert "[ E27 ]" in result.err
    assert "the enclave memory pool has 56 MiB free" in result.err


def test_e22_more_cpus_than_the_pool(emu, eif) -> None:
    result = emu.run(eif, "--cpu-count", "3")

    assert result.status == 39
    assert result.err.startswith(
        "[ E22 ] Insufficient CPUs available in the pool. User provided `cpu-count` is 3, which "
        "is more than the configured CPU pool size.\nYou can increase the CPU pool size by "
        "editing the `cpu_count` value from '/etc/nitro_enclaves/allocator.yaml' and then enable "
        "the nitro-enclaves-allocator.service.\n"
        "Reason: Insufficient CPUs available (requested 3, but maximum is 2)\n\n"
    )


def test_e21_cpu_not_in_the_pool_and_e20_duplicates(emu, eif) -> None:
    outside = emu.run(eif, "--cpu-ids", "1", "5")
    twice = emu.run(eif, "--cpu-ids", "1", "1")

    assert (outside.status, twice.status) == (39, 39)
    assert outside.err.startswith(
        "[ E21 ] No such CPU available in the pool. User provided `cpu-ids` contains CPU 5, "
        "which is not available in the pool.\n"
    )
    assert twice.err.startswith(
        "[ E20 ] Invalid CPU configuration. User provided `cpu-ids` contains same CPU(s) "
        "(CPU(s) 1) multiple times.\n"
    )


def test_e29_cpu_or_cid_already_used(emu, eif) -> None:
    first = run_ok(emu, eif, "--cpu-ids", "1", "--enclave-cid", "20")

    busy_cpu = emu.run(eif, "--cpu-ids", "1")
    busy_cid = emu.run(eif, "--cpu-ids", "2", "--enclave-cid", "20")

    assert busy_cpu.status == busy_cid.status == 39
    assert busy_cpu.err.startswith("Start allocating memory...\n[ E29 ] Ioctl failure.")
    assert f"Reason: The provided vCPU is already used: CPU 1 by enclave {first['EnclaveID']}" in (
        busy_cpu.err
    )
    assert f"Reason: The enclave CID 20 is already used by enclave {first['EnclaveID']}" in (
        busy_cid.err
    )


def test_e29_for_a_well_known_cid_from_a_config_file(emu, eif) -> None:
    config = emu.config(eif_path=str(eif), memory_mib=64, cpu_count=1, enclave_cid=3)

    result = emu("run-enclave", "--config", str(config))

    assert result.status == 39
    assert "[ E29 ]" in result.err
    assert "being a well-known CID or the parent VM CID (3; use 4..4294967294)" in result.err


def test_e35_not_an_eif(emu, tmp_path) -> None:
    bogus = tmp_path / "bogus.eif"
    bogus.write_bytes(b"MZ" + bytes(4096))

    result = emu.run(bogus, "--cpu-count", "1")

    assert result.status == 39
    assert result.err.startswith("Start allocating memory...\n[ E35 ] EIF file parsing error.")
    assert f"\nReason: {bogus}: not an EIF: bytes 0-3 are" in result.err
    assert emu.state.records() == []


def test_e35_crc_mismatch(emu, eif, tmp_path) -> None:
    corrupt = tmp_path / "corrupt.eif"
    data = bytearray(eif.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))

    result = emu.run(corrupt, "--cpu-count", "1")

    assert "[ E35 ]" in result.err
    assert "Reason: CRC mismatch: the header says 0x" in result.err


def test_e19_eif_missing(emu, tmp_path) -> None:
    missing = tmp_path / "missing.eif"

    result = emu.run(missing, "--cpu-count", "1")

    assert result.status == 39
    assert result.err.startswith(
        "[ E19 ] File operation failure. Such error appears when the system fails to perform "
        "the requested file operations, such as opening the EIF file when launching an enclave, "
        "or seeking to a specific offset in the EIF file, or writing to the log file.\n"
        f"File: '{missing}', failing operation: 'Open'.\n"
        "Reason: No such file or directory\n\n"
    )


def test_e36_boot_failure_releases_the_reservation(emu, eif) -> None:
    emu.launcher.failure = nitro_cli_errors.enclave_boot_failure(
        "no heartbeat on vsock(3:9000) within 2.0 s"
    )

    result = emu.run(eif, "--cpu-count", "2", memory="256")

    assert result.status == 39
    assert "Started enclave with enclave-cid: 16, memory: 256 MiB, cpu-ids: [1, 2]\n" in result.err
    assert "[ E36 ] Enclave boot failure." in result.err
    assert "Reason: no heartbeat on vsock(3:9000) within 2.0 s" in result.err
    assert emu.state.records() == []
    emu.launcher.failure = None
    assert run_ok(emu, eif, "--cpu-count", "2", memory="256")["EnclaveCID"] == 16


def test_other_launcher_errors_are_reported_as_boot_failures(emu, eif) -> None:
    emu.launcher.failure = EnclaveOpsError("nitro-emu needs root to create namespaces")

    result = emu.run(eif, "--cpu-count", "1")

    assert result.status == 39
    assert "[ E36 ]" in result.err
    assert "Reason: nitro-emu needs root to create namespaces" in result.err


# run-enclave errors found by the CLI itself: exit with the error's own number


@pytest.mark.parametrize(
    ("flags", "parameter", "value"),
    [
        (["--cpu-count", "two", "--memory", "64"], "cpu-count", "two"),
        (["--cpu-count", "1", "--memory", "64MB"], "memory", "64MB"),
        (["--cpu-count", "1", "--memory", "-5"], "memory", "-5"),
        (["--cpu-ids", "1", "x", "--memory", "64"], "cpu-id", "x"),
        (["--cpu-count", "1", "--memory", "64", "--enclave-cid", "3"], "enclave-cid", "3"),
        (["--cpu-count", "1", "--memory", "64", "--enclave-cid", "2"], "enclave-cid", "2"),
        (["--cpu-count", "4294967296", "--memory", "64"], "cpu-count", "4294967296"),
    ],
)
def test_e03_invalid_values(emu, eif, flags, parameter, value) -> None:
    result = emu("run-enclave", "--eif-path", str(eif), *flags)

    assert result.status == 3
    assert result.err.startswith(
        f"[ E03 ] Invalid argument provided. The parameter `{parameter}` is not a valid integer "
        f"(`{value}`)\nReason: "
    )


def test_e03_for_the_parent_cid_says_why(emu, eif) -> None:
    result = emu.run(eif, "--cpu-count", "1", "--enclave-cid", "3")

    assert "Reason: CID 3 is the CID of the parent VM, not to be used for enclaves" in result.err


@pytest.mark.parametrize(
    ("settings", "status", "start"),
    [
        ({"memory_mib": 64}, 1, "[ E01 ] Missing mandatory argument. User did not provide the"),
        (
            {"memory_mib": 64, "cpu_count": 1, "cpu_ids": [1]},
            2,
            "[ E02 ] Conflicting arguments. User provided both `cpu-count` and `cpu-ids`.",
        ),
        ({"cpu_count": 1}, 17, "[ E17 ] Serde error."),
        ({"memory_mib": "64", "cpu_count": 1}, 17, "[ E17 ] Serde error."),
        ({"memory_mib": 64, "cpu_ids": [1.5]}, 17, "[ E17 ] Serde error."),
        ({"memory_mib": 64, "cpu_count": 1, "debug_mode": "yes"}, 17, "[ E17 ] Serde error."),
    ],
)
def test_config_file_errors(emu, eif, settings, status, start) -> None:
    config = emu.config(eif_path=str(eif), **settings)

    result = emu("run-enclave", "--config", str(config))

    assert (result.status, result.err[: len(start)]) == (status, start)


def test_config_file_that_is_not_json_or_missing(emu, tmp_path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    missing = tmp_path / "missing.json"

    not_json = emu("run-enclave", "--config", str(broken))
    absent = emu("run-enclave", "--config", str(missing))

    assert not_json.status == 17
    assert "Reason: Invalid JSON format for config file" in not_json.err
    assert absent.status == 19
    assert f"File: '{missing}', failing operation: 'Open'." in absent.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpu-count", "1", "--cpu-ids", "1", "--memory", "64"], "cannot be used with"),
        (["--cpu-count", "1"], "required arguments were not provided: --memory"),
        (["--memory", "64"], "--cpu-ids <cpu-ids>...|--cpu-count"),
        (["--config", "c.json", "--memory", "64"], "'--config' cannot be used with '--memory'"),
    ],
)
def test_flags_that_do_not_go_together_exit_2(emu, eif, argv, message) -> None:
    with pytest.raises(SystemExit) as caught:
        emu("run-enclave", "--eif-path", str(eif), *argv)

    assert caught.value.code == 2
    assert message in emu.capsys.readouterr().err


# describe-enclaves, terminate-enclave, console


def test_describe_enclaves_lists_running_enclaves_with_measurements(emu, eif) -> None:
    assert emu("describe-enclaves").out == "[]\n"
    started = run_ok(emu, eif, "--cpu-count", "1", "--debug-mode")

    described = emu("describe-enclaves").json()

    assert len(described) == 1
    assert list(described[0]) == [*started, "State", "Flags", "Measurements"]
    assert {key: described[0][key] for key in started} == started
    assert (described[0]["State"], described[0]["Flags"]) == ("RUNNING", "DEBUG_MODE")
    assert (
        described[0]["Measurements"]
        == emu("describe-eif", "--eif-path", str(eif)).json()["Measurements"]
    )


def test_describe_enclaves_metadata_adds_the_eif_identity(emu, eif) -> None:
    run_ok(emu, eif, "--cpu-count", "1")
    image = read_eif(eif)

    described = emu("describe-enclaves", "--metadata").json()[0]

    assert list(described)[-3:] == ["ImageName", "ImageVersion", "Metadata"]
    assert described["ImageName"] == image.metadata.image_name
    assert described["Metadata"] == image.metadata.describe()
    assert described["Metadata"]["team"] == "demo"


def test_describe_does_not_list_an_enclave_still_booting(emu, eif) -> None:
    pool = AllocatorConfig(memory_mib=256, cpu_count=2)
    emu.state.reserve(
        pool, ResourceRequest(64, cpu_count=1), name="boot", eif_path=eif, debug_mode=False
    )

    assert emu("describe-enclaves").json() == []


def test_a_dead_enclave_process_leaves_nothing_after_the_next_command(emu, eif) -> None:
    info = run_ok(emu, eif, "--cpu-count", "2", memory="256")
    emu.launcher.end(info["EnclaveID"])

    assert emu("describe-enclaves").json() == []
    assert [record.enclave_id for record in emu.launcher.cleaned] == [info["EnclaveID"]]
    assert emu.state.records() == []
    assert run_ok(emu, eif, "--cpu-count", "2", memory="256")["CPUIDs"] == [1, 2]


def test_terminate_by_id(emu, eif) -> None:
    info = run_ok(emu, eif, "--cpu-count", "1", "--enclave-name", "web")

    result = emu("terminate-enclave", "--enclave-id", info["EnclaveID"])

    assert result.status == 0
    assert result.out == (
        f'{{\n  "EnclaveName": "web",\n  "EnclaveID": "{info["EnclaveID"]}",\n'
        '  "Terminated": true\n}\n'
    )
    assert result.err == f"Successfully terminated enclave {info['EnclaveID']}.\n"
    assert emu.launcher.terminated == [info["EnclaveID"]]
    assert emu.state.records() == []


def test_terminate_by_id_needs_only_the_slot_as_nitro_cli(emu, eif) -> None:
    info = run_ok(emu, eif, "--cpu-count", "1")
    slot = info["EnclaveID"].rpartition("-enc")[2]

    assert emu("terminate-enclave", "--enclave-id", f"i-0000000000000000-enc{slot}").status == 0


def test_terminate_by_name_and_all(emu, eif) -> None:
    first = run_ok(emu, eif, "--cpu-count", "1", "--enclave-name", "a")
    second = run_ok(emu, eif, "--cpu-count", "1", "--enclave-name", "b")

    by_name = emu("terminate-enclave", "--enclave-name", "a")
    everything = emu("terminate-enclave", "--all")

    assert by_name.json()["EnclaveID"] == first["EnclaveID"]
    assert everything.json() == [
        {"EnclaveName": "b", "EnclaveID": second["EnclaveID"], "Terminated": True}
    ]
    assert emu("terminate-enclave", "--all").out == "[]\n"


def test_terminate_unknown_id_is_e11_and_unknown_name_e58(emu) -> None:
    by_id = emu("terminate-enclave", "--enclave-id", "i-0123456789abcdef0-enc1234")
    by_name = emu("terminate-enclave", "--enclave-name", "nobody")

    assert by_id.status == 11
    assert by_id.err.startswith("[ E11 ] Socket error.")
    assert "no running enclave has the ID 'i-0123456789abcdef0-enc1234'" in by_id.err
    assert by_name.status == 58
    assert by_name.err.startswith(
        "[ E58 ] Naming error. Such error appears when trying to perform an enclave operation "
        "using the enclave name and the name is invalid.\n"
        "Reason: No enclave matched the given name.\n"
    )


def test_terminate_needs_exactly_one_selector(emu) -> None:
    with pytest.raises(SystemExit) as caught:
        emu("terminate-enclave", "--all", "--enclave-name", "x")
    assert caught.value.code == 2


def test_console_of_a_non_debug_enclave_is_e44(emu, eif) -> None:
    run_ok(emu, eif, "--cpu-count", "1", "--enclave-name", "prod")

    result = emu("console", "--enclave-name", "prod")

    assert result.status == 44
    assert result.err.startswith(
        "[ E44 ] Enclave console connection failure. Such error appears when the Nitro CLI "
        "process fails to establish a connection to a running enclave's console.\n"
        "Reason: The enclave was not started with the debug flag set, include '--debug-mode' in "
        "the run-enclave command\n"
    )


def test_console_prints_until_the_disconnect_timeout(emu, eif) -> None:
    run_ok(emu, eif, "--cpu-count", "1", "--debug-mode", "--enclave-name", "dbg")

    started = time.monotonic()
    result = emu("console", "--enclave-name", "dbg", "--disconnect-timeout", "1")

    assert result.status == 0
    assert 0.9 < time.monotonic() - started < 10
    assert result.out == (
        "Connecting to the console for enclave 16...\n"
        "Successfully connected to the console.\n"
        "Linux version 4.14\n"
    )


def test_console_follows_until_the_enclave_ends(emu, eif) -> None:
    info = run_ok(emu, eif, "--cpu-count", "1", "--debug-mode")
    record = emu.state.get(info["EnclaveID"])
    console = FakeLauncher.console_log_path(emu.root, record)

    def enclave_prints_then_ends() -> None:
        time.sleep(0.3)
        with console.open("a") as stream:
            stream.write("hello from the enclave\n")
        time.sleep(0.3)
        emu.launcher.end(info["EnclaveID"])

    worker = threading.Thread(target=enclave_prints_then_ends)
    worker.start()
    result = emu("console", "--enclave-id", info["EnclaveID"])
    worker.join()

    assert result.status == 0
    assert result.out.endswith("Linux version 4.14\nhello from the enclave\n")


def test_attach_console_runs_then_follows(emu, eif) -> None:
    def end_the_enclave_once_started() -> None:
        deadline = time.monotonic() + 30
        while not emu.launcher.processes and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        emu.launcher.stop_all()

    worker = threading.Thread(target=end_the_enclave_once_started)
    worker.start()
    result = emu.run(eif, "--cpu-count", "1", "--attach-console")
    worker.join()

    assert result.status == 0
    assert emu.launcher.requests[0].debug_mode is True
    json_end = result.out.index("\n}\n") + 3
    assert json.loads(result.out[:json_end])["EnclaveCID"] == 16
    assert result.out[json_end:].startswith("Connecting to the console for enclave 16...\n")


def test_console_bad_timeout_is_e03(emu, eif) -> None:
    run_ok(emu, eif, "--cpu-count", "1", "--debug-mode", "--enclave-name", "dbg")

    result = emu("console", "--enclave-name", "dbg", "--disconnect-timeout", "soon")

    assert result.status == 3


# build-enclave, describe-eif, pcr


def test_describe_eif_is_the_eif_description(emu, eif) -> None:
    result = emu("describe-eif", "--eif-path", str(eif))

    assert result.status == 0
    assert result.json() == read_eif(eif).describe()
    assert list(result.json())[:3] == ["EifVersion", "Measurements", "IsSigned"]


def test_describe_eif_of_a_bad_file_is_e35_exit_35(emu, tmp_path) -> None:
    bogus = tmp_path / "x.eif"
    bogus.write_bytes(b"nope")

    result = emu("describe-eif", "--eif-path", str(bogus))

    assert result.status == 35
    assert result.err.startswith("[ E35 ] EIF file parsing error.")


def test_pcr_of_an_input_file(emu, tmp_path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"measure me" * 10000)

    result = emu("pcr", "--input", str(data))

    assert result.status == 0
    assert result.out == json.dumps({"PCR": pcr_of(data.read_bytes()).hex()}, indent=2) + "\n"


def test_pcr_of_a_signing_certificate_is_pcr8(emu, tmp_path) -> None:
    pem = tmp_path / "cert.pem"
    pem.write_bytes(self_signed_certificate_pem())

    result = emu("pcr", "--signing-certificate", str(pem))

    assert result.json() == {"PCR8": certificate_pcr(pem.read_bytes()).hex()}


def test_pcr_errors(emu, tmp_path) -> None:
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("hello")

    missing = emu("pcr", "--input", str(tmp_path / "missing"))
    bad_certificate = emu("pcr", "--signing-certificate", str(not_pem))

    assert missing.status == 19
    assert missing.err.startswith("[ E19 ] File operation failure.")
    assert bad_certificate.status == 57
    assert bad_certificate.err.startswith("[ E57 ] Hasher error.")


class FakeBuilder:
    def __init__(self, measurements: Measurements, failure: Exception | None = None) -> None:
        self.measurements = measurements
        self.failure = failure
        self.calls: list[dict[str, Any]] = []

    def build(self, **kwargs: Any) -> Measurements:
        self.calls.append(kwargs)
        if self.failure is not None:
            raise self.failure
        return self.measurements


def test_build_enclave_calls_the_native_builder_and_prints_measurements(
    emu, eif, monkeypatch, tmp_path
) -> None:
    builder = FakeBuilder(read_eif(eif).measurements)
    monkeypatch.setattr(cli.eif_builder, "build_from_docker_image", builder.build)
    monkeypatch.setenv("NITRO_CLI_BLOBS", str(tmp_path / "blobs"))

    result = emu(
        "build-enclave",
        "--docker-uri",
        "hello:latest",
        "--output-file",
        "hello.eif",
        "--name",
        "hello",
        "--version",
        "2.0",
        "--metadata",
        "meta.json",
    )

    assert result.status == 0
    assert (
        result.err == "Start building the Enclave Image...\nEnclave Image successfully created.\n"
    )
    assert result.json() == {"Measurements": read_eif(eif).measurements.to_nitro_cli()}
    assert builder.calls == [
        {
            "docker_uri": "hello:latest",
            "output_path": Path("hello.eif"),
            "blobs_dir": tmp_path / "blobs",
            "signing_certificate": None,
            "private_key": None,
            "image_name": "hello",
            "image_version": "2.0",
            "metadata_path": Path("meta.json"),
        }
    ]


def test_builder_nitro_cli_errors_pass_through(emu, eif, monkeypatch) -> None:
    failure = nitro_cli_errors.docker_image_pull_error("pull access denied for nope")
    builder = FakeBuilder(read_eif(eif).measurements, failure)
    monkeypatch.setattr(cli.eif_builder, "build_from_docker_image", builder.build)

    result = emu("build-enclave", "--docker-uri", "nope", "--output-file", "x.eif")

    assert result.status == 50
    assert result.err.startswith("Start building the Enclave Image...\n[ E50 ] Docker image pull")


def test_build_enclave_failures_are_e48(emu, eif, monkeypatch) -> None:
    builder = FakeBuilder(read_eif(eif).measurements, EnclaveOpsError("no such image"))
    monkeypatch.setattr(cli.eif_builder, "build_from_docker_image", builder.build)

    result = emu("build-enclave", "--docker-uri", "nope", "--output-file", "x.eif")

    assert result.status == 48
    assert "[ E48 ] EIF building error." in result.err
    assert "Reason: no such image" in result.err


def test_build_enclave_signing_needs_both_files(emu) -> None:
    with pytest.raises(SystemExit) as caught:
        emu("build-enclave", "--docker-uri", "x", "--output-file", "o", "--private-key", "k")

    assert caught.value.code == 2
    assert "the argument '--private-key' requires '--signing-certificate'" in (
        emu.capsys.readouterr().err
    )


# the allocator file and the error texts themselves


def test_a_missing_default_allocator_file_gives_the_default_pool(tmp_path) -> None:
    context = cli.Context(
        root=tmp_path,
        allocator_path=tmp_path / "absent.yaml",
        allocator_is_explicit=False,
        blobs=tmp_path,
    )

    assert context.pool() == cli.DEFAULT_POOL == AllocatorConfig(memory_mib=2048, cpu_count=2)


def test_an_explicit_allocator_file_must_exist(emu, eif, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NITRO_EMU_ALLOCATOR", str(tmp_path / "absent.yaml"))

    result = emu.run(eif, "--cpu-count", "1")

    assert result.status == 1
    assert result.err.startswith("nitro-emu: cannot read ")


def test_a_bad_allocator_file_is_reported(emu, eif, tmp_path, monkeypatch) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory_mib: 512\ncpu_count: 2\n")
    monkeypatch.setenv("NITRO_EMU_ALLOCATOR", str(bad))

    result = emu.run(eif, "--cpu-count", "1")

    assert result.status == 1
    assert f"nitro-emu: {bad}: add a line '---'" in result.err


def test_render_without_a_log_dir_has_no_support_ticket_line() -> None:
    error = nitro_cli_errors.insufficient_cpus(4, 2)

    assert error.code == "E22"
    assert error.exit_status == 22
    assert error.render().endswith(f"\n\n{HELP}#E22")
    relayed = error.relayed_by_enclave_process()
    assert relayed.exit_status == 39
    assert relayed.render().endswith(E39_TAIL.rstrip("\n"))


def test_error_log_is_skipped_when_it_cannot_be_written(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    text = nitro_cli_errors.socket_error("x").render(log_dir=blocker / "logs")

    assert "support ticket" not in text


def test_an_unusable_state_directory_is_a_plain_error(emu, eif, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    listing = emu("--root", str(blocker / "emu"), "terminate-enclave", "--all")
    run = emu.run(eif, "--cpu-count", "1", "--root", str(blocker / "emu"))

    assert (listing.status, listing.out) == (0, "[]\n")  # nothing to do, nothing created
    assert run.status == 1
    assert run.err.startswith(
        "Start allocating memory...\nnitro-emu: cannot use the emulator state directory "
    )


def test_version(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("nitro-emu ")


def self_signed_certificate_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signer")])
    now = time.time()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime.fromtimestamp(now - 60, datetime.timezone.utc))
        .not_valid_after(datetime.datetime.fromtimestamp(now + 3600, datetime.timezone.utc))
        .sign(key, hashes.SHA384())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_records_are_running_after_run(emu, eif) -> None:
    info = run_ok(emu, eif, "--cpu-count", "1")

    assert emu.state.get(info["EnclaveID"]).state == STATE_RUNNING
