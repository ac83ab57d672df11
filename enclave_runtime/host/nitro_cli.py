"""Drive ``nitro-cli`` (or ``nitro-emu``, which takes the same flags) and read its JSON strictly.

Facts from aws/aws-nitro-enclaves-cli:

- ``src/common/json_output.rs``: the JSON keys of each command (``EnclaveRunInfo``,
  ``EnclaveDescribeInfo``, ``EnclaveTerminateInfo``, ``EifDescribeInfo``, ``EnclaveBuildInfo``).
  ``describe-enclaves`` documents ``EnclaveName`` and the flattened ``Measurements`` as optional
  (older versions and enclaves still starting omit them); every other key is always written.
- ``src/common/document_errors.rs``: a failure prints ``[ Exx ] <sentence>`` on stderr and exits
  with the number ``xx``. ``run-enclave`` does its work in an enclave process whose error is
  relayed: the CLI then adds ``Failed connections: 1`` and ``[ E39 ]`` and exits 39, so the
  FIRST code on stderr is the cause.
- ``src/lib.rs``: ``console`` prints two progress lines on stdout, then the console's bytes.

Every failure is a :class:`NitroCliError`; a command that ran and failed is a
:class:`NitroCliCommandError` carrying the command line, exit status, output and the code.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from enclave_runtime.errors import EnclaveOpsError, FormatError
from enclave_runtime.formats.pcr import Measurements

DEFAULT_TIMEOUT = 600.0
DEFAULT_BUILD_TIMEOUT = 3600.0
ALLOCATOR_FILE = "/etc/nitro_enclaves/allocator.yaml"
ALLOCATOR_SERVICE = "nitro-enclaves-allocator.service"

_ERROR_HEADLINE = re.compile(r"^\[ (E\d{2,}) \] ?(.*)$", re.MULTILINE)
_STDERR_TAIL_LINES = 6

# What an operator should do about each code nitro-cli reports (document_errors.rs numbering).
_ADVICE: dict[str, str] = {
    "E03": "pass whole numbers to --memory, --cpu-count, --cpu-ids and --enclave-cid",
    "E11": (
        "no running enclave has that ID; check the ID with `nitro-cli describe-enclaves` (the "
        "enclave may already have ended)"
    ),
    "E19": "check that the file exists and that this user may read (or write) it",
    "E20": "list every CPU id only once in --cpu-ids",
    "E21": (
        f"ask only for CPU ids that are in the allocator's cpu_pool ({ALLOCATOR_FILE}), or add "
        f"them there and restart {ALLOCATOR_SERVICE}"
    ),
    "E22": (
        f"ask for fewer CPUs, or raise cpu_count in {ALLOCATOR_FILE} and restart "
        f"{ALLOCATOR_SERVICE}"
    ),
    "E26": (
        "give the enclave at least the minimum nitro-cli names (4 × the EIF file size): raise "
        "--memory-mb or defaults.memory_mb in enclaver.yaml, or make the image smaller"
    ),
    "E27": (
        f"the allocator's memory pool is smaller than the memory asked for: raise memory_mib in "
        f"{ALLOCATOR_FILE} and restart {ALLOCATOR_SERVICE} (resize the allocator), or ask for "
        "less memory; other running enclaves hold part of the pool too"
    ),
    "E29": (
        "the Nitro Enclaves driver refused the request: the CPUs or the CID may be in use by "
        "another enclave (see `nitro-cli describe-enclaves`); leave the CID unset to get a free "
        "one, and check that the allocator service is running"
    ),
    "E35": (
        "the EIF cannot be read: rebuild it, or copy it again (`nitro-cli describe-eif` shows "
        "whether its CRC checks out)"
    ),
    "E36": (
        "the enclave did not boot: the EIF may be corrupt, built for another architecture or "
        "with the wrong blobs (an emulator EIF on real Nitro), or the memory too small; run it "
        "with --debug-mode and read `nitro-cli console`"
    ),
    "E39": (
        "nitro-cli could not reach its enclave process; read the log in "
        "/var/log/nitro_enclaves/ and check `nitro-cli describe-enclaves`"
    ),
    "E44": (
        "the console is only available for an enclave started with --debug-mode; restart the "
        "enclave in debug mode (its PCRs then read as zeros)"
    ),
    "E48": "the EIF build failed; read the reason above and the Docker image's configuration",
    "E50": "the Docker image could not be pulled; check the image name and registry access",
    "E58": (
        "no enclave (or more than one) has that name; check the names with "
        "`nitro-cli describe-enclaves`"
    ),
    "E59": "the EIF's signature or signing certificate does not verify; rebuild or re-sign it",
}


class NitroCliError(EnclaveOpsError):
    """Any failure to get an answer from nitro-cli."""


class NitroCliNotFoundError(NitroCliError):
    """The nitro-cli executable is not there."""


class NitroCliUsageError(NitroCliError, ValueError):
    """Arguments that nitro-cli would refuse, caught before running it."""


class NitroCliCommandError(NitroCliError):
    """nitro-cli ran and failed; ``code`` is its ``[ Exx ]`` code (the cause), or None."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None,
        command: Sequence[str],
        rc: int,
        stdout: str,
        stderr: str,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.command = list(command)
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr


class NitroCliTimeoutError(NitroCliError):
    """nitro-cli did not finish in time and was killed."""

    def __init__(self, message: str, *, command: Sequence[str], timeout: float) -> None:
        super().__init__(message)
        self.command = list(command)
        self.timeout = timeout


class NitroCliOutputError(NitroCliError):
    """nitro-cli succeeded but its output is not the JSON it documents."""

    def __init__(self, message: str, *, command: Sequence[str], stdout: str) -> None:
        super().__init__(message)
        self.command = list(command)
        self.stdout = stdout


@dataclass(frozen=True)
class RunInfo:
    """``run-enclave``'s answer (nitro-cli's ``EnclaveRunInfo``)."""

    enclave_name: str
    enclave_id: str
    process_id: int
    enclave_cid: int
    number_of_cpus: int
    cpu_ids: tuple[int, ...]
    memory_mib: int


@dataclass(frozen=True)
class EnclaveInfo:
    """One ``describe-enclaves`` entry (nitro-cli's ``EnclaveDescribeInfo``)."""

    enclave_name: str | None
    enclave_id: str
    process_id: int
    enclave_cid: int
    number_of_cpus: int
    cpu_ids: tuple[int, ...]
    memory_mib: int
    state: str
    flags: str
    measurements: Measurements | None
    image_name: str | None = None
    image_version: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class TerminateInfo:
    """``terminate-enclave``'s answer (nitro-cli's ``EnclaveTerminateInfo``)."""

    enclave_name: str | None
    enclave_id: str
    terminated: bool


@dataclass(frozen=True)
class EifInfo:
    """``describe-eif``'s answer (nitro-cli's ``EifDescribeInfo``)."""

    eif_version: int
    measurements: Measurements
    is_signed: bool
    check_crc: bool
    signing_certificate: dict[str, Any] | None = None
    signature_check: bool | None = None
    image_name: str | None = None
    image_version: str | None = None
    metadata: dict[str, Any] | None = None


class NitroCli:
    """One nitro-cli (or nitro-emu) executable.

    ``env`` adds variables to this process's environment for every command (e.g.
    ``NITRO_EMU_ROOT`` for nitro-emu). ``timeout`` bounds each command in seconds (None: no
    limit); ``build_timeout`` bounds ``build-enclave``, which can take much longer.
    """

    def __init__(
        self,
        path: str = "nitro-cli",
        env: Mapping[str, str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        build_timeout: float | None = DEFAULT_BUILD_TIMEOUT,
    ) -> None:
        self.path = path
        self.env = dict(env) if env is not None else {}
        self.timeout = timeout
        self.build_timeout = build_timeout

    # --- commands ------------------------------------------------------------------------------

    def run_enclave(
        self,
        eif_path: str | os.PathLike[str],
        memory_mib: int,
        *,
        cpu_count: int | None = None,
        cpu_ids: Sequence[int] | None = None,
        enclave_cid: int | None = None,
        debug_mode: bool = False,
        enclave_name: str | None = None,
    ) -> RunInfo:
        """Start an enclave; returns once it has booted (nitro-cli waits for its heartbeat)."""
        args = ["run-enclave", "--eif-path", os.fspath(eif_path), "--memory", str(memory_mib)]
        args += _cpu_arguments(cpu_count, cpu_ids)
        if enclave_cid is not None:
            args += ["--enclave-cid", str(enclave_cid)]
        if debug_mode:
            args.append("--debug-mode")
        if enclave_name is not None:
            args += ["--enclave-name", enclave_name]
        reader = _JsonReader(self._json(args), args)
        return _run_info(reader.object(reader.document, "the answer"), reader)

    def describe_enclaves(self, metadata: bool = False) -> list[EnclaveInfo]:
        """The running enclaves, with their state, flags and measurements."""
        args = ["describe-enclaves"] + (["--metadata"] if metadata else [])
        reader = _JsonReader(self._json(args), args)
        if not isinstance(reader.document, list):
            raise reader.error("the answer is not a JSON array of enclaves")
        return [
            _enclave_info(reader.object(item, f"enclave [{index}]"), reader)
            for index, item in enumerate(reader.document)
        ]

    def terminate_enclave(
        self, enclave_id: str | None = None, enclave_name: str | None = None
    ) -> TerminateInfo:
        """Terminate the enclave with ``enclave_id`` or ``enclave_name`` (exactly one)."""
        if (enclave_id is None) == (enclave_name is None):
            raise NitroCliUsageError("terminate_enclave needs exactly one of enclave_id or name")
        if enclave_id is not None:
            args = ["terminate-enclave", "--enclave-id", enclave_id]
        else:
            args = ["terminate-enclave", "--enclave-name", str(enclave_name)]
        reader = _JsonReader(self._json(args), args)
        document = reader.object(reader.document, "the answer")
        info = TerminateInfo(
            enclave_name=reader.optional(document, "EnclaveName", str),
            enclave_id=reader.field(document, "EnclaveID", str),
            terminated=reader.field(document, "Terminated", bool),
        )
        if not info.terminated:
            raise reader.error(
                f"nitro-cli says enclave {info.enclave_id} was not terminated; check it with "
                "`nitro-cli describe-enclaves` and terminate it again"
            )
        return info

    def describe_eif(self, eif_path: str | os.PathLike[str]) -> EifInfo:
        """The EIF's measurements, signature and metadata, as nitro-cli reads them."""
        args = ["describe-eif", "--eif-path", os.fspath(eif_path)]
        reader = _JsonReader(self._json(args), args)
        document = reader.object(reader.document, "the answer")
        return EifInfo(
            eif_version=reader.field(document, "EifVersion", int),
            measurements=reader.measurements(document),
            is_signed=reader.field(document, "IsSigned", bool),
            check_crc=reader.field(document, "CheckCRC", bool),
            signing_certificate=reader.optional(document, "SigningCertificate", dict),
            signature_check=reader.optional(document, "SignatureCheck", bool),
            image_name=reader.optional(document, "ImageName", str),
            image_version=reader.optional(document, "ImageVersion", str),
            metadata=reader.optional(document, "Metadata", dict),
        )

    def build_enclave(
        self,
        docker_uri: str,
        output_file: str | os.PathLike[str],
        signing_certificate: str | os.PathLike[str] | None = None,
        private_key: str | os.PathLike[str] | None = None,
    ) -> Measurements:
        """Build an EIF from a Docker image (signed when both signing files are given)."""
        if (signing_certificate is None) != (private_key is None):
            raise NitroCliUsageError(
                "signing an EIF needs both signing_certificate and private_key (or neither)"
            )
        args = ["build-enclave", "--docker-uri", docker_uri, "--output-file"]
        args.append(os.fspath(output_file))
        if signing_certificate is not None and private_key is not None:
            args += ["--signing-certificate", os.fspath(signing_certificate)]
            args += ["--private-key", os.fspath(private_key)]
        reader = _JsonReader(self._json(args, self.build_timeout), args)
        return reader.measurements(reader.object(reader.document, "the answer"))

    def console_argv(self, enclave_id: str, disconnect_timeout: int | None = None) -> list[str]:
        """The command line that follows an enclave's console (debug mode only)."""
        argv = [self.executable(), "console", "--enclave-id", enclave_id]
        if disconnect_timeout is not None:
            argv += ["--disconnect-timeout", str(disconnect_timeout)]
        return argv

    def console(
        self, enclave_id: str, disconnect_timeout: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``nitro-cli console``; its stdout (a pipe) carries the console's bytes."""
        argv = self.console_argv(enclave_id, disconnect_timeout)
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.environment(),
                start_new_session=True,
            )
        except OSError as err:
            raise self._not_startable(err) from err

    async def open_console(
        self, enclave_id: str, disconnect_timeout: int | None = None
    ) -> asyncio.subprocess.Process:
        """:meth:`console` for asyncio: stdout and stderr are stream readers."""
        argv = self.console_argv(enclave_id, disconnect_timeout)
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.environment(),
                start_new_session=True,
            )
        except OSError as err:
            raise self._not_startable(err) from err

    # --- running -------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def executable(self) -> str:
        """The full path of nitro-cli, looked up on the commands' PATH."""
        found = shutil.which(self.path, path=self.environment().get("PATH"))
        if found is None:
            raise NitroCliNotFoundError(self._missing_message())
        return found

    def _missing_message(self) -> str:
        where = (
            "is not an executable file"
            if os.sep in self.path
            else f"is not on PATH ({self.environment().get('PATH', '')})"
        )
        return (
            f"nitro-cli not found: {self.path!r} {where}; install the AWS Nitro Enclaves CLI "
            "(aws-nitro-enclaves-cli), or give the path of nitro-cli or nitro-emu with "
            "--nitro-cli PATH (nitro_cli_path in Ansible)"
        )

    def _not_startable(self, err: OSError) -> NitroCliNotFoundError:
        return NitroCliNotFoundError(f"{self._missing_message()} ({err.strerror or err})")

    def _json(self, args: list[str], timeout: float | None = None) -> Any:
        stdout = self._run(args, self.timeout if timeout is None else timeout)
        try:
            return json.loads(stdout)
        except ValueError as err:
            raise NitroCliOutputError(
                f"`{self._display(args)}` printed no valid JSON ({err}); the output was: "
                f"{_excerpt(stdout)}",
                command=[self.path, *args],
                stdout=stdout,
            ) from None

    def _run(self, args: list[str], timeout: float | None) -> str:
        argv = [self.executable(), *args]
        try:
            completed = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=self.environment(),
                timeout=timeout,
                check=False,
                # Out of the caller's process group: a Ctrl-C meant for the caller must not kill
                # nitro-cli half-way through starting or terminating an enclave.
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise NitroCliTimeoutError(
                f"`{self._display(args)}` did not finish within {timeout:g} s and was killed; "
                "check `nitro-cli describe-enclaves` for an enclave it may have left",
                command=argv,
                timeout=float(timeout or 0),
            ) from None
        except OSError as err:
            raise self._not_startable(err) from err
        stdout = completed.stdout.decode("utf-8", "replace")
        stderr = completed.stderr.decode("utf-8", "replace")
        if completed.returncode != 0:
            raise command_error(argv, completed.returncode, stdout, stderr, self._display(args))
        return stdout

    def _display(self, args: Sequence[str]) -> str:
        return shlex.join([os.path.basename(self.path), *args])


def command_error(
    command: Sequence[str], rc: int, stdout: str, stderr: str, display: str | None = None
) -> NitroCliCommandError:
    """The error for a failed nitro-cli command, explained from its ``[ Exx ]`` text."""
    shown = display if display is not None else shlex.join(command)
    cause = _first_error_block(stderr)
    if cause is None:
        message = f"`{shown}` failed with exit status {rc}: {_tail(stderr) or '(no message)'}"
        return NitroCliCommandError(
            message, code=None, command=command, rc=rc, stdout=stdout, stderr=stderr
        )
    code, text = cause
    message = f"`{shown}` failed with [ {code} ] {text}"
    advice = _ADVICE.get(code)
    if advice is not None:
        message += f"\nWhat to do: {advice}"
    return NitroCliCommandError(
        message, code=code, command=command, rc=rc, stdout=stdout, stderr=stderr
    )


def _first_error_block(stderr: str) -> tuple[str, str] | None:
    """The first ``[ Exx ]`` code and its text up to the blank line that ends the block."""
    match = _ERROR_HEADLINE.search(stderr)
    if match is None:
        return None
    lines = [match.group(2).strip()]
    rest = stderr[match.end() :]
    if rest.startswith("\n"):
        for line in rest[1:].split("\n"):
            if not line.strip() or _ERROR_HEADLINE.match(line):
                break
            lines.append(line.strip())
    return match.group(1), "\n".join(line for line in lines if line)


def _tail(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "\n".join(lines[-_STDERR_TAIL_LINES:])


def _excerpt(text: str, limit: int = 200) -> str:
    text = text.strip()
    if not text:
        return "(nothing)"
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _cpu_arguments(cpu_count: int | None, cpu_ids: Sequence[int] | None) -> list[str]:
    if (cpu_count is None) == (cpu_ids is None):
        raise NitroCliUsageError("run-enclave needs exactly one of cpu_count or cpu_ids")
    if cpu_ids is not None:
        if not cpu_ids:
            raise NitroCliUsageError("cpu_ids must name at least one CPU")
        return ["--cpu-ids", *(str(cpu) for cpu in cpu_ids)]
    return ["--cpu-count", str(cpu_count)]


class _JsonReader:
    """Typed access to one command's JSON; every problem names the command and the key."""

    def __init__(self, document: Any, args: Sequence[str]) -> None:
        self.document = document
        self.args = list(args)

    def error(self, problem: str) -> NitroCliOutputError:
        return NitroCliOutputError(
            f"unexpected output from `nitro-cli {self.args[0]}`: {problem}; is the nitro-cli "
            "(or nitro-emu) at --nitro-cli a supported version?",
            command=self.args,
            stdout=json.dumps(self.document),
        )

    def object(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(f"{what} is not a JSON object")
        return value

    def field(self, document: dict[str, Any], key: str, kind: type) -> Any:
        if key not in document:
            raise self.error(f'the key "{key}" is missing')
        return self._typed(document[key], key, kind)

    def optional(self, document: dict[str, Any], key: str, kind: type) -> Any:
        value = document.get(key)
        return None if value is None else self._typed(value, key, kind)

    def integers(self, document: dict[str, Any], key: str) -> tuple[int, ...]:
        values = self.field(document, key, list)
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
            raise self.error(f'"{key}" is not a list of integers')
        return tuple(values)

    def measurements(self, document: dict[str, Any]) -> Measurements:
        return self._measurements(self.field(document, "Measurements", dict))

    def optional_measurements(self, document: dict[str, Any]) -> Measurements | None:
        value = self.optional(document, "Measurements", dict)
        return self._measurements(value) if value else None

    def _measurements(self, value: dict[str, Any]) -> Measurements:
        try:
            return Measurements.from_nitro_cli(value)
        except FormatError as err:
            raise self.error(f'"Measurements": {err}') from None

    def _typed(self, value: Any, key: str, kind: type) -> Any:
        wrong_bool = kind is int and isinstance(value, bool)
        if wrong_bool or not isinstance(value, kind):
            raise self.error(f'"{key}" is {type(value).__name__}, not {kind.__name__}')
        return value


def _run_info(document: dict[str, Any], reader: _JsonReader) -> RunInfo:
    return RunInfo(
        enclave_name=reader.field(document, "EnclaveName", str),
        enclave_id=reader.field(document, "EnclaveID", str),
        process_id=reader.field(document, "ProcessID", int),
        enclave_cid=reader.field(document, "EnclaveCID", int),
        number_of_cpus=reader.field(document, "NumberOfCPUs", int),
        cpu_ids=reader.integers(document, "CPUIDs"),
        memory_mib=reader.field(document, "MemoryMiB", int),
    )


def _enclave_info(document: dict[str, Any], reader: _JsonReader) -> EnclaveInfo:
    return EnclaveInfo(
        enclave_name=reader.optional(document, "EnclaveName", str),
        enclave_id=reader.field(document, "EnclaveID", str),
        process_id=reader.field(document, "ProcessID", int),
        enclave_cid=reader.field(document, "EnclaveCID", int),
        number_of_cpus=reader.field(document, "NumberOfCPUs", int),
        cpu_ids=reader.integers(document, "CPUIDs"),
        memory_mib=reader.field(document, "MemoryMiB", int),
        state=reader.field(document, "State", str),
        flags=reader.field(document, "Flags", str),
        measurements=reader.optional_measurements(document),
        image_name=reader.optional(document, "ImageName", str),
        image_version=reader.optional(document, "ImageVersion", str),
        metadata=reader.optional(document, "Metadata", dict),
    )


__all__ = [
    "EifInfo",
    "EnclaveInfo",
    "NitroCli",
    "NitroCliCommandError",
    "NitroCliError",
    "NitroCliNotFoundError",
    "NitroCliOutputError",
    "NitroCliTimeoutError",
    "NitroCliUsageError",
    "RunInfo",
    "TerminateInfo",
    "command_error",
]
