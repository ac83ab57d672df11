"""``enclaveops eif``: build, describe, verify and measure enclave images without nitro-cli.

The JSON printed matches nitro-cli's: ``build`` prints ``{"Measurements": ...}`` as
``nitro-cli build-enclave`` does, ``describe`` what ``nitro-cli describe-eif`` prints, ``pcr``
what ``nitro-cli pcr`` prints. Errors exit 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from enclave_runtime.cli.attest_cmd import rfc3339_time
from enclave_runtime.formats.eif import (
    ARCHITECTURES,
    EifError,
    build_eif,
    default_identity,
    read_eif,
    verify_eif,
)
from enclave_runtime.formats.eif_metadata import (
    EifBuildInfo,
    read_custom_metadata,
    reproducible_build_time,
)
from enclave_runtime.formats.eif_signature import certificate_pcr, read_signing_certificate
from enclave_runtime.formats.eif_sizes import component_sizes
from enclave_runtime.formats.pcr import PcrHasher

# nitro-cli refuses custom metadata files above 4 KiB (MAX_META_FILE_SIZE in identity.rs).
_READ_CHUNK = 1 << 20


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    eif = subparsers.add_parser(
        "eif", help="build and inspect enclave image files (EIF)", description="EIF tools."
    )
    actions = eif.add_subparsers(dest="eif_command", metavar="ACTION", required=True)
    _register_build(actions)
    _register_describe(actions)
    _register_verify(actions)
    _register_pcr(actions)


def _register_build(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    build = actions.add_parser(
        "build",
        help="build an EIF from a kernel, a command line and ramdisks",
        description=(
            "Write an EIF v4 as nitro-cli does (Kernel, Cmdline, Metadata, Ramdisks, Signature) "
            "and print its measurements. The same inputs always give the same bytes."
        ),
    )
    build.add_argument("--kernel", required=True, type=Path, help="kernel image (bzImage/Image)")
    build.add_argument("--cmdline", required=True, help="kernel command line")
    build.add_argument(
        "--ramdisk",
        required=True,
        action="append",
        type=Path,
        help="ramdisk (cpio); repeat: first the bootstrap ramdisk, then the customer ones",
    )
    build.add_argument("--output", required=True, type=Path, help="EIF file to write")
    build.add_argument("--metadata", type=Path, help="custom metadata JSON file (max 4 KiB)")
    build.add_argument("--signing-certificate", type=Path, help="PEM certificate (gives PCR8)")
    build.add_argument("--private-key", type=Path, help="PEM EC private key of the certificate")
    build.add_argument("--name", help="image name (default: the kernel's file name)")
    build.add_argument("--version", dest="image_version", help="image version (default: 1.0)")
    build.add_argument(
        "--build-time",
        type=rfc3339_time,
        help="BuildTime recorded in the metadata (default: $SOURCE_DATE_EPOCH, else 1970-01-01)",
    )
    build.add_argument("--arch", choices=sorted(ARCHITECTURES), default="x86_64")
    build.set_defaults(run=run_build)


def _register_describe(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    describe = actions.add_parser(
        "describe",
        help="print what nitro-cli describe-eif prints",
        description="Measurements, CRC and signature checks and metadata of an EIF.",
    )
    _add_eif_argument(describe)
    describe.add_argument(
        "--sizes",
        action="store_true",
        help='also the bytes of each part: kernel, bootstrap, runtime, app (as "Sizes")',
    )
    describe.set_defaults(run=run_describe)


def _register_verify(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verify = actions.add_parser(
        "verify",
        help="fail unless the EIF's CRC and signature hold",
        description=(
            "Like describe, but exit 1 naming the failed check when the CRC does not match, the "
            "signature does not sign this image's PCR0, or (with --at) the signing certificate "
            "is not valid at that time."
        ),
    )
    _add_eif_argument(verify)
    verify.add_argument(
        "--at", type=rfc3339_time, metavar="RFC3339", help="check certificate validity then"
    )
    verify.set_defaults(run=run_verify)


def _register_pcr(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pcr = actions.add_parser(
        "pcr",
        help="print the PCR of a file or of a signing certificate (nitro-cli pcr)",
        description="PCR = SHA384(48 zero bytes || SHA384(input)); for a certificate, of its DER.",
    )
    source = pcr.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help='any file: prints {"PCR": ...}')
    source.add_argument(
        "--signing-certificate", type=Path, help='PEM certificate: prints {"PCR8": ...}'
    )
    pcr.set_defaults(run=run_pcr)


def _add_eif_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("eif", nargs="?", type=Path, metavar="EIF", help="the EIF file")
    parser.add_argument("--eif-path", type=Path, help="the EIF file (nitro-cli's spelling)")


def run_build(args: argparse.Namespace) -> int:
    custom = read_custom_metadata(args.metadata) if args.metadata is not None else None
    defaults = default_identity(args.kernel, custom)
    identity = replace(
        defaults,
        image_name=args.name or defaults.image_name,
        image_version=args.image_version or defaults.image_version,
        build_info=EifBuildInfo(build_time=_build_time(args.build_time)),
    )
    measurements = build_eif(
        args.kernel,
        args.cmdline,
        args.ramdisk,
        args.output,
        metadata=identity,
        signing_certificate=args.signing_certificate,
        private_key=args.private_key,
        arch=args.arch,
    )
    _print_json({"Measurements": measurements.to_nitro_cli()})
    return 0


def run_describe(args: argparse.Namespace) -> int:
    path = _eif_path(args)
    document = read_eif(path).describe()
    if args.sizes:
        document["Sizes"] = component_sizes(path).to_json()
    _print_json(document)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    _print_json(verify_eif(_eif_path(args), at=args.at).describe())
    return 0


def run_pcr(args: argparse.Namespace) -> int:
    if args.signing_certificate is not None:
        pem = read_signing_certificate(args.signing_certificate)
        _print_json({"PCR8": certificate_pcr(pem).hex()})
    else:
        _print_json({"PCR": _file_pcr(args.input).hex()})
    return 0


def _eif_path(args: argparse.Namespace) -> Path:
    if args.eif is not None and args.eif_path is not None and args.eif != args.eif_path:
        raise EifError(f"two EIFs given ({args.eif} and --eif-path {args.eif_path}); pass one")
    path = args.eif if args.eif is not None else args.eif_path
    if path is None:
        raise EifError("no EIF given; pass its path (or --eif-path PATH)")
    return path


def _build_time(explicit: datetime | None) -> str:
    """chrono's to_rfc3339 form; reproducible unless the caller asks for a time."""
    return explicit.isoformat() if explicit is not None else reproducible_build_time()


def _file_pcr(path: Path) -> bytes:
    hasher = PcrHasher()
    try:
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(_READ_CHUNK), b""):
                hasher.update(chunk)
    except OSError as err:
        raise EifError(f"cannot read {path}: {err.strerror}") from err
    return hasher.pcr()


def _print_json(value: dict[str, Any]) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")
