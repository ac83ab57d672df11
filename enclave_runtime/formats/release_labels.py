"""The labels ``enclaveops build`` puts on a release image, and the checks a parent makes on them.

The build machine writes them (build/pipeline.py); a parent reads them before it runs an image
it pulled (host/release_pull.py), so both find the names and the shapes here. A label is only
what the image claims about itself: the parent compares it with the build record, which came
from the build machine by another path (docs/build.md, "Pull by digest").
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import re
from collections.abc import Mapping

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.pcr import Measurements, pcr_differences

LABEL_SOURCES = "org.enclaveops.build.sources"
LABEL_INPUTS = "org.enclaveops.build.inputs"
LABEL_MEASUREMENTS = "org.enclaveops.build.measurements"
LABEL_EIF = "org.enclaveops.build.eif"
LABEL_AMEND_INPUTS = "org.enclaveops.amend.inputs"
# On release and amended images: the target they were built for, so that a rebuild finds the
# untagged images earlier builds of that target left behind.
LABEL_TARGET = "org.enclaveops.build.target"

_SHA384_HEX = re.compile(r"^[0-9a-f]{96}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_REBUILD = "build it again with this enclave-runtime (enclaveops build --force, image force: true)"


class ReleaseLabelError(FormatError):
    """A release image whose labels are missing, damaged, or not the expected build's."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        # The record fields that differ (eif_sha384, PCR0 ...); empty when labels are unreadable.
        self.fields = fields


@dataclasses.dataclass(frozen=True)
class ReleaseLabels:
    """What a release image's labels record about its EIF."""

    measurements: Measurements
    eif_sha256: str
    eif_size: int
    # None on release images built before the label carried it.
    eif_sha384: str | None


def eif_label(sha256: str, sha384: str, size: int) -> str:
    """The value of :data:`LABEL_EIF`."""
    return json.dumps({"SHA256": sha256, "SHA384": sha384, "Size": size}, sort_keys=True)


def read_release_labels(labels: Mapping[str, str], image: str) -> ReleaseLabels:
    """The EIF facts in ``labels`` (of ``image``); ReleaseLabelError naming the label."""
    for label in (LABEL_MEASUREMENTS, LABEL_EIF):
        if label not in labels:
            raise ReleaseLabelError(
                f"{image} has no label {label}: it is not a release image enclaveops build made; "
                + _REBUILD
            )
    try:
        measurements = Measurements.from_nitro_cli(json.loads(labels[LABEL_MEASUREMENTS]))
    except (ValueError, TypeError, AttributeError) as err:
        raise ReleaseLabelError(f"{image}: label {LABEL_MEASUREMENTS} is damaged ({err})") from None
    try:
        eif = json.loads(labels[LABEL_EIF])
        sha256, size, sha384 = str(eif["SHA256"]), int(eif["Size"]), eif.get("SHA384")
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ReleaseLabelError(f"{image}: label {LABEL_EIF} is damaged ({err!r})") from None
    if not _SHA256_HEX.match(sha256) or (sha384 is not None and not _SHA384_HEX.match(sha384)):
        raise ReleaseLabelError(f"{image}: label {LABEL_EIF} holds a malformed hash")
    return ReleaseLabels(measurements, sha256, size, sha384)


def label_differences(
    found: ReleaseLabels, *, eif_sha384: str | None, pcrs: Mapping[int, bytes]
) -> list[tuple[str, str, str]]:
    """``(field, expected, found)`` for each expected value the labels do not hold."""
    differences: list[tuple[str, str, str]] = []
    if eif_sha384 is not None:
        have = found.eif_sha384 or ""
        if not hmac.compare_digest(eif_sha384.lower(), have):
            differences.append(("eif_sha384", eif_sha384.lower(), have or "(not recorded)"))
    for index, want, got in pcr_differences(pcrs, found.measurements.as_pcrs()):
        differences.append((f"PCR{index}", want.hex(), got.hex() if got else "(none)"))
    return differences
