"""``enclaveops``: the host utility (manifest check, EIF build/describe/pcr, attestation verify).

Each command group lives in its own module with a ``register(subparsers)`` function; a
subcommand stores its handler as ``run`` and returns the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from enclave_runtime import __version__
from enclave_runtime.cli import attest_cmd, build_cmd, eif_cmd, manifest_cmd, run_cmd
from enclave_runtime.errors import EnclaveOpsError

COMMAND_GROUPS = (manifest_cmd, eif_cmd, attest_cmd, build_cmd, run_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclaveops", description="Build, inspect and verify AWS Nitro Enclaves artifacts."
    )
    parser.add_argument("--version", action="version", version=f"enclaveops {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except EnclaveOpsError as err:
        print(f"enclaveops: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
