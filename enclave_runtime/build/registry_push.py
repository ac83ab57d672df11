"""Push a release image to a registry and learn the digest parents pull it by.

The digest is the registry's: the SHA-256 of the image manifest it stores, which the engine
records in the image's ``RepoDigests`` after a push. Parents deploy ``repository@digest``
(host/release_pull.py), so a tag that moves later changes nothing that runs.

A push is skipped when the registry's tag already names a manifest the local image was pushed
as (its digest is in ``RepoDigests``): a second run with nothing changed is ``changed=false``
and asks the registry one question (``docker manifest inspect``'s distribution endpoint).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.image_reference import DigestReference, parse_repository
from enclave_runtime.host.docker_engine import (
    DockerError,
    RegistryAuth,
    docker_module,
    get_image,
)

if TYPE_CHECKING:
    from docker import DockerClient

DEFAULT_TAG = "latest"


class RegistryPushError(EnclaveOpsError):
    """The registry refused the push, or could not be asked what its tag holds."""


@dataclasses.dataclass(frozen=True)
class PushResult:
    """Where the release image is in the registry, and whether this call put it there."""

    repository: str
    tag: str
    # sha256:… of the registry's manifest; None in check mode when a push would run.
    digest: str | None
    pushed: bool
    reason: str

    @property
    def repo_digest(self) -> str | None:
        """``repository@sha256:…``, the reference parents pull and a build record keeps."""
        return str(DigestReference(self.repository, self.digest)) if self.digest else None


def push_release(
    client: DockerClient,
    image_id: str,
    destination: str,
    *,
    auth: RegistryAuth | None = None,
    check_mode: bool = False,
) -> PushResult:
    """Tag ``image_id`` as ``destination`` (``repository[:tag]``) and push it unless the
    registry's tag already holds it; check mode only asks the registry."""
    repository, tag = parse_repository(destination)
    tag = tag or DEFAULT_TAG
    pushed_as = repo_digests(client, image_id, repository)
    remote = registry_digest(client, f"{repository}:{tag}", auth)
    if remote is not None and remote in pushed_as:
        return PushResult(
            repository, tag, remote, False, f"{repository}:{tag} already holds this image"
        )
    reason = (
        f"{repository}:{tag} does not exist in the registry"
        if remote is None
        else f"{repository}:{tag} holds {remote}, another image"
    )
    if check_mode:
        return PushResult(repository, tag, None, True, f"{reason}: would push")
    digest = push(client, image_id, repository, tag, auth)
    return PushResult(repository, tag, digest, True, f"{reason}: pushed")


def repo_digests(client: DockerClient, image_id: str, repository: str) -> set[str]:
    """The registry digests the engine recorded for ``image_id`` in ``repository``."""
    image = get_image(client, image_id)
    found = set()
    for entry in image.attrs.get("RepoDigests") or ():
        name, _, digest = str(entry).rpartition("@")
        if name == repository:
            found.add(digest)
    return found


def registry_digest(client: DockerClient, reference: str, auth: RegistryAuth | None) -> str | None:
    """The manifest digest ``reference`` has in its registry; None when the tag does not exist."""
    docker = docker_module()
    try:
        data = client.images.get_registry_data(
            reference, auth_config=auth.auth_config() if auth else None
        )
    except docker.errors.NotFound:  # the engine answers 404 for "manifest unknown"
        return None
    except docker.errors.APIError as err:
        explanation = str(getattr(err, "explanation", "") or err)
        raise RegistryPushError(_registry_problem(reference, explanation)) from None
    except (docker.errors.DockerException, OSError) as err:
        raise RegistryPushError(_registry_problem(reference, str(err))) from None
    return str(data.id)


def push(
    client: DockerClient, image_id: str, repository: str, tag: str, auth: RegistryAuth | None
) -> str:
    """Tag and push; the digest the registry answered, as the engine then records it."""
    docker = docker_module()
    extra = {"auth_config": auth.auth_config()} if auth is not None else {}
    digest = None
    try:
        client.api.tag(image_id, repository, tag)
        # Failures come inside the progress stream; the last event's aux carries the digest.
        for event in client.api.push(repository, tag=tag, stream=True, decode=True, **extra):
            if "error" in event:
                raise RegistryPushError(_registry_problem(f"{repository}:{tag}", event["error"]))
            digest = (event.get("aux") or {}).get("Digest") or digest
    except (docker.errors.DockerException, OSError) as err:
        raise RegistryPushError(_registry_problem(f"{repository}:{tag}", str(err))) from None
    if digest is None or digest not in repo_digests(client, image_id, repository):
        raise DockerError(
            f"the engine pushed {repository}:{tag} but recorded no registry digest for it "
            f"(RepoDigests of {image_id}); push again"
        )
    return str(digest)


def _registry_problem(reference: str, explanation: str) -> str:
    return (
        f"cannot push {reference}: {explanation}; check that the registry is reachable from "
        "the build machine and that the credentials may push there (registry_username and "
        "registry_password, or docker login as the engine's user; for ECR: user AWS, password "
        "from aws ecr get-login-password); a registry without TLS must be in the engine's "
        "insecure-registries"
    )
