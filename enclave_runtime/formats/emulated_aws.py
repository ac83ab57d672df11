"""The endpoints file of the emulated AWS services and the egress routes it implies.

``nitro-emu aws-services`` writes ``$NITRO_EMU_ROOT/aws/endpoints.json``; a sleeve on the
emulator reads it and has its egress broker connect IMDS (``169.254.169.254:80``) and the
region's KMS name (``kms.<region>.amazonaws.com:443``) to the loopback servers (docs/kms.md).
The file is the contract between the emulator and the parent's side, so it lives here, below both.
"""

from __future__ import annotations

import json
from pathlib import Path

ENDPOINTS_FILE = "endpoints.json"

Routes = dict[tuple[str, int], tuple[str, int]]


def aws_directory(root: Path) -> Path:
    """Where the emulator at ``root`` keeps its AWS services' files."""
    return Path(root) / "aws"


def routes_for(region: str, imds_port: int, kms_port: int) -> Routes:
    """IMDS's address and the region's KMS name, routed to the loopback servers."""
    return {
        ("169.254.169.254", 80): ("127.0.0.1", imds_port),
        (f"kms.{region}.amazonaws.com", 443): ("127.0.0.1", kms_port),
    }


def emulated_routes(root: Path) -> Routes:
    """The egress broker's routes to running emulated services; empty when none run."""
    path = aws_directory(root) / ENDPOINTS_FILE
    if not path.is_file():
        return {}
    description = json.loads(path.read_text())
    return routes_for(
        description["region"], int(description["imds_port"]), int(description["kms_port"])
    )
