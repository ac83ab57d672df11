"""The EIF metadata section (EIF v4): who built the image, from what, plus the user's own JSON.

The section holds ``serde_json::to_vec(&EifIdentityInfo)`` (aws-nitro-enclaves-image-format,
src/defs/mod.rs): compact JSON with the keys ImageName, ImageVersion, BuildMetadata {BuildTime,
BuildTool, BuildToolVersion, OperatingSystem, KernelVersion}, DockerInfo and CustomMetadata, in
that order. DockerInfo and CustomMetadata are ``serde_json::Value``s, whose objects nitro-cli
serialises with sorted keys (serde_json without ``preserve_order`` keeps maps in a BTreeMap);
we do the same so an image we build carries the bytes nitro-cli would write for the same inputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from enclave_runtime import __version__
from enclave_runtime.errors import FormatError

BUILD_INFO_KEYS = {
    "build_time": "BuildTime",
    "build_tool": "BuildTool",
    "build_tool_version": "BuildToolVersion",
    "operating_system": "OperatingSystem",
    "kernel_version": "KernelVersion",
}
# chrono's to_rfc3339() of the Unix epoch: the build time of a reproducible image by default.
EPOCH_RFC3339 = "1970-01-01T00:00:00+00:00"
MAX_METADATA_FILE = 4096  # nitro-cli refuses larger --metadata files


class EifMetadataError(FormatError):
    """A metadata section (or metadata to be written) that is not EifIdentityInfo JSON."""


@dataclass(frozen=True)
class EifBuildInfo:
    """``BuildMetadata``: the tool and kernel an image was built with."""

    build_time: str = EPOCH_RFC3339
    build_tool: str = "enclaveops"
    build_tool_version: str = __version__
    operating_system: str = "OS"
    kernel_version: str = "kernel"

    def to_json(self) -> dict[str, str]:
        return {json_key: getattr(self, field) for field, json_key in BUILD_INFO_KEYS.items()}


@dataclass(frozen=True)
class EifIdentity:
    """The metadata section's content; ``custom_metadata`` is the user's ``--metadata`` JSON."""

    image_name: str
    image_version: str
    build_info: EifBuildInfo
    docker_info: Any = None
    custom_metadata: Any = None

    def to_json_bytes(self) -> bytes:
        """The section bytes, as serde_json would write them (compact, UTF-8, no NaN)."""
        try:
            document = {
                "ImageName": self.image_name,
                "ImageVersion": self.image_version,
                "BuildMetadata": self.build_info.to_json(),
                "DockerInfo": _sorted_json_value(self.docker_info),
                "CustomMetadata": _sorted_json_value(self.custom_metadata),
            }
            text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            return text.encode("utf-8")
        except (TypeError, ValueError, RecursionError) as err:
            raise EifMetadataError(
                f"metadata cannot be written as JSON: {err}; use only JSON objects, arrays, "
                "strings, finite numbers, booleans and null"
            ) from err

    @classmethod
    def from_json_bytes(cls, data: bytes) -> EifIdentity:
        """Parse a metadata section; unknown keys are ignored, as serde does."""
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise EifMetadataError(f"metadata section is not UTF-8 JSON: {err}") from err
        if not isinstance(document, dict):
            raise EifMetadataError("metadata section must be a JSON object (EifIdentityInfo)")
        build = _required(document, "BuildMetadata", dict, "metadata")
        return cls(
            image_name=_required(document, "ImageName", str, "metadata"),
            image_version=_required(document, "ImageVersion", str, "metadata"),
            build_info=EifBuildInfo(
                **{
                    field: _required(build, json_key, str, "metadata.BuildMetadata")
                    for field, json_key in BUILD_INFO_KEYS.items()
                }
            ),
            docker_info=_required(document, "DockerInfo", object, "metadata"),
            custom_metadata=_required(document, "CustomMetadata", object, "metadata"),
        )

    def describe(self) -> dict[str, Any]:
        """The ``Metadata`` object of ``nitro-cli describe-eif`` (CustomMetadata flattened in)."""
        described: dict[str, Any] = dict(self.build_info.to_json())
        described["DockerInfo"] = self.docker_info
        if isinstance(self.custom_metadata, dict):
            described.update(_sorted_json_value(self.custom_metadata))
        elif self.custom_metadata is not None:
            # nitro-cli cannot flatten a non-object and fails; we show it under its own key.
            described["CustomMetadata"] = self.custom_metadata
        return described


def _required(document: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in document:
        raise EifMetadataError(f"{where}.{key} is missing")
    value = document[key]
    if kind is not object and not isinstance(value, kind):
        expected = "a string" if kind is str else "an object"
        raise EifMetadataError(f"{where}.{key} must be {expected}, got {type(value).__name__}")
    return value


def _sorted_json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted_json_value(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_json_value(item) for item in value]
    return value


def reproducible_build_time() -> str:
    """``SOURCE_DATE_EPOCH`` in chrono's RFC 3339 form, else the Unix epoch: never the clock."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return EPOCH_RFC3339
    try:
        return datetime.fromtimestamp(int(epoch), tz=timezone.utc).isoformat()
    except (ValueError, OverflowError, OSError):
        raise EifMetadataError(
            f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time in whole seconds; fix or unset it"
        ) from None


def read_custom_metadata(path: str | os.PathLike[str]) -> Any:
    """A ``--metadata`` file: JSON of at most 4096 bytes, as nitro-cli accepts it."""
    file_path = Path(path)
    if not file_path.is_file():
        raise EifMetadataError(f"the metadata file {file_path} does not exist or is not a file")
    try:
        with file_path.open("rb") as stream:
            data = stream.read(MAX_METADATA_FILE + 1)
    except OSError as err:
        raise EifMetadataError(
            f"cannot read the metadata file {file_path}: {err.strerror}"
        ) from None
    if len(data) > MAX_METADATA_FILE:
        raise EifMetadataError(
            f"the metadata file {file_path} is larger than {MAX_METADATA_FILE} bytes, nitro-cli's "
            "limit: keep only what identifies the build"
        )
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise EifMetadataError(f"the metadata file {file_path} is not JSON: {err}") from None
