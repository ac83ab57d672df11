"""The sleeve against a fake enclave: a fake nitro-cli and fake odyn servers on the fabric.

The fake nitro-cli is a small Python script: run-enclave prints canned JSON (and records whether
the egress broker answered at that moment), describe-enclaves lists the enclave until it was
terminated or "vanished", terminate-enclave works once, console prints a few lines. odyn's status
and log ports are asyncio servers in the test, listening as the enclave's CID on a temporary
emulated fabric (NITRO_EMU_ROOT), so nothing needs root and nothing leaves this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.allocator_config import AllocatorConfig
from enclave_runtime.formats.manifest import parse_manifest
from enclave_runtime.formats.protocol import (
    AppStatus,
    StatusExited,
    StatusFatal,
    StatusRunning,
    StatusSignaled,
    encode_status_line,
)
from enclave_runtime.formats.vsock_ports import APP_LOG_PORT, STATUS_PORT
from enclave_runtime.host.egress_broker import start_egress_broker
from enclave_runtime.host.nitro_cli import NitroCli, NitroCliCommandError
from enclave_runtime.host.sleeve import (
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_SIGNALED,
    LOG_LINE_MAX,
    LogStream,
    SleeveError,
    SleeveOptions,
    SleeveTimings,
    build_parser,
    resources,
    run_sleeve,
)
from enclave_runtime.transport.vsock import EmulatedFabric, VsockAddress
from tests.conftest import REPO_ROOT
from tests.unit.test_nitro_cli import NITRO_EMU, runnable_eif

CID = 16
ENCLAVE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
INGRESS_PORT = 8080
FAST = SleeveTimings(
    status_retry=0.05,
    status_attempts=40,
    log_retry=0.05,
    log_retry_max=0.2,
    watch_interval=0.3,
    log_drain=3.0,
    status_grace=0.5,
    console_stop=2.0,
)
MANIFEST = f"""\
version: v1
name: demo
target: demo-release:latest
sources:
  app: demo-app:latest
defaults:
  cpu_count: 1
  memory_mb: 512
ingress:
  - listen_port: {INGRESS_PORT}
egress:
  allow:
    - host
"""

FAKE_NITRO_CLI = """\
#!{python}
import json, os, sys, time
from pathlib import Path

STATE = Path({state!r})
CID = {cid}
ENCLAVE_ID = {enclave_id!r}
with open(STATE / "calls.jsonl", "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
command = sys.argv[1]

def fail(code, sentence, status):
    sys.stderr.write(
        f"[ {{code}} ] {{sentence}}\\n\\nFor more details, please visit "
        f"https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#{{code}}\\n"
    )
    sys.exit(status)

def broker_answers():
    from enclave_runtime.formats.protocol import ConnectRequest, read_egress_frame
    from enclave_runtime.transport.vsock import EmulatedFabric
    try:
        conn = EmulatedFabric(Path(os.environ["NITRO_EMU_ROOT"]), CID).connect(3, 17002, 5)
    except OSError:
        return False
    with conn:
        conn.sendall(ConnectRequest("host", 9).encode())
        return len(conn.recv(2)) == 2

info = {{
    "EnclaveName": "application", "EnclaveID": ENCLAVE_ID, "ProcessID": 4242,
    "EnclaveCID": CID, "NumberOfCPUs": 1, "CPUIDs": [1], "MemoryMiB": 512,
}}
if command == "run-enclave":
    (STATE / "broker-at-run").write_text("yes" if broker_answers() else "no")
    if (STATE / "run-fails").exists():
        fail("E26", "Insufficient memory requested. User provided `memory` is 4 MB, but based "
             "on the EIF file size, the minimum memory should be 8 MB", 39)
    print(json.dumps(info, indent=2))
elif command == "describe-enclaves":
    ended = (STATE / "terminated").exists() or (STATE / "vanished").exists()
    described = dict(info, State="RUNNING", Flags="NONE", Measurements={{}})
    print(json.dumps([] if ended else [described], indent=2))
elif command == "terminate-enclave":
    if (STATE / "terminated").exists():
        fail("E11", "Socket error.", 11)
    (STATE / "terminated").write_text("")
    print(json.dumps({{"EnclaveName": "application", "EnclaveID": ENCLAVE_ID,
                      "Terminated": True}}, indent=2))
elif command == "console":
    print(f"Connecting to the console for enclave {{CID}}...")
    print("Successfully connected to the console.")
    print("[    0.000000] Linux version 4.14.256 (fake console)", flush=True)
    deadline = time.monotonic() + 30
    while not (STATE / "terminated").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
else:
    sys.exit(f"fake nitro-cli: unexpected command {{command}}")
"""


@dataclass
class FakeNitroCli:
    path: Path
    state: Path

    def calls(self) -> list[list[str]]:
        calls_file = self.state / "calls.jsonl"
        if not calls_file.exists():
            return []
        return [json.loads(line) for line in calls_file.read_text().splitlines()]

    def commands(self, name: str) -> list[list[str]]:
        return [call for call in self.calls() if call[0] == name]

    def broker_was_up_at_run(self) -> bool:
        return (self.state / "broker-at-run").read_text() == "yes"

    def run_was_called(self) -> bool:
        return bool(self.commands("run-enclave"))


@dataclass
class FakeOdyn:
    """odyn's status and log ports, scripted: a backlog, live lines, then a final status."""

    fabric: EmulatedFabric
    final: AppStatus | None = field(default_factory=lambda: StatusExited(3))
    backlog: list[bytes] = field(default_factory=lambda: [b"backlog 1\n", b"backlog 2\n"])
    live: list[bytes] = field(default_factory=lambda: [b"live 3\n", b"live 4\n"])
    last_words: bytes = b"after the status 5\n"
    status_prelude: list[bytes] = field(
        default_factory=lambda: [encode_status_line(StatusRunning())]
    )
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    log_connections: int = 0
    finish: asyncio.Event = field(init=False)
    final_sent: asyncio.Event = field(init=False)
    log_clients: asyncio.Event = field(init=False)

    async def start(self) -> None:
        # Made here, in the running loop: on Python 3.9 an asyncio.Event made outside one binds
        # to get_event_loop(), which asyncio.run() has already reset (docs/development.md).
        self.finish = asyncio.Event()  # the test lets the application end
        self.final_sent = asyncio.Event()
        self.log_clients = asyncio.Event()
        self.servers.append(await self.fabric.start_server(self._status, STATUS_PORT))
        self.servers.append(await self.fabric.start_server(self._log, APP_LOG_PORT))

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()

    async def _status(self, reader: Any, writer: asyncio.StreamWriter, peer: VsockAddress) -> None:
        with contextlib.closing(writer):
            for line in self.status_prelude:
                writer.write(line)
            await writer.drain()
            await self.finish.wait()
            if self.final is not None:
                writer.write(encode_status_line(self.final))
                await writer.drain()
            self.final_sent.set()

    async def _log(self, reader: Any, writer: asyncio.StreamWriter, peer: VsockAddress) -> None:
        self.log_connections += 1
        with contextlib.closing(writer):
            writer.write(b"".join(self.backlog))
            await writer.drain()
            self.log_clients.set()
            for line in self.live:
                await asyncio.sleep(0.02)
                writer.write(line)
                await writer.drain()
            await self.final_sent.wait()
            await asyncio.sleep(0.1)  # odyn's last words arrive after the final status
            writer.write(self.last_words)
            await writer.drain()


@pytest.fixture
def fabric_root(monkeypatch) -> Iterator[Path]:
    # Short: a Unix socket path (root/vsock/CID/PORT) must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="slv", dir="/tmp"))
    monkeypatch.setenv("NITRO_EMU_ROOT", str(root))
    monkeypatch.delenv("NITRO_EMU_CID", raising=False)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def nitro_cli(tmp_path) -> FakeNitroCli:
    state = tmp_path / "state"
    state.mkdir()
    script = tmp_path / "nitro-cli"
    script.write_text(
        FAKE_NITRO_CLI.format(
            python=sys.executable, state=str(state), cid=CID, enclave_id=ENCLAVE_ID
        )
    )
    script.chmod(0o755)
    return FakeNitroCli(script, state)


@pytest.fixture
def release(tmp_path) -> tuple[Path, Path]:
    eif = tmp_path / "application.eif"
    eif.write_bytes(b"an EIF the fake nitro-cli never reads")
    manifest = tmp_path / "enclaver.yaml"
    manifest.write_text(MANIFEST)
    return eif, manifest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Run:
    code: int | None
    output: bytes
    messages: str
    error: BaseException | None = None


def options_for(
    release: tuple[Path, Path], nitro_cli: FakeNitroCli, **overrides: Any
) -> SleeveOptions:
    eif, manifest = release
    settings: dict[str, Any] = {
        "eif_file": eif,
        "manifest_file": manifest,
        "nitro_cli": str(nitro_cli.path),
        "ingress_host": "127.0.0.1",
        "port_map": {INGRESS_PORT: free_port()},
    }
    settings.update(overrides)
    return SleeveOptions(**settings)


async def sleeve_with(options: SleeveOptions, odyn: FakeOdyn | None, during: Any = None) -> Run:
    """Run the sleeve to its end while ``during(odyn)`` plays the enclave's part."""
    output, messages = io.BytesIO(), io.StringIO()
    if odyn is not None:
        await odyn.start()
    sleeve = asyncio.ensure_future(
        run_sleeve(
            options,
            nitro_cli=NitroCli(options.nitro_cli),
            output=output,
            messages=messages,
            timings=FAST,
        )
    )
    try:
        if during is not None:
            await during(odyn)
        done, _ = await asyncio.wait({sleeve}, timeout=30)
        assert done, f"the sleeve did not end; it said:\n{messages.getvalue()}"
        error = sleeve.exception()
        code = None if error is not None else sleeve.result()
        return Run(code, output.getvalue(), messages.getvalue(), error)
    finally:
        sleeve.cancel()
        if odyn is not None:
            await odyn.close()


async def let_the_app_end(odyn: FakeOdyn) -> None:
    await asyncio.wait_for(odyn.log_clients.wait(), 10)
    await asyncio.sleep(0.2)
    odyn.finish.set()


def fake_odyn(fabric_root: Path, **settings: Any) -> FakeOdyn:
    return FakeOdyn(EmulatedFabric(fabric_root, CID), **settings)


# --- exit codes and the log --------------------------------------------------------------------


def test_the_sleeve_exits_with_the_apps_code_after_the_whole_log(
    fabric_root, nitro_cli, release
) -> None:
    async def scenario() -> Run:
        return await sleeve_with(
            options_for(release, nitro_cli), fake_odyn(fabric_root), let_the_app_end
        )

    run = asyncio.run(scenario())
    assert run.error is None, run.messages
    assert run.code == 3
    assert run.output == (b"backlog 1\nbacklog 2\nlive 3\nlive 4\nafter the status 5\n"), (
        "every log line, in order, once, including those sent after the final status"
    )
    assert f"started enclave ID={ENCLAVE_ID}, CID={CID}" in run.messages
    assert "the application exited with code 3" in run.messages
    assert nitro_cli.broker_was_up_at_run()
    assert nitro_cli.commands("terminate-enclave") == [
        ["terminate-enclave", "--enclave-id", ENCLAVE_ID]
    ]


@pytest.mark.parametrize(
    "case",
    [
        (StatusExited(0), 0, "exited with code 0"),
        (StatusSignaled(9), EXIT_SIGNALED, "killed by signal 9 (SIGKILL)"),
        (StatusFatal("manifest: egress.allow[0] is not a domain"), EXIT_FATAL, "egress.allow[0]"),
    ],
)
def test_each_final_status_gives_enclaver_runs_exit_code(
    fabric_root, nitro_cli, release, case
) -> None:
    final, code, said = case

    async def scenario() -> Run:
        odyn = fake_odyn(fabric_root, final=final)
        return await sleeve_with(options_for(release, nitro_cli), odyn, let_the_app_end)

    run = asyncio.run(scenario())
    assert run.error is None, run.messages
    assert run.code == code
    assert said in run.messages
    assert len(nitro_cli.commands("terminate-enclave")) == 1


def test_a_fatal_status_without_running_first_is_final(fabric_root, nitro_cli, release) -> None:
    async def scenario() -> Run:
        odyn = fake_odyn(
            fabric_root,
            status_prelude=[encode_status_line(StatusFatal("cannot load the manifest"))],
            final=None,
        )
        return await sleeve_with(options_for(release, nitro_cli), odyn, let_the_app_end)

    run = asyncio.run(scenario())
    assert run.code == EXIT_FATAL
    assert "odyn failed before starting the application: cannot load the manifest" in run.messages


def test_bad_status_lines_are_reported_and_skipped(fabric_root, nitro_cli, release) -> None:
    async def scenario() -> Run:
        odyn = fake_odyn(
            fabric_root,
            status_prelude=[b"not json\n", b'{"status":"exited"}\n', b'{"status":"running"}\n'],
            final=StatusExited(5),
        )
        return await sleeve_with(options_for(release, nitro_cli), odyn, let_the_app_end)

    run = asyncio.run(scenario())
    assert run.code == 5
    assert "ignoring a bad line from the status port: status line is not JSON" in run.messages
    assert 'status "exited" needs "code"' in run.messages


def test_the_sleeve_waits_for_odyn_to_listen(fabric_root, nitro_cli, release) -> None:
    """odyn starts after run-enclave returns: status and log are retried until it listens."""

    async def scenario() -> Run:
        odyn = fake_odyn(fabric_root)

        async def boot_late(_: Any) -> None:
            while not nitro_cli.run_was_called():
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            await odyn.start()
            await let_the_app_end(odyn)

        return await sleeve_with(options_for(release, nitro_cli), None, boot_late)

    run = asyncio.run(scenario())
    assert run.code == 3, run.messages
    assert run.output.startswith(b"backlog 1\nbacklog 2\n")


def test_odyn_never_answering_is_fatal_and_terminates(fabric_root, nitro_cli, release) -> None:
    run = asyncio.run(sleeve_with(options_for(release, nitro_cli), None))
    assert run.code == EXIT_FATAL
    assert "odyn did not answer on the enclave's status port (vsock 17000)" in run.messages
    assert len(nitro_cli.commands("terminate-enclave")) == 1


def test_an_enclave_that_vanishes_without_a_status_is_fatal(
    fabric_root, nitro_cli, release
) -> None:
    async def vanish(odyn: FakeOdyn) -> None:
        await asyncio.wait_for(odyn.log_clients.wait(), 10)
        (nitro_cli.state / "vanished").write_text("")
        odyn.final = None
        odyn.finish.set()
        await odyn.close()

    run = asyncio.run(sleeve_with(options_for(release, nitro_cli), fake_odyn(fabric_root), vanish))
    assert run.code == EXIT_FATAL
    assert f"enclave {ENCLAVE_ID} is gone (nitro-cli describe-enclaves no longer lists it)" in (
        run.messages
    )
    assert nitro_cli.commands("terminate-enclave") == []


def test_a_cancelled_sleeve_still_terminates_the_enclave(fabric_root, nitro_cli, release) -> None:
    async def scenario() -> None:
        odyn = fake_odyn(fabric_root)
        await odyn.start()
        sleeve = asyncio.ensure_future(
            run_sleeve(
                options_for(release, nitro_cli),
                output=io.BytesIO(),
                messages=io.StringIO(),
                timings=FAST,
            )
        )
        try:
            await asyncio.wait_for(odyn.log_clients.wait(), 10)
            sleeve.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sleeve
        finally:
            await odyn.close()

    asyncio.run(scenario())
    assert len(nitro_cli.commands("terminate-enclave")) == 1


# --- the egress broker and ingress -------------------------------------------------------------


def test_without_egress_no_broker_is_started(fabric_root, nitro_cli, release, tmp_path) -> None:
    manifest = tmp_path / "no-egress.yaml"
    manifest.write_text(MANIFEST.split("egress:", maxsplit=1)[0])
    options = options_for((release[0], manifest), nitro_cli)
    run = asyncio.run(sleeve_with(options, fake_odyn(fabric_root), let_the_app_end))
    assert run.code == 3
    assert not nitro_cli.broker_was_up_at_run()


def test_the_broker_is_closed_when_the_sleeve_ends(fabric_root, nitro_cli, release) -> None:
    async def scenario() -> None:
        run = await sleeve_with(
            options_for(release, nitro_cli), fake_odyn(fabric_root), let_the_app_end
        )
        assert run.code == 3
        broker = await start_egress_broker()  # the port is free again
        await broker.close()

    asyncio.run(scenario())


def test_ingress_relays_a_tcp_request_into_the_enclave(fabric_root, nitro_cli, release) -> None:
    host_port = free_port()

    async def app(reader: Any, writer: asyncio.StreamWriter, peer: VsockAddress) -> None:
        with contextlib.closing(writer):
            request = await reader.readline()
            writer.write(b"enclave got " + request)
            await writer.drain()

    async def ask_through_ingress(odyn: FakeOdyn) -> None:
        server = await odyn.fabric.start_server(app, INGRESS_PORT)
        try:
            await asyncio.wait_for(odyn.log_clients.wait(), 10)
            reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
            writer.write(b"hello\n")
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
        finally:
            server.close()
        odyn.finish.set()

    answers: list[bytes] = []
    options = options_for(release, nitro_cli, port_map={INGRESS_PORT: host_port})
    run = asyncio.run(sleeve_with(options, fake_odyn(fabric_root), ask_through_ingress))
    assert run.code == 3, run.messages
    assert answers == [b"enclave got hello\n"]
    assert f"ingress 127.0.0.1:{host_port} -> enclave port {INGRESS_PORT}" in run.messages
    with socket.socket() as probe:  # the listener is gone with the sleeve
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", host_port))
        probe.listen()


def test_a_taken_ingress_port_terminates_the_enclave(fabric_root, nitro_cli, release) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = options_for(release, nitro_cli, port_map={INGRESS_PORT: port})
        run = asyncio.run(sleeve_with(options, fake_odyn(fabric_root)))
    assert run.error is not None
    assert f"cannot listen on 127.0.0.1:{port} for ingress port {INGRESS_PORT}" in str(run.error)
    assert len(nitro_cli.commands("terminate-enclave")) == 1


# --- starting: resources, errors, debug mode ---------------------------------------------------


def test_resources_come_from_the_command_line_then_the_manifest_then_enclavers_defaults() -> None:
    with_defaults = parse_manifest(MANIFEST)
    without = parse_manifest(MANIFEST.replace("defaults:\n  cpu_count: 1\n  memory_mb: 512\n", ""))
    assert resources(SleeveOptions(), with_defaults) == (1, 512)
    assert resources(SleeveOptions(cpu_count=4, memory_mb=8192), with_defaults) == (4, 8192)
    assert resources(SleeveOptions(memory_mb=1024), without) == (2, 1024)
    assert resources(SleeveOptions(), without) == (2, 4096)


def test_run_enclave_gets_the_manifest_resources_and_the_eif(
    fabric_root, nitro_cli, release
) -> None:
    run = asyncio.run(
        sleeve_with(options_for(release, nitro_cli), fake_odyn(fabric_root), let_the_app_end)
    )
    assert run.code == 3
    [call] = nitro_cli.commands("run-enclave")
    assert call == [
        "run-enclave",
        "--eif-path",
        str(release[0]),
        "--memory",
        "512",
        "--cpu-count",
        "1",
    ]


def test_a_failing_run_enclave_is_an_error_and_nothing_is_left(
    fabric_root, nitro_cli, release
) -> None:
    (nitro_cli.state / "run-fails").write_text("")

    async def scenario() -> Run:
        run = await sleeve_with(options_for(release, nitro_cli), None)
        broker = await start_egress_broker()
        await broker.close()
        return run

    run = asyncio.run(scenario())
    assert isinstance(run.error, NitroCliCommandError)
    assert run.error.code == "E26"
    assert "What to do: give the enclave at least the minimum" in str(run.error)
    assert nitro_cli.commands("terminate-enclave") == []


def test_a_port_map_for_a_port_the_manifest_lacks_is_refused(nitro_cli, release) -> None:
    options = options_for(release, nitro_cli, port_map={9999: 19999})
    with pytest.raises(SleeveError, match=r"--port-map names port 9999.*ingress ports: 8080"):
        asyncio.run(run_sleeve(options, timings=FAST))
    assert nitro_cli.calls() == []


def test_an_invalid_manifest_is_refused_naming_the_file(nitro_cli, release, tmp_path) -> None:
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(MANIFEST.replace("listen_port: 8080", "listen_port: 17000"))
    options = options_for(release, nitro_cli, manifest_file=manifest, port_map={})
    with pytest.raises(SleeveError, match=r"the manifest .*bad.yaml is not valid") as caught:
        asyncio.run(run_sleeve(options, timings=FAST))
    assert "ingress[0].listen_port" in str(caught.value)
    assert nitro_cli.calls() == []


def test_a_missing_eif_is_refused_before_anything_runs(nitro_cli, release, tmp_path) -> None:
    options = options_for(release, nitro_cli, eif_file=tmp_path / "absent.eif")
    with pytest.raises(SleeveError, match=r"cannot open the EIF file .*absent.eif.*--eif-file"):
        asyncio.run(run_sleeve(options, timings=FAST))
    assert nitro_cli.calls() == []


def test_debug_mode_relays_the_console_to_stderr(fabric_root, nitro_cli, release) -> None:
    options = options_for(release, nitro_cli, debug_mode=True)
    run = asyncio.run(sleeve_with(options, fake_odyn(fabric_root), let_the_app_end))
    assert run.code == 3
    assert "--debug-mode" in nitro_cli.commands("run-enclave")[0]
    assert nitro_cli.commands("console") == [["console", "--enclave-id", ENCLAVE_ID]]
    assert "console: [    0.000000] Linux version 4.14.256 (fake console)" in run.messages
    assert b"Linux version" not in run.output, "stdout carries the app's log only"


def test_port_maps_parse_and_bad_ones_are_refused(capsys) -> None:
    args = build_parser().parse_args(["--port-map", "8080:18080", "--port-map", "443:0"])
    assert args.port_map == [(8080, 18080), (443, 0)]
    for bad in ("8080", "x:1", "0:80", "80:70000"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--port-map", bad])
        assert "is not P:H" in capsys.readouterr().err


# --- the log stream ----------------------------------------------------------------------------


def test_the_log_stream_retries_an_empty_connection_and_never_replays(fabric_root) -> None:
    """A connection closed before any byte is retried; one that ended after bytes is not."""

    async def scenario() -> tuple[bytes, int]:
        fabric = EmulatedFabric(fabric_root, CID)
        connections = 0

        async def log_port(reader: Any, writer: asyncio.StreamWriter, peer: Any) -> None:
            nonlocal connections
            connections += 1
            with contextlib.closing(writer):
                if connections == 1:
                    return  # odyn at its client limit: closed at once
                writer.write(b"one\ntwo without newline")
                await writer.drain()

        server = await fabric.start_server(log_port, APP_LOG_PORT)
        output = io.BytesIO()
        stream = LogStream(EmulatedFabric(fabric_root), CID, output, print, FAST)
        stream.start()
        assert stream.task is not None
        await asyncio.wait_for(stream.task, 10)
        await asyncio.sleep(0.3)
        server.close()
        await server.wait_closed()
        return output.getvalue(), connections

    output, connections = asyncio.run(scenario())
    assert output == b"one\ntwo without newline\n"
    assert connections == 2


def _copied(chunks: list[bytes]) -> bytes:
    """What LogStream writes to stdout for a log stream arriving in ``chunks``."""

    async def copy() -> bytes:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        output = io.BytesIO()
        stream = LogStream(EmulatedFabric(Path("/nonexistent")), CID, output, print, FAST)
        assert await stream._copy(reader) == (sum(map(len, chunks)), True)
        return output.getvalue()

    return asyncio.run(copy())


@given(st.lists(st.binary(max_size=300), max_size=12))
def test_the_log_reaches_stdout_byte_for_byte_however_it_is_cut(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    expected = data + b"\n" if data and not data.endswith(b"\n") else data
    assert _copied(chunks) == expected


def test_an_endless_line_is_passed_on_in_pieces() -> None:
    line = b"x" * (LOG_LINE_MAX + 10)
    assert _copied([line[:40000], line[40000:], b"\nnext\n"]) == (
        line[:LOG_LINE_MAX] + b"\n" + line[LOG_LINE_MAX:] + b"\nnext\n"
    )


# --- the command line, in a real process -------------------------------------------------------


def sleeve_process(fabric_root: Path, options: SleeveOptions) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "enclave_runtime.host.sleeve",
        "--eif-file",
        str(options.eif_file),
        "--manifest-file",
        str(options.manifest_file),
        "--nitro-cli",
        options.nitro_cli,
        "--ingress-host",
        "127.0.0.1",
    ]
    for port, host_port in options.port_map.items():
        argv += ["--port-map", f"{port}:{host_port}"]
    env = {**os.environ, "NITRO_EMU_ROOT": str(fabric_root), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


async def wait_for_process(process: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    out, err = await asyncio.to_thread(process.communicate, timeout=30)
    return process.returncode, out, err


def test_the_command_exits_with_the_apps_code(fabric_root, nitro_cli, release) -> None:
    async def scenario() -> tuple[int, bytes, bytes]:
        odyn = fake_odyn(fabric_root)
        await odyn.start()
        try:
            process = sleeve_process(fabric_root, options_for(release, nitro_cli))
            await let_the_app_end(odyn)
            return await wait_for_process(process)
        finally:
            await odyn.close()

    code, out, err = asyncio.run(scenario())
    assert code == 3, err.decode()
    assert out == b"backlog 1\nbacklog 2\nlive 3\nlive 4\nafter the status 5\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_terminates_the_enclave_and_exits_109(
    fabric_root, nitro_cli, release, signum
) -> None:
    async def scenario() -> tuple[int, bytes, bytes]:
        odyn = fake_odyn(fabric_root)
        await odyn.start()
        try:
            process = sleeve_process(fabric_root, options_for(release, nitro_cli))
            await asyncio.wait_for(odyn.log_clients.wait(), 20)
            await asyncio.sleep(0.3)  # the status port is followed too
            process.send_signal(signum)
            return await wait_for_process(process)
        finally:
            await odyn.close()

    code, _, err = asyncio.run(scenario())
    assert code == EXIT_INTERRUPTED, err.decode()
    assert f"received {signal.Signals(signum).name}: terminating the enclave" in err.decode()
    assert nitro_cli.commands("terminate-enclave") == [
        ["terminate-enclave", "--enclave-id", ENCLAVE_ID]
    ]


def test_a_missing_nitro_cli_is_named_with_the_option(fabric_root, release, tmp_path) -> None:
    eif, manifest = release
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "enclave_runtime.host.sleeve",
            "--eif-file",
            str(eif),
            "--manifest-file",
            str(manifest),
            "--nitro-cli",
            str(tmp_path / "no-nitro-cli"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NITRO_EMU_ROOT": str(fabric_root), "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("sleeve: nitro-cli not found:")
    assert "--nitro-cli PATH" in result.stderr
    assert "Traceback" not in result.stderr


# --- the real nitro-emu (root: namespaces, mounts) ---------------------------------------------


@pytest.mark.root
@pytest.mark.slow
def test_the_sleeve_drives_a_real_emulated_enclave(fabric_root, release, tmp_path) -> None:
    """nitro-emu runs a real enclave (a shell that sleeps); odyn's ports are played here."""
    eif = tmp_path / "app.eif"
    runnable_eif(eif)
    allocator = tmp_path / "allocator.yaml"
    allocator.write_text(AllocatorConfig(memory_mib=256, cpu_count=2).render())
    options = SleeveOptions(
        eif_file=eif,
        manifest_file=release[1],
        memory_mb=64,
        debug_mode=True,
        nitro_cli=NITRO_EMU,
        ingress_host="127.0.0.1",
        port_map={INGRESS_PORT: 0},
    )
    emu = NitroCli(NITRO_EMU, env={"NITRO_EMU_ALLOCATOR": str(allocator)})

    async def scenario() -> tuple[int, bytes, str]:
        odyn = fake_odyn(fabric_root)
        await odyn.start()
        output, messages = io.BytesIO(), io.StringIO()
        sleeve = asyncio.ensure_future(
            run_sleeve(options, nitro_cli=emu, output=output, messages=messages, timings=FAST)
        )
        try:
            await let_the_app_end(odyn)
            code = await asyncio.wait_for(sleeve, 60)
        finally:
            sleeve.cancel()
            await odyn.close()
        return code, output.getvalue(), messages.getvalue()

    code, output, messages = asyncio.run(scenario())
    assert code == 3, messages
    assert output == b"backlog 1\nbacklog 2\nlive 3\nlive 4\nafter the status 5\n"
    assert f"CID={CID}" in messages
    assert "console: hello from the enclave" in messages
    assert "terminated enclave i-" in messages
    assert emu.describe_enclaves() == []
