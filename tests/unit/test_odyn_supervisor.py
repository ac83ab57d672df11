"""odyn as a whole: start order, fatal errors, the application's end, signals, and the CLI.

The in-process tests run the supervisor in the test's own event loop (it must own the main
thread for its signal handlers); the CLI tests run ``python -m enclave_runtime.odyn.cli`` as
the enclave would, with the test as the parent on the emulated fabric.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.emulator.ca import EmulatorCA
from enclave_runtime.emulator.nsm_device import NsmDevice, NsmServer, boot_pcrs
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.formats.protocol import (
    AppStatus,
    StatusExited,
    StatusFatal,
    StatusRunning,
    StatusSignaled,
)
from enclave_runtime.formats.vsock_ports import APP_LOG_PORT, STATUS_PORT
from enclave_runtime.odyn.bootstrap import seed_kernel_rng
from enclave_runtime.odyn.cli import parse_args
from enclave_runtime.odyn.supervisor import Supervisor, SupervisorOptions
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.unit.odyn_support import (
    PYTHON,
    connect_when_listening,
    eventually,
    fabric_environment,
    odyn_command,
    odyn_environment,
    parent_side,
    read_status,
    read_until,
    write_manifest,
)

TERMINAL = (StatusExited, StatusSignaled, StatusFatal)


@pytest.fixture
def parent(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedFabric]:
    """This process is enclave CID 16 for the supervisor; the returned fabric is the parent."""
    with fabric_environment() as (root, env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield parent_side(root)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write_manifest(tmp_path / "config")
    return tmp_path / "config"


def _options(config_dir: Path, argv: list[str], **changes: Any) -> SupervisorOptions:
    settings: dict[str, Any] = {"bootstrap": False, "env": dict(os.environ), "linger": 10.0}
    settings.update(changes)
    return SupervisorOptions(config_dir=config_dir, argv=tuple(argv), **settings)


async def _statuses(reader: asyncio.StreamReader) -> list[AppStatus]:
    """Status lines until a final one."""
    seen = [await read_status(reader)]
    while not isinstance(seen[-1], TERMINAL):
        seen.append(await read_status(reader))
    return seen


def _gate(tmp_path: Path) -> Path:
    """A FIFO the application blocks on until the test lets it go on."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    return fifo


async def _open_gate(fifo: Path) -> None:
    await asyncio.get_running_loop().run_in_executor(None, fifo.write_text, "go\n")


# --- in process --------------------------------------------------------------------------------


def test_running_then_exited_with_the_code_and_the_log(
    parent: EmulatedFabric, config_dir: Path, tmp_path: Path
) -> None:
    gate = _gate(tmp_path)
    argv = ["sh", "-c", f"read go < {gate}; echo hello from the app; exit 3"]

    async def scenario() -> tuple[int, list[AppStatus], bytes]:
        supervisor = asyncio.ensure_future(Supervisor(_options(config_dir, argv)).run())
        log_reader, log_writer = await connect_when_listening(parent, APP_LOG_PORT)
        status_reader, status_writer = await connect_when_listening(parent, STATUS_PORT)
        first = await read_status(status_reader)
        await _open_gate(gate)
        rest = await _statuses(status_reader)
        log = await read_until(log_reader, b"hello from the app\n")
        code = await asyncio.wait_for(supervisor, 20)
        log_writer.close()
        status_writer.close()
        return code, [first, *rest], log

    code, statuses, log = asyncio.run(scenario())
    assert code == 3
    assert statuses == [StatusRunning(), StatusExited(3)]
    assert log.endswith(b"hello from the app\n")


def test_an_invalid_manifest_is_fatal_and_the_application_never_starts(
    parent: EmulatedFabric, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    write_manifest(config, "ingress:\n  - listen_port: 17001\nunknown_key: 1\n")
    marker = tmp_path / "app-ran"

    async def scenario() -> tuple[int, list[AppStatus]]:
        supervisor = asyncio.ensure_future(
            Supervisor(_options(config, ["touch", str(marker)])).run()
        )
        reader, writer = await connect_when_listening(parent, STATUS_PORT)
        statuses = await _statuses(reader)
        code = await asyncio.wait_for(supervisor, 20)
        writer.close()
        return code, statuses

    code, statuses = asyncio.run(scenario())
    assert code == 1
    assert len(statuses) == 1 and isinstance(statuses[0], StatusFatal)
    error = statuses[0].error
    assert "ingress[0].listen_port" in error and "reserved app log port" in error
    assert "unknown_key" in error
    assert not marker.exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["no-such-application"], "'no-such-application': not found"),
        (["true"], "enclaver.yaml"),  # with the manifest missing
    ],
)
def test_failures_before_the_launch_are_published_as_fatal(
    parent: EmulatedFabric, tmp_path: Path, argv: list[str], expected: str
) -> None:
    config = tmp_path / "config"
    if argv != ["true"]:
        write_manifest(config)

    async def scenario() -> tuple[int, AppStatus]:
        supervisor = asyncio.ensure_future(Supervisor(_options(config, argv)).run())
        reader, writer = await connect_when_listening(parent, STATUS_PORT)
        status = await read_status(reader)
        code = await asyncio.wait_for(supervisor, 20)
        writer.close()
        return code, status

    code, status = asyncio.run(scenario())
    assert code == 1
    assert isinstance(status, StatusFatal) and expected in status.error


def test_the_log_backlog_has_the_manifests_size(parent: EmulatedFabric, tmp_path: Path) -> None:
    config = tmp_path / "config"
    write_manifest(config, "runtime:\n  log_buffer_size: 1024\n")
    gate = _gate(tmp_path)
    program = (
        "for n in range(600): print('line %04d' % n)\n"
        f"print('END', flush=True)\nopen({str(gate)!r}).read()"
    )
    total = 600 * 10 + 4

    async def scenario() -> tuple[bytes, list[AppStatus]]:
        supervisor = Supervisor(_options(config, [PYTHON, "-c", program]))
        running = asyncio.ensure_future(supervisor.run())
        status_reader, status_writer = await connect_when_listening(parent, STATUS_PORT)
        assert await read_status(status_reader) == StatusRunning()
        assert supervisor.console is not None
        console = supervisor.console
        await eventually(lambda: console.ring.end == total)
        log_reader, log_writer = await connect_when_listening(parent, APP_LOG_PORT)
        backlog = await read_until(log_reader, b"END\n")
        await _open_gate(gate)
        statuses = await _statuses(status_reader)
        await asyncio.wait_for(running, 20)
        log_writer.close()
        status_writer.close()
        return backlog, statuses

    backlog, statuses = asyncio.run(scenario())
    assert len(backlog) == 1024
    assert backlog.endswith(b"line 0599\nEND\n")
    assert statuses == [StatusExited(0)]


def test_sigterm_to_odyn_reaches_the_application(parent: EmulatedFabric, config_dir: Path) -> None:
    program = "import time\nprint('ready', flush=True)\ntime.sleep(60)"

    async def scenario() -> tuple[int, list[AppStatus]]:
        supervisor = asyncio.ensure_future(
            Supervisor(_options(config_dir, [PYTHON, "-c", program])).run()
        )
        log_reader, log_writer = await connect_when_listening(parent, APP_LOG_PORT)
        status_reader, status_writer = await connect_when_listening(parent, STATUS_PORT)
        assert await read_status(status_reader) == StatusRunning()
        await read_until(log_reader, b"ready\n")
        os.kill(os.getpid(), signal.SIGTERM)  # odyn's handler is installed in this process
        statuses = await _statuses(status_reader)
        code = await asyncio.wait_for(supervisor, 20)
        log_writer.close()
        status_writer.close()
        return code, statuses

    code, statuses = asyncio.run(scenario())
    assert statuses == [StatusSignaled(15, "SIGTERM")]
    assert code == 128 + 15


# --- the services' contract (egress, API, ingress are other modules) ---------------------------

SERVICES_MANIFEST = """
egress:
  allow: ["example.com", "169.254.169.254", "kms.*.amazonaws.com"]
kms_proxy:
  listen_port: 9200
api:
  listen_port: 9100
ingress:
  - listen_port: 8080
"""


class _Service:
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events

    def env(self) -> dict[str, str]:
        if self.name == "kms_proxy":
            return {"AWS_KMS_ENDPOINT": "http://127.0.0.1:9200"}
        return {"http_proxy": "http://127.0.0.1:10000"}

    async def close(self) -> None:
        self.events.append(f"close {self.name}")


def _fake_services(
    monkeypatch: pytest.MonkeyPatch, events: list[str], app_output: Path, failing: str = ""
) -> None:
    def starter(name: str) -> Any:
        async def start(*args: Any) -> _Service:
            events.append(f"start {name} {type(args[0]).__name__} app-ran={app_output.exists()}")
            if name == failing:
                raise OSError(98, f"cannot listen for {name}: address in use")
            return _Service(name, events)

        return start

    functions = {
        "egress": "start_egress_proxy",
        "kms_proxy": "start_from_manifest",
        "api": "start_api",
        "ingress": "start_ingress",
    }
    for module, function in functions.items():
        fake = types.ModuleType(f"enclave_runtime.odyn.{module}")
        setattr(fake, function, starter(module))
        monkeypatch.setitem(sys.modules, f"enclave_runtime.odyn.{module}", fake)


def _run_to_end(options: SupervisorOptions, parent: EmulatedFabric) -> tuple[int, list[AppStatus]]:
    async def scenario() -> tuple[int, list[AppStatus]]:
        supervisor = asyncio.ensure_future(Supervisor(options).run())
        reader, writer = await connect_when_listening(parent, STATUS_PORT)
        statuses = await _statuses(reader)
        code = await asyncio.wait_for(supervisor, 20)
        writer.close()
        return code, statuses

    return asyncio.run(scenario())


def test_services_start_in_order_before_the_app_and_close_in_reverse(
    parent: EmulatedFabric, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    write_manifest(config, SERVICES_MANIFEST)
    events: list[str] = []
    output = tmp_path / "proxy"
    _fake_services(monkeypatch, events, output)
    argv = ["sh", "-c", f'printf "%s %s" "$http_proxy" "$AWS_KMS_ENDPOINT" > {output}']
    code, statuses = _run_to_end(_options(config, argv), parent)
    assert (code, statuses[-1]) == (0, StatusExited(0))
    assert events == [
        "start egress Egress app-ran=False",
        "start kms_proxy KmsProxy app-ran=False",
        "start api Api app-ran=False",
        "start ingress tuple app-ran=False",
        "close ingress",
        "close api",
        "close kms_proxy",
        "close egress",
    ]
    assert output.read_text() == "http://127.0.0.1:10000 http://127.0.0.1:9200"


def test_a_service_that_fails_is_fatal_and_the_started_ones_are_closed(
    parent: EmulatedFabric, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    write_manifest(config, SERVICES_MANIFEST)
    events: list[str] = []
    marker = tmp_path / "app-ran"
    _fake_services(monkeypatch, events, marker, failing="ingress")
    code, statuses = _run_to_end(_options(config, ["touch", str(marker)]), parent)
    assert code == 1
    assert statuses == [StatusFatal("[Errno 98] cannot listen for ingress: address in use")]
    assert events[-3:] == ["close api", "close kms_proxy", "close egress"]
    assert not marker.exists()


def test_service_modules_are_imported_only_when_configured(
    parent: EmulatedFabric, monkeypatch: pytest.MonkeyPatch, config_dir: Path, tmp_path: Path
) -> None:
    for module in ("egress", "api", "ingress"):
        monkeypatch.setitem(sys.modules, f"enclave_runtime.odyn.{module}", None)  # unimportable
    code, statuses = _run_to_end(_options(config_dir, ["true"]), parent)
    assert (code, statuses[-1]) == (0, StatusExited(0))

    config = tmp_path / "with-egress"
    write_manifest(config, 'egress:\n  allow: ["example.com"]\n')
    code, statuses = _run_to_end(_options(config, ["true"]), parent)
    assert code == 1
    assert isinstance(statuses[0], StatusFatal)
    assert "configures egress, but this odyn cannot load enclave_runtime.odyn.egress" in (
        statuses[0].error
    )


# --- bootstrap ---------------------------------------------------------------------------------


@pytest.fixture
def emulated_nsm(tmp_path: Path) -> Iterator[Path]:
    measurements = Measurements(*(hashlib.sha384(name).digest() for name in (b"0", b"1", b"2")))
    device = NsmDevice(
        "i-0123456789abcdef0-enc0",
        boot_pcrs(measurements, "i-0", False),
        EmulatorCA(tmp_path / "ca"),
    )
    server = NsmServer(device, tmp_path / "nsm.sock").start()
    try:
        yield tmp_path / "nsm.sock"
    finally:
        server.close()


def test_the_kernel_rng_is_seeded_with_the_nsms_random_bytes(
    emulated_nsm: Path, tmp_path: Path
) -> None:
    sink = tmp_path / "random"
    sink.touch()
    written = seed_kernel_rng(str(emulated_nsm), str(sink))
    assert written == len(sink.read_bytes()) >= 32
    assert sink.read_bytes() != bytes(written)


def test_a_missing_nsm_is_a_fatal_bootstrap_error(
    parent: EmulatedFabric, config_dir: Path, tmp_path: Path
) -> None:
    options = _options(config_dir, ["true"], bootstrap=True, nsm_path=str(tmp_path / "no-nsm"))
    code, statuses = _run_to_end(options, parent)
    assert code == 1
    assert isinstance(statuses[0], StatusFatal)
    # Without root the loopback step fails first; with root the NSM is found missing.
    assert "interface up" in statuses[0].error or "cannot seed the kernel RNG" in statuses[0].error


@pytest.mark.root
def test_bootstrap_with_the_emulated_nsm_then_the_application_runs(
    parent: EmulatedFabric, config_dir: Path, emulated_nsm: Path
) -> None:
    options = _options(config_dir, ["true"], bootstrap=True, nsm_path=str(emulated_nsm))
    code, statuses = _run_to_end(options, parent)
    assert (code, statuses[-1]) == (0, StatusExited(0))


# --- the command line --------------------------------------------------------------------------


def test_the_command_line_takes_the_application_after_the_separator() -> None:
    options, verbosity = parse_args(
        [
            "--config-dir",
            "/etc/enclaver",
            "-vv",
            "--user",
            "app",
            "--workdir",
            "/srv",
            "--",
            "/app",
            "--config-dir",
            "--",
            "x",
        ]
    )
    assert options.argv == ("/app", "--config-dir", "--", "x")
    assert (options.user, options.workdir, verbosity) == ("app", "/srv", 2)
    assert options.bootstrap and options.console and options.capture_own_stdio


def test_the_command_line_refuses_a_missing_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config-dir", "/etc/enclaver"])
    assert exit_info.value.code == 2
    assert "give the application's command after --" in capsys.readouterr().err


@pytest.fixture
def fabric() -> Iterator[tuple[EmulatedFabric, dict[str, str]]]:
    with fabric_environment() as (root, env):
        yield parent_side(root), odyn_environment(env)


def test_odyn_end_to_end_with_its_own_output_in_the_log(
    fabric: tuple[EmulatedFabric, dict[str, str]], config_dir: Path
) -> None:
    parent, env = fabric
    command = odyn_command(config_dir, "--no-bootstrap", "--", "sh", "-c", "echo hello; exit 5")

    async def scenario() -> tuple[int, list[AppStatus], bytes]:
        odyn = subprocess.Popen(command, env=env)
        try:
            log_reader, log_writer = await connect_when_listening(parent, APP_LOG_PORT)
            status_reader, status_writer = await connect_when_listening(parent, STATUS_PORT)
            statuses = await _statuses(status_reader)
            log = await read_until(log_reader, b"exited with code 5\n")
            code = await asyncio.get_running_loop().run_in_executor(None, odyn.wait, 20)
            log_writer.close()
            status_writer.close()
            return code, statuses, log
        finally:
            odyn.kill()

    code, statuses, log = asyncio.run(scenario())
    assert code == 5
    assert statuses[-1] == StatusExited(5)
    assert log.splitlines() == [
        b"[odyn] INFO starting the application ['sh', '-c', 'echo hello; exit 5']",
        b"hello",
        b"[odyn] INFO the application exited with code 5",
    ]


def test_sigterm_to_the_odyn_process_is_forwarded(
    fabric: tuple[EmulatedFabric, dict[str, str]], config_dir: Path
) -> None:
    parent, env = fabric
    program = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('got TERM', flush=True), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    command = odyn_command(config_dir, "--no-bootstrap", "--", PYTHON, "-c", program)

    async def scenario() -> tuple[int, list[AppStatus], bytes]:
        odyn = subprocess.Popen(command, env=env)
        try:
            log_reader, log_writer = await connect_when_listening(parent, APP_LOG_PORT)
            status_reader, status_writer = await connect_when_listening(parent, STATUS_PORT)
            await read_until(log_reader, b"ready\n")
            odyn.send_signal(signal.SIGTERM)
            statuses = await _statuses(status_reader)
            log = await read_until(log_reader, b"got TERM\n")
            code = await asyncio.get_running_loop().run_in_executor(None, odyn.wait, 20)
            log_writer.close()
            status_writer.close()
            return code, statuses, log
        finally:
            odyn.kill()

    code, statuses, log = asyncio.run(scenario())
    assert (code, statuses[-1]) == (0, StatusExited(0))
    assert b"received SIGTERM" in log


ORPHAN_CHECK = """
import os, subprocess, time
print("odyn is pid", os.getppid(), flush=True)
# sh exits at once; its background sleep is orphaned to PID 1 and ends soon after.
started = subprocess.run(["sh", "-c", "sleep 0.1 & echo $!"], capture_output=True, check=True)
orphan = int(started.stdout)

def state():
    try:
        with open(f"/proc/{orphan}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1].split()[0]
    # ESRCH when it is reaped between open and read.
    except (FileNotFoundError, ProcessLookupError):
        return "reaped"

deadline = time.monotonic() + 5
while state() != "reaped" and time.monotonic() < deadline:
    time.sleep(0.02)
print("orphan:", state(), flush=True)
"""


@pytest.mark.root
def test_as_pid_1_odyn_reaps_orphans(
    fabric: tuple[EmulatedFabric, dict[str, str]], config_dir: Path
) -> None:
    _, env = fabric
    command = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        *odyn_command(config_dir, "--no-bootstrap", "--no-console", "--linger", "0"),
        "--",
        PYTHON,
        "-c",
        ORPHAN_CHECK,
    ]
    result = subprocess.run(command, env=env, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert b"odyn is pid 1\n" in result.stdout
    assert b"orphan: reaped\n" in result.stdout
