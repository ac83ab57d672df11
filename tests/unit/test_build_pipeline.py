"""The build pipeline's decisions without a Docker engine: the amended ENTRYPOINT and config,
source resolution and its errors, the builder choice, the inputs digest and skipping, the E26
memory check and ``--explain``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import docker
import pytest

from enclave_runtime.formats.eif import build_eif
from enclave_runtime.formats.manifest import load_manifest
from enclave_runtime.formats.pcr import Measurements, pcr_of
from enclave_runtime.host.build_pipeline import (
    LABEL_EIF,
    LABEL_INPUTS,
    LABEL_MEASUREMENTS,
    BuilderChoiceError,
    BuildOptions,
    EifTooLargeError,
    SourceImage,
    SourceImageError,
    amended_config,
    amended_reference,
    build_inputs,
    check_architectures,
    check_memory,
    choose_builder,
    explain,
    odyn_entrypoint,
    resolve_sources,
    signing_files,
    source_references,
    up_to_date_release,
)
from enclave_runtime.host.docker_rootfs import ImageConfigError, image_config

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


class FakeEngine:
    def __init__(self, images: dict[str, dict[str, Any]]) -> None:
        self.known = images
        self.images = self

    def get(self, reference: str) -> FakeImage:
        if reference not in self.known:
            raise docker.errors.ImageNotFound(f"No such image: {reference}")
        return FakeImage(self.known[reference])


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
    engine = FakeEngine({"example/hello:1.0": app_attrs()})

    with pytest.raises(
        Exception,
        match=r"sources.odyn .* build the project's images with "
        r"scripts/build-images.sh, or pass --pull",
    ):
        resolve_sources(engine, load_manifest(manifest_path))


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
        LABEL_EIF: json.dumps({"SHA256": "ee", "Size": 10}),
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
