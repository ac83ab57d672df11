"""``nitro-emu``: nitro-cli's commands, flags, JSON and ``[ Exx ]`` errors, on any Linux machine.

Everything a caller parses is nitro-cli's (aws/aws-nitro-enclaves-cli src/lib.rs ``create_app!``,
src/common/commands_parser.rs, src/common/json_output.rs): the JSON on stdout (pretty-printed with
two spaces, keys in nitro-cli's order), the progress lines on stderr, the error texts and the exit
statuses, including run-enclave's ``Failed connections: 1`` + E39 after an error in the enclave
process. Our own options say where the emulator keeps its state (``--root``), its resource pool
(``--allocator``) and the build blobs (``--blobs``).

The enclave itself is started, stopped and followed by :mod:`enclave_runtime.emulator.launcher`,
imported when a command needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, Callable

from enclave_runtime import __version__
from enclave_runtime.emulator import nitro_cli_errors as errors
from enclave_runtime.emulator.nitro_cli_errors import NitroCliError
from enclave_runtime.emulator.state import (
    MIB,
    EmulatorState,
    EnclaveRecord,
    ResourceRequest,
    check_cpu_request,
    check_memory_for_eif,
    default_enclave_name,
    default_root,
)
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats import allocator_config
from enclave_runtime.formats.allocator_config import AllocatorConfig
from enclave_runtime.formats.eif import EifError, EifImage, read_eif
from enclave_runtime.formats.eif_signature import (
    EifSignatureError,
    certificate_pcr,
    check_certificate_validity,
)
from enclave_runtime.formats.pcr import PcrHasher
from enclave_runtime.formats.vsock_ports import HOST_CID, PARENT_CID

ENV_ALLOCATOR = "NITRO_EMU_ALLOCATOR"
ENV_BLOBS = "NITRO_CLI_BLOBS"
ENV_BOOT_TIMEOUT = "NITRO_EMU_BOOT_TIMEOUT"
ENV_BACKTRACE = "BACKTRACE"
# Used when neither --allocator nor NITRO_EMU_ALLOCATOR is given and the default file is absent.
DEFAULT_POOL = AllocatorConfig(memory_mib=2048, cpu_count=2)
DEFAULT_BLOBS = Path(__file__).resolve().parent / "blobs"
LAUNCHER_MODULE = "enclave_runtime.emulator.launcher"
BUILDER_MODULE = "enclave_runtime.host.eif_builder"

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF
# nitro-cli's calculate_necessary_timeout: 90 s per started 6 GiB of EIF and per 100 GiB of memory.
BOOT_TIMEOUT_STEP = 90.0
GIB = 1024 * MIB
CONSOLE_POLL_SECONDS = 0.1
CONSOLE_CHUNK = 64 * 1024

_UNSIGNED = re.compile(r"\+?[0-9]+")  # what Rust's str::parse::<u32 / u64> accepts
_MEMORY_UNITS = {"": 1, "M": 1, "m": 1, "G": 1024, "g": 1024, "T": 1024 * 1024, "t": 1024 * 1024}
_CONFIG_INTEGER_LIMITS = {"memory_mib": U64_MAX, "enclave_cid": U64_MAX, "cpu_count": U32_MAX}


class UsageError(EnclaveOpsError):
    """Flags that do not go together; reported like argparse's own errors (exit status 2)."""


class EmulatorSettingError(EnclaveOpsError):
    """An emulator setting from the environment that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this invocation keeps state and finds its pool and blobs."""

    root: Path
    allocator_path: Path
    allocator_is_explicit: bool
    blobs: Path

    def state(self) -> EmulatorState:
        return EmulatorState(self.root)

    def pool(self) -> AllocatorConfig:
        """The allocator pool; the built-in default when the default file does not exist."""
        if not self.allocator_is_explicit and not self.allocator_path.exists():
            return DEFAULT_POOL
        return allocator_config.load(self.allocator_path)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """run-enclave's arguments, from the command line or a ``--config`` JSON file."""

    eif_path: str
    memory_mib: int
    cpu_count: int | None = None
    cpu_ids: tuple[int, ...] | None = None
    enclave_cid: int | None = None
    debug_mode: bool = False
    attach_console: bool = False
    enclave_name: str | None = None

    def resources(self) -> ResourceRequest:
        return ResourceRequest(
            memory_mib=self.memory_mib,
            cpu_count=self.cpu_count,
            cpu_ids=self.cpu_ids,
            enclave_cid=self.enclave_cid,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    context = _context(args)
    try:
        return int(args.run(context, args))
    except UsageError as err:
        subparser: argparse.ArgumentParser = args.subparser
        subparser.error(str(err))  # exits with status 2, like argparse's own checks
    except NitroCliError as err:
        show_backtrace = os.environ.get(ENV_BACKTRACE) == "1"
        log_dir = context.state().log_dir
        print(err.render(log_dir=log_dir, show_backtrace=show_backtrace), file=sys.stderr)
        return err.exit_status
    except EnclaveOpsError as err:
        print(f"nitro-emu: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nitro-emu",
        description="A Nitro Enclaves emulator with nitro-cli's command line.",
    )
    parser.add_argument("--version", action="version", version=f"nitro-emu {__version__}")
    _add_emulator_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _add_emulator_options(common, argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in (
        _register_run,
        _register_terminate,
        _register_describe_enclaves,
        _register_build,
        _register_describe_eif,
        _register_console,
        _register_pcr,
        _register_aws_services,
    ):
        register(subparsers, common)
    return parser


def _add_emulator_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--root",
        type=Path,
        default=default,
        help="emulator state directory (default: $NITRO_EMU_ROOT, else /run/nitro-emu)",
    )
    parser.add_argument(
        "--allocator",
        type=Path,
        default=default,
        help=(
            f"allocator.yaml with the enclave pool (default: ${ENV_ALLOCATOR}, else "
            f"{allocator_config.DEFAULT_PATH}; if that is absent, 2048 MiB and 2 CPUs)"
        ),
    )
    parser.add_argument(
        "--blobs",
        type=Path,
        default=default,
        help=f"kernel/init blobs for build-enclave (default: ${ENV_BLOBS}, else nitro-emu's own)",
    )


def _subparser(
    subparsers: Any,
    common: argparse.ArgumentParser,
    name: str,
    summary: str,
    handler: Callable[[Context, argparse.Namespace], int],
) -> argparse.ArgumentParser:
    subparser = subparsers.add_parser(name, help=summary, description=summary, parents=[common])
    subparser.set_defaults(run=handler, subparser=subparser)
    return subparser


def _context(args: argparse.Namespace) -> Context:
    allocator = args.allocator or os.environ.get(ENV_ALLOCATOR)
    blobs = args.blobs or os.environ.get(ENV_BLOBS)
    return Context(
        root=args.root or default_root(),
        allocator_path=Path(allocator) if allocator else allocator_config.DEFAULT_PATH,
        allocator_is_explicit=bool(allocator),
        blobs=Path(blobs) if blobs else DEFAULT_BLOBS,
    )


# run-enclave


def _register_run(subparsers: Any, common: argparse.ArgumentParser) -> None:
    run = _subparser(subparsers, common, "run-enclave", "Starts a new enclave", _run_enclave)
    run.add_argument("--cpu-ids", nargs="+", help="CPU ids to give the enclave")
    run.add_argument("--cpu-count", help="number of CPUs")
    run.add_argument("--memory", help="memory in MiB; a suffix M, G or T sets the unit")
    run.add_argument("--eif-path", help="the enclave image file")
    run.add_argument("--enclave-cid", help="CID for the enclave (default: the lowest free >= 16)")
    run.add_argument("--debug-mode", action="store_true", help="keep the console for `console`")
    run.add_argument(
        "--attach-console", action="store_true", help="follow the console (implies debug mode)"
    )
    run.add_argument("--enclave-name", help="the enclave's name (default: the EIF's file name)")
    run.add_argument(
        "--config", metavar="json-config", help="read the settings from a nitro-cli JSON file"
    )


def _run_enclave(context: Context, args: argparse.Namespace) -> int:
    settings = _run_settings(args)
    timeout = _boot_timeout_override()
    state = context.state()
    _prune(state)
    pool = context.pool()
    try:
        record = _start_enclave(state, pool, settings, timeout)
    except NitroCliError as err:
        raise err.relayed_by_enclave_process() from None
    _print_json(record.run_info())
    if settings.attach_console:
        return _follow_console(state, record, None)
    return 0


def _run_settings(args: argparse.Namespace) -> RunSettings:
    _check_run_flags(args)
    if args.config is not None:
        settings = _settings_from_config(args.config)
        if args.attach_console:
            settings = dataclasses.replace(settings, attach_console=True, debug_mode=True)
        return settings
    # Parsed in nitro-cli's order (RunEnclavesArgs::new_with), so the same flag is blamed first.
    cpu_count = _parse_unsigned("cpu-count", args.cpu_count, U32_MAX)
    enclave_cid = _parse_enclave_cid(args.enclave_cid)
    memory_mib = _parse_memory(args.memory)
    cpu_ids = None if args.cpu_ids is None else tuple(map(_parse_cpu_id, args.cpu_ids))
    return RunSettings(
        eif_path=args.eif_path,
        memory_mib=memory_mib,
        cpu_count=cpu_count,
        cpu_ids=cpu_ids,
        enclave_cid=enclave_cid,
        debug_mode=args.debug_mode or args.attach_console,
        attach_console=args.attach_console,
        enclave_name=args.enclave_name,
    )


def _check_run_flags(args: argparse.Namespace) -> None:
    """clap's rules for run-enclave: what --config excludes, and what is required without it."""
    given = {
        "--cpu-ids": args.cpu_ids is not None,
        "--cpu-count": args.cpu_count is not None,
        "--memory": args.memory is not None,
        "--eif-path": args.eif_path is not None,
        "--enclave-cid": args.enclave_cid is not None,
        "--debug-mode": args.debug_mode,
        "--enclave-name": args.enclave_name is not None,
    }
    if given["--cpu-ids"] and given["--cpu-count"]:
        raise UsageError("the argument '--cpu-ids' cannot be used with '--cpu-count'")
    if args.config is not None:
        clashing = next((flag for flag, present in given.items() if present), None)
        if clashing is not None:
            raise UsageError(f"the argument '--config' cannot be used with '{clashing}'")
        return
    missing = [flag for flag in ("--memory", "--eif-path") if not given[flag]]
    if not given["--cpu-ids"] and not given["--cpu-count"]:
        missing.insert(0, "--cpu-ids <cpu-ids>...|--cpu-count")
    if missing:
        raise UsageError(
            "the following required arguments were not provided: " + ", ".join(missing)
        )


def _parse_unsigned(name: str, value: str | None, limit: int) -> int | None:
    return None if value is None else _unsigned(name, value, limit)


def _unsigned(name: str, value: str, limit: int) -> int:
    if not _UNSIGNED.fullmatch(value) or int(value) > limit:
        raise errors.invalid_argument(name, value, reason=f"`{name}` is not a number")
    return int(value)


def _parse_cpu_id(value: str) -> int:
    return _unsigned("cpu-id", value, U32_MAX)


def _parse_enclave_cid(value: str | None) -> int | None:
    """nitro-cli's CID checks: 0 means "pick one"; 1-3 and u32::MAX and above are refused."""
    cid = _parse_unsigned("enclave-cid", value, U64_MAX)
    if cid is None:
        return None
    if cid == 0:
        print("The enclave CID will be auto-generated as the provided CID is 0", file=sys.stderr)
        return None
    if cid <= HOST_CID or cid == U32_MAX:
        reason = f"CID {cid} is a well-known CID, not to be used for enclaves"
    elif cid == PARENT_CID:
        reason = f"CID {cid} is the CID of the parent VM, not to be used for enclaves"
    elif cid > U32_MAX:
        reason = f"CID {cid} is higher than the maximum supported (u32 max) for a vsock device"
    else:
        return cid
    raise errors.invalid_argument("enclave-cid", str(value), reason=reason)


def _parse_memory(value: str) -> int:
    """``--memory``: a number of MiB, optionally followed by M, G or T (either case)."""
    unit = value.lstrip("0123456789")
    number = value[: len(value) - len(unit)]
    if not number or int(number) > U64_MAX or unit not in _MEMORY_UNITS:
        raise errors.invalid_argument(
            "memory", value, reason="`memory` must be a number of MiB, optionally with M, G or T"
        )
    return int(number) * _MEMORY_UNITS[unit]


def _settings_from_config(path: str) -> RunSettings:
    """A nitro-cli ``--config`` file: RunEnclavesArgs as JSON (unknown keys are ignored)."""
    try:
        with open(path, encoding="utf-8") as stream:
            document = json.load(stream)
    except OSError as err:
        raise errors.file_operation_failure(path, "Open", reason=err.strerror) from None
    except ValueError as err:
        raise errors.serde_error(f"Invalid JSON format for config file: {err}") from None
    if not isinstance(document, dict):
        raise errors.serde_error("the config file must hold a JSON object (RunEnclavesArgs)")
    fields = _ConfigFields(document)
    cpu_count = fields.integer("cpu_count")
    cpu_ids = fields.cpu_ids()
    if cpu_count is None and cpu_ids is None:
        raise errors.missing_argument("cpu-count` or `cpu-ids")
    if cpu_count is not None and cpu_ids is not None:
        raise errors.conflicting_arguments("cpu-count", "cpu-ids")
    debug_mode, attach_console = fields.flag("debug_mode"), fields.flag("attach_console")
    enclave_cid = fields.integer("enclave_cid")
    return RunSettings(
        eif_path=fields.required_string("eif_path"),
        memory_mib=fields.required_integer("memory_mib"),
        cpu_count=cpu_count,
        cpu_ids=cpu_ids,
        enclave_cid=enclave_cid or None,  # 0 lets the driver pick, as on the command line
        debug_mode=debug_mode or attach_console,
        attach_console=attach_console,
        enclave_name=fields.string("enclave_name"),
    )


class _ConfigFields:
    """serde's view of the config object: typed fields, ``null`` for an absent optional."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document

    def integer(self, key: str) -> int | None:
        value = self.document.get(key)
        if value is None:
            return None
        if not _is_unsigned(value, _CONFIG_INTEGER_LIMITS[key]):
            raise errors.serde_error(f"config field {key} must be a non-negative integer")
        return int(value)

    def required_integer(self, key: str) -> int:
        value = self.integer(key)
        if value is None:
            raise errors.serde_error(f"config field {key} is missing")
        return value

    def cpu_ids(self) -> tuple[int, ...] | None:
        value = self.document.get("cpu_ids")
        if value is None:
            return None
        if not isinstance(value, list) or not all(_is_unsigned(cpu, U32_MAX) for cpu in value):
            raise errors.serde_error("config field cpu_ids must be a list of CPU ids")
        return tuple(value)

    def flag(self, key: str) -> bool:
        value = self.document.get(key, False)
        if not isinstance(value, bool):
            raise errors.serde_error(f"config field {key} must be true or false")
        return value

    def string(self, key: str) -> str | None:
        value = self.document.get(key)
        if value is not None and not isinstance(value, str):
            raise errors.serde_error(f"config field {key} must be a string")
        return value

    def required_string(self, key: str) -> str:
        value = self.string(key)
        if value is None:
            raise errors.serde_error(f"config field {key} is missing")
        return value


def _is_unsigned(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _start_enclave(
    state: EmulatorState, pool: AllocatorConfig, settings: RunSettings, timeout: float | None
) -> EnclaveRecord:
    """What nitro-cli's enclave process does for run-enclave, in its order of checks."""
    eif_size = _eif_size(settings.eif_path)
    request = settings.resources()
    check_cpu_request(pool, request)
    check_memory_for_eif(settings.memory_mib, eif_size)
    print("Start allocating memory...", file=sys.stderr)
    image = _verified_image(settings.eif_path)
    record = state.reserve(
        pool,
        request,
        name=settings.enclave_name or default_enclave_name(settings.eif_path),
        eif_path=Path(settings.eif_path).absolute(),
        debug_mode=settings.debug_mode,
    )
    try:
        record = _with_image(record, image)
        state.save(record)
        print(
            f"Started enclave with enclave-cid: {record.enclave_cid}, memory: "
            f"{record.memory_mib} MiB, cpu-ids: {list(record.cpu_ids)}",
            file=sys.stderr,
        )
        heartbeat_timeout = timeout or boot_timeout(eif_size, record.memory_mib)
        process_id = _launch(state, record, image, heartbeat_timeout)
        return state.mark_running(record, process_id)
    except BaseException:
        state.remove(record.enclave_id)
        raise


def _eif_size(eif_path: str) -> int:
    try:
        with open(eif_path, "rb") as eif:
            return os.fstat(eif.fileno()).st_size
    except OSError as err:
        raise errors.file_operation_failure(eif_path, "Open", reason=err.strerror) from None


def _verified_image(eif_path: str) -> EifImage:
    """The EIF, parsed and CRC-checked (E35); a signed one must verify now (E59)."""
    try:
        image = read_eif(eif_path)
    except EifError as err:
        raise errors.eif_parsing_error(str(err)) from None
    if not image.crc_ok:
        raise errors.eif_parsing_error(
            f"CRC mismatch: the header says 0x{image.header.crc32:08x}, the content gives "
            f"0x{image.crc_computed:08x}; the file is corrupt or was changed after it was built"
        )
    if image.signature_check is not None and not image.signature_check.valid:
        raise errors.eif_signature_checker_error(image.signature_check.reason)
    if image.signatures:
        now = datetime.datetime.now(datetime.timezone.utc)
        validity = check_certificate_validity(image.signatures[0].signing_certificate, now)
        if not validity.valid:
            raise errors.eif_signature_checker_error(validity.reason)
    return image


def _with_image(record: EnclaveRecord, image: EifImage) -> EnclaveRecord:
    identity = image.metadata
    return dataclasses.replace(
        record,
        measurements=image.measurements.to_nitro_cli(),
        image_name=identity.image_name if identity is not None else None,
        image_version=identity.image_version if identity is not None else None,
        metadata=identity.describe() if identity is not None else None,
    )


def _boot_timeout_override() -> float | None:
    """NITRO_EMU_BOOT_TIMEOUT: seconds to wait for the heartbeat instead of nitro-cli's rule."""
    override = os.environ.get(ENV_BOOT_TIMEOUT)
    if not override:
        return None
    try:
        seconds = float(override)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise EmulatorSettingError(
            f"{ENV_BOOT_TIMEOUT}={override!r} is not a number of seconds greater than 0"
        )
    return seconds


def boot_timeout(eif_size: int, memory_mib: int) -> float:
    """How long nitro-cli waits for an enclave's boot heartbeat (calculate_necessary_timeout)."""
    eif_steps = 1 + (max(eif_size, 1) - 1) // (6 * GIB)
    memory_steps = 1 + (max(memory_mib * MIB, 1) - 1) // (100 * GIB)
    return (eif_steps + memory_steps) * BOOT_TIMEOUT_STEP


def _launch(
    state: EmulatorState, record: EnclaveRecord, image: EifImage, heartbeat_timeout: float
) -> int:
    launcher = _launcher()
    request = launcher.LaunchRequest(
        root=state.root,
        record=record,
        image=image,
        debug_mode=record.debug_mode,
        heartbeat_timeout=heartbeat_timeout,
    )
    try:
        return int(launcher.launch(request))
    except NitroCliError:
        raise
    except EnclaveOpsError as err:
        raise errors.enclave_boot_failure(str(err)) from None


# describe-enclaves, terminate-enclave, console


def _register_describe_enclaves(subparsers: Any, common: argparse.ArgumentParser) -> None:
    describe = _subparser(
        subparsers,
        common,
        "describe-enclaves",
        "Returns a list of the running enclaves",
        _describe_enclaves,
    )
    describe.add_argument("--metadata", action="store_true", help="add each enclave's EIF metadata")


def _describe_enclaves(context: Context, args: argparse.Namespace) -> int:
    state = context.state()
    _prune(state)
    _print_json([record.describe_info(args.metadata) for record in state.running()])
    return 0


def _register_terminate(subparsers: Any, common: argparse.ArgumentParser) -> None:
    terminate = _subparser(
        subparsers, common, "terminate-enclave", "Terminates an enclave", _terminate_enclave
    )
    which = terminate.add_mutually_exclusive_group(required=True)
    which.add_argument("--enclave-id", help="the enclave's ID")
    which.add_argument("--enclave-name", help="the enclave's name")
    which.add_argument("--all", action="store_true", help="terminate every running enclave")


def _terminate_enclave(context: Context, args: argparse.Namespace) -> int:
    state = context.state()
    _prune(state)
    if args.all:
        terminated = [_terminate(state, record) for record in state.running()]
        _print_json([record.terminate_info() for record in terminated])
        return 0
    record = _find_enclave(state, args.enclave_id, args.enclave_name)
    _print_json(_terminate(state, record).terminate_info())
    return 0


def _terminate(state: EmulatorState, record: EnclaveRecord) -> EnclaveRecord:
    _launcher().terminate(state.root, record)
    state.remove(record.enclave_id)
    print(f"Successfully terminated enclave {record.enclave_id}.", file=sys.stderr)
    return record


def _register_console(subparsers: Any, common: argparse.ArgumentParser) -> None:
    console = _subparser(
        subparsers, common, "console", "Connect to the console of an enclave", _console
    )
    which = console.add_mutually_exclusive_group(required=True)
    which.add_argument("--enclave-id", help="the enclave's ID")
    which.add_argument("--enclave-name", help="the enclave's name")
    console.add_argument(
        "--disconnect-timeout", help="stop following the console after this many seconds"
    )


def _console(context: Context, args: argparse.Namespace) -> int:
    state = context.state()
    _prune(state)
    record = _find_enclave(state, args.enclave_id, args.enclave_name)
    timeout = _parse_unsigned("disconnect-timeout", args.disconnect_timeout, U64_MAX)
    if not record.debug_mode:
        raise errors.console_connection_failure(
            "The enclave was not started with the debug flag set, include '--debug-mode' in "
            "the run-enclave command"
        )
    return _follow_console(state, record, timeout)


def _find_enclave(
    state: EmulatorState, enclave_id: str | None, enclave_name: str | None
) -> EnclaveRecord:
    """The running enclave that ``--enclave-id`` or ``--enclave-name`` names, as nitro-cli does."""
    running = state.running()
    if enclave_name is not None:
        matches = [record for record in running if record.enclave_name == enclave_name]
        if len(matches) != 1:
            raise errors.enclave_naming_error(
                "No enclave matched the given name."
                if not matches
                else "Conflicting enclave names have been found."
            )
        return matches[0]
    # nitro-cli reaches the enclave process by the slot after the last "-enc" only.
    slot = str(enclave_id).rpartition("-enc")[2]
    for record in running:
        if record.enclave_id.rpartition("-enc")[2] == slot:
            return record
    raise errors.socket_error(
        f"Failed to connect to specific enclave process: no running enclave has the ID "
        f"{enclave_id!r} (see describe-enclaves)"
    )


def _follow_console(state: EmulatorState, record: EnclaveRecord, timeout: int | None) -> int:
    """Print the enclave's console from its start, then follow it until the enclave ends."""
    print(f"Connecting to the console for enclave {record.enclave_cid}...", flush=True)
    path = Path(_launcher().console_log_path(state.root, record))
    try:
        console = open(path, "rb")  # noqa: SIM115 - closed below, after following
    except OSError as err:
        raise errors.console_connection_failure(
            f"cannot open the console of enclave {record.enclave_id} ({path}): {err.strerror}"
        ) from None
    print("Successfully connected to the console.", flush=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    with console:
        _copy_until_end(console, lambda: _enclave_running(state, record), deadline)
    return 0


def _copy_until_end(console: BinaryIO, running: Callable[[], bool], deadline: float | None) -> None:
    output = sys.stdout.buffer
    while deadline is None or time.monotonic() < deadline:
        chunk = console.read(CONSOLE_CHUNK)
        if chunk:
            output.write(chunk)
            output.flush()
        elif not running():
            output.write(console.read())  # what was written just before the end
            output.flush()
            return
        else:
            time.sleep(CONSOLE_POLL_SECONDS)


def _enclave_running(state: EmulatorState, record: EnclaveRecord) -> bool:
    current = state.get(record.enclave_id)
    return current is not None and state.is_alive(current)


# build-enclave, describe-eif, pcr


def _register_build(subparsers: Any, common: argparse.ArgumentParser) -> None:
    build = _subparser(
        subparsers,
        common,
        "build-enclave",
        "Builds an enclave image and saves it to a file",
        _build_enclave,
    )
    build.add_argument("--docker-uri", required=True, help="the Docker image to build from")
    build.add_argument("--output-file", required=True, help="where to write the EIF")
    build.add_argument("--signing-certificate", help="PEM certificate to sign the EIF with")
    build.add_argument("--private-key", help="PEM EC private key of the signing certificate")
    build.add_argument("--name", dest="image_name", help="name for the enclave image")
    build.add_argument("--version", dest="image_version", help="version of the enclave image")
    build.add_argument("--metadata", help="JSON file with custom metadata")


def _build_enclave(context: Context, args: argparse.Namespace) -> int:
    if (args.signing_certificate is None) != (args.private_key is None):
        present, absent = (
            ("--signing-certificate", "--private-key")
            if args.private_key is None
            else ("--private-key", "--signing-certificate")
        )
        raise UsageError(f"the argument '{present}' requires '{absent}'")
    print("Start building the Enclave Image...", file=sys.stderr)
    builder = _eif_builder()
    try:
        measurements = builder.build_from_docker_image(
            docker_uri=args.docker_uri,
            output_path=Path(args.output_file),
            blobs_dir=context.blobs,
            signing_certificate=_optional_path(args.signing_certificate),
            private_key=_optional_path(args.private_key),
            image_name=args.image_name,
            image_version=args.image_version,
            metadata_path=_optional_path(args.metadata),
        )
    except NitroCliError:
        raise
    except EnclaveOpsError as err:
        raise errors.eif_building_error(str(err)) from None
    print("Enclave Image successfully created.", file=sys.stderr)
    _print_json({"Measurements": measurements.to_nitro_cli()})
    return 0


def _eif_builder() -> ModuleType:
    try:
        return importlib.import_module(BUILDER_MODULE)
    except ModuleNotFoundError as err:
        if err.name is None or not f"{BUILDER_MODULE}.".startswith(f"{err.name}."):
            raise  # the builder is there but one of its own imports is not: a bug to see
        raise errors.eif_building_error(
            f"the native EIF builder ({BUILDER_MODULE}) is not installed"
        ) from None


def _register_describe_eif(subparsers: Any, common: argparse.ArgumentParser) -> None:
    describe = _subparser(
        subparsers,
        common,
        "describe-eif",
        "Returns information about the EIF found at a given path.",
        _describe_eif,
    )
    describe.add_argument("--eif-path", required=True, help="the EIF to describe")


def _describe_eif(context: Context, args: argparse.Namespace) -> int:
    try:
        image = read_eif(args.eif_path)
    except EifError as err:
        raise errors.eif_parsing_error(str(err)) from None
    _print_json(image.describe())
    return 0


def _register_pcr(subparsers: Any, common: argparse.ArgumentParser) -> None:
    pcr = _subparser(
        subparsers, common, "pcr", "Return the PCR hash value of the given input", _pcr
    )
    which = pcr.add_mutually_exclusive_group(required=True)
    which.add_argument("--input", help="a file: prints the PCR of its bytes")
    which.add_argument(
        "--signing-certificate", help="a PEM signing certificate: prints PCR8 of EIFs it signs"
    )


def _pcr(context: Context, args: argparse.Namespace) -> int:
    if args.signing_certificate is not None:
        pem = _read_input(args.signing_certificate)
        try:
            _print_json({"PCR8": certificate_pcr(pem).hex()})
        except EifSignatureError as err:
            raise errors.hasher_error(str(err)) from None
        return 0
    hasher = PcrHasher()
    try:
        with open(args.input, "rb") as data:
            while chunk := data.read(CONSOLE_CHUNK):
                hasher.update(chunk)
    except OSError as err:
        raise errors.file_operation_failure(reason=f"{args.input}: {err.strerror}") from None
    _print_json({"PCR": hasher.pcr().hex()})
    return 0


def _register_aws_services(subparsers: Any, common: argparse.ArgumentParser) -> None:
    services = _subparser(
        subparsers,
        common,
        "aws-services",
        "Serve the emulated parent's IMDSv2 and KMS until SIGTERM (not a nitro-cli command)",
        _aws_services,
    )
    services.add_argument("--region", default="us-east-1", help="the KMS region to emulate")


def _aws_services(context: Context, args: argparse.Namespace) -> int:
    from enclave_runtime.emulator.aws_services import serve_until_signalled  # noqa: PLC0415

    return serve_until_signalled(context.root, args.region)


def _read_input(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise errors.file_operation_failure(reason=f"{path}: {err.strerror}") from None


# shared


def _prune(state: EmulatorState) -> None:
    """Forget enclaves whose process is gone, letting the launcher clean up after each."""
    for pruned in state.prune_dead(lambda record: _launcher().cleanup(record)):
        if pruned.cleanup_error is not None:
            print(
                f"Warning: cleaning up after the ended enclave {pruned.record.enclave_id} "
                f"failed: {pruned.cleanup_error}",
                file=sys.stderr,
            )


def _launcher() -> ModuleType:
    return importlib.import_module(LAUNCHER_MODULE)


def _optional_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _print_json(document: Any) -> None:
    """serde_json::to_string_pretty's layout: two-space indent, UTF-8 as is."""
    print(json.dumps(document, indent=2, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    sys.exit(main())
