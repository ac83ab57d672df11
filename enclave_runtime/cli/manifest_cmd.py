"""``enclaveops manifest check``: validate an enclaver.yaml and say what it configures.

Findings are the command's output, so they go to stdout (one ``FILE:LINE: path: reason`` line
each, like a linter) and the exit status is 1. A file that cannot be read at all is an
operational failure: in text mode it goes to stderr through ``enclaveops``'s error handler; with
``--json`` it is reported in the JSON object, so a caller always gets one object to parse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from enclave_runtime.formats.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    ManifestIssue,
    ManifestReadError,
    load_manifest,
    parse_manifest,
)

STDIN = "-"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser(
        "manifest",
        help="work with enclaver.yaml manifests",
        description="Work with enclaver.yaml manifests.",
    )
    commands = group.add_subparsers(dest="manifest_command", metavar="SUBCOMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="validate a manifest and list every problem",
        description=(
            "Validate an enclaver.yaml: keys and types (JSON Schema), then ports, reserved vsock "
            "ports, egress rules and services. Prints every problem, one per line, and exits 1; "
            "prints a one-line summary and exits 0 when the manifest is valid."
        ),
    )
    check.add_argument("file", metavar="FILE", help="the manifest; - reads standard input")
    check.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: {"valid", "file", "errors", "summary", "manifest"}',
    )
    check.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    source = "<stdin>" if args.file == STDIN else args.file
    try:
        manifest = _load(args.file)
    except ManifestError as err:
        _report_invalid(source, err.issues, args.json)
        return 1
    except ManifestReadError as err:
        if not args.json:
            raise
        _report_invalid(source, [ManifestIssue("", str(err))], as_json=True)
        return 1
    _report_valid(source, manifest, args.json)
    return 0


def _load(file: str) -> Manifest:
    if file != STDIN:
        return load_manifest(file)
    data = sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1)
    return parse_manifest(data, source="<stdin>", base_dir=Path.cwd())


def summary_line(manifest: Manifest) -> str:
    """``ok: app "hello" (v1): 2 ingress ports (8000, 8443), egress allow 3 / deny 1, ...``."""
    parts = [_ingress_part(manifest), _egress_part(manifest)]
    for label, section in (
        ("api", manifest.api),
        ("aux_api", manifest.aux_api),
        ("kms_proxy", manifest.kms_proxy),
    ):
        if section is not None:
            parts.append(f"{label} {section.listen_port}")
    if manifest.spire is not None:
        parts.append(f"spire {manifest.spire.trust_domain}")
    units = len(manifest.services.units)
    if units:
        parts.append(_plural(units, "service"))
    head = f"ok: app {json.dumps(manifest.name)} ({manifest.version})"
    return f"{head}: {', '.join(parts)}"


def _ingress_part(manifest: Manifest) -> str:
    if not manifest.ingress:
        return "no ingress"
    ports = ", ".join(str(ingress.listen_port) for ingress in manifest.ingress)
    return f"{_plural(len(manifest.ingress), 'ingress port')} ({ports})"


def _egress_part(manifest: Manifest) -> str:
    if manifest.egress is None:
        return "no egress"
    if not manifest.egress.enabled:
        return "no egress (nothing allowed)"
    return f"egress allow {len(manifest.egress.allow)} / deny {len(manifest.egress.deny)}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _report_valid(source: str, manifest: Manifest, as_json: bool) -> None:
    summary = summary_line(manifest)
    if as_json:
        result: dict[str, Any] = {
            "valid": True,
            "file": source,
            "errors": [],
            "summary": summary,
            "manifest": manifest.to_dict(),
        }
        print(json.dumps(result, indent=2))
    else:
        print(summary)


def _report_invalid(source: str, issues: Any, as_json: bool) -> None:
    if as_json:
        errors = [
            {"path": issue.path, "message": issue.message, "line": issue.line} for issue in issues
        ]
        print(json.dumps({"valid": False, "file": source, "errors": errors}, indent=2))
        return
    for issue in issues:
        where = f"{source}:{issue.line}" if issue.line is not None else source
        print(f"{where}: {issue}")
