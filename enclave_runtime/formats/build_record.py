"""Build records: one JSON document per build, what every parent of a fleet checks against.

A record names the pushed release image by registry digest, the EIF inside it by SHA-384 and
SHA-256, its PCRs, the digest of the manifest's bytes and the ports a deployment publishes. The
shape is a JSON Schema shipped beside this module (``data/build_record.schema.json``); a record
that does not follow it is refused with the path of the first field that is wrong. Written by
the build machine (build/release_record.py), read by playbooks (docs/build.md, "Build records").
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jsonschema

from enclave_runtime.errors import FormatError
from enclave_runtime.formats import strict_json
from enclave_runtime.formats.image_reference import DigestReference, parse_digest_reference
from enclave_runtime.formats.manifest_load import strict_validator
from enclave_runtime.formats.pcr import Measurements

RECORD_VERSION = 1
# Fields that say when, not what: two records that differ only there describe the same build.
_WHEN = ("created",)


class BuildRecordError(FormatError):
    """A build record that is not valid JSON or does not follow its schema."""


@dataclasses.dataclass(frozen=True)
class BuildRecord:
    """One build, as parents check it. ``document`` is the JSON, validated."""

    document: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.document["name"])

    @property
    def image(self) -> DigestReference:
        return parse_digest_reference(self.document["image"]["repo_digest"])

    @property
    def eif_sha384(self) -> str:
        return str(self.document["eif"]["sha384"])

    @property
    def measurements(self) -> Measurements:
        return Measurements.from_nitro_cli(self.document["measurements"])

    @property
    def created(self) -> str:
        return str(self.document["created"])

    def file_name(self) -> str:
        """Unique to the build: the first 16 hex digits of PCR0 and 12 of the image digest."""
        pcr0 = str(self.document["measurements"]["PCR0"])[:16]
        return f"{pcr0}-{self.image.short_digest}.json"

    def same_build(self, other: BuildRecord) -> bool:
        """Whether both describe the same build (they may have been written at other times)."""
        return _without_when(self.document) == _without_when(other.document)

    def to_json(self) -> str:
        return json.dumps(self.document, indent=2, sort_keys=True) + "\n"


def _without_when(document: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key not in _WHEN}


def record_from_document(document: Any, source: str = "<record>") -> BuildRecord:
    """A BuildRecord of a decoded document; BuildRecordError naming the first wrong field."""
    errors = sorted(_validator().iter_errors(document), key=lambda error: list(error.path))
    if errors:
        first = errors[0]
        where = ".".join(str(part) for part in first.absolute_path) or "(the document)"
        raise BuildRecordError(
            f"{source} is not a build record (version {RECORD_VERSION}): {where}: "
            f"{first.message}; write it again from the build (enclaveops.nitro.image record_dir)"
        )
    return BuildRecord(document)


def load_record(text: str | bytes, source: str = "<record>") -> BuildRecord:
    """A BuildRecord parsed from JSON text."""
    try:
        document = strict_json.loads(text.decode() if isinstance(text, bytes) else text)
    except (ValueError, UnicodeDecodeError) as err:
        raise BuildRecordError(f"{source} is not JSON: {err}") from None
    return record_from_document(document, source)


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema_file = resources.files("enclave_runtime.formats").joinpath(
        "data/build_record.schema.json"
    )
    # The manifest's validator: 8080.0 is not a port and true is not a size.
    return strict_validator(json.loads(schema_file.read_text(encoding="utf-8")))
