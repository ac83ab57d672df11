"""``enclaveops build``: the release image of an enclaver.yaml (docs/build.md).

stdout: one JSON document (``Sources``, ``Measurements``, ``Image``...); stderr: progress and a
short summary, unless ``--json``. Exit status 0, or 1 with one message on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from enclave_runtime.build.explain import SectionDigest, explain
from enclave_runtime.build.pipeline import BUILDERS, BuildOptions, BuildResult, build
from enclave_runtime.formats.eif_sizes import ComponentSizes, component_sizes
from enclave_runtime.formats.nitro_cli_rules import minimum_memory_mib


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build the release image of an enclaver.yaml (amend, EIF, sleeve image)",
        description=(
            "Amend the app image with the enclave runtime, build its EIF and the release image "
            "named by target. The same inputs give the same EIF, PCRs and image IDs; a release "
            "image built from the same inputs is left as it is."
        ),
    )
    parser.add_argument(
        "-f",
        "--file",
        type=Path,
        default=Path("enclaver.yaml"),
        help="the manifest (default: ./enclaver.yaml)",
    )
    parser.add_argument(
        "--pull",
        action="store_true",
        help="pull the source images first, present or not (never the project's enclaveops/ ones)",
    )
    parser.add_argument(
        "--builder",
        choices=BUILDERS,
        default="auto",
        help="EIF builder (default auto: nitro-cli where AWS nitro-cli is installed, else native)",
    )
    parser.add_argument(
        "--nitro-cli",
        default="nitro-cli",
        metavar="PATH",
        help="the nitro-cli executable (default: nitro-cli on PATH)",
    )
    parser.add_argument(
        "--blobs",
        type=Path,
        metavar="DIR",
        help="kernel, cmdline, init and nsm.ko (default: $NITRO_CLI_BLOBS, else nitro-emu's)",
    )
    parser.add_argument(
        "--force", action="store_true", help="build even when the inputs are unchanged"
    )
    parser.add_argument(
        "--eif-output", type=Path, metavar="PATH", help="also write the EIF to PATH"
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help=(
            "show what goes into each PCR (every EIF section with its size and SHA-384) and the "
            "bytes each part adds: kernel, bootstrap, runtime, app"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the JSON: no progress or summary"
    )
    parser.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    options = BuildOptions(
        pull=args.pull,
        builder=args.builder,
        nitro_cli=args.nitro_cli,
        blobs=args.blobs,
        force=args.force,
        eif_output=args.eif_output,
    )
    progress = None if args.json else _progress
    with tempfile.TemporaryDirectory(prefix="enclaveops-explain-") as scratch:
        if args.explain and options.eif_output is None:
            # --explain reads the EIF: a skipped build copies it out of the release image.
            options = dataclasses.replace(options, eif_output=Path(scratch) / "application.eif")
        result = build(args.file, options, progress=progress)
        explained = args.explain and options.eif_output is not None
        sections = explain(options.eif_output) if explained else []
        sizes = component_sizes(options.eif_output) if explained else None
    document = result.to_json()
    if sections:
        document["Explain"] = [section.to_json() for section in sections]
    if sizes is not None:
        document["Sizes"] = sizes.to_json()
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if not args.json:
        _summary(result, time.monotonic() - started, sections, sizes)
    return 0


def _progress(message: str) -> None:
    print(f"enclaveops build: {message}", file=sys.stderr, flush=True)


def _summary(
    result: BuildResult,
    seconds: float,
    sections: list[SectionDigest],
    sizes: ComponentSizes | None,
) -> None:
    verb = "up to date" if result.skipped else f"built in {seconds:.1f} s ({result.builder})"
    lines = [f"{result.image}: {verb}; {result.reason}"]
    lines += [f"  {s.name:<6} {s.reference}  {s.image_id}" for s in result.sources]
    lines.append(f"  EIF    {result.eif_size / 1e6:.1f} MB  sha256:{result.eif_sha256}")
    lines += [f"  {key:<6} {value}" for key, value in _pcrs(result).items()]
    lines += _explain_lines(sections)
    lines += _size_lines(sizes)
    print("\n".join(lines), file=sys.stderr)


def _pcrs(result: BuildResult) -> dict[str, Any]:
    shown = result.measurements.to_nitro_cli()
    shown.pop("HashAlgorithm")
    return shown


def _explain_lines(sections: list[SectionDigest]) -> list[str]:
    if not sections:
        return []
    lines = ["  what each PCR measures (PCRn = SHA384(48 zero bytes || SHA384(sections))):"]
    for section in sections:
        pcrs = ", ".join(f"PCR{index}" for index in section.pcrs) or "no PCR"
        lines.append(
            f"    [{section.index}] {section.kind:<9} {section.size:>11} bytes  "
            f"sha384:{section.sha384[:16]}…  {pcrs}"
        )
    return lines


def _size_lines(sizes: ComponentSizes | None) -> list[str]:
    """What each part adds to the EIF, and nitro-cli's memory minimum for the whole."""
    if sizes is None:
        return []
    mib = 1 << 20
    lines = ["  bytes each part adds to the EIF:"]
    for name, size in sizes.to_json().items():
        share = f"{100 * size / sizes.total:5.1f} %" if name != "total" else ""
        lines.append(f"    {name:<9} {size:>11} bytes {size / mib:7.1f} MiB  {share}")
    lines.append(
        f"    enclave memory needed: >= {minimum_memory_mib(sizes.total)} MiB "
        "(nitro-cli: 4 x the EIF)"
    )
    return lines
