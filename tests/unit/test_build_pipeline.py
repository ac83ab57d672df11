"""The build pipeline's decisions without a Docker engine: the amended ENTRYPOINT and config,
source resolution and pulling, the engine's image store, the builder choice, the inputs digest
and skipping, the E26 memory check, ``--explain``, replacing output files whole and removing the
images earlier builds left."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import docker
import pytest

from enclave_runtime.build.docker_rootfs import ImageConfigError, image_config
from enclave_runtime.build.explain import explain
from enclave_runtime.build.image_layers import ImageStoreError, NoSpaceError, uses_containerd_store
from enclave_runtime.build.pipeline import (
    LABEL_AMEND_INPUTS,
    LABEL_EIF,
    LABEL_INPUTS,
    LABEL_MEASUREMENTS,
    LABEL_TARGET,
    BuilderChoiceError,
    BuildOptions,
    BuildResult,
    EifTooLargeError,
    ReleaseEifMismatchError,
    SourceImage,
    SourceImageError,
    amend_inputs_digest,
    amended_config,
    amended_reference,
    blobs_digests,
    build,
    build_inputs,
    check_architectures,
    check_memory,
    choose_builder,
    existing_release,
    odyn_entrypoint,
    plan_build,
    prune_superseded,
    rebuild_reason,
    replaced_on_success,
    resolve_sources,
    signing_files,
    source_references,
    up_to_date_release,
)
from enclave_runtime.formats.eif import build_eif
from enclave_runtime.formats.manifest import load_manifest
from enclave_runtime.formats.pcr import Measurements, pcr_of

MANIFEST = """\
version: v1
name: hello
target: example/hello-release:1.0
sources:
  app: example/hello:1.0
  odyn: enclaveops/runtime:0.1.0
  sleeve: enclaveops/sleeve-emulator:0.1.0
defaults:
  memory_mb: 64
"""
ODYN = ["/opt/enclave-runtime/bin/odyn", "--config-dir", "/etc/enclaver"]


def app_attrs(**config: Any) -> dict[str, Any]:
    return {
        "Id": "sha256:" + "a1" * 32,
        "Architecture": "amd64",
        "Config": {
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hi"],
            "Entrypoint": None,
            "Cmd": ["python3", "/app/app.py"],
            "WorkingDir": "",
            "User": "",
            "Labels": {"maintainer": "me"},
            "Hostname": "",
            **config,
        },
    }


@pytest.fixture
def manifest_path(tmp_path: Path) -> Path:
    path = tmp_path / "enclaver.yaml"
    path.write_text(MANIFEST)
    return path


# --------------------------------------------------------------------------------------------
# The amended image


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, [*ODYN, "--", "python3", "/app/app.py"]),
        # docker run's rule, not nitro-cli's: ENTRYPOINT and CMD together
        (
            {"Entrypoint": ["/app/run"], "Cmd": ["--port", "80"]},
            [*ODYN, "--", "/app/run", "--port", "80"],
        ),
        ({"Entrypoint": ["/app/run"], "Cmd": None}, [*ODYN, "--", "/app/run"]),
        ({"WorkingDir": "/srv"}, [*ODYN, "--workdir", "/srv", "--", "python3", "/app/app.py"]),
        ({"User": "app:app"}, [*ODYN, "--user", "app:app", "--", "python3", "/app/app.py"]),
        (
            {"User": "1000", "WorkingDir": "/srv"},
            [*ODYN, "--workdir", "/srv", "--user", "1000", "--", "python3", "/app/app.py"],
        ),
    ],
)
def test_odyn_runs_the_apps_entrypoint_and_cmd_with_its_workdir_and_user(
    config: dict[str, Any], expected: list[str]
) -> None:
    assert odyn_entrypoint(image_config(app_attrs(**config))) == expected


def test_an_app_without_a_command_is_refused() -> None:
    with pytest.raises(ImageConfigError, match=r"sources\.app has neither ENTRYPOINT nor CMD"):
        odyn_entrypoint(image_config(app_attrs(Cmd=None)))


def test_the_amended_config_has_no_cmd_and_no_user_and_keeps_env_and_workdir() -> None:
    attrs = app_attrs(User="app", WorkingDir="/srv", Entrypoint=["/app/run"])

    config = amended_config(attrs, {"org.enclaveops.amend.app": "sha256:x"})

    assert config == {
        "Env": ["PATH=/usr/bin:/bin", "GREETING=hi"],
        "Entrypoint": [
            *ODYN,
            "--workdir",
            "/srv",
            "--user",
            "app",
            "--",
            "/app/run",
            "python3",
            "/app/app.py",
        ],
        "WorkingDir": "/srv",
        "Labels": {"maintainer": "me", "org.enclaveops.amend.app": "sha256:x"},
    }
    # nitro-cli would run a CMD alone, without the ENTRYPOINT: there must be none
    assert image_config({"Config": config}).enclave_command()[0] == ODYN[0]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("hello", "hello-amended:latest"),
        ("example/hello-release:1.0", "example/hello-release-amended:1.0"),
        ("registry:5000/team/app:v2", "registry:5000/team/app-amended:v2"),
        ("registry:5000/team/app", "registry:5000/team/app-amended:latest"),
    ],
)
def test_the_amended_image_is_tagged_beside_the_target(target: str, expected: str) -> None:
    assert amended_reference(target) == expected


# --------------------------------------------------------------------------------------------
# Sources


class FakeImage:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs
        self.id = attrs["Id"]


# `docker info` of Docker 20.10 with the classic store (this machine), and the part that differs
# on Docker Engine 29 with the containerd image store (docs.docker.com/engine/storage/containerd).
CLASSIC_INFO = {
    "ServerVersion": "20.10.24+dfsg1",
    "Driver": "overlay2",
    "DriverStatus": [
        ["Backing Filesystem", "extfs"],
        ["Supports d_type", "true"],
        ["Native Overlay Diff", "true"],
        ["userxattr", "false"],
    ],
}
CONTAINERD_INFO = {
    "ServerVersion": "29.0.1",
    "Driver": "overlayfs",
    "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]],
}


class FakeEngine:
    """images.get, api.pull (from ``registry``) and info: what planning a build uses."""

    def __init__(
        self,
        images: dict[str, dict[str, Any]],
        registry: dict[str, dict[str, Any]] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.known = images
        self.registry = registry or {}
        self.answer = info or CLASSIC_INFO
        self.pulled: list[str] = []
        self.looked_up: list[str] = []
        self.images = self
        self.api = self

    def get(self, reference: str) -> FakeImage:
        self.looked_up.append(reference)
        if reference not in self.known:
            raise docker.errors.ImageNotFound(f"No such image: {reference}")
        return FakeImage(self.known[reference])

    def pull(self, repository: str, tag: str, **_options: Any) -> list[dict[str, Any]]:
        reference = f"{repository}:{tag}"
        self.pulled.append(reference)
        if reference not in self.registry:
            return [{"error": f"pull access denied for {repository}, repository does not exist"}]
        self.known[reference] = self.registry[reference]
        return [{"status": f"Downloaded newer image for {reference}"}]

    def info(self) -> dict[str, Any]:
        return self.answer


def test_sources_resolve_to_local_image_ids(manifest_path: Path) -> None:
    engine = FakeEngine(
        {
            "example/hello:1.0": app_attrs(),
            "enclaveops/runtime:0.1.0": {"Id": "sha256:r", "Architecture": "amd64"},
            "enclaveops/sleeve-emulator:0.1.0": {"Id": "sha256:s", "Architecture": "amd64"},
        }
    )

    resolved = resolve_sources(engine, load_manifest(manifest_path))

    assert {name: image.id for name, (_, image) in resolved.items()} == {
        "app": "sha256:" + "a1" * 32,
        "odyn": "sha256:r",
        "sleeve": "sha256:s",
    }


def test_a_missing_app_image_names_the_field_the_reference_and_the_fixes(manifest_path) -> None:
    with pytest.raises(SourceImageError) as err:
        resolve_sources(FakeEngine({}), load_manifest(manifest_path))

    assert str(err.value) == (
        f"sources.app in {manifest_path}: the image 'example/hello:1.0' is not present locally; "
        "build it (docker build -t example/hello:1.0 <app directory>), or pass --pull to pull it "
        "from its registry"
    )


def test_a_missing_project_image_points_at_the_build_script(manifest_path) -> None:
    engine = FakeEngine({}, registry={"example/hello:1.0": app_attrs()})

    with pytest.raises(SourceImageError) as err:
        resolve_sources(engine, load_manifest(manifest_path), pull=True)

    assert str(err.value) == (
        f"sources.odyn in {manifest_path}: the image 'enclaveops/runtime:0.1.0' is not present "
        "locally; build the project's images with scripts/build-images.sh (they are never "
        "pulled: no registry serves them)"
    )
    assert engine.pulled == ["example/hello:1.0"]


def _local_sources(app: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {
        "example/hello:1.0": app or app_attrs(),
        "enclaveops/runtime:0.1.0": {"Id": "sha256:r", "Architecture": "amd64"},
        "enclaveops/sleeve-emulator:0.1.0": {"Id": "sha256:s", "Architecture": "amd64"},
    }


def test_pull_refreshes_a_present_app_image_but_never_the_project_images(manifest_path) -> None:
    newer = dict(app_attrs(), Id="sha256:" + "b2" * 32)
    engine = FakeEngine(_local_sources(), registry={"example/hello:1.0": newer})

    resolved = resolve_sources(engine, load_manifest(manifest_path), pull=True)

    assert engine.pulled == ["example/hello:1.0"]
    assert resolved["app"][1].id == "sha256:" + "b2" * 32


def test_a_failed_pull_names_the_source(manifest_path) -> None:
    engine = FakeEngine(_local_sources())

    with pytest.raises(SourceImageError) as err:
        resolve_sources(engine, load_manifest(manifest_path), pull=True)

    assert str(err.value).startswith(
        f"sources.app in {manifest_path}: pulling 'example/hello:1.0' failed: pull access denied"
    )


def test_check_mode_never_pulls_and_says_what_a_real_run_would(manifest_path) -> None:
    sources = _local_sources()
    del sources["example/hello:1.0"]
    engine = FakeEngine(sources, registry={"example/hello:1.0": app_attrs()})

    plan = plan_build(manifest_path, BuildOptions(pull=True), engine, check_mode=True)
    release, reason = existing_release(engine, plan)

    assert engine.pulled == []
    assert plan.would_pull == ("example/hello:1.0",)
    assert [source.name for source in plan.sources] == ["odyn", "sleeve"]
    assert (plan.inputs_digest, release) == (None, None)
    assert reason == (
        "would pull example/hello:1.0 first (pull), then build example/hello-release:1.0 when a "
        "pulled image is new or another input changed"
    )


def test_check_mode_without_pull_plans_from_the_local_images(manifest_path) -> None:
    engine = FakeEngine(_local_sources())

    plan = plan_build(manifest_path, BuildOptions(), engine, check_mode=True)

    assert (engine.pulled, plan.would_pull) == ([], ())
    assert plan.inputs_digest is not None and plan.inputs_digest.startswith("sha256:")


# --------------------------------------------------------------------------------------------
# The engine's image store


def test_the_containerd_image_store_is_recognised_from_docker_info() -> None:
    assert uses_containerd_store(CONTAINERD_INFO)
    assert uses_containerd_store({"Driver": "overlayfs", "DriverStatus": None})
    assert not uses_containerd_store(CLASSIC_INFO)
    assert not uses_containerd_store({"Driver": "fuse-overlayfs", "DriverStatus": []})


def test_an_engine_with_the_containerd_store_is_refused_before_anything(manifest_path) -> None:
    engine = FakeEngine(_local_sources(), info=CONTAINERD_INFO)

    with pytest.raises(ImageStoreError) as err:
        plan_build(manifest_path, BuildOptions(pull=True), engine)

    assert (engine.looked_up, engine.pulled) == ([], [])
    message = str(err.value)
    assert message.startswith(
        "the Docker engine (version 29.0.1) keeps its images in the containerd image store "
        "(docker info: driver-type io.containerd.snapshotter.v1)"
    )
    assert '"features": {"containerd-snapshotter": false} in /etc/docker/daemon.json' in message
    assert "restart Docker" in message


def test_a_runtime_of_another_architecture_is_refused() -> None:
    sources = (
        SourceImage("app", "app:1", "sha256:a", "amd64"),
        SourceImage("odyn", "runtime:1", "sha256:r", "arm64"),
    )

    with pytest.raises(
        Exception,
        match=r"sources.odyn \(runtime:1\) is built for arm64, but "
        r"sources.app \(app:1\) for amd64",
    ):
        check_architectures(sources)


@pytest.mark.parametrize("parent", ["aarch64", "arm64"])
def test_an_app_for_another_cpu_than_the_parents_is_refused_before_the_build(
    manifest_path, parent: str
) -> None:
    engine = FakeEngine(_local_sources())  # an amd64 app, as built on an x86 controller

    with pytest.raises(SourceImageError) as err:
        plan_build(manifest_path, BuildOptions(target_architecture=parent), engine)

    assert str(err.value).startswith(
        f"sources.app (example/hello:1.0) is built for amd64, but the target parent is {parent}"
    )
    assert "docker build --platform linux/arm64" in str(err.value)


@pytest.mark.parametrize("parent", ["x86_64", "amd64", None])
def test_an_app_for_the_parents_cpu_is_planned(manifest_path, parent: str | None) -> None:
    plan = plan_build(
        manifest_path, BuildOptions(target_architecture=parent), FakeEngine(_local_sources())
    )
    assert plan.sources[0].architecture == "amd64"


# --------------------------------------------------------------------------------------------
# Builder, signing, inputs


def _executable(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho '{version}'\n")
    path.chmod(0o755)
    return str(path)


def test_auto_uses_nitro_cli_only_where_the_real_one_answers(tmp_path) -> None:
    real = _executable(tmp_path / "nitro-cli", "Nitro CLI 1.3.1")
    emulator = _executable(tmp_path / "nitro-emu", "nitro-emu 0.1.0")

    assert choose_builder("auto", real) == "nitro-cli"
    assert choose_builder("auto", emulator) == "native"
    assert choose_builder("auto", str(tmp_path / "absent")) == "native"
    assert choose_builder("nitro-cli", emulator) == "nitro-cli"
    with pytest.raises(BuilderChoiceError, match="unknown builder 'docker'; use one of auto"):
        choose_builder("docker")


def test_signing_files_resolve_beside_the_manifest_and_must_exist(tmp_path) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text(MANIFEST + "signature:\n  certificate: keys/cert.pem\n  key: keys/key.pem\n")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "cert.pem").write_text("cert")

    with pytest.raises(BuilderChoiceError) as err:
        signing_files(load_manifest(path))
    assert str(err.value).startswith(f"signature.key in {path}: {tmp_path}/keys/key.pem is not")

    (tmp_path / "keys" / "key.pem").write_text("key")
    assert signing_files(load_manifest(path)) == (
        tmp_path / "keys" / "cert.pem",
        tmp_path / "keys" / "key.pem",
    )


SOURCES = (
    SourceImage("app", "a", "sha256:a", "amd64"),
    SourceImage("odyn", "o", "sha256:o", "amd64"),
    SourceImage("sleeve", "s", "sha256:s", "amd64"),
)


def test_paths_given_as_strings_become_paths(tmp_path) -> None:
    (tmp_path / "bzImage").write_bytes(b"kernel")

    options = BuildOptions(blobs=str(tmp_path), eif_output="out.eif", work_dir="/var/tmp")

    assert (options.blobs, options.eif_output, options.work_dir) == (
        tmp_path,
        Path("out.eif"),
        Path("/var/tmp"),
    )
    assert blobs_digests("nitro-cli", options, "amd64") == {
        "bzImage": hashlib.sha256(b"kernel").hexdigest()
    }


def test_every_input_changes_the_inputs(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for name in ("bzImage", "bzImage.config", "cmdline", "init", "nsm.ko"):
        (blobs / name).write_text(name)
    options = BuildOptions(blobs=blobs)
    base = build_inputs(SOURCES, b"version: v1\n", "native", options, None)

    assert build_inputs(SOURCES, b"version: v1\n", "native", options, None) == base
    assert build_inputs(SOURCES, b"version: v1 \n", "native", options, None) != base
    assert build_inputs(SOURCES[::-1], b"version: v1\n", "native", options, None) == base
    other_app = (SourceImage("app", "a", "sha256:b", "amd64"), *SOURCES[1:])
    assert build_inputs(other_app, b"version: v1\n", "native", options, None) != base
    (blobs / "init").write_text("another init")
    assert build_inputs(SOURCES, b"version: v1\n", "native", options, None) != base
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    assert build_inputs(SOURCES, b"version: v1\n", "native", options, None)["source_date_epoch"]


def _release(labels: dict[str, str]) -> FakeEngine:
    return FakeEngine(
        {"example/hello-release:1.0": {"Id": "sha256:rel", "Config": {"Labels": labels}}}
    )


PCRS = Measurements(bytes(48), b"\x01" * 48, b"\x02" * 48)


def test_a_release_made_from_the_same_inputs_is_up_to_date() -> None:
    labels = {
        LABEL_INPUTS: "sha256:in",
        LABEL_MEASUREMENTS: json.dumps(PCRS.to_nitro_cli()),
        LABEL_EIF: json.dumps({"SHA256": "ee", "SHA384": "ff", "Size": 10}),
    }

    found = up_to_date_release(_release(labels), "example/hello-release:1.0", "sha256:in")

    assert found is not None
    assert (found.skipped, found.image, found.measurements) == (
        True,
        "example/hello-release:1.0@sha256:rel",
        PCRS,
    )
    assert found.reason == "inputs unchanged: example/hello-release:1.0 already holds this build"
    assert up_to_date_release(_release(labels), "example/hello-release:1.0", "sha256:x") is None
    assert up_to_date_release(FakeEngine({}), "example/hello-release:1.0", "sha256:in") is None


def test_a_release_whose_label_lacks_the_eif_sha384_is_built_again_and_says_why() -> None:
    """Build records need the SHA-384; release images of an older enclave-runtime lack it."""
    labels = {
        LABEL_INPUTS: "sha256:in",
        LABEL_MEASUREMENTS: json.dumps(PCRS.to_nitro_cli()),
        LABEL_EIF: json.dumps({"SHA256": "ee", "Size": 10}),
    }
    engine = _release(labels)

    assert up_to_date_release(engine, "example/hello-release:1.0", "sha256:in") is None
    assert rebuild_reason(engine, "example/hello-release:1.0") == (
        "example/hello-release:1.0 does not record its EIF's SHA-384 (an older enclave-runtime "
        "built it)"
    )


# --------------------------------------------------------------------------------------------
# The EIF


def test_an_eif_too_large_for_the_manifests_memory_is_e26(manifest_path, tmp_path) -> None:
    eif = tmp_path / "big.eif"
    with eif.open("wb") as out:
        out.truncate(17 * 1024 * 1024)

    with pytest.raises(EifTooLargeError) as err:
        check_memory(eif, load_manifest(manifest_path))

    assert str(err.value) == (
        "the EIF is 17 MiB, so nitro-cli needs at least 68 MiB of enclave memory for it (4 × its "
        f"size; [ E26 ] otherwise), but defaults.memory_mb in {manifest_path} is 64: raise "
        "defaults.memory_mb to 68 or more (and the allocator's memory_mib with it), or make the "
        "app image smaller"
    )
    os.truncate(eif, 16 * 1024 * 1024)
    check_memory(eif, load_manifest(manifest_path))


def test_explain_shows_each_section_with_the_pcrs_it_feeds(tmp_path) -> None:
    kernel, bootstrap, customer = b"kernel" * 100, b"bootstrap", b"customer" * 1000
    eif = tmp_path / "x.eif"
    pcrs = build_eif(kernel, "console=ttyS0", [bootstrap, customer], eif)

    sections = explain(eif)

    assert [(s.kind, s.size, s.pcrs) for s in sections] == [
        ("Kernel", len(kernel), (0, 1)),
        ("Cmdline", len(b"console=ttyS0"), (0, 1)),
        ("Metadata", sections[2].size, ()),
        ("Ramdisk", len(bootstrap), (0, 1)),
        ("Ramdisk", len(customer), (0, 2)),
    ]
    assert pcrs.pcr1 == pcr_of(kernel, b"console=ttyS0", bootstrap)
    assert sections[4].sha384 == hashlib.sha384(customer).hexdigest()


def test_absent_odyn_and_sleeve_default_to_the_project_images(tmp_path) -> None:
    path = tmp_path / "enclaver.yaml"
    path.write_text("version: v1\nname: hello\ntarget: hello-release\nsources:\n  app: hello\n")
    manifest = load_manifest(path)

    assert source_references(manifest) == {
        "app": "hello",
        "odyn": "enclaveops/runtime:0.1.0",
        "sleeve": "enclaveops/sleeve-emulator:0.1.0",
    }
    assert source_references(manifest, "nitro-cli")["sleeve"] == "enclaveops/sleeve:0.1.0"


# --------------------------------------------------------------------------------------------
# Output files


def test_an_output_is_replaced_only_when_it_was_written_whole(tmp_path) -> None:
    eif = tmp_path / "app.eif"
    eif.write_bytes(b"working EIF")

    with pytest.raises(RuntimeError), replaced_on_success(eif) as partial:
        partial.write_bytes(b"half")
        raise RuntimeError("the builder died")

    assert eif.read_bytes() == b"working EIF"
    assert [path.name for path in tmp_path.iterdir()] == ["app.eif"]
    with replaced_on_success(eif) as partial:
        partial.write_bytes(b"new EIF")
    assert eif.read_bytes() == b"new EIF"
    assert [path.name for path in tmp_path.iterdir()] == ["app.eif"]


def test_an_output_that_cannot_be_written_names_the_directory(tmp_path) -> None:
    with pytest.raises(NoSpaceError) as err, replaced_on_success(tmp_path / "a.eif") as partial:
        partial.write_bytes(b"x" * 2_000_000)
        raise OSError(28, "No space left on device")

    assert str(err.value).startswith(
        f"no space left on the device of {tmp_path}: about 2 MB are needed"
    )


# --------------------------------------------------------------------------------------------
# A skipped build: the amended image and the EIF of the release image

RELEASE_EIF_BYTES = b"the EIF inside the release image"


class FakeContainer:
    def __init__(self, engine: ReleaseEngine) -> None:
        self.engine = engine

    def get_archive(self, path: str) -> tuple[list[bytes], dict[str, Any]]:
        self.engine.copied.append(path)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            member = tarfile.TarInfo(Path(path).name)
            member.size = len(self.engine.eif)
            tar.addfile(member, io.BytesIO(self.engine.eif))
        return [archive.getvalue()], {"name": Path(path).name}

    def remove(self, force: bool) -> None:
        self.engine.removed_containers += 1


class ReleaseEngine(FakeEngine):
    """A FakeEngine holding an up-to-date release image of ``manifest_path`` (labels as a build
    writes them), its amended image, and containers that give the EIF inside the release."""

    def __init__(self, manifest_path: Path, amended_digest: str | None = None) -> None:
        super().__init__(_local_sources())
        self.containers = self
        self.copied: list[str] = []
        self.removed_containers = 0
        self.eif = RELEASE_EIF_BYTES
        plan = plan_build(manifest_path, BuildOptions(builder="native"), self)
        self.known["example/hello-release:1.0"] = {
            "Id": "sha256:rel",
            "Config": {
                "Labels": {
                    LABEL_INPUTS: plan.inputs_digest,
                    LABEL_MEASUREMENTS: json.dumps(PCRS.to_nitro_cli()),
                    LABEL_EIF: json.dumps(
                        {
                            "SHA256": hashlib.sha256(RELEASE_EIF_BYTES).hexdigest(),
                            "SHA384": hashlib.sha384(RELEASE_EIF_BYTES).hexdigest(),
                            "Size": len(RELEASE_EIF_BYTES),
                        }
                    ),
                }
            },
        }
        digest = amended_digest or amend_inputs_digest(plan.images, plan.manifest_bytes)
        self.known["example/hello-release-amended:1.0"] = {
            "Id": "sha256:am",
            "Config": {"Labels": {LABEL_AMEND_INPUTS: digest}},
        }

    def create(self, image_id: str, entrypoint: list[str]) -> FakeContainer:
        assert image_id == "sha256:rel"
        return FakeContainer(self)


def _skipped_build(engine: ReleaseEngine, manifest_path: Path, eif: Path | None) -> BuildResult:
    return build(manifest_path, BuildOptions(builder="native", eif_output=eif), client=engine)


def test_a_skipped_build_reports_the_amended_image_it_was_made_from(manifest_path) -> None:
    result = _skipped_build(ReleaseEngine(manifest_path), manifest_path, None)

    assert result.skipped and not result.eif_written
    assert (result.amended.reference, result.amended.image_id) == (
        "example/hello-release-amended:1.0",
        "sha256:am",
    )
    assert result.to_json()["AmendedImage"] == "example/hello-release-amended:1.0@sha256:am"


def test_an_amended_image_from_other_inputs_is_not_reported(manifest_path) -> None:
    engine = ReleaseEngine(manifest_path, amended_digest="sha256:another-build")

    result = _skipped_build(engine, manifest_path, None)

    assert result.skipped and result.amended is None
    assert "AmendedImage" not in result.to_json()


def test_a_skipped_build_copies_a_missing_eif_out_of_the_release_image(
    manifest_path, tmp_path
) -> None:
    engine = ReleaseEngine(manifest_path)
    eif = tmp_path / "out" / "hello.eif"
    eif.parent.mkdir()

    result = _skipped_build(engine, manifest_path, eif)

    assert eif.read_bytes() == RELEASE_EIF_BYTES
    assert (result.skipped, result.eif_written) == (True, True)
    assert engine.copied == ["/enclave/application.eif"]
    assert engine.removed_containers == 1
    assert result.reason == (
        "inputs unchanged: example/hello-release:1.0 already holds this build; "
        f"{eif} does not exist: copied the EIF out of the release image"
    )
    assert [path.name for path in eif.parent.iterdir()] == ["hello.eif"]


def test_a_skipped_build_leaves_the_eif_alone_when_it_is_the_builds(
    manifest_path, tmp_path
) -> None:
    engine = ReleaseEngine(manifest_path)
    eif = tmp_path / "hello.eif"
    eif.write_bytes(RELEASE_EIF_BYTES)

    result = _skipped_build(engine, manifest_path, eif)

    assert (result.skipped, result.eif_written, engine.copied) == (True, False, [])
    assert result.reason == "inputs unchanged: example/hello-release:1.0 already holds this build"


def test_a_skipped_build_replaces_another_eif_with_the_builds(manifest_path, tmp_path) -> None:
    eif = tmp_path / "hello.eif"
    eif.write_bytes(b"the EIF of an older build")

    result = _skipped_build(ReleaseEngine(manifest_path), manifest_path, eif)

    assert eif.read_bytes() == RELEASE_EIF_BYTES
    assert result.eif_written
    assert result.reason.endswith(
        f"{eif} is not the EIF of this build: copied the EIF out of the release image"
    )


def test_an_eif_in_the_release_that_differs_from_its_label_is_refused(
    manifest_path, tmp_path
) -> None:
    engine = ReleaseEngine(manifest_path)
    engine.eif = b"an EIF put into the image by hand"
    eif = tmp_path / "hello.eif"
    eif.write_bytes(b"the EIF of an older build")

    with pytest.raises(ReleaseEifMismatchError) as err:
        _skipped_build(engine, manifest_path, eif)

    expected = hashlib.sha256(RELEASE_EIF_BYTES).hexdigest()
    found = hashlib.sha256(engine.eif).hexdigest()
    assert str(err.value) == (
        f"/enclave/application.eif in the release image sha256:rel has SHA-256 {found}, but the "
        f"image's label {LABEL_EIF} records {expected}: the image was altered after enclaveops "
        "built it; build it again (enclaveops build --force, or the image module's force: true)"
    )
    assert eif.read_bytes() == b"the EIF of an older build"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["enclaver.yaml", "hello.eif"]
    assert engine.removed_containers == 1


# --------------------------------------------------------------------------------------------
# Housekeeping


class PruningEngine:
    """images.list/remove and api.containers: what prune_superseded uses."""

    def __init__(self, dangling: list[str], used: list[str], refused: tuple[str, ...] = ()) -> None:
        self.dangling = dangling
        self.used = used
        self.refused = refused
        self.filters: dict[str, Any] = {}
        self.removed: list[str] = []
        self.images = self
        self.api = self

    def list(self, filters: dict[str, Any]) -> list[FakeImage]:
        self.filters = filters
        return [FakeImage({"Id": image_id}) for image_id in self.dangling]

    def containers(self, all: bool) -> list[dict[str, str]]:
        assert all, "stopped containers use their images too"
        return [
            {"Id": f"c{index}", "ImageID": image_id} for index, image_id in enumerate(self.used)
        ]

    def remove(self, image_id: str) -> None:
        if image_id in self.refused:
            raise docker.errors.APIError(f"conflict: unable to delete {image_id}")
        self.removed.append(image_id)


def test_rebuilds_remove_older_untagged_images_but_keep_the_previous_release() -> None:
    engine = PruningEngine(
        dangling=["sha256:previous", "sha256:older", "sha256:amended-old", "sha256:in-use"],
        used=["sha256:in-use"],
    )

    removed = prune_superseded(engine, "example/hello-release:1.0", {"sha256:previous"})

    assert removed == engine.removed == ["sha256:older", "sha256:amended-old"]
    assert engine.filters == {
        "dangling": True,
        "label": f"{LABEL_TARGET}=example/hello-release:1.0",
    }


def test_an_image_the_engine_will_not_remove_is_left_quietly() -> None:
    engine = PruningEngine(dangling=["sha256:a", "sha256:b"], used=[], refused=("sha256:a",))

    assert prune_superseded(engine, "t:1", set()) == ["sha256:b"]
