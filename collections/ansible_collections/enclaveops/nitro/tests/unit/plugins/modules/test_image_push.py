# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""enclaveops.nitro.image with push_repository and record_dir: the release image is pushed once
(the registry's digest returned), recorded once, predicted in check mode; credentials reach the
engine and never the result. The pipeline is test_image's stand-in; the engine and its registry
are a fake that answers as Docker does (tag, push stream with the digest, RepoDigests,
distribution inspect). A real registry: tests/e2e/test_registry.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.enclaveops.nitro.plugins.modules import build_record_info, image
from ansible_collections.enclaveops.nitro.tests.unit.plugins.modules import test_image

docker = pytest.importorskip("docker")
pipeline = pytest.importorskip("enclave_runtime.build.pipeline")
docker_engine = pytest.importorskip("enclave_runtime.host.docker_engine")

REPOSITORY = "10.231.0.1:5000/hello"
EIF_SHA384 = hashlib.sha384(test_image.EIF).hexdigest()
IMAGE_ID = "sha256:" + "1" * 64
MANIFEST = """\
version: v1
name: hello
target: hello-release:latest
sources:
  app: hello:latest
ingress:
  - listen_port: 8080
api:
  listen_port: 9100
aux_api:
  listen_port: 9101
"""


class Registry:
    """The engine's images and the registry behind it, for one local release image."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}  # repository:tag -> manifest digest
        self.repo_digests: list[str] = []
        self.pushes: list[tuple[str, str, Any]] = []
        self.asked: list[Any] = []
        self.images = self
        self.api = self

    # images.*
    def get(self, reference: str) -> Any:
        return type("Image", (), {"id": IMAGE_ID, "attrs": {"RepoDigests": self.repo_digests}})

    def get_registry_data(self, reference: str, auth_config: Any = None) -> Any:
        self.asked.append(auth_config)
        if reference not in self.tags:
            raise docker.errors.NotFound(f"manifest unknown: {reference}")
        return type("RegistryData", (), {"id": self.tags[reference]})

    # api.*
    def tag(self, image_id: str, repository: str, tag: str) -> None:
        assert image_id == IMAGE_ID

    def push(self, repository: str, tag: str, stream: bool, decode: bool, **kwargs: Any):
        self.pushes.append((repository, tag, kwargs.get("auth_config")))
        digest = "sha256:" + hashlib.sha256(f"{repository}:{tag}".encode()).hexdigest()
        self.tags[f"{repository}:{tag}"] = digest
        self.repo_digests.append(f"{repository}@{digest}")
        return iter([{"status": "Pushed"}, {"aux": {"Tag": tag, "Digest": digest, "Size": 1}}])


@pytest.fixture
def registry(monkeypatch, test_image_fake) -> Registry:
    engine = Registry()
    monkeypatch.setattr(docker_engine, "docker_client", lambda: engine)
    return engine


@pytest.fixture
def test_image_fake(monkeypatch):
    """test_image's pipeline stand-in, up to date, whose build records the EIF's SHA-384."""
    stand_in = test_image.Pipeline(up_to_date=True)
    for name in ("plan_build", "existing_release"):
        monkeypatch.setattr(pipeline, name, getattr(stand_in, name))

    def recorded(build):
        return dataclasses.replace(
            build, image_id=IMAGE_ID, eif_sha384=EIF_SHA384, inputs_digest="sha256:" + "9" * 64
        )

    def build(manifest, options, client=None):
        return recorded(stand_in.build(manifest, options))

    def existing_release(client, plan, force=False):
        found, reason = stand_in.existing_release(client, plan, force)
        return (recorded(found) if found else None), reason

    monkeypatch.setattr(pipeline, "build", build)
    monkeypatch.setattr(pipeline, "existing_release", existing_release)
    return stand_in


@pytest.fixture
def args(tmp_path: Path) -> dict[str, Any]:
    manifest = tmp_path / "enclaver.yaml"
    manifest.write_text(MANIFEST)
    return {
        "manifest": str(manifest),
        "push_repository": f"{REPOSITORY}:1.0",
        "registry_username": "ci",
        "registry_password": "s3cret",
        "record_dir": str(tmp_path / "records"),
    }


def test_the_first_run_pushes_and_records_the_second_changes_nothing(
    run_module, registry, args, tmp_path
) -> None:
    first = run_module(image.main, args)
    digest = registry.tags[f"{REPOSITORY}:1.0"]
    assert first["failed"] is False, first["msg"]
    assert first["changed"] is True
    assert first["repo_digest"] == f"{REPOSITORY}@{digest}"
    assert first["push"]["pushed"] is True
    assert registry.pushes == [(REPOSITORY, "1.0", {"username": "ci", "password": "s3cret"})]
    record = first["record"]
    assert record["written"] is True
    assert Path(record["path"]) == (
        tmp_path / "records" / "hello" / f"{'00' * 8}-{digest[7:19]}.json"
    )
    kept = json.loads(Path(record["path"]).read_text())
    assert kept == record["document"]
    assert kept["image"]["repo_digest"] == first["repo_digest"]
    assert kept["eif"]["sha384"] == EIF_SHA384 == first["eif_sha384"]
    assert (kept["ingress_ports"], kept["aux_api_port"]) == ([8080], 9101)
    assert "s3cret" not in json.dumps(first)

    second = run_module(image.main, args)
    assert second["changed"] is False, second
    assert second["push"]["reason"] == f"{REPOSITORY}:1.0 already holds this image"
    assert second["record"]["written"] is False
    assert second["repo_digest"] == first["repo_digest"]
    assert len(registry.pushes) == 1


def test_check_mode_asks_the_registry_and_pushes_and_writes_nothing(
    run_module, registry, args, tmp_path
) -> None:
    predicted = run_module(image.main, args, check_mode=True)
    assert predicted["changed"] is True
    assert predicted["push"]["reason"] == (
        f"{REPOSITORY}:1.0 does not exist in the registry: would push"
    )
    assert (predicted["repo_digest"], predicted["record"]) == (None, None)
    assert registry.pushes == [] and len(registry.asked) == 1
    assert not (tmp_path / "records").exists()

    run_module(image.main, args)
    assert run_module(image.main, args, check_mode=True)["changed"] is False


def test_another_image_under_the_tag_is_pushed_over(run_module, registry, args) -> None:
    registry.tags[f"{REPOSITORY}:1.0"] = "sha256:" + "f" * 64
    pushed = run_module(image.main, args)
    assert pushed["push"]["reason"] == (
        f"{REPOSITORY}:1.0 holds sha256:{'f' * 64}, another image: pushed"
    )


def test_a_record_of_another_build_at_the_same_path_fails_and_is_kept(
    run_module, registry, args
) -> None:
    path = Path(run_module(image.main, args)["record"]["path"])
    document = json.loads(path.read_text())
    document["manifest_digest"] = "sha256:" + "e" * 64
    path.write_text(json.dumps(document))
    failed = run_module(image.main, args)
    assert failed["failed"] is True
    assert "already records another build" in failed["msg"]
    assert json.loads(path.read_text()) == document


def test_a_bad_push_repository_names_the_option(run_module, registry, args) -> None:
    failed = run_module(image.main, dict(args, push_repository="Hello@sha256:x"))
    assert failed["failed"] is True
    assert "push_repository 'Hello@sha256:x' is not a repository to push to" in failed["msg"]


def test_without_push_repository_nothing_is_pushed(run_module, registry, args) -> None:
    plain = {"manifest": args["manifest"]}
    built = run_module(image.main, plain)
    assert (built["repo_digest"], built["push"], built["record"]) == (None, None, None)
    assert registry.asked == []


def test_record_info_lists_the_records_and_picks_the_build_before(
    run_module, registry, args
) -> None:
    run_module(image.main, args)
    run_module(image.main, dict(args, push_repository=f"{REPOSITORY}:2.0"))
    info = run_module(build_record_info.main, {"record_dir": args["record_dir"], "name": "hello"})
    assert info["changed"] is False
    tags = [record["image"]["tag"] for record in info["records"]]
    assert sorted(tags) == ["1.0", "2.0"]
    assert info["previous"] == info["records"][0]
    assert info["latest"] == info["records"][1]
    before_first = run_module(
        build_record_info.main,
        {
            "record_dir": args["record_dir"],
            "name": "hello",
            "before": info["records"][0]["image"]["repo_digest"],
        },
    )
    assert before_first["previous"] is None
    unknown = run_module(
        build_record_info.main,
        {"record_dir": args["record_dir"], "name": "hello", "before": "x@sha256:" + "0" * 64},
    )
    assert unknown["failed"] is True and "no build record of hello names" in unknown["msg"]
