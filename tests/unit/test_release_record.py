"""Build records: made from a build and its push, validated by their schema, written once, never
overwritten, listed oldest first, and "the one before" picked for a rollback."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from enclave_runtime.build.pipeline import BuildResult
from enclave_runtime.build.registry_push import PushResult
from enclave_runtime.build.release_record import (
    RecordConflictError,
    RecordStore,
    RecordStoreError,
    make_record,
    record_before,
)
from enclave_runtime.formats.build_record import BuildRecordError, load_record
from enclave_runtime.formats.manifest import load_manifest
from enclave_runtime.formats.pcr import Measurements
from tests.conftest import REPO_ROOT

HELLO = REPO_ROOT / "examples" / "hello" / "enclaver.yaml"
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(HELLO.read_bytes()).hexdigest()
EIF = b"an EIF"
T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=timezone.utc)


def build(pcr0: int = 0xA0, image_id: str = "sha256:" + "1" * 64) -> BuildResult:
    return BuildResult(
        target="enclaveops-examples/hello-release:latest",
        image_id=image_id,
        sources=(),
        measurements=Measurements(bytes([pcr0]) * 48, b"\x01" * 48, b"\x02" * 48),
        eif_sha256=hashlib.sha256(EIF).hexdigest(),
        eif_size=len(EIF),
        eif_sha384=hashlib.sha384(EIF).hexdigest(),
        builder="native",
        inputs_digest="sha256:" + "9" * 64,
        skipped=False,
        reason="no local image",
    )


def push(digest_hex: str = "d" * 64) -> PushResult:
    return PushResult("10.231.0.1:5000/hello", "latest", f"sha256:{digest_hex}", True, "pushed")


def record(pcr0: int = 0xA0, digest_hex: str = "d" * 64, when: datetime = T0):
    return make_record(
        load_manifest(HELLO), MANIFEST_DIGEST, build(pcr0), push(digest_hex), created=when
    )


def test_a_record_holds_what_parents_check() -> None:
    document = record().document
    assert document["name"] == "hello"
    assert document["image"] == {
        "repository": "10.231.0.1:5000/hello",
        "tag": "latest",
        "digest": "sha256:" + "d" * 64,
        "repo_digest": "10.231.0.1:5000/hello@sha256:" + "d" * 64,
        "image_id": "sha256:" + "1" * 64,
    }
    assert document["eif"] == {
        "sha384": hashlib.sha384(EIF).hexdigest(),
        "sha256": hashlib.sha256(EIF).hexdigest(),
        "size": len(EIF),
    }
    assert document["measurements"] == {"PCR0": "a0" * 48, "PCR1": "01" * 48, "PCR2": "02" * 48}
    assert document["manifest_digest"] == MANIFEST_DIGEST
    assert (document["ingress_ports"], document["aux_api_port"]) == ([8080, 9101], 9101)
    assert document["created"] == "2026-12-07T12:00:00Z"


def test_a_signed_build_records_pcr8() -> None:
    signed = dataclasses.replace(
        build(), measurements=dataclasses.replace(build().measurements, pcr8=b"\x08" * 48)
    )
    made = make_record(load_manifest(HELLO), MANIFEST_DIGEST, signed, push(), created=T0)
    assert made.document["measurements"]["PCR8"] == "08" * 48


def test_a_release_without_its_eif_sha384_cannot_be_recorded() -> None:
    old = dataclasses.replace(build(), eif_sha384=None)
    with pytest.raises(RecordStoreError, match=r"does not record its EIF's SHA-384.*force: true"):
        make_record(load_manifest(HELLO), MANIFEST_DIGEST, old, push(), created=T0)


def test_an_unpushed_build_cannot_be_recorded() -> None:
    unpushed = PushResult("10.231.0.1:5000/hello", "latest", None, True, "would push")
    with pytest.raises(RecordStoreError, match="was not pushed"):
        make_record(load_manifest(HELLO), MANIFEST_DIGEST, build(), unpushed, created=T0)


def test_the_file_is_named_by_pcr0_and_image_digest(tmp_path: Path) -> None:
    written = RecordStore(tmp_path).write(record())
    assert written.path == tmp_path / "hello" / f"{'a0' * 8}-{'d' * 12}.json"
    assert written.written is True
    assert load_record(written.path.read_text()).document == record().document


def test_the_same_build_recorded_again_is_left_alone(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    first = store.write(record())
    before = first.path.read_bytes()
    again = store.write(record(when=T0 + timedelta(hours=1)))
    assert again.written is False
    assert first.path.read_bytes() == before  # the first created time stays
    assert again.record.created == "2026-12-07T12:00:00Z"


def test_another_build_at_the_same_path_is_refused_and_the_record_kept(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    first = store.write(record())
    before = first.path.read_bytes()
    other = dataclasses.replace(
        record(), document={**record().document, "manifest_digest": "sha256:" + "e" * 64}
    )
    with pytest.raises(
        RecordConflictError, match=r"already records another build.*never overwritten"
    ):
        store.write(other)
    assert first.path.read_bytes() == before


def test_check_mode_says_it_would_write_and_writes_nothing(tmp_path: Path) -> None:
    written = RecordStore(tmp_path).write(record(), check_mode=True)
    assert written.written is True
    assert not written.path.exists()


def test_records_list_oldest_first_and_the_one_before_is_the_rollback(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    third = record(0xC0, "c" * 64, T0 + timedelta(days=2))
    first = record(0xA0, "a" * 64, T0)
    second = record(0xB0, "b" * 64, T0 + timedelta(days=1))
    for made in (third, first, second):  # written out of order
        store.write(made)
    assert [r.document for r in store.records("hello")] == [
        first.document,
        second.document,
        third.document,
    ]
    assert store.previous("hello").document == second.document
    assert store.previous("hello", before=str(second.image)).document == first.document


def test_nothing_before_the_first_build(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.write(record())
    with pytest.raises(RecordStoreError, match="nothing to roll back to"):
        store.previous("hello")
    with pytest.raises(RecordStoreError, match="no build record of hello names other@"):
        store.previous("hello", before="other@sha256:" + "0" * 64)
    assert RecordStore(tmp_path).records("absent") == []


def test_a_damaged_record_in_the_store_names_the_file_and_the_field(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    path = store.write(record()).path
    document = json.loads(path.read_text())
    document["measurements"]["PCR1"] = "zz"
    path.write_text(json.dumps(document))
    with pytest.raises(BuildRecordError, match=rf"{path} is not a build record.*measurements.PCR1"):
        store.records("hello")


@pytest.mark.parametrize("text", ["", "[1]", '{"version": 1, "version": 1}', "NaN"])
def test_what_is_not_a_record_is_refused(text: str) -> None:
    with pytest.raises(BuildRecordError):
        load_record(text)


def test_a_name_that_would_leave_the_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecordStoreError, match="is not a manifest name"):
        RecordStore(tmp_path).records("../etc")


def test_record_before_an_unknown_digest_lists_the_recorded_ones() -> None:
    made = record()
    with pytest.raises(RecordStoreError, match=str(made.image).replace(".", r"\.")):
        record_before([made], "hello", "x@sha256:" + "0" * 64)
