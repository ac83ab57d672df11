# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""enclaveops.nitro.image: the adapter over enclave_runtime's build pipeline (the pipeline itself
runs in tests/e2e/test_build.py): options passed through, results mapped, check mode building
nothing, errors reported with what to do."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.enclaveops.nitro.plugins.modules import image

pipeline = pytest.importorskip("enclave_runtime.build.pipeline")
docker_engine = pytest.importorskip("enclave_runtime.host.docker_engine")
pcr = pytest.importorskip("enclave_runtime.formats.pcr")
image_layers = pytest.importorskip("enclave_runtime.build.image_layers")

TARGET = "hello-release:latest"
MEASUREMENTS = pcr.Measurements(bytes(48), b"\x01" * 48, b"\x02" * 48)
SOURCES = (
    pipeline.SourceImage("app", "hello:latest", "sha256:a", "amd64"),
    pipeline.SourceImage("odyn", "enclaveops/runtime:0.1.0", "sha256:o", "amd64"),
    pipeline.SourceImage("sleeve", "enclaveops/sleeve-emulator:0.1.0", "sha256:s", "amd64"),
)


class FakeManifest:
    target = TARGET


EIF = b"the EIF of the release image"
EIF_SHA256 = hashlib.sha256(EIF).hexdigest()
AMENDED = image_layers.AppendedImage("sha256:am", "hello-release-amended:latest")


def result(skipped: bool, eif_written: bool = False) -> Any:
    return pipeline.BuildResult(
        target=TARGET,
        image_id="sha256:rel",
        sources=SOURCES,
        measurements=MEASUREMENTS,
        eif_sha256=EIF_SHA256,
        eif_size=len(EIF),
        builder="native",
        inputs_digest="sha256:in",
        skipped=skipped,
        reason="inputs unchanged: …" if skipped else "no local image hello-release:latest",
        amended=AMENDED,
        eif_written=eif_written,
    )


class Pipeline:
    """Stand-ins for plan_build, existing_release and build, recording their calls."""

    def __init__(self, up_to_date: bool) -> None:
        self.up_to_date = up_to_date
        self.calls: list[tuple[str, Any]] = []
        self.check_mode: list[bool] = []

    def plan_build(self, manifest, options, client, check_mode=False):
        self.calls.append(("plan", options))
        self.check_mode.append(check_mode)
        return pipeline.BuildPlan(FakeManifest(), b"", {}, SOURCES, "native", None, "sha256:in")

    def existing_release(self, client, plan, force=False):
        if self.up_to_date and not force:
            return result(skipped=True), "inputs unchanged: …"
        return None, "forced (--force)" if force else "no local image hello-release:latest"

    def build(self, manifest, options, client=None):
        self.calls.append(("build", options))
        if manifest == "broken.yaml":
            raise pipeline.SourceImageError("sources.app in broken.yaml: the image 'x' is missing")
        skipped = self.up_to_date and not options.force
        # The pipeline writes eif_output on a build, and on a skipped one when it is not the EIF.
        output = options.eif_output
        written = output is not None and (
            not skipped or pipeline.eif_output_reason(output, EIF_SHA256) is not None
        )
        return result(skipped=skipped, eif_written=written)


@pytest.fixture
def fake(monkeypatch):
    def install(up_to_date: bool) -> Pipeline:
        stand_in = Pipeline(up_to_date)
        for name in ("plan_build", "existing_release", "build"):
            monkeypatch.setattr(pipeline, name, getattr(stand_in, name))
        monkeypatch.setattr(docker_engine, "docker_client", object)
        return stand_in

    return install


def test_a_build_reports_the_image_the_measurements_and_why(run_module, fake) -> None:
    stand_in = fake(up_to_date=False)

    built = run_module(image.main, {"manifest": "enclaver.yaml", "pull": True, "blobs": "/b"})

    assert built["changed"] is True
    assert built["image"] == "hello-release:latest@sha256:rel"
    assert built["measurements"] == MEASUREMENTS.to_nitro_cli()
    assert built["sources"]["app"] == {"Reference": "hello:latest", "ImageID": "sha256:a"}
    assert (built["eif_digest"], built["image_id"]) == (EIF_SHA256, "sha256:rel")
    assert built["reason"] == "no local image hello-release:latest"
    ((_call, options),) = stand_in.calls
    assert (options.pull, str(options.blobs), options.builder) == (True, "/b", "auto")


def test_unchanged_inputs_are_not_a_change(run_module, fake) -> None:
    fake(up_to_date=True)

    assert run_module(image.main, {"manifest": "enclaver.yaml"})["changed"] is False


def test_check_mode_predicts_and_builds_nothing(run_module, fake) -> None:
    stand_in = fake(up_to_date=False)

    predicted = run_module(image.main, {"manifest": "enclaver.yaml"}, check_mode=True)

    assert [call for call, _options in stand_in.calls] == ["plan"]
    assert stand_in.check_mode == [True]  # the pipeline then pulls nothing
    assert predicted["changed"] is True
    assert (predicted["image"], predicted["measurements"]) == (TARGET, None)
    assert predicted["inputs_digest"] == "sha256:in"
    fake(up_to_date=True)
    assert run_module(image.main, {"manifest": "e.yaml"}, check_mode=True)["changed"] is False


def test_force_builds_in_check_mode_too(run_module, fake) -> None:
    fake(up_to_date=True)

    predicted = run_module(image.main, {"manifest": "e.yaml", "force": True}, check_mode=True)

    assert (predicted["changed"], predicted["reason"]) == (True, "forced (--force)")


def test_a_failed_build_says_what_and_why(run_module, fake) -> None:
    fake(up_to_date=False)

    failed = run_module(image.main, {"manifest": "broken.yaml"})

    assert failed["failed"]
    assert failed["msg"] == (
        "cannot build the release image of broken.yaml: sources.app in broken.yaml: the image "
        "'x' is missing"
    )


def test_blobs_given_as_a_string_reach_the_nitro_cli_builder_as_a_directory(
    run_module, fake, tmp_path
) -> None:
    stand_in = fake(up_to_date=False)
    (tmp_path / "bzImage").write_bytes(b"kernel")

    run_module(image.main, {"manifest": "e.yaml", "builder": "nitro-cli", "blobs": str(tmp_path)})

    ((_call, options),) = stand_in.calls
    assert options.blobs == Path(tmp_path)
    assert pipeline.blobs_digests(options.builder, options, "amd64") == {
        "bzImage": hashlib.sha256(b"kernel").hexdigest()
    }


def test_the_amended_image_is_reported_by_reference_and_id(run_module, fake) -> None:
    fake(up_to_date=True)

    built = run_module(image.main, {"manifest": "enclaver.yaml"})

    assert built["amended"] == {
        "reference": "hello-release-amended:latest",
        "image_id": "sha256:am",
    }
    assert built["eif"] is None


def test_eif_output_reaches_the_pipeline_and_is_reported(run_module, fake, tmp_path) -> None:
    stand_in = fake(up_to_date=False)
    output = tmp_path / "hello.eif"

    built = run_module(image.main, {"manifest": "enclaver.yaml", "eif_output": str(output)})

    ((_call, options),) = stand_in.calls
    assert options.eif_output == output
    assert built["changed"] is True
    assert built["eif"] == {"path": str(output), "sha256": EIF_SHA256, "size": len(EIF)}


def test_a_skipped_build_that_writes_the_eif_is_a_change_and_then_not(
    run_module, fake, tmp_path
) -> None:
    fake(up_to_date=True)
    output = tmp_path / "hello.eif"
    args = {"manifest": "enclaver.yaml", "eif_output": str(output)}

    assert run_module(image.main, args)["changed"] is True  # copied out of the release image
    output.write_bytes(EIF)
    assert run_module(image.main, args)["changed"] is False


def test_check_mode_predicts_whether_the_eif_would_be_copied_out(
    run_module, fake, tmp_path
) -> None:
    stand_in = fake(up_to_date=True)
    output = tmp_path / "hello.eif"
    args = {"manifest": "enclaver.yaml", "eif_output": str(output)}

    missing = run_module(image.main, args, check_mode=True)
    assert not output.exists()  # check mode writes nothing
    output.write_bytes(b"an older EIF")
    other = run_module(image.main, args, check_mode=True)
    output.write_bytes(EIF)
    current = run_module(image.main, args, check_mode=True)

    assert [call for call, _options in stand_in.calls] == ["plan"] * 3
    assert (missing["changed"], other["changed"], current["changed"]) == (True, True, False)
    assert missing["reason"] == (
        f"inputs unchanged: …; {output} does not exist: would copy the EIF out of the release image"
    )
    assert other["reason"].endswith(
        f"{output} is not the EIF of this build: would copy the EIF out of the release image"
    )
    assert current["eif"] == {"path": str(output), "sha256": EIF_SHA256, "size": len(EIF)}


def test_check_mode_that_would_build_reports_no_eif_and_no_amended_image(
    run_module, fake, tmp_path
) -> None:
    fake(up_to_date=False)
    args = {"manifest": "enclaver.yaml", "eif_output": str(tmp_path / "hello.eif")}

    predicted = run_module(image.main, args, check_mode=True)

    assert (predicted["changed"], predicted["eif"], predicted["amended"]) == (True, None, None)
    assert not (tmp_path / "hello.eif").exists()


def test_the_parents_architecture_reaches_the_pipeline(run_module, fake) -> None:
    stand_in = fake(up_to_date=False)

    run_module(image.main, {"manifest": "enclaver.yaml", "target_architecture": "aarch64"})

    ((_call, options),) = stand_in.calls
    assert options.target_architecture == "aarch64"


def test_expected_pcrs_that_match_pass(run_module, fake) -> None:
    fake(up_to_date=True)

    built = run_module(
        image.main, {"manifest": "enclaver.yaml", "expected_pcrs": MEASUREMENTS.to_nitro_cli()}
    )

    assert not built["failed"], built
    assert built["measurements"] == MEASUREMENTS.to_nitro_cli()


def test_other_pcrs_than_expected_fail_naming_the_pcr(run_module, fake) -> None:
    fake(up_to_date=True)
    expected = {"PCR0": "00" * 48, "PCR2": "ff" * 48}

    failed = run_module(image.main, {"manifest": "enclaver.yaml", "expected_pcrs": expected})

    assert failed["failed"]
    assert failed["msg"] == (
        f"the release image {TARGET}@sha256:rel has PCR2 {'02' * 48}, expected {'ff' * 48}: it "
        "was built from other inputs than the expected PCRs come from"
    )
    assert failed["measurements"] == MEASUREMENTS.to_nitro_cli()


def test_expected_pcrs_that_are_not_pcrs_fail_with_the_key(run_module, fake) -> None:
    fake(up_to_date=True)

    failed = run_module(image.main, {"manifest": "enclaver.yaml", "expected_pcrs": {"0": "abc"}})

    assert failed["failed"]
    assert "expected PCR 0 is not 96 hex digits" in failed["msg"]
