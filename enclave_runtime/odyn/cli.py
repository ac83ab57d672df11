"""The ``odyn`` command: ``odyn --config-dir DIR [options] -- ARGV...``.

The amended image's ENTRYPOINT (``odyn --config-dir /etc/enclaver -- <app ENTRYPOINT+CMD>``).
With ``--init`` odyn is the EIF's own PID 1 instead (see :mod:`enclave_runtime.odyn.raw_init`).
Exit status: the application's exit code, 128 + the signal number if a signal killed it, or 1 if
odyn failed before the application could start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.odyn import raw_init
from enclave_runtime.odyn.supervisor import (
    DEFAULT_LINGER,
    EXIT_FATAL,
    SupervisorOptions,
    run_supervisor,
)
from enclave_runtime.process.launcher import DEFAULT_GRACE_PERIOD
from enclave_runtime.transport.nsm import DEFAULT_NSM_PATH

LOG_FORMAT = "[odyn] %(levelname)s %(message)s"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odyn",
        description="Supervise an application inside a Nitro enclave (or a nitro-emu one).",
        epilog="Put the application's command after --, e.g. odyn --config-dir /etc/enclaver "
        "-- /usr/bin/app --port 8080",
    )
    parser.add_argument(
        "--config-dir", required=True, type=Path, help="directory holding enclaver.yaml"
    )
    parser.add_argument(
        "--no-bootstrap",
        action="store_true",
        help="do not bring lo up or seed the kernel RNG from the NSM (outside an enclave)",
    )
    parser.add_argument(
        "--no-console",
        action="store_true",
        help="do not capture output or serve the log port; the application writes to odyn's "
        "stdout and stderr",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more detail in odyn's own messages"
    )
    parser.add_argument(
        "--workdir", help="the application's working directory (default: odyn's own)"
    )
    parser.add_argument(
        "--user",
        help="run the application as USER[:GROUP] (names or ids, as Docker's USER; default: "
        "odyn's own user)",
    )
    parser.add_argument(
        "--grace-period",
        type=_seconds,
        default=DEFAULT_GRACE_PERIOD,
        help="seconds between forwarding SIGTERM and sending SIGKILL (default %(default)s)",
    )
    parser.add_argument(
        "--linger",
        type=_seconds,
        default=DEFAULT_LINGER,
        help="at most this many seconds to wait, at the end, for the host to read the final "
        "status and log (default %(default)s)",
    )
    parser.add_argument(
        "--nsm-path",
        default=DEFAULT_NSM_PATH,
        help="the NSM device or emulated NSM socket (default %(default)s)",
    )
    parser.add_argument(
        "--init",
        action="store_true",
        help="run as PID 1 of an EIF without AWS's init: mount /proc, /sys, /dev, /run, /tmp, "
        "load /nsm.ko, send the boot heartbeat, and power the enclave off at the end",
    )
    parser.add_argument(
        "--rootfs",
        type=Path,
        help="with --init: chroot into this directory of the ramdisks before supervising",
    )
    parser.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str]) -> tuple[SupervisorOptions, int]:
    """The supervisor's options and the verbosity; exits with usage on bad arguments."""
    options, verbosity, _init = parse_command_line(argv)
    return options, verbosity


def parse_command_line(
    argv: Sequence[str],
) -> tuple[SupervisorOptions, int, raw_init.InitOptions | None]:
    """As :func:`parse_args`, plus the raw-init options when ``--init`` is given."""
    parser = build_parser()
    arguments = list(argv)
    if "--" in arguments:
        split = arguments.index("--")
        args = parser.parse_args(arguments[:split])
        command = arguments[split + 1 :]
    else:
        args = parser.parse_args(arguments)
        command = args.command
    if args.command and "--" in arguments:
        parser.error(f"unexpected arguments before --: {' '.join(args.command)}")
    if not command:
        parser.error("give the application's command after --")
    if args.rootfs is not None and not args.init:
        parser.error("--rootfs is only meaningful with --init")
    options = SupervisorOptions(
        config_dir=args.config_dir,
        argv=tuple(command),
        bootstrap=not args.no_bootstrap,
        console=not args.no_console,
        capture_own_stdio=not args.no_console,
        workdir=args.workdir,
        user=args.user,
        nsm_path=args.nsm_path,
        grace_period=args.grace_period,
        linger=args.linger,
    )
    init = raw_init.InitOptions(rootfs=args.rootfs, nsm_path=args.nsm_path) if args.init else None
    return options, args.verbose, init


def configure_logging(verbosity: int) -> None:
    """odyn's messages go to stderr, which the console turns into part of the log stream."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("odyn")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    logger.propagate = False


def supervise(options: SupervisorOptions) -> int:
    try:
        return asyncio.run(run_supervisor(options))
    except EnclaveOpsError as err:
        # Only when the status server cannot start: later failures are published as "fatal".
        print(f"odyn: {err}", file=sys.stderr)
        return EXIT_FATAL


def run_as_init(options: SupervisorOptions, init: raw_init.InitOptions) -> int:
    """Bring the enclave up, supervise, then end the enclave as its PID 1 must."""
    raw_init.require_pid_1("run as the enclave's init")  # before anything touches the system
    try:
        raw_init.prepare(init)
    except EnclaveOpsError as err:
        print(f"odyn: {err}", file=sys.stderr, flush=True)
        return raw_init.finish(EXIT_FATAL)
    return raw_init.finish(supervise(options))


def main(argv: Sequence[str] | None = None) -> int:
    options, verbosity, init = parse_command_line(sys.argv[1:] if argv is None else argv)
    configure_logging(verbosity)
    if init is None:
        return supervise(options)
    try:
        return run_as_init(options, init)
    except EnclaveOpsError as err:
        print(f"odyn: {err}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
