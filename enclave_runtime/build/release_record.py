"""Build records on the build machine: made from a build and its push, kept once, listed.

The store is a directory: ``<record_dir>/<name>/<PCR0 first 16 hex>-<image digest 12 hex>.json``,
one file per build. A file is written once and never replaced: the same build recorded again
leaves it alone (its first ``created`` time stays), another build that would land at the same
path is refused. Records of a name sort by ``created`` (then file name), so "the build before"
a deployed one is what a rollback goes back to (docs/build.md, "Build records").
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from enclave_runtime.build.pipeline import BuildResult
from enclave_runtime.build.registry_push import PushResult
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.build_record import (
    RECORD_VERSION,
    BuildRecord,
    load_record,
    record_from_document,
)
from enclave_runtime.formats.manifest import Manifest, load_manifest
from enclave_runtime.formats.pcr import Measurements

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RecordStoreError(EnclaveOpsError):
    """A record that cannot be made, written, found or read."""


class RecordConflictError(RecordStoreError):
    """Another build's record already holds the path this build's record would take."""


class NoEarlierRecordError(RecordStoreError):
    """There is no build recorded before the one named: nothing to roll back to."""


@dataclasses.dataclass(frozen=True)
class RecordWrite:
    """Where a record is, and whether this call wrote it (in check mode: would write it)."""

    path: Path
    record: BuildRecord
    written: bool


def make_record(
    manifest: Manifest,
    manifest_digest: str,
    build: BuildResult,
    push: PushResult,
    *,
    created: datetime | None = None,
) -> BuildRecord:
    """The record of ``build`` once ``push`` put it in a registry."""
    if push.repo_digest is None or push.digest is None:
        raise RecordStoreError("the release image was not pushed: a record needs its digest")
    if build.eif_sha384 is None:
        raise RecordStoreError(
            f"{build.image} does not record its EIF's SHA-384 (an older enclave-runtime built "
            "it): build it again (image force: true) before recording it"
        )
    moment = (created or datetime.now(timezone.utc)).astimezone(timezone.utc)
    document = {
        "version": RECORD_VERSION,
        "name": manifest.name,
        "image": {
            "repository": push.repository,
            "tag": push.tag,
            "digest": push.digest,
            "repo_digest": push.repo_digest,
            "image_id": build.image_id,
        },
        "eif": {"sha384": build.eif_sha384, "sha256": build.eif_sha256, "size": build.eif_size},
        "measurements": _measurements(build.measurements),
        "manifest_digest": manifest_digest,
        "inputs_digest": build.inputs_digest,
        "ingress_ports": [ingress.listen_port for ingress in manifest.ingress],
        "aux_api_port": manifest.aux_api.listen_port if manifest.aux_api else None,
        "created": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return record_from_document(document, f"the record of {build.image}")


def record_build(
    manifest_path: str | os.PathLike[str],
    build: BuildResult,
    push: PushResult,
    record_dir: str | os.PathLike[str],
    *,
    check_mode: bool = False,
) -> RecordWrite:
    """Record ``build`` of the manifest at ``manifest_path`` under ``record_dir``, once."""
    manifest_bytes = Path(manifest_path).read_bytes()
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    record = make_record(load_manifest(manifest_path), digest, build, push)
    return RecordStore(record_dir).write(record, check_mode=check_mode)


def _measurements(measurements: Measurements) -> dict[str, str]:
    return {
        key: value for key, value in measurements.to_nitro_cli().items() if key != "HashAlgorithm"
    }


class RecordStore:
    """The records under one directory (``record_dir``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, record: BuildRecord) -> Path:
        return self._directory(record.name) / record.file_name()

    def write(self, record: BuildRecord, *, check_mode: bool = False) -> RecordWrite:
        """Keep ``record`` unless it is already kept; never replace another build's record."""
        path = self.path_for(record)
        existing = self._read_if_present(path)
        if existing is not None:
            if not existing.same_build(record):
                raise RecordConflictError(
                    f"{path} already records another build (same PCR0 and image digest prefix, "
                    "other contents); records are never overwritten: move that file away if it "
                    "is wrong, or keep this build's record in another record_dir"
                )
            return RecordWrite(path, existing, written=False)
        if not check_mode:
            self._create(path, record.to_json())
        return RecordWrite(path, record, written=True)

    def records(self, name: str) -> list[BuildRecord]:
        """Every record of ``name``, oldest first (``created``, then file name)."""
        directory = self._directory(name)
        if not directory.is_dir():
            return []
        found = [
            (self._read(path), path.name)
            for path in directory.iterdir()
            if path.suffix == ".json" and not path.name.startswith(".")
        ]
        return [record for record, _ in sorted(found, key=lambda item: (item[0].created, item[1]))]

    def previous(self, name: str, before: str | None = None) -> BuildRecord:
        """The record before ``before`` (a repo_digest), or before the newest when None."""
        return record_before(self.records(name), name, before)

    def _directory(self, name: str) -> Path:
        if not _NAME.match(name):
            raise RecordStoreError(
                f"build record name {name!r:.140} is not a manifest name (letters, digits, . _ -)"
            )
        return self.root / name

    def _read_if_present(self, path: Path) -> BuildRecord | None:
        return self._read(path) if path.exists() else None

    def _read(self, path: Path) -> BuildRecord:
        try:
            text = path.read_bytes()
        except OSError as err:
            raise RecordStoreError(f"cannot read the build record {path}: {err}") from None
        return load_record(text, str(path))

    def _create(self, path: Path, text: str) -> None:
        """Written whole beside ``path``, then linked to it: the link fails if another writer
        got there first, so a record is never half written nor replaced."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=path.parent, prefix=".", suffix=".partial", delete=False
            ) as partial:
                partial.write(text)
            try:
                os.link(partial.name, path)
            finally:
                os.unlink(partial.name)
        except FileExistsError:
            raise RecordConflictError(
                f"{path} was written by another build at the same time; run again"
            ) from None
        except OSError as err:
            raise RecordStoreError(f"cannot write the build record {path}: {err}") from None


def record_before(records: Sequence[BuildRecord], name: str, before: str | None) -> BuildRecord:
    """From records oldest first: the one before ``before`` (a repo_digest), else before the
    newest. RecordStoreError when there is none to go back to."""
    if before is None:
        index = len(records) - 1
    else:
        matches = [i for i, record in enumerate(records) if str(record.image) == before]
        if not matches:
            raise RecordStoreError(
                f"no build record of {name} names {before}; the records name "
                + (", ".join(str(record.image) for record in records) or "nothing")
            )
        index = matches[0]
    if index < 1:
        raise NoEarlierRecordError(
            f"there is no build of {name} recorded before "
            f"{before or 'the newest'}: nothing to roll back to ({len(records)} record(s))"
        )
    return records[index - 1]
