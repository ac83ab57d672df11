"""``enclaveops attest verify``: check an attestation document against a pinned root.

Success prints the verified facts as JSON and exits 0. Failure exits 1 with one line naming the
failed check (on stderr, through ``enclaveops`` main), or with ``--json`` a JSON object
``{"valid": false, "check": ..., "error": ...}`` on stdout, so scripts never parse prose.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.attestation import (
    MAX_DOCUMENT_BYTES,
    AttestationError,
    load_root_certificate,
    verify_attestation_document,
)
from enclave_runtime.formats.pcr import parse_pcr_index

# First byte of a raw COSE_Sign1: an array of 4 (untagged) or tag 18. Neither is printable
# ASCII, so raw CBOR and base64 text cannot be confused.
RAW_DOCUMENT_FIRST_BYTES = (0x84, 0xD2)
# Base64 text of the largest accepted document, with room for line breaks.
MAX_INPUT_BYTES = MAX_DOCUMENT_BYTES * 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    attest = subparsers.add_parser(
        "attest", help="verify NSM attestation documents", description="Attestation documents."
    )
    actions = attest.add_subparsers(dest="attest_command", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify",
        help="verify a document's certificate chain, signature and expected values",
        description=(
            "Verify an NSM attestation document (raw CBOR or base64) against a pinned root: "
            "certificate chain and validity at --at, ES384 signature, expected PCRs and values."
        ),
    )
    verify.add_argument("document", metavar="DOC", help="document file, or - for stdin")
    verify.add_argument(
        "--root",
        metavar="ROOT.pem",
        type=Path,
        help="trusted root certificate, PEM or DER (default: AWS Nitro Enclaves Root G1)",
    )
    verify.add_argument(
        "--at",
        metavar="RFC3339",
        type=rfc3339_time,
        help="verification time, e.g. 2023-09-18T15:00:00Z (default: now)",
    )
    verify.add_argument(
        "--expect-pcr",
        metavar="N=HEX",
        type=expected_pcr,
        action="append",
        default=[],
        help="require PCR N to equal HEX (repeatable)",
    )
    verify.add_argument("--nonce", metavar="HEX", type=hex_bytes, help="require this nonce")
    verify.add_argument("--user-data", metavar="HEX", type=hex_bytes, help="require this user_data")
    verify.add_argument(
        "--public-key", metavar="HEX", type=hex_bytes, help="require this public_key (DER)"
    )
    verify.add_argument(
        "--json", action="store_true", help="on failure, print a JSON verdict to stdout too"
    )
    verify.set_defaults(run=run_verify)


def rfc3339_time(text: str) -> datetime:
    """An RFC 3339 instant with an explicit offset; ``Z`` is accepted on Python 3.9 as well."""
    normalized = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        moment = datetime.fromisoformat(normalized)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 time; write e.g. 2023-09-18T15:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset; append Z (UTC) or an offset such as +02:00"
        )
    return moment


def hex_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not hex (two hex digits per byte, e.g. 0a1b)"
        ) from None


def expected_pcr(text: str) -> tuple[int, bytes]:
    index_text, separator, value_text = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"{text!r} is not N=HEX (e.g. 0=8f3a…)")
    try:
        index = parse_pcr_index(index_text.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--expect-pcr {text!r:.60}: {err}") from None
    try:
        return index, bytes.fromhex(value_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: PCR value is not hex (96 hex digits for SHA-384)"
        ) from None


def run_verify(args: argparse.Namespace) -> int:
    try:
        verified = verify_attestation_document(
            read_document(args.document),
            root=read_root(args.root) if args.root else None,
            at=args.at,
            expected_pcrs=expected_pcr_map(args.expect_pcr),
            expected_nonce=args.nonce,
            expected_user_data=args.user_data,
            expected_public_key=args.public_key,
        )
    except EnclaveOpsError as err:
        if not args.json:
            raise
        print_json(failure_verdict(err))
        return 1
    print_json(verified.summary())
    return 0


def expected_pcr_map(pairs: list[tuple[int, bytes]]) -> dict[int, bytes]:
    expected: dict[int, bytes] = {}
    for index, value in pairs:
        if expected.get(index, value) != value:
            raise AttestationError(
                f"pcr {index}", "--expect-pcr gives two different values for this PCR"
            )
        expected[index] = value
    return expected


def failure_verdict(err: EnclaveOpsError) -> dict[str, Any]:
    check = err.check if isinstance(err, AttestationError) else "input"
    return {"valid": False, "check": check, "error": str(err)}


def print_json(value: dict[str, Any]) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def read_document(source: str) -> bytes:
    """The document's bytes from a file or stdin, raw CBOR or base64 text."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with open(source, "rb") as stream:
                data = stream.read(MAX_INPUT_BYTES + 1)
    except OSError as err:
        raise AttestationError("document", f"cannot read {source}: {err.strerror}") from err
    if len(data) > MAX_INPUT_BYTES:
        raise AttestationError(
            "document",
            f"{source} is larger than {MAX_INPUT_BYTES} bytes: not an attestation document",
        )
    return decode_document_text(data)


def decode_document_text(data: bytes) -> bytes:
    """Raw COSE_Sign1 bytes as they are, or base64 (standard or URL-safe) decoded."""
    if data and data[0] in RAW_DOCUMENT_FIRST_BYTES:
        return data
    text = b"".join(data.split()).translate(bytes.maketrans(b"-_", b"+/"))
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise AttestationError(
            "document",
            "is neither a raw COSE_Sign1 (first byte 0x84 or 0xd2) nor base64 text",
        ) from None


def read_root(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AttestationError("root certificate", f"cannot read {path}: {err.strerror}") from err
    return load_root_certificate(data)
