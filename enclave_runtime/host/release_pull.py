"""A parent gets the release image a build record names and checks it before running it.

``repository@sha256:D`` is pulled when it is not here (or always, if asked), then the local
image must have D among its ``RepoDigests`` (the registry's manifest digest the record keeps),
and its labels must hold the record's EIF SHA-384 and PCRs. Any difference refuses the image
before a container exists, naming the field; the labels are what the image says of itself, the
record is what the build machine said, by another path (docs/build.md, "Pull by digest").

Resolution itself stays in :func:`~enclave_runtime.host.sleeve_container.resolve_release_image`
(tags, image IDs, pinned IDs); this module only adds the pull before it and the checks after.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.image_reference import (
    is_digest_reference,
    parse_digest,
    parse_digest_reference,
)
from enclave_runtime.formats.release_labels import (
    ReleaseLabelError,
    label_differences,
    read_release_labels,
)
from enclave_runtime.host.docker_engine import (
    ImageNotFoundError,
    RegistryAuth,
    get_image,
    pull_image,
)
from enclave_runtime.host.sleeve_container import ReleaseImage, resolve_release_image

if TYPE_CHECKING:
    from docker import DockerClient

PULL_POLICIES = ("never", "missing", "always")


class PullPolicyError(EnclaveOpsError):
    """A pull policy that is not one of :data:`PULL_POLICIES`."""


@dataclasses.dataclass(frozen=True)
class ReleaseExpectation:
    """What the build record says the image is; unset fields are not checked."""

    digest: str | None = None  # sha256:… of the registry manifest
    eif_sha384: str | None = None
    pcrs: Mapping[int, bytes] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.digest is None and self.eif_sha384 is None and not self.pcrs


@dataclasses.dataclass(frozen=True)
class PreparedRelease:
    """The release image to run; None only in check mode when a pull would bring it."""

    release: ReleaseImage | None
    pulled: bool  # a pull brought an image that was not here (in check mode: would)
    reason: str = ""


def expectation_for(
    reference: str,
    *,
    digest: str | None = None,
    eif_sha384: str | None = None,
    pcrs: Mapping[int, bytes] | None = None,
) -> ReleaseExpectation:
    """The checks for ``reference``: a ``repository@sha256:D`` reference expects D itself when
    no ``digest`` is given (D is then a registry digest, unless it is a local image ID)."""
    if digest is not None:
        digest = parse_digest(digest)
    elif is_digest_reference(reference):
        digest = parse_digest_reference(reference).digest
    return ReleaseExpectation(digest, eif_sha384.lower() if eif_sha384 else None, dict(pcrs or {}))


def prepare_release_image(
    client: DockerClient,
    reference: str,
    *,
    pull: str = "never",
    auth: RegistryAuth | None = None,
    expected: ReleaseExpectation = ReleaseExpectation(),
    check_mode: bool = False,
) -> PreparedRelease:
    """Pull ``reference`` as ``pull`` asks, resolve it, and check it against ``expected``."""
    if pull not in PULL_POLICIES:
        raise PullPolicyError(f"pull {pull!r} is not one of {', '.join(PULL_POLICIES)}")
    if is_digest_reference(reference):
        parse_digest_reference(reference)  # a malformed digest never reaches a registry
    present = _resolve_or_none(client, reference)
    pulled = False
    if pull == "always" and not check_mode:
        pull_image(client, reference, auth)
        pulled, present = present is None, resolve_release_image(client, reference)
    elif present is None and pull != "never":
        if check_mode:
            return PreparedRelease(None, True, f"would pull {reference}")
        pull_image(client, reference, auth)
        pulled, present = True, resolve_release_image(client, reference)
    if present is None:
        present = resolve_release_image(client, reference)  # raises what to do
    check_release_image(client, present, expected)
    return PreparedRelease(present, pulled, f"pulled {reference}" if pulled else "")


def _resolve_or_none(client: DockerClient, reference: str) -> ReleaseImage | None:
    try:
        return resolve_release_image(client, reference)
    except ImageNotFoundError:
        return None


def check_release_image(
    client: DockerClient, release: ReleaseImage, expected: ReleaseExpectation
) -> None:
    """ReleaseLabelError naming each field in which the local image is not ``expected``. The
    labels are read only when an EIF hash or PCRs are expected."""
    differences: list[tuple[str, str, str]] = []
    if expected.digest is not None and not _has_digest(client, release, expected.digest):
        found = ", ".join(_repo_digests(client, release)) or "(none)"
        differences.append(("digest", expected.digest, found))
    if expected.eif_sha384 is not None or expected.pcrs:
        image = get_image(client, release.image_id)
        labels = read_release_labels(
            (image.attrs.get("Config") or {}).get("Labels") or {}, release.pinned
        )
        differences += label_differences(labels, eif_sha384=expected.eif_sha384, pcrs=expected.pcrs)
    if differences:
        said = "; ".join(f"{field} is {have}, expected {want}" for field, want, have in differences)
        raise ReleaseLabelError(
            f"the release image {release.pinned} is not the recorded build: {said}. Refusing to "
            "run it: deploy the repo_digest the build record names, and check that nothing "
            "pushed another image in its place",
            tuple(field for field, _, _ in differences),
        )


def _repo_digests(client: DockerClient, release: ReleaseImage) -> list[str]:
    return [
        str(entry) for entry in get_image(client, release.image_id).attrs.get("RepoDigests") or ()
    ]


def _has_digest(client: DockerClient, release: ReleaseImage, digest: str) -> bool:
    """Whether the image is the one with manifest ``digest``: one of its RepoDigests, or (a
    locally built image pinned as ``tag@<image ID>``) its own ID."""
    if hmac.compare_digest(release.image_id, digest):
        return True
    return any(entry.rpartition("@")[2] == digest for entry in _repo_digests(client, release))
