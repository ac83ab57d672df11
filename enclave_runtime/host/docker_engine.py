"""The Docker engine, as the build and the host both reach it: the SDK, a checked client, images.

The SDK is imported on first use, so the runtime works without it where no Docker is needed (in
the enclave, in nitro-emu); the errors name the fix (install the SDK, start the engine, pull).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

from enclave_runtime.errors import EnclaveOpsError

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.images import Image

DOCKER_SDK_HINT = "pip install docker (or pip install 'enclave-runtime[host]')"


class DockerError(EnclaveOpsError):
    """A Docker image that cannot be obtained, exported or used (engine, image, container)."""


class DockerUnavailableError(DockerError):
    """The Docker SDK is not installed or the engine does not answer."""


class ImageNotFoundError(DockerError):
    """The image is not present locally and pulling was not asked for."""


class ImagePullError(DockerError):
    """Pulling the image failed."""


def docker_module() -> ModuleType:
    """The ``docker`` SDK, imported on first use so the package works without it."""
    try:
        return importlib.import_module("docker")
    except ImportError as err:
        raise DockerUnavailableError(
            f"the Docker SDK for Python is not installed ({err}); {DOCKER_SDK_HINT}"
        ) from None


def docker_client() -> DockerClient:
    """A client for the engine ``DOCKER_HOST`` names (default the local socket), checked alive."""
    docker = docker_module()
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, OSError) as err:
        raise DockerUnavailableError(
            f"cannot reach the Docker engine at {where}: {err}; start it (systemctl start "
            "docker, or scripts/ensure-docker.sh as root), or point DOCKER_HOST at a running one"
        ) from None
    return client


@dataclasses.dataclass(frozen=True)
class RegistryAuth:
    """``docker login``-style credentials for one push or pull.

    Unset (no RegistryAuth), the engine's client configuration applies: the SDK reads
    ``~/.docker/config.json`` (and its credential helpers) of the user running it. For ECR the
    password is ``aws ecr get-login-password --region R`` and the user name ``AWS``
    (docs/build.md, "Registries and credentials").
    """

    username: str
    password: str = dataclasses.field(repr=False)
    registry: str | None = None

    def auth_config(self) -> dict[str, str]:
        """The SDK's ``auth_config`` for push and pull."""
        config = {"username": self.username, "password": self.password}
        if self.registry:
            config["serveraddress"] = self.registry
        return config


def registry_auth(
    username: str | None, password: str | None, registry: str | None = None
) -> RegistryAuth | None:
    """Credentials from the module options: both or neither of user name and password."""
    if not username and not password:
        return None
    if not username or not password:
        missing = "registry_password" if username else "registry_username"
        raise DockerError(
            f"{missing} is not set: give registry_username and registry_password together "
            "(for ECR: AWS and `aws ecr get-login-password`), or neither to use the engine "
            "user's ~/.docker/config.json"
        )
    return RegistryAuth(username, password, registry or None)


def get_image(client: DockerClient, reference: str, *, pull: bool = False) -> Image:
    """The local image ``reference`` names; with ``pull``, pulled first even when present, so a
    tag that moved in its registry is refreshed (``docker build --pull``)."""
    if pull:
        return pull_image(client, reference)
    docker = docker_module()
    try:
        return client.images.get(reference)
    except docker.errors.ImageNotFound:
        raise ImageNotFoundError(
            f"the Docker image {reference!r} is not present locally; build or load it, "
            f"or pull it first (docker pull {reference}, or ask for pulling)"
        ) from None
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(f"cannot look up the Docker image {reference!r}: {err}") from None


def pull_image(client: DockerClient, reference: str, auth: RegistryAuth | None = None) -> Image:
    """Pull ``reference`` (``latest`` when it names no tag or digest) and return the image; a
    ``repository@sha256:…`` reference pulls exactly the manifest with that digest."""
    docker = docker_module()
    repository, tag = docker.utils.parse_repository_tag(reference)
    extra = {"auth_config": auth.auth_config()} if auth is not None else {}
    try:
        # The engine reports most pull failures inside the progress stream, not as HTTP errors.
        pulling = client.api.pull(
            repository, tag=tag or "latest", stream=True, decode=True, **extra
        )
        for event in pulling:
            if "error" in event:
                raise ImagePullError(f"pulling {reference!r} failed: {event['error']}")
        return client.images.get(reference)
    except (docker.errors.DockerException, OSError) as err:
        raise ImagePullError(
            f"pulling {reference!r} failed: {err}; check the name, the registry's reachability "
            "and your credentials (docker login)"
        ) from None
