"""``sleeve``: run one enclave from a release image and stand in for it on the parent.

The host-side counterpart of odyn, wire-compatible with enclaver's ``enclaver-run``
(enclaver-io/enclaver ``enclaver/src/run.rs`` and ``src/bin/enclaver-run/main.rs``):

1. the egress broker listens on vsock (ANY, 17002) BEFORE the enclave starts, when the manifest
   has ``egress`` (its rules are the parent's allowlist too);
2. ``nitro-cli run-enclave`` starts the enclave; its ID and CID are printed on stderr;
3. the app log (vsock CID:17001, backlog then live) goes to stdout line by line; in debug mode
   ``nitro-cli console`` goes to stderr, each line prefixed ``console:``;
4. one TCP listener per ingress port P relays ``--ingress-host``:P to vsock (CID, P);
5. the status port (CID:17000) is followed until the final status; then the log is drained
   (bounded), the enclave terminated and the sleeve exits with the application's code:
   ``exited`` → its code, ``signaled`` → 107, ``fatal`` → 108, SIGTERM/SIGINT → 109 (after
   terminating the enclave), the enclave vanishing without a final status → 108.

Resources come from the command line, else the manifest's ``defaults``, else enclaver's defaults
(2 CPUs, 4096 MiB: ``DEFAULT_CPU_COUNT``/``DEFAULT_MEMORY_MB`` in run.rs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, TextIO

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.egress_policy import EgressPolicy
from enclave_runtime.formats.manifest import Manifest, ManifestError, load_manifest
from enclave_runtime.formats.protocol import (
    AppStatus,
    StatusExited,
    StatusFatal,
    StatusLineError,
    StatusRunning,
    StatusSignaled,
    decode_status_line,
)
from enclave_runtime.formats.vsock_ports import APP_LOG_PORT, EGRESS_BROKER_PORT, STATUS_PORT
from enclave_runtime.host.egress_broker import EgressBroker, start_egress_broker
from enclave_runtime.host.ingress_proxy import IngressProxy, start_ingress_proxy
from enclave_runtime.host.nitro_cli import NitroCli, NitroCliCommandError, NitroCliError, RunInfo
from enclave_runtime.transport import vsock

# enclaver's RELEASE_BUNDLE_DIR, EIF_FILE_NAME and MANIFEST_FILE_NAME (enclaver/src/constants.rs).
DEFAULT_EIF_FILE = "/enclave/application.eif"
DEFAULT_MANIFEST_FILE = "/enclave/enclaver.yaml"
DEFAULT_INGRESS_HOST = "0.0.0.0"
# enclaver-run's exit statuses (src/bin/enclaver-run/main.rs).
EXIT_SIGNALED = 107
EXIT_FATAL = 108
EXIT_INTERRUPTED = 109
EXIT_ERROR = 1

# nitro-cli's codes for "no such enclave": terminating one that already ended is not a failure.
_ALREADY_GONE = {"E11", "E58"}
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_READ_SIZE = 64 * 1024
# A log "line" longer than this is passed on in pieces rather than held in memory.
LOG_LINE_MAX = 64 * 1024

log = logging.getLogger(__name__)


class SleeveError(EnclaveOpsError):
    """The sleeve cannot run the enclave as configured."""


@dataclass(frozen=True)
class SleeveOptions:
    """The command line, parsed."""

    eif_file: Path = Path(DEFAULT_EIF_FILE)
    manifest_file: Path = Path(DEFAULT_MANIFEST_FILE)
    cpu_count: int | None = None
    memory_mb: int | None = None
    debug_mode: bool = False
    nitro_cli: str = "nitro-cli"
    ingress_host: str = DEFAULT_INGRESS_HOST
    port_map: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SleeveTimings:
    """Every wait of the sleeve, in seconds; all bounded."""

    # enclaver's STATUS_VSOCK_RETRY_INTERVAL and STATUS_VSOCK_RETRY_LIMIT (run.rs): odyn has
    # 100 × 250 ms to answer on the status port, counted again after each lost connection.
    status_retry: float = 0.25
    status_attempts: int = 100
    # Log port reconnection back-off: from enclaver's 250 ms, doubling up to the cap.
    log_retry: float = 0.25
    log_retry_max: float = 2.0
    # How often describe-enclaves checks that the enclave still exists.
    watch_interval: float = 2.0
    # After the final status: how long the rest of the log may take to arrive.
    log_drain: float = 5.0
    # After the enclave vanished: how long a status line already in flight may take.
    status_grace: float = 1.0
    # How long nitro-cli console may take to end once the enclave is gone.
    console_stop: float = 2.0


DEFAULT_TIMINGS = SleeveTimings()


@dataclass(frozen=True)
class Outcome:
    """How the enclave ended and what the sleeve exits with."""

    exit_code: int
    message: str


@dataclass(frozen=True)
class RunPlan:
    """What the options and the manifest ask for, checked before anything starts."""

    manifest: Manifest
    cpu_count: int
    memory_mb: int
    port_map: Mapping[int, int]


def plan_run(options: SleeveOptions) -> RunPlan:
    """Load the manifest and check the options against it and the EIF."""
    try:
        manifest = load_manifest(options.manifest_file)
    except ManifestError as err:
        raise SleeveError(
            f"the manifest {options.manifest_file} is not valid (give another with "
            f"--manifest-file, or fix it; `enclaveops manifest check` lists every problem):\n{err}"
        ) from err
    cpu_count, memory_mb = resources(options, manifest)
    port_map = _checked_port_map(options.port_map, manifest)
    _check_eif_readable(options.eif_file)
    return RunPlan(manifest, cpu_count, memory_mb, port_map)


@dataclass
class _StatusSession:
    connected: bool = False
    lines: int = 0
    final: AppStatus | None = None


class _StatusLost(Exception):
    """The status port stopped answering; ``str()`` says what happened."""


class LogStream:
    """Copies the enclave's log port to ``output`` line by line, reconnecting while needed.

    A connection that delivered bytes and then ended cleanly is the end of the log (odyn
    closes it after sending everything); it is not reopened, since a new connection would
    replay the backlog. A connection refused, closed before any byte (odyn not listening yet,
    or at its client limit) or broken by an error is retried with back-off.
    """

    def __init__(
        self,
        fabric: vsock.Backend,
        cid: int,
        output: BinaryIO,
        say: Callable[[str], None],
        timings: SleeveTimings,
    ) -> None:
        self._fabric = fabric
        self._cid = cid
        self._output = output
        self._say = say
        self._timings = timings
        self._ended = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until the current connection ends or the log is over."""
        if self.task is None or self.task.done():
            return
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({ended, self.task}, timeout=timeout)
        finally:
            ended.cancel()

    async def _run(self) -> None:
        delay = self._timings.log_retry
        while True:
            try:
                reader, writer = await self._fabric.open_connection(self._cid, APP_LOG_PORT)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._timings.log_retry_max)
                continue
            self._ended.clear()
            try:
                received, clean = await self._copy(reader)
            finally:
                writer.close()
                self._ended.set()
            if received and clean:
                return
            if received:
                self._say("the log stream broke; reconnecting (backlog lines may repeat)")
                delay = self._timings.log_retry
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._timings.log_retry_max)

    async def _copy(self, reader: asyncio.StreamReader) -> tuple[int, bool]:
        """Relay complete lines as they come; returns (bytes received, ended cleanly)."""
        pending = bytearray()
        received = 0
        try:
            while True:
                try:
                    chunk = await reader.read(_READ_SIZE)
                except OSError:
                    return received, False
                if not chunk:
                    return received, True
                received += len(chunk)
                pending += chunk
                self._write_lines(pending)
        finally:
            if pending:  # a last line without its newline, or one cut by a cancellation
                self._write(bytes(pending) + b"\n")

    def _write_lines(self, pending: bytearray) -> None:
        end = pending.rfind(b"\n")
        if end >= 0:
            self._write(bytes(pending[: end + 1]))
            del pending[: end + 1]
        elif len(pending) >= LOG_LINE_MAX:
            self._write(bytes(pending) + b"\n")
            pending.clear()

    def _write(self, data: bytes) -> None:
        self._output.write(data)
        self._output.flush()


class _Say:
    """The sleeve's own messages: one line each on ``stream``, prefixed ``sleeve:``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, message: str) -> None:
        print(f"sleeve: {message}", file=self.stream, flush=True)


class Sleeve:
    """One run of one enclave; use :func:`run_sleeve`."""

    def __init__(
        self,
        options: SleeveOptions,
        plan: RunPlan,
        *,
        cli: NitroCli,
        fabric: vsock.Backend,
        output: BinaryIO,
        messages: TextIO,
        timings: SleeveTimings,
    ) -> None:
        self.options = options
        self.plan = plan
        self.cli = cli
        self.fabric = fabric
        self.output = output
        self.messages = messages
        self.say = _Say(messages)
        self.timings = timings
        self.interrupted = asyncio.Event()
        self.enclave: RunInfo | None = None
        self.broker: EgressBroker | None = None
        self.ingress: IngressProxy | None = None
        self.log_stream: LogStream | None = None
        self.console: asyncio.subprocess.Process | None = None
        self._console_relay: asyncio.Task[None] | None = None
        self._terminated = False
        self._running_announced = False
        self._handled_signals: list[int] = []
        self._check_enclave = asyncio.Event()

    async def run(self) -> int:
        self._install_signal_handlers()
        try:
            outcome = await self._run()
        except BaseException:
            await self._terminate()  # an error or a cancellation never leaves the enclave behind
            raise
        finally:
            self._remove_signal_handlers()
            await self._close()
        self.say(outcome.message)
        return outcome.exit_code

    async def _run(self) -> Outcome:
        plan = self.plan
        manifest = plan.manifest
        if manifest.egress is not None:
            self.broker = await start_egress_broker(
                backend=self.fabric,
                allowlist=EgressPolicy.from_manifest(manifest.egress),
                routes=_emulated_aws_routes(),
            )
            self.say(f"egress broker listening on vsock port {EGRESS_BROKER_PORT}")
        if self.interrupted.is_set():
            return Outcome(EXIT_INTERRUPTED, "interrupted before the enclave was started")
        cpus = f"{plan.cpu_count} CPU" + ("s" if plan.cpu_count != 1 else "")
        self.say(f"starting the enclave: {cpus}, {plan.memory_mb} MiB")
        self.enclave = enclave = await self._run_enclave(plan)
        self.say(f"started enclave ID={enclave.enclave_id}, CID={enclave.enclave_cid}")
        if self.interrupted.is_set():
            await self._terminate()
            return Outcome(EXIT_INTERRUPTED, "interrupted; the enclave was terminated")
        await self._start_companions(manifest, enclave, plan.port_map)
        return await self._wait_for_end(enclave)

    async def _run_enclave(self, plan: RunPlan) -> RunInfo:
        """run-enclave in a thread; if cancelled meanwhile, the enclave is still recorded."""
        starting = asyncio.ensure_future(
            asyncio.to_thread(
                self.cli.run_enclave,
                self.options.eif_file,
                plan.memory_mb,
                cpu_count=plan.cpu_count,
                debug_mode=self.options.debug_mode,
            )
        )
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            with contextlib.suppress(NitroCliError):
                self.enclave = await starting
            raise

    async def _start_companions(
        self, manifest: Manifest, enclave: RunInfo, port_map: Mapping[int, int]
    ) -> None:
        if self.options.debug_mode:
            self.console = await self.cli.open_console(enclave.enclave_id)
            self._console_relay = asyncio.ensure_future(self._relay_console(self.console))
        self.log_stream = LogStream(
            self.fabric, enclave.enclave_cid, self.output, self.say, self.timings
        )
        self.log_stream.start()
        ports = [item.listen_port for item in manifest.ingress]
        if ports:
            self.ingress = await start_ingress_proxy(
                enclave.enclave_cid,
                ports,
                bind_host=self.options.ingress_host,
                host_ports=port_map,
                backend=self.fabric,
            )
            for port, host_port in self.ingress.bound.items():
                self.say(f"ingress {self.options.ingress_host}:{host_port} -> enclave port {port}")

    async def _wait_for_end(self, enclave: RunInfo) -> Outcome:
        status = asyncio.ensure_future(self._follow_status(enclave.enclave_cid))
        gone = asyncio.ensure_future(self._watch_enclave(enclave.enclave_id))
        interrupted = asyncio.ensure_future(self.interrupted.wait())
        try:
            await asyncio.wait({status, gone, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            if not status.done() and gone.done():
                # The last status line may still be on its way when the enclave has gone.
                await asyncio.wait({status, interrupted}, timeout=self.timings.status_grace)
            if status.done():
                return await self._finish(status)
            if interrupted.done():
                await self._terminate()
                return Outcome(EXIT_INTERRUPTED, "interrupted; the enclave was terminated")
            return Outcome(
                EXIT_FATAL,
                f"enclave {enclave.enclave_id} is gone (nitro-cli describe-enclaves no longer "
                "lists it) and sent no final status: it crashed, ran out of memory or was "
                "terminated from outside; run with --debug-mode to see its console",
            )
        finally:
            for task in (status, gone, interrupted):
                task.cancel()
            await asyncio.gather(status, gone, interrupted, return_exceptions=True)

    async def _finish(self, status_task: asyncio.Future[AppStatus]) -> Outcome:
        try:
            status = status_task.result()
        except _StatusLost as lost:
            await self._terminate()
            return Outcome(EXIT_FATAL, str(lost))
        if self.log_stream is not None:
            await _first_of(self.log_stream.drain(self.timings.log_drain), self.interrupted.wait())
        await self._terminate()
        return outcome_of(status)

    async def _follow_status(self, cid: int) -> AppStatus:
        """The final status from the status port, reconnecting while the enclave lives."""
        failures = 0
        while True:
            session = await self._status_session(cid)
            if session.final is not None:
                return session.final
            if session.connected:
                self._check_enclave.set()  # a lost connection may mean a lost enclave
            failures = (0 if session.lines else failures) + 1
            if failures >= self.timings.status_attempts:
                raise _StatusLost(self._status_lost_message(self._running_announced))
            await asyncio.sleep(self.timings.status_retry)

    async def _status_session(self, cid: int) -> _StatusSession:
        """One connection to the status port, read until a final status or its end."""
        session = _StatusSession()
        try:
            reader, writer = await self.fabric.open_connection(cid, STATUS_PORT)
        except OSError:
            return session
        session.connected = True
        try:
            async for status in _status_lines(reader, self.say):
                session.lines += 1
                if not isinstance(status, StatusRunning):
                    session.final = status
                    return session
                if not self._running_announced:
                    self.say("the application is running")
                    self._running_announced = True
        finally:
            writer.close()
        return session

    def _status_lost_message(self, ever_answered: bool) -> str:
        waited = self.timings.status_attempts * self.timings.status_retry
        if ever_answered:
            return (
                f"lost the enclave's status port (vsock {STATUS_PORT}) and could not reconnect "
                f"within {waited:g} s; the enclave was terminated"
            )
        return (
            f"odyn did not answer on the enclave's status port (vsock {STATUS_PORT}) within "
            f"{waited:g} s: is the EIF built with odyn as its entrypoint (enclaveops build)? "
            "Run with --debug-mode to see the enclave's console; the enclave was terminated"
        )

    async def _watch_enclave(self, enclave_id: str) -> None:
        """Return once describe-enclaves no longer lists the enclave."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._check_enclave.wait(), self.timings.watch_interval)
            self._check_enclave.clear()
            try:
                enclaves = await asyncio.to_thread(self.cli.describe_enclaves)
            except NitroCliError as err:
                log.debug("describe-enclaves failed: %s", err)
                continue
            if all(info.enclave_id != enclave_id for info in enclaves):
                return

    async def _relay_console(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None and process.stderr is not None
        await asyncio.gather(
            self._relay_lines(process.stdout, "console: "),
            self._relay_lines(process.stderr, "console (nitro-cli): "),
        )
        code = await process.wait()
        if code != 0:
            self.say(f"nitro-cli console ended with exit status {code}")

    async def _relay_lines(self, stream: asyncio.StreamReader, prefix: str) -> None:
        while True:
            try:
                line = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as partial:
                line = partial.partial
            except asyncio.LimitOverrunError as overrun:
                line = await stream.readexactly(overrun.consumed)
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            print(f"{prefix}{text}", file=self.messages, flush=True)

    async def _terminate(self) -> None:
        """Terminate the enclave, once; an enclave that already ended is not an error."""
        if self.enclave is None or self._terminated:
            return
        self._terminated = True
        enclave_id = self.enclave.enclave_id
        try:
            await asyncio.to_thread(self.cli.terminate_enclave, enclave_id=enclave_id)
        except NitroCliCommandError as err:
            if err.code in _ALREADY_GONE:
                self.say(f"enclave {enclave_id} had already ended")
                return
            self._report_terminate_failure(enclave_id, err)
        except NitroCliError as err:
            self._report_terminate_failure(enclave_id, err)
        else:
            self.say(f"terminated enclave {enclave_id}")

    def _report_terminate_failure(self, enclave_id: str, err: NitroCliError) -> None:
        self.say(
            f"could not terminate enclave {enclave_id}: {err}\nterminate it by hand: "
            f"nitro-cli terminate-enclave --enclave-id {enclave_id}"
        )

    async def _close(self) -> None:
        if self.ingress is not None:
            await self.ingress.close()
        if self.log_stream is not None:
            await self.log_stream.stop()
        await self._stop_console()
        if self.broker is not None:
            await self.broker.close()

    async def _stop_console(self) -> None:
        """nitro-cli console ends with the enclave: relay its last lines; kill one that lingers."""
        if self.console is None or self._console_relay is None:
            return
        await asyncio.wait({self._console_relay}, timeout=self.timings.console_stop)
        if self.console.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.console.kill()
        self._console_relay.cancel()
        await asyncio.gather(self._console_relay, return_exceptions=True)
        await self.console.wait()

    def _install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT end the run; only the main thread's loop can receive them."""
        loop = asyncio.get_running_loop()
        for signum in _STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, self._on_stop_signal, signum)
            except (RuntimeError, ValueError):
                log.debug("not in the main thread: %s is not handled", signal.Signals(signum).name)
                return
            self._handled_signals.append(signum)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        while self._handled_signals:
            loop.remove_signal_handler(self._handled_signals.pop())

    def _on_stop_signal(self, signum: int) -> None:
        if self.interrupted.is_set():
            return
        self.say(f"received {signal.Signals(signum).name}: terminating the enclave")
        self.interrupted.set()


async def _status_lines(
    reader: asyncio.StreamReader, say: Callable[[str], None]
) -> AsyncIterator[AppStatus]:
    """Each valid status line until the connection ends; bad lines are reported and skipped."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            return
        try:
            yield decode_status_line(line)
        except StatusLineError as err:
            say(f"ignoring a bad line from the status port: {err}")


async def _first_of(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _emulated_aws_routes() -> dict[tuple[str, int], tuple[str, int]]:
    """On the emulator, IMDS and KMS are `nitro-emu aws-services` when it runs (docs/kms.md)."""
    root = os.environ.get(vsock.ENV_ROOT)
    if not root:
        return {}
    from enclave_runtime.emulator.aws_services import emulated_routes  # noqa: PLC0415

    return emulated_routes(Path(root))


def outcome_of(status: AppStatus) -> Outcome:
    """The exit code and message for a final status, as enclaver-run maps them."""
    if isinstance(status, StatusExited):
        return Outcome(status.code, f"the application exited with code {status.code}")
    if isinstance(status, StatusSignaled):
        return Outcome(
            EXIT_SIGNALED,
            f"the application was killed by signal {status.signal} ({status.name})",
        )
    if isinstance(status, StatusFatal):
        return Outcome(EXIT_FATAL, f"odyn failed before starting the application: {status.error}")
    raise ValueError(f"not a final status: {status!r}")


def resources(options: SleeveOptions, manifest: Manifest) -> tuple[int, int]:
    """CPU count and memory: the command line's, else the manifest's ``defaults``.

    The manifest parser fills ``defaults`` with enclaver's own defaults (2 CPUs, 4096 MiB) when
    the file has none, so this is enclaver-run's order of precedence.
    """
    cpu_count = options.cpu_count if options.cpu_count is not None else manifest.defaults.cpu_count
    memory_mb = options.memory_mb if options.memory_mb is not None else manifest.defaults.memory_mb
    return cpu_count, memory_mb


def _checked_port_map(port_map: Mapping[int, int], manifest: Manifest) -> dict[int, int]:
    ingress = {item.listen_port for item in manifest.ingress}
    unknown = sorted(set(port_map) - ingress)
    if unknown:
        listed = ", ".join(str(port) for port in sorted(ingress)) or "none"
        raise SleeveError(
            f"--port-map names port {unknown[0]}, which is not an ingress port of "
            f"{manifest.source} (ingress ports: {listed})"
        )
    return dict(port_map)


def _check_eif_readable(eif_file: Path) -> None:
    try:
        with eif_file.open("rb"):
            pass
    except OSError as err:
        raise SleeveError(
            f"cannot open the EIF file {eif_file}: {err.strerror or err}; give its path with "
            "--eif-file (the release image keeps it at /enclave/application.eif)"
        ) from err


async def run_sleeve(
    options: SleeveOptions,
    *,
    nitro_cli: NitroCli | None = None,
    backend: vsock.Backend | None = None,
    output: BinaryIO | None = None,
    messages: TextIO | None = None,
    timings: SleeveTimings = DEFAULT_TIMINGS,
) -> int:
    """Run the enclave to its end; returns the sleeve's exit status.

    In the main thread's event loop it handles SIGTERM and SIGINT (elsewhere, cancel it). Raises
    :class:`~enclave_runtime.errors.EnclaveOpsError` when the enclave cannot be started.
    """
    plan = plan_run(options)
    cli = nitro_cli if nitro_cli is not None else NitroCli(options.nitro_cli)
    cli.executable()  # a missing nitro-cli is reported before anything starts
    sleeve = Sleeve(
        options,
        plan,
        cli=cli,
        fabric=backend if backend is not None else vsock.backend(),
        output=output if output is not None else sys.stdout.buffer,
        messages=messages if messages is not None else sys.stderr,
        timings=timings,
    )
    return await sleeve.run()


def parse_port_map(text: str) -> tuple[int, int]:
    """``P:H``: the enclave's ingress port P is served on host port H (0: any free port)."""
    enclave_port, colon, host_port = text.partition(":")
    try:
        pair = (int(enclave_port), int(host_port))
    except ValueError:
        pair = (-1, -1)
    if not colon or not 1 <= pair[0] <= 0xFFFF or not 0 <= pair[1] <= 0xFFFF:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not P:H (an ingress port 1-65535 and a host port 0-65535)"
        )
    return pair


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sleeve",
        description=(
            "Run the enclave of a release image: egress broker, nitro-cli run-enclave, app log "
            "on stdout, ingress listeners; exit with the application's exit code."
        ),
    )
    parser.add_argument("--eif-file", type=Path, default=Path(DEFAULT_EIF_FILE))
    parser.add_argument("--manifest-file", type=Path, default=Path(DEFAULT_MANIFEST_FILE))
    parser.add_argument(
        "--cpu-count", type=_positive, help="CPUs (default: defaults.cpu_count, else 2)"
    )
    parser.add_argument(
        "--memory-mb", type=_positive, help="memory in MiB (default: defaults.memory_mb, else 4096)"
    )
    parser.add_argument(
        "--debug-mode",
        action="store_true",
        help="start the enclave in debug mode and relay its console to stderr (PCRs read as 0)",
    )
    parser.add_argument(
        "--nitro-cli", default="nitro-cli", metavar="PATH", help="nitro-cli or nitro-emu to run"
    )
    parser.add_argument(
        "--ingress-host",
        default=DEFAULT_INGRESS_HOST,
        help=f"address the ingress listeners bind (default: {DEFAULT_INGRESS_HOST})",
    )
    parser.add_argument(
        "--port-map",
        type=parse_port_map,
        action="append",
        default=[],
        metavar="P:H",
        help="serve ingress port P on host port H instead of P (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every relayed connection")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    levels = (logging.WARNING, logging.INFO, logging.DEBUG)
    logging.basicConfig(
        level=levels[min(args.verbose, len(levels) - 1)],
        stream=sys.stderr,
        format="sleeve: %(message)s",
    )
    options = SleeveOptions(
        eif_file=args.eif_file,
        manifest_file=args.manifest_file,
        cpu_count=args.cpu_count,
        memory_mb=args.memory_mb,
        debug_mode=args.debug_mode,
        nitro_cli=args.nitro_cli,
        ingress_host=args.ingress_host,
        port_map=dict(args.port_map),
    )
    try:
        return asyncio.run(run_sleeve(options))
    except EnclaveOpsError as err:
        print(f"sleeve: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
