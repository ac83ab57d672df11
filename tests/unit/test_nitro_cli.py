"""The nitro-cli wrapper: exact argv, strict JSON parsing, and ``[ Exx ]`` errors explained.

Errors come from the real ``nitro-emu`` (the same texts and exit statuses as nitro-cli) where it
raises them before any sandbox is needed; a real enclave run needs root (marked). Output shapes
nitro-emu never prints (missing keys, wrong types, hangs) come from a fake nitro-cli script.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.build.eif_builder import bootstrap_ramdisk, find_blobs
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.allocator_config import AllocatorConfig
from enclave_runtime.formats.cpio import CpioWriter
from enclave_runtime.formats.eif import build_eif
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.host.nitro_cli import (
    EnclaveInfo,
    NitroCli,
    NitroCliCommandError,
    NitroCliNotFoundError,
    NitroCliOutputError,
    NitroCliTimeoutError,
    NitroCliUsageError,
    RunInfo,
    command_error,
)

NITRO_EMU = str(Path(sys.executable).parent / "nitro-emu")
MIB = 1024 * 1024
PCR = "ab" * 48
MEASUREMENTS = {"HashAlgorithm": "Sha384 { ... }", "PCR0": PCR, "PCR1": PCR, "PCR2": PCR}
RUN_INFO = {
    "EnclaveName": "app",
    "EnclaveID": "i-0123456789abcdef0-enc0123456789abcdef",
    "ProcessID": 4242,
    "EnclaveCID": 17,
    "NumberOfCPUs": 2,
    "CPUIDs": [1, 3],
    "MemoryMiB": 512,
}
# nitro-cli's own stderr for a relayed run-enclave failure (document_errors.rs wording, the
# layout of NitroCliFailure's printing, then E39 from the CLI process).
REAL_E26_STDERR = """\
Start allocating memory...
[ E26 ] Insufficient memory requested. User provided `memory` is 64 MB, but based on the EIF \
file size, the minimum memory should be 1240 MB

For more details, please visit https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#E26

If you open a support ticket, please provide the error log found at \
"/var/log/nitro_enclaves/err2024-01-01T00:00:00.000000000+00:00.log"
Failed connections: 1
[ E39 ] Enclave process connection failure. Such error appears when the enclave manager fails \
to connect to at least one enclave process for retrieving the description information.

For more details, please visit https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#E39
"""

FAKE = """\
#!{python}
import json, sys, time
from pathlib import Path
state = Path({state!r})
with open(state / "calls.jsonl", "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
answer = json.loads((state / (sys.argv[1] + ".json")).read_text())
time.sleep(answer.get("sleep", 0))
sys.stdout.write(answer.get("stdout", ""))
sys.stderr.write(answer.get("stderr", ""))
sys.exit(answer.get("rc", 0))
"""


@dataclass
class Fake:
    """A fake nitro-cli whose answer to each command is set by the test."""

    path: Path
    state: Path

    def answer(
        self, command: str, stdout: Any = "", stderr: str = "", rc: int = 0, **extra: Any
    ) -> None:
        text = stdout if isinstance(stdout, str) else json.dumps(stdout, indent=2)
        answer = {"stdout": text, "stderr": stderr, "rc": rc, **extra}
        (self.state / f"{command}.json").write_text(json.dumps(answer))

    def calls(self) -> list[list[str]]:
        lines = (self.state / "calls.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    @property
    def cli(self) -> NitroCli:
        return NitroCli(str(self.path), timeout=10)


@pytest.fixture
def fake(tmp_path) -> Fake:
    state = tmp_path / "state"
    state.mkdir()
    script = tmp_path / "nitro-cli"
    script.write_text(FAKE.format(python=sys.executable, state=str(state)))
    script.chmod(0o755)
    return Fake(script, state)


@pytest.fixture
def emu(tmp_path) -> NitroCli:
    """The real nitro-emu with its own state directory and a 256 MiB, 2-CPU pool."""
    allocator = tmp_path / "allocator.yaml"
    allocator.write_text(AllocatorConfig(memory_mib=256, cpu_count=2).render())
    return NitroCli(
        NITRO_EMU,
        env={"NITRO_EMU_ROOT": str(tmp_path / "emu"), "NITRO_EMU_ALLOCATOR": str(allocator)},
    )


@pytest.fixture(scope="module")
def eif(tmp_path_factory) -> tuple[Path, Measurements]:
    """A 1.5 MiB EIF: nitro-cli wants at least 4 × its size, which it rounds to 8 MB."""
    path = tmp_path_factory.mktemp("eif") / "hello.eif"
    measurements = build_eif(
        b"kernel" * 1000, "console=ttyS0", [b"bootstrap" * 1000, bytes(3 * MIB // 2)], path
    )
    return path, measurements


# --- nitro-cli's errors, from nitro-emu --------------------------------------------------------


def test_too_little_memory_is_e26_with_the_minimum_and_what_to_do(emu, eif) -> None:
    with pytest.raises(NitroCliCommandError) as caught:
        emu.run_enclave(eif[0], 4, cpu_count=1)
    err = caught.value
    assert err.code == "E26", "the relayed cause, not the E39 that follows it"
    assert err.rc == 39
    assert "[ E39 ]" in err.stderr
    assert err.command[1:5] == ["run-enclave", "--eif-path", str(eif[0]), "--memory"]
    message = str(err)
    assert "[ E26 ] Insufficient memory requested" in message
    assert "the minimum memory should be 8 MB" in message
    assert "What to do: give the enclave at least the minimum nitro-cli names" in message
    assert "E39" not in message


def test_more_memory_than_the_pool_is_e27_resize_the_allocator(emu, eif) -> None:
    with pytest.raises(NitroCliCommandError) as caught:
        emu.run_enclave(eif[0], 1024, cpu_count=1)
    assert caught.value.code == "E27"
    assert "raise memory_mib in /etc/nitro_enclaves/allocator.yaml" in str(caught.value)
    assert "resize the allocator" in str(caught.value)


def test_more_cpus_than_the_pool_is_e22(emu, eif) -> None:
    with pytest.raises(NitroCliCommandError) as caught:
        emu.run_enclave(eif[0], 64, cpu_count=8)
    assert caught.value.code == "E22"
    assert "ask for fewer CPUs, or raise cpu_count" in str(caught.value)


def test_a_cpu_outside_the_pool_is_e21(emu, eif) -> None:
    with pytest.raises(NitroCliCommandError) as caught:
        emu.run_enclave(eif[0], 64, cpu_ids=[1, 63])
    assert caught.value.code == "E21"
    assert "cpu_pool" in str(caught.value)


def test_a_file_that_is_no_eif_is_e35(emu, tmp_path) -> None:
    bad = tmp_path / "bad.eif"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(NitroCliCommandError) as caught:
        emu.run_enclave(bad, 64, cpu_count=1)
    assert caught.value.code == "E35"
    assert "rebuild it, or copy it again" in str(caught.value)


def test_unknown_enclaves_are_e11_by_id_and_e58_by_name(emu) -> None:
    with pytest.raises(NitroCliCommandError) as by_id:
        emu.terminate_enclave(enclave_id="i-0123456789abcdef0-enc0123456789abcdef")
    assert (by_id.value.code, by_id.value.rc) == ("E11", 11)
    assert "check the ID with `nitro-cli describe-enclaves`" in str(by_id.value)
    with pytest.raises(NitroCliCommandError) as by_name:
        emu.terminate_enclave(enclave_name="nope")
    assert (by_name.value.code, by_name.value.rc) == ("E58", 58)


def test_nothing_running_is_an_empty_list(emu) -> None:
    assert emu.describe_enclaves() == []


def test_describe_eif_reads_the_measurements_of_the_eif(emu, eif) -> None:
    info = emu.describe_eif(eif[0])
    assert info.measurements == eif[1]
    assert (info.eif_version, info.is_signed, info.check_crc) == (4, False, True)
    assert info.signature_check is None


def test_the_first_error_code_on_stderr_is_the_cause() -> None:
    err = command_error(["nitro-cli", "run-enclave"], 39, "", REAL_E26_STDERR)
    assert err.code == "E26"
    assert str(err) == (
        "`nitro-cli run-enclave` failed with [ E26 ] Insufficient memory requested. User "
        "provided `memory` is 64 MB, but based on the EIF file size, the minimum memory should "
        "be 1240 MB\nWhat to do: give the enclave at least the minimum nitro-cli names (4 × the "
        "EIF file size): raise --memory-mb or defaults.memory_mb in enclaver.yaml, or make the "
        "image smaller"
    )


def test_e44_says_the_console_needs_debug_mode() -> None:
    stderr = "[ E44 ] Enclave console connection failure.\n\nFor more details...\n"
    err = command_error(["nitro-cli", "console", "--enclave-id", "x"], 44, "", stderr)
    assert err.code == "E44"
    assert "only available for an enclave started with --debug-mode" in str(err)


def test_a_failure_without_a_code_shows_the_end_of_stderr(fake) -> None:
    fake.answer("describe-enclaves", stderr="warming up\nnitro-emu: state is corrupt\n", rc=1)
    with pytest.raises(NitroCliCommandError) as caught:
        fake.cli.describe_enclaves()
    assert caught.value.code is None
    assert caught.value.rc == 1
    assert str(caught.value).endswith(
        "failed with exit status 1: warming up\nnitro-emu: state is corrupt"
    )


@given(st.text(max_size=400), st.lists(st.integers(0, 99), max_size=3))
def test_any_stderr_is_explained_by_its_first_code(noise: str, codes: list[int]) -> None:
    blocks = "".join(f"[ E{code:02d} ] sentence {code}\n\nFor more details...\n" for code in codes)
    stderr = noise.replace("[", "(") + "\n" + blocks
    err = command_error(["nitro-cli", "run-enclave"], 39, "", stderr)
    assert err.code == (f"E{codes[0]:02d}" if codes else None)
    assert err.rc == 39
    if codes:
        assert f"[ E{codes[0]:02d} ] sentence {codes[0]}" in str(err)


# --- a missing nitro-cli -----------------------------------------------------------------------


def test_a_nitro_cli_missing_from_path_names_the_option(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NitroCliNotFoundError) as caught:
        NitroCli().describe_enclaves()
    message = str(caught.value)
    assert "'nitro-cli' is not on PATH (/nonexistent)" in message
    assert "--nitro-cli PATH" in message
    assert isinstance(caught.value, EnclaveOpsError)


def test_a_wrong_nitro_cli_path_is_named(tmp_path) -> None:
    with pytest.raises(NitroCliNotFoundError, match="is not an executable file"):
        NitroCli(str(tmp_path / "nitro-cli")).run_enclave("x.eif", 64, cpu_count=1)


# --- strict parsing (fake nitro-cli) -----------------------------------------------------------


def test_run_enclave_passes_documented_flags_and_reads_every_key(fake) -> None:
    fake.answer("run-enclave", RUN_INFO)
    info = fake.cli.run_enclave(
        "/enclave/app.eif",
        512,
        cpu_ids=[1, 3],
        enclave_cid=17,
        debug_mode=True,
        enclave_name="app",
    )
    assert info == RunInfo("app", RUN_INFO["EnclaveID"], 4242, 17, 2, (1, 3), 512)
    assert fake.calls() == [
        [
            "run-enclave",
            "--eif-path",
            "/enclave/app.eif",
            "--memory",
            "512",
            "--cpu-ids",
            "1",
            "3",
            "--enclave-cid",
            "17",
            "--debug-mode",
            "--enclave-name",
            "app",
        ]
    ]


@pytest.mark.parametrize("key", sorted(RUN_INFO))
def test_a_missing_key_is_named(fake, key) -> None:
    fake.answer("run-enclave", {k: v for k, v in RUN_INFO.items() if k != key})
    with pytest.raises(NitroCliOutputError, match=f'the key "{key}" is missing'):
        fake.cli.run_enclave("app.eif", 512, cpu_count=2)


@pytest.mark.parametrize(
    ("key", "value"),
    [("EnclaveCID", "17"), ("ProcessID", True), ("CPUIDs", [1, "3"]), ("EnclaveID", 5)],
)
def test_a_value_of_the_wrong_type_is_refused(fake, key, value) -> None:
    fake.answer("run-enclave", {**RUN_INFO, key: value})
    with pytest.raises(NitroCliOutputError, match=f'"{key}"'):
        fake.cli.run_enclave("app.eif", 512, cpu_count=2)


def test_output_that_is_not_json_is_an_error(fake) -> None:
    fake.answer("describe-enclaves", "Start allocating memory...\n")
    with pytest.raises(NitroCliOutputError, match="printed no valid JSON"):
        fake.cli.describe_enclaves()


def test_describe_enclaves_reads_state_flags_and_measurements(fake) -> None:
    described = {**RUN_INFO, "State": "RUNNING", "Flags": "DEBUG_MODE"}
    older = {k: v for k, v in described.items() if k != "EnclaveName"}
    fake.answer(
        "describe-enclaves",
        [{**described, "Measurements": MEASUREMENTS}, {**older, "Measurements": {}}],
    )
    first, second = fake.cli.describe_enclaves()
    assert isinstance(first, EnclaveInfo)
    assert (first.state, first.flags, first.enclave_name) == ("RUNNING", "DEBUG_MODE", "app")
    assert first.measurements == Measurements.from_nitro_cli(MEASUREMENTS)
    assert second.enclave_name is None, "older nitro-cli versions omit EnclaveName"
    assert second.measurements is None, "an enclave still starting has no measurements yet"


def test_describe_enclaves_needs_state_and_flags(fake) -> None:
    fake.answer("describe-enclaves", [{**RUN_INFO, "Flags": "NONE"}])
    with pytest.raises(NitroCliOutputError, match='"State" is missing'):
        fake.cli.describe_enclaves()


def test_bad_measurements_are_refused(fake) -> None:
    fake.answer("describe-eif", {"EifVersion": 4, "Measurements": {"PCR0": PCR}})
    with pytest.raises(NitroCliOutputError, match=r"Measurements.*PCR1"):
        fake.cli.describe_eif("app.eif")


def test_terminate_reads_the_answer_and_refuses_terminated_false(fake) -> None:
    answer = {"EnclaveName": "app", "EnclaveID": RUN_INFO["EnclaveID"], "Terminated": True}
    fake.answer("terminate-enclave", answer)
    assert fake.cli.terminate_enclave(enclave_name="app").terminated
    assert fake.calls()[-1] == ["terminate-enclave", "--enclave-name", "app"]
    fake.answer("terminate-enclave", {**answer, "Terminated": False})
    with pytest.raises(NitroCliOutputError, match="was not terminated"):
        fake.cli.terminate_enclave(enclave_id=RUN_INFO["EnclaveID"])
    assert fake.calls()[-1] == ["terminate-enclave", "--enclave-id", RUN_INFO["EnclaveID"]]


def test_build_enclave_signs_with_both_files_and_returns_measurements(fake) -> None:
    fake.answer("build-enclave", {"Measurements": {**MEASUREMENTS, "PCR8": "cd" * 48}})
    measurements = fake.cli.build_enclave("app:latest", "app.eif", "cert.pem", "key.pem")
    assert measurements.pcr8 == bytes.fromhex("cd" * 48)
    assert fake.calls() == [
        [
            "build-enclave",
            "--docker-uri",
            "app:latest",
            "--output-file",
            "app.eif",
            "--signing-certificate",
            "cert.pem",
            "--private-key",
            "key.pem",
        ]
    ]


def test_a_hung_command_is_killed_after_the_timeout(fake) -> None:
    fake.answer("describe-enclaves", [], sleep=30)
    cli = NitroCli(str(fake.path), timeout=0.5)
    with pytest.raises(NitroCliTimeoutError, match=r"did not finish within 0\.5 s"):
        cli.describe_enclaves()


def test_the_env_reaches_nitro_cli(tmp_path) -> None:
    script = tmp_path / "env-cli"
    script.write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        "sys.stdout.write('[]' if os.environ.get('NITRO_EMU_ROOT') == '/x' else 'no')\n"
    )
    script.chmod(0o755)
    assert NitroCli(str(script), env={"NITRO_EMU_ROOT": "/x"}).describe_enclaves() == []


def test_arguments_nitro_cli_would_refuse_are_caught_first(fake) -> None:
    with pytest.raises(NitroCliUsageError, match="exactly one of cpu_count or cpu_ids"):
        fake.cli.run_enclave("app.eif", 64, cpu_count=2, cpu_ids=[1])
    with pytest.raises(NitroCliUsageError, match="exactly one of cpu_count or cpu_ids"):
        fake.cli.run_enclave("app.eif", 64)
    with pytest.raises(NitroCliUsageError, match="exactly one of enclave_id or name"):
        fake.cli.terminate_enclave()
    with pytest.raises(NitroCliUsageError, match="both signing_certificate and private_key"):
        fake.cli.build_enclave("app:latest", "app.eif", signing_certificate="cert.pem")
    assert not (fake.state / "calls.jsonl").exists()


def test_console_starts_a_process_whose_stdout_is_the_console(fake) -> None:
    fake.answer("console", "Connecting to the console for enclave 17...\nLinux version 4.14\n")
    process = fake.cli.console(RUN_INFO["EnclaveID"], disconnect_timeout=5)
    out, _ = process.communicate(timeout=10)
    assert b"Linux version 4.14" in out
    assert fake.calls() == [
        ["console", "--enclave-id", RUN_INFO["EnclaveID"], "--disconnect-timeout", "5"]
    ]

    async def read_async() -> bytes:
        process = await fake.cli.open_console(RUN_INFO["EnclaveID"])
        out, _ = await process.communicate()
        return out

    assert b"Linux version 4.14" in asyncio.run(read_async())


# --- a real enclave on nitro-emu (root: namespaces, mounts) ------------------------------------


def _program_closure(programs: list[str]) -> dict[str, Path]:
    """Each program and the shared libraries it loads, by their path inside the rootfs."""
    files: dict[str, Path] = {}
    for program in programs:
        found = shutil.which(program)
        assert found is not None, f"{program} is needed to build the test enclave"
        real = Path(os.path.realpath(found))
        files[f"/bin/{program}"] = real
        linked = subprocess.run(["ldd", str(real)], capture_output=True, text=True, check=False)
        for library in re.findall(r"(/\S+) \(0x", linked.stdout):
            files[library] = Path(os.path.realpath(library))
    return files


def runnable_eif(path: Path) -> None:
    """An EIF whose command prints a line on the console and then sleeps."""
    customer = io.BytesIO()
    directories: set[str] = set()
    with CpioWriter(customer) as writer:
        writer.add_file("cmd", b"/bin/sh\n-c\necho hello from the enclave; exec sleep 600\n")
        writer.add_file("env", b"PATH=/bin:/usr/bin\n")
        writer.add_directory("rootfs")
        for name, source in sorted(_program_closure(["sh", "sleep"]).items()):
            parts = f"rootfs{name}".split("/")
            for depth in range(2, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    writer.add_directory(directory)
            writer.add_file(f"rootfs{name}", source.read_bytes(), mode=0o755)
    blobs = find_blobs()
    build_eif(
        blobs.kernel,
        blobs.read_cmdline(),
        [bootstrap_ramdisk(blobs), customer.getvalue()],
        path,
    )


@pytest.fixture
def short_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="ncli", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.root
@pytest.mark.slow
def test_a_real_enclave_runs_is_described_shows_its_console_and_ends(short_root, tmp_path) -> None:
    eif = tmp_path / "app.eif"
    runnable_eif(eif)
    allocator = tmp_path / "allocator.yaml"
    allocator.write_text(AllocatorConfig(memory_mib=256, cpu_count=2).render())
    cli = NitroCli(
        NITRO_EMU,
        env={"NITRO_EMU_ROOT": str(short_root), "NITRO_EMU_ALLOCATOR": str(allocator)},
    )
    info = cli.run_enclave(eif, 64, cpu_count=1, debug_mode=True, enclave_name="probe")
    try:
        assert (info.enclave_name, info.number_of_cpus, info.memory_mib) == ("probe", 1, 64)
        [described] = cli.describe_enclaves()
        assert described.enclave_id == info.enclave_id
        assert (described.state, described.flags) == ("RUNNING", "DEBUG_MODE")
        assert described.measurements == cli.describe_eif(eif).measurements
        console = cli.console(info.enclave_id, disconnect_timeout=2)
        out, _ = console.communicate(timeout=30)
        assert b"hello from the enclave" in out
    finally:
        terminated = cli.terminate_enclave(enclave_id=info.enclave_id)
    assert terminated.enclave_id == info.enclave_id
    assert cli.describe_enclaves() == []
