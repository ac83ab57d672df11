"""A standalone EIF from a local image (the Ansible ``eif`` module, docs/build.md).

The EIF is rebuilt only when its inputs changed: a JSON record beside it keeps their digest
(:func:`eif_record_path`), and the file is replaced whole, only once the build succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import enclave_runtime
from enclave_runtime.build.image_layers import (
    disk_error,
)
from enclave_runtime.build.pipeline import (
    BuildOptions,
    blobs_digests,
    build_enclave_image,
    choose_builder,
    file_sha256,
    inputs_digest,
    nitro_cli_version,
    replaced_on_success,
    require_signing_files,
)
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.host.docker_engine import (
    docker_client,
    get_image,
)

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.images import Image


DEFAULT_OPTIONS = BuildOptions()


@dataclasses.dataclass(frozen=True)
class EifBuild:
    """An EIF built from a local image, or found up to date (``skipped``)."""

    path: Path
    image_id: str
    measurements: Measurements
    sha256: str
    size: int
    builder: str
    inputs_digest: str
    skipped: bool
    reason: str

    def record(self) -> dict[str, Any]:
        """What :func:`eif_record_path` keeps beside the EIF."""
        return {
            "ImageID": self.image_id,
            "Measurements": self.measurements.to_nitro_cli(),
            "SHA256": self.sha256,
            "Size": self.size,
            "Builder": self.builder,
            "InputsDigest": self.inputs_digest,
        }


def eif_record_path(eif: Path) -> Path:
    """``app.eif`` → ``app.eif.build.json``: the inputs digest and measurements of its build."""
    return eif.with_name(eif.name + ".build.json")


def plan_eif(
    client: DockerClient, reference: str, options: BuildOptions, signing: tuple[Path, Path] | None
) -> tuple[Image, str, str]:
    """The local image, the builder and the inputs digest of an EIF of ``reference``."""
    if signing is not None:
        signing = require_signing_files(signing)
    image = get_image(client, reference, pull=options.pull)
    builder = choose_builder(options.builder, options.nitro_cli)
    architecture = str(image.attrs.get("Architecture", ""))
    inputs: dict[str, Any] = {
        "image": str(image.id),
        "enclaveops": enclave_runtime.__version__,
        "builder": builder,
        "blobs": blobs_digests(builder, options, architecture),
        "signing_certificate": file_sha256(signing[0]) if signing else None,
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
    }
    if builder == "nitro-cli":
        inputs["nitro_cli"] = nitro_cli_version(options.nitro_cli)
    return image, builder, inputs_digest(inputs)


def up_to_date_eif(
    output: str | os.PathLike[str], digest: str, *, force: bool = False
) -> tuple[EifBuild | None, str]:
    """The recorded build of ``output`` when its inputs digest is ``digest`` and the file is the
    one recorded (same SHA-256); else None and why a build is needed."""
    eif = Path(output)
    if force:
        return None, "forced (force)"
    record_path = eif_record_path(eif)
    if not eif.is_file():
        return None, f"{eif} does not exist"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        recorded = EifBuild(
            path=eif,
            image_id=str(record["ImageID"]),
            measurements=Measurements.from_nitro_cli(record["Measurements"]),
            sha256=str(record["SHA256"]),
            size=int(record["Size"]),
            builder=str(record["Builder"]),
            inputs_digest=str(record["InputsDigest"]),
            skipped=True,
            reason=f"inputs unchanged: {eif} was built from them",
        )
    except (OSError, ValueError, KeyError, TypeError, EnclaveOpsError):
        return None, f"{record_path} is missing or unreadable"
    if recorded.inputs_digest != digest:
        return None, "inputs changed since the last build"
    if file_sha256(eif) != recorded.sha256:
        return None, f"{eif} changed since it was built"
    return recorded, recorded.reason


def build_eif_file(
    reference: str,
    output: str | os.PathLike[str],
    options: BuildOptions = DEFAULT_OPTIONS,
    *,
    signing: tuple[Path, Path] | None = None,
    client: DockerClient | None = None,
) -> EifBuild:
    """Build the EIF of the local image ``reference`` at ``output``, unless the EIF there was
    built from the same inputs; the build is recorded in :func:`eif_record_path`."""
    eif = Path(output)
    client = docker_client() if client is None else client
    image, builder, digest = plan_eif(client, reference, options, signing)
    existing, reason = up_to_date_eif(eif, digest, force=options.force)
    if existing is not None:
        return existing
    with replaced_on_success(eif) as partial:
        measurements = build_enclave_image(
            client, builder, reference=reference, eif=partial, options=options, signing=signing
        )
        sha256, size = file_sha256(partial), partial.stat().st_size
    built = EifBuild(
        path=eif,
        image_id=str(image.id),
        measurements=measurements,
        sha256=sha256,
        size=size,
        builder=builder,
        inputs_digest=digest,
        skipped=False,
        reason=reason,
    )
    _write_record(eif_record_path(eif), built.record())
    return built


def _write_record(path: Path, record: Mapping[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise disk_error(err, path.parent, 4096) from None
