"""A parent pulls a release image by digest and checks it against the build record: the registry
digest, the EIF SHA-384 and PCR0-2 in its labels, each mismatch named, before anything runs.

The engine is a stand-in that resolves references the way Docker does (tag, image ID, and
``repository@digest`` through RepoDigests) and pulls from a dict standing in for a registry.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from enclave_runtime.formats.image_reference import ImageReferenceError
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.formats.release_labels import (
    LABEL_EIF,
    LABEL_MEASUREMENTS,
    ReleaseLabelError,
    eif_label,
)
from enclave_runtime.host import release_pull
from enclave_runtime.host.docker_engine import (
    DockerError,
    ImageNotFoundError,
    RegistryAuth,
    registry_auth,
)

docker = pytest.importorskip("docker")

REPO = "127.0.0.1:5000/hello"
DIGEST = "sha256:" + "d" * 64
OTHER_DIGEST = "sha256:" + "e" * 64
IMAGE_ID = "sha256:" + "1" * 64
PCRS = Measurements(b"\xa0" * 48, b"\x01" * 48, b"\x02" * 48)
EIF_SHA384 = "38" * 48


def labels(measurements: Measurements = PCRS, sha384: str = EIF_SHA384) -> dict[str, str]:
    return {
        LABEL_MEASUREMENTS: json.dumps(measurements.to_nitro_cli()),
        LABEL_EIF: eif_label("56" * 32, sha384, 100),
    }


class Image:
    def __init__(self, image_id: str, repo_digests: list[str], image_labels: dict) -> None:
        self.id = image_id
        self.attrs = {"RepoDigests": repo_digests, "Config": {"Labels": image_labels}}


class Engine:
    """images.get and api.pull as the engine answers them; ``registry`` maps digest -> Image."""

    def __init__(self) -> None:
        self.local: dict[str, Image] = {}
        self.registry: dict[str, Image] = {DIGEST: Image(IMAGE_ID, [f"{REPO}@{DIGEST}"], labels())}
        self.pulls: list[tuple[str, str, Any]] = []
        self.images = self
        self.api = self

    def get(self, reference: str) -> Image:
        for image in self.local.values():
            if reference == image.id or reference in image.attrs["RepoDigests"]:
                return image
        raise docker.errors.ImageNotFound(reference)

    def pull(self, repository: str, tag: str, stream: bool, decode: bool, **kwargs: Any):
        self.pulls.append((repository, tag, kwargs.get("auth_config")))
        if tag not in self.registry:
            return iter([{"error": f"manifest for {repository}@{tag} not found"}])
        self.local[tag] = self.registry[tag]
        return iter([{"status": "Downloaded"}])


@pytest.fixture
def engine() -> Engine:
    return Engine()


def expect(**kwargs: Any) -> release_pull.ReleaseExpectation:
    return release_pull.expectation_for(f"{REPO}@{DIGEST}", **kwargs)


def test_missing_pulls_once_by_digest_with_the_credentials_then_finds_it_here(engine) -> None:
    auth = RegistryAuth("ci", "secret", "127.0.0.1:5000")
    first = release_pull.prepare_release_image(
        engine, f"{REPO}@{DIGEST}", pull="missing", auth=auth, expected=expect()
    )
    assert (first.pulled, first.release.image_id) == (True, IMAGE_ID)
    assert engine.pulls == [
        (REPO, DIGEST, {"username": "ci", "password": "secret", "serveraddress": "127.0.0.1:5000"})
    ]
    again = release_pull.prepare_release_image(
        engine, f"{REPO}@{DIGEST}", pull="missing", expected=expect()
    )
    assert (again.pulled, len(engine.pulls)) == (False, 1)


def test_never_keeps_todays_behaviour_a_missing_image_fails(engine) -> None:
    with pytest.raises(ImageNotFoundError, match="is not present locally"):
        release_pull.prepare_release_image(engine, f"{REPO}@{DIGEST}")
    assert engine.pulls == []


def test_check_mode_reports_the_pull_and_pulls_nothing(engine) -> None:
    for pull in ("missing", "always"):
        predicted = release_pull.prepare_release_image(
            engine, f"{REPO}@{DIGEST}", pull=pull, check_mode=True
        )
        assert (predicted.release, predicted.pulled) == (None, True)
        assert predicted.reason == f"would pull {REPO}@{DIGEST}"
    assert engine.pulls == []


def test_always_pulls_even_when_present_and_that_is_no_change(engine) -> None:
    engine.local[DIGEST] = engine.registry[DIGEST]
    prepared = release_pull.prepare_release_image(engine, f"{REPO}@{DIGEST}", pull="always")
    assert (prepared.pulled, len(engine.pulls)) == (False, 1)


def test_a_malformed_digest_is_refused_before_any_registry_is_asked(engine) -> None:
    with pytest.raises(ImageReferenceError, match="64 lower-case hex"):
        release_pull.prepare_release_image(engine, f"{REPO}@sha256:abc", pull="missing")
    assert engine.pulls == []


def test_the_recorded_build_passes(engine) -> None:
    prepared = release_pull.prepare_release_image(
        engine,
        f"{REPO}@{DIGEST}",
        pull="missing",
        expected=expect(eif_sha384=EIF_SHA384, pcrs=PCRS.as_pcrs()),
    )
    assert prepared.release.pinned == f"{REPO}@{IMAGE_ID}"


@pytest.mark.parametrize(
    ("expected", "field"),
    [
        ({"eif_sha384": "00" * 48}, "eif_sha384"),
        ({"pcrs": {0: b"\x00" * 48}}, "PCR0"),
        ({"pcrs": {1: b"\x00" * 48}}, "PCR1"),
        ({"pcrs": {2: b"\x00" * 48}}, "PCR2"),
        ({"pcrs": {8: b"\x08" * 48}}, "PCR8"),
        ({"digest": OTHER_DIGEST}, "digest"),
    ],
)
def test_each_field_that_differs_from_the_record_is_named(engine, expected, field) -> None:
    with pytest.raises(ReleaseLabelError) as refused:
        release_pull.prepare_release_image(
            engine, f"{REPO}@{DIGEST}", pull="missing", expected=expect(**expected)
        )
    assert refused.value.fields == (field,)
    assert f"{field} is " in str(refused.value)
    assert "Refusing to run it" in str(refused.value)


def test_every_differing_field_is_named_at_once(engine) -> None:
    with pytest.raises(ReleaseLabelError) as refused:
        release_pull.prepare_release_image(
            engine,
            f"{REPO}@{DIGEST}",
            pull="missing",
            expected=expect(
                digest=OTHER_DIGEST, eif_sha384="00" * 48, pcrs={0: b"\x00" * 48, 2: b"\x00" * 48}
            ),
        )
    assert refused.value.fields == ("digest", "eif_sha384", "PCR0", "PCR2")


def test_an_image_pushed_over_the_tag_is_refused_by_the_recorded_digest(engine) -> None:
    """Same labels (copied), another manifest: only the digest tells them apart."""
    impostor = Image("sha256:" + "2" * 64, [f"{REPO}@{OTHER_DIGEST}"], labels())
    engine.local["hello:latest"] = impostor
    engine.get = lambda ref: impostor if ref == "hello:latest" else Engine.get(engine, ref)
    with pytest.raises(
        ReleaseLabelError, match=f"digest is {REPO}@{OTHER_DIGEST}, expected {DIGEST}"
    ):
        release_pull.prepare_release_image(
            engine,
            "hello:latest",
            expected=release_pull.expectation_for("hello:latest", digest=DIGEST),
        )


def test_an_image_without_release_labels_is_refused(engine) -> None:
    engine.registry[DIGEST] = Image(IMAGE_ID, [f"{REPO}@{DIGEST}"], {})
    with pytest.raises(
        ReleaseLabelError, match=r"has no label org\.enclaveops\.build\.measurements"
    ):
        release_pull.prepare_release_image(
            engine, f"{REPO}@{DIGEST}", pull="missing", expected=expect(eif_sha384=EIF_SHA384)
        )


def test_a_locally_built_image_pinned_by_its_id_passes_the_digest_check(engine) -> None:
    engine.local["x"] = Image(IMAGE_ID, [], labels())
    engine.get = lambda ref: (
        engine.local["x"]
        if ref in ("hello-release:latest", IMAGE_ID)
        else (Engine.get(engine, ref))
    )
    reference = f"hello-release:latest@{IMAGE_ID}"
    prepared = release_pull.prepare_release_image(
        engine, reference, expected=release_pull.expectation_for(reference, pcrs=PCRS.as_pcrs())
    )
    assert prepared.release.image_id == IMAGE_ID


def test_credentials_come_in_pairs() -> None:
    assert registry_auth(None, None) is None
    with pytest.raises(DockerError, match="registry_password is not set"):
        registry_auth("AWS", None)
    with pytest.raises(DockerError, match="registry_username is not set"):
        registry_auth(None, "token")
    assert "token" not in repr(registry_auth("AWS", "token"))


def test_a_malformed_expected_digest_names_the_option() -> None:
    with pytest.raises(ImageReferenceError, match=r"expected_digest 'sha256:12' is not sha256:"):
        release_pull.expectation_for("hello:latest", digest="sha256:12")


def test_an_unknown_pull_policy_is_refused(engine) -> None:
    with pytest.raises(release_pull.PullPolicyError, match="is not one of never, missing, always"):
        release_pull.prepare_release_image(engine, f"{REPO}@{DIGEST}", pull="sometimes")
