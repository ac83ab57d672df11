"""``enclaveops build`` of examples/hello with the project's runtime and sleeve images:
reproducible from scratch, skipped when nothing changed, a one-byte change of the app moves PCR0
and PCR2 but not PCR1, and rebuilds remove the images earlier builds left, except the previous
release and images a container uses. Needs root and Docker; CI has both.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclave_runtime.build.project_images import ProjectImages, ensure_project_images
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

EXAMPLE = REPO_ROOT / "examples" / "hello"
REPOSITORY = "enclaveops-test/build-hello"
TEST_LABEL = "org.enclaveops.test=build"


@dataclass
class Example:
    work: Path
    images: ProjectImages
    base_image: str
    tags: list[str]
    targets: list[str]

    def app_image(self, name: str, edit: str | None = None) -> str:
        """examples/hello built as ``REPOSITORY:name``; ``edit`` replaces app.py's last byte."""
        context = self.work / name
        shutil.copytree(EXAMPLE, context)
        if edit is not None:
            app = context / "app.py"
            app.write_bytes(app.read_bytes()[:-1] + edit.encode())
        tag = f"{REPOSITORY}:{name}"
        docker(
            "build", "-q", "--label", TEST_LABEL, "--build-arg", f"BASE_IMAGE={self.base_image}",
            "-t", tag, str(context),
        )  # fmt: skip
        self.tags.append(tag)
        return tag

    def manifest(self, name: str, app: str) -> Path:
        """examples/hello's manifest building ``app`` into ``REPOSITORY:name-release``."""
        document = yaml.safe_load((EXAMPLE / "enclaver.yaml").read_text())
        document["sources"] = {
            "app": app,
            "odyn": self.images.runtime,
            "sleeve": self.images.sleeve_emulator,
        }
        document["target"] = f"{REPOSITORY}:{name}-release"
        self.tags += [document["target"], f"{REPOSITORY}-amended:{name}-release"]
        self.targets.append(document["target"])
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document))
        return path


def docker(*args: str) -> str:
    return subprocess.run(
        ["docker", *args], check=True, capture_output=True, text=True, timeout=600
    ).stdout


def enclaveops_build(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "enclave_runtime.cli.enclaveops", "build", "--json", *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def built_for(target: str) -> list[str]:
    """The IDs of the images builds of ``target`` made that are still present."""
    label = f"label=org.enclaveops.build.target={target}"
    return docker("images", "-q", "--no-trunc", "--filter", label).split()


def image_exists(reference: str) -> bool:
    inspected = subprocess.run(
        ["docker", "image", "inspect", reference], capture_output=True, check=False
    )
    return inspected.returncode == 0


def build_json(manifest: Path, eif: Path) -> dict[str, Any]:
    output = enclaveops_build("-f", str(manifest), "--builder", "native", "--eif-output", str(eif))
    return json.loads(output.stdout)


@pytest.fixture(scope="module")
def example(base_image: str) -> Iterator[Example]:
    images = ensure_project_images(base_image=base_image)
    work = Path(tempfile.mkdtemp(prefix="build-e2e-", dir="/var/tmp"))
    example = Example(work, images, base_image, [], [])
    yield example
    subprocess.run(["docker", "rmi", "-f", *example.tags], capture_output=True, check=False)
    for target in example.targets:  # the untagged images the builds kept
        subprocess.run(
            ["docker", "rmi", "-f", *built_for(target)], capture_output=True, check=False
        )
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def first_build(example: Example) -> tuple[Path, dict[str, Any]]:
    manifest = example.manifest("same", example.app_image("same"))
    return manifest, build_json(manifest, example.work / "first.eif")


def test_two_builds_from_scratch_give_identical_eif_bytes_pcrs_and_images(
    example: Example, first_build: tuple[Path, dict[str, Any]]
) -> None:
    manifest, first = first_build
    docker("rmi", first["Image"].split("@")[0], first["AmendedImage"].split("@")[0])

    second = build_json(manifest, example.work / "second.eif")

    assert not first["Skipped"] and not second["Skipped"]
    assert (example.work / "first.eif").read_bytes() == (example.work / "second.eif").read_bytes()
    assert second["Measurements"] == first["Measurements"]
    assert (second["Image"], second["AmendedImage"]) == (first["Image"], first["AmendedImage"])
    assert second["Eif"]["SHA256"] == first["Eif"]["SHA256"]


def test_a_build_with_unchanged_inputs_is_skipped(
    example: Example, first_build: tuple[Path, dict[str, Any]]
) -> None:
    manifest, first = first_build

    again = build_json(manifest, example.work / "again.eif")

    assert again["Skipped"] is True
    assert again["Reason"].startswith("inputs unchanged")
    assert (again["Image"], again["Measurements"]) == (first["Image"], first["Measurements"])
    assert (example.work / "again.eif").read_bytes() == (example.work / "first.eif").read_bytes()


def test_the_amended_image_starts_odyn_with_the_apps_command_and_no_cmd(
    first_build: tuple[Path, dict[str, Any]],
) -> None:
    _, first = first_build
    amended = json.loads(docker("image", "inspect", first["AmendedImage"].split("@")[0]))[0]
    release = json.loads(docker("image", "inspect", first["Image"].split("@")[0]))[0]

    assert amended["Config"]["Entrypoint"] == [
        "/opt/enclave-runtime/bin/odyn",
        "--config-dir",
        "/etc/enclaver",
        "--",
        "python3",
        "/app/app.py",
    ]
    assert amended["Config"]["Cmd"] is None
    assert (
        amended["RootFS"]["Layers"][:-1]
        == json.loads(docker("image", "inspect", first["Sources"]["app"]["ImageID"]))[0]["RootFS"][
            "Layers"
        ]
    )
    labels = release["Config"]["Labels"]
    assert json.loads(labels["org.enclaveops.build.measurements"]) == first["Measurements"]
    assert (
        release["Config"]["Entrypoint"]
        == json.loads(docker("image", "inspect", first["Sources"]["sleeve"]["ImageID"]))[0][
            "Config"
        ]["Entrypoint"]
    )


def test_one_byte_of_the_app_changes_pcr0_and_pcr2_but_not_pcr1(
    example: Example, first_build: tuple[Path, dict[str, Any]]
) -> None:
    _, first = first_build
    manifest = example.manifest("edited", example.app_image("edited", edit=" "))

    edited = build_json(manifest, example.work / "edited.eif")

    before, after = first["Measurements"], edited["Measurements"]
    assert after["PCR0"] != before["PCR0"]
    assert after["PCR2"] != before["PCR2"]
    assert after["PCR1"] == before["PCR1"]


def test_a_missing_app_image_without_pull_names_the_field_and_the_fixes(
    example: Example,
) -> None:
    manifest = example.manifest("absent", f"{REPOSITORY}:no-such-app")

    result = enclaveops_build("-f", str(manifest), check=False)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"enclaveops: sources.app in {manifest}: the image '{REPOSITORY}:no-such-app' is not "
        f"present locally; build it (docker build -t {REPOSITORY}:no-such-app <app directory>), "
        "or pass --pull to pull it from its registry\n"
    )


def test_rebuilds_keep_the_previous_release_and_images_in_use_and_remove_the_rest(
    example: Example,
) -> None:
    manifest = example.manifest("rebuilt", example.app_image("rebuilt"))
    target, text = example.targets[-1], manifest.read_text()

    def rebuild(number: int) -> dict[str, Any]:
        manifest.write_text(f"{text}# build {number}\n")  # new manifest bytes: a new release
        return build_json(manifest, example.work / "rebuilt.eif")

    first, second = rebuild(1), rebuild(2)
    container = docker("create", "--label", TEST_LABEL, first["ImageID"]).strip()
    try:
        third = rebuild(3)
        after_third = built_for(target)
    finally:
        docker("rm", "-f", container)
    fourth = rebuild(4)

    # the first release stays while a (stopped) container uses it, the second as the previous
    # release; the earlier amended images go
    amended = third["AmendedImage"].split("@")[1]
    assert sorted(after_third) == sorted(
        [first["ImageID"], second["ImageID"], third["ImageID"], amended]
    )
    amended = fourth["AmendedImage"].split("@")[1]
    assert sorted(built_for(target)) == sorted([third["ImageID"], fourth["ImageID"], amended])
    assert not image_exists(first["ImageID"]) and not image_exists(second["ImageID"])
