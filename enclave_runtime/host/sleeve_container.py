"""A release image run as a container: the one place that knows how (Docker SDK).

A release image's entrypoint is ``sleeve`` (host/sleeve.py), which starts the enclave from
``/enclave/application.eif`` and stays beside it. To reach the enclave the container needs:

- on a Nitro parent, the device ``/dev/nitro_enclaves`` (as enclaver documents it:
  ``docker run --device /dev/nitro_enclaves``), nitro-cli's sockets and log directories
  bind-mounted at the same paths and the host PID namespace, so the host's nitro-cli
  (``describe-enclaves``, ``terminate-enclave``) sees the enclave the container started
  (``NITRO_CONTAINER_SETTINGS``);
- on the emulator, the host's emulator directory (``NITRO_EMU_ROOT``) bind-mounted at the same
  path, with ``NITRO_EMU_ROOT`` set, so host tools (``nitro-emu describe-enclaves``,
  ``initctl`` over the fabric) see and reach the enclave the container started; a named
  allocator file the same way; and the privileges the emulator's sandbox needs
  (:mod:`.emulator_container`).

``enclaveops run`` and the ``enclaveops.nitro.sleeve`` module both go through here. Containers
carry their configuration as labels (the options as JSON, and a digest of the whole container
specification), so a later run can tell whether a container still matches what is asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.host.docker_engine import (
    DockerError,
    ImageNotFoundError,
    docker_module,
    get_image,
)
from enclave_runtime.host.emulator_container import emulator_container_settings
from enclave_runtime.host.nitro_cli import EnclaveInfo, NitroCli
from enclave_runtime.waiting import poll

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container
    from docker.models.images import Image

NITRO_DEVICE = "/dev/nitro_enclaves"
DEFAULT_EMULATOR_ROOT = "/run/nitro-emu"

# How a sleeve container runs on a Nitro parent (aws/aws-nitro-enclaves-cli sources, read at
# 2950b36): `nitro-cli run-enclave` forks an enclave process that holds the enclave and listens
# on <dir>/<enclave>.sock, <dir> being $NITRO_CLI_SOCKETS_PATH, else /run/nitro_enclaves
# (src/common/mod.rs). `describe-enclaves` and `terminate-enclave` from ANY process connect to
# the sockets found in that directory (src/enclave_proc_comm.rs); the enclave process lets uid 0
# issue every command (SO_PEERCRED, src/enclave_proc/connection.rs). So sharing the directory at
# the same path lets the host's nitro-cli list and terminate the container's enclave. The host
# PID namespace makes the ProcessID those commands report a host PID (nitro-cli reports its
# own getpid()). The log directory ($NITRO_CLI_LOGS_PATH, else /var/log/nitro_enclaves,
# src/common/logger.rs) is shared so the error-log paths nitro-cli's messages name exist on the
# host. The variables pin the container's nitro-cli to the mounted paths whatever its version's
# defaults (before 2020 the sockets lived in /var/run/nitro_enclaves).
NITRO_CONTAINER_SETTINGS: Mapping[str, Any] = {
    "devices": (f"{NITRO_DEVICE}:{NITRO_DEVICE}:rwm",),
    "pid_mode": "host",
    # environment variable: directory, bind-mounted read-write at the same path
    "shared_directories": {
        "NITRO_CLI_SOCKETS_PATH": "/run/nitro_enclaves",
        "NITRO_CLI_LOGS_PATH": "/var/log/nitro_enclaves",
    },
}
RESTART_POLICIES = ("no", "on-failure", "unless-stopped", "always")

SLEEVE_LABEL = "org.enclaveops.sleeve"
CONFIG_LABEL = "org.enclaveops.sleeve.config"
DIGEST_LABEL = "org.enclaveops.sleeve.config-digest"

# docker stop's grace period: the sleeve terminates the enclave on SIGTERM, then exits 109.
STOP_TIMEOUT = 30
_POLL_INTERVAL = 0.5
_STARTED_LINE = re.compile(r"^sleeve: started enclave ID=(?P<id>\S+), CID=(?P<cid>\d+)\s*$")
_LOG_TAIL = 20
# ``<repository[:tag]>@sha256:<image ID>``, the form ``enclaveops build`` prints as "Image".
_PINNED = re.compile(r"^(?P<name>.+)@(?P<id>sha256:[0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]+$")


class SleeveContainerError(EnclaveOpsError):
    """The sleeve container cannot be created, started, stopped or found."""


class SleeveExitedError(SleeveContainerError):
    """The container ended before its enclave was running; carries its exit code and log."""

    def __init__(self, message: str, *, rc: int | None, stderr: str) -> None:
        super().__init__(message)
        self.rc = rc
        self.stderr = stderr


@dataclasses.dataclass(frozen=True)
class PortBinding:
    """``[IP:]HOST:CONTAINER``: host port HOST (0: any free one) to the container's CONTAINER."""

    host_port: int
    container_port: int
    host_ip: str = ""

    def __str__(self) -> str:
        lead = f"{self.host_ip}:" if self.host_ip else ""
        return f"{lead}{self.host_port}:{self.container_port}"


def parse_port_binding(text: str) -> PortBinding:
    """``HOST:CONTAINER`` or ``IP:HOST:CONTAINER``, as ``docker run -p`` takes them (TCP)."""
    parts = text.rsplit(":", 2)
    if len(parts) == 2:
        parts.insert(0, "")
    try:
        binding = PortBinding(int(parts[1]), int(parts[2]), parts[0].strip("[]"))
    except (ValueError, IndexError):
        binding = PortBinding(-1, -1)
    if not 0 <= binding.host_port <= 0xFFFF or not 1 <= binding.container_port <= 0xFFFF:
        raise SleeveContainerError(
            f"{text!r} is not HOST:CONTAINER or IP:HOST:CONTAINER (a host port 0-65535, 0 for "
            "any free port, and an ingress port 1-65535 of the manifest)"
        )
    return binding


@dataclasses.dataclass(frozen=True)
class SleeveConfig:
    """How the release image runs: what an operator chooses, beyond the image itself."""

    published_ports: tuple[PortBinding, ...] = ()
    cpu_count: int | None = None
    memory_mb: int | None = None
    debug_mode: bool = False
    # Set: run on the emulator with this NITRO_EMU_ROOT; None: on a Nitro parent instance.
    emulator_root: str | None = None
    emulator_allocator: str | None = None
    restart_policy: str = "no"

    def __post_init__(self) -> None:
        if self.restart_policy not in RESTART_POLICIES:
            raise SleeveContainerError(
                f"restart policy {self.restart_policy!r} is not one of "
                + ", ".join(RESTART_POLICIES)
            )

    def sleeve_arguments(self) -> list[str]:
        """The sleeve's command line after its entrypoint; unset values keep the manifest's.

        Which nitro-cli the sleeve drives is the release image's business: the emulator sleeve
        base names nitro-emu in its entrypoint.
        """
        args: list[str] = []
        if self.cpu_count is not None:
            args += ["--cpu-count", str(self.cpu_count)]
        if self.memory_mb is not None:
            args += ["--memory-mb", str(self.memory_mb)]
        if self.debug_mode:
            args.append("--debug-mode")
        return args

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as stored in the container's label and shown in diffs."""
        document = dataclasses.asdict(self)
        document["published_ports"] = [str(binding) for binding in self.published_ports]
        return document


def default_emulator_root(environ: Mapping[str, str]) -> str:
    """The emulator directory host tools use: ``NITRO_EMU_ROOT``, else nitro-emu's default."""
    return environ.get("NITRO_EMU_ROOT") or DEFAULT_EMULATOR_ROOT


def default_emulator_allocator(environ: Mapping[str, str]) -> str | None:
    """The allocator file to share: ``NITRO_EMU_ALLOCATOR``, else none.

    Never whether a file exists right now: the choice is part of the container's configuration
    digest, so a file that appears later would otherwise replace a running container.
    """
    return environ.get("NITRO_EMU_ALLOCATOR") or None


def nitro_container_settings() -> dict[str, Any]:
    """docker SDK ``containers.create`` keyword arguments for a sleeve on a Nitro parent."""
    shared = NITRO_CONTAINER_SETTINGS["shared_directories"]
    return {
        "devices": list(NITRO_CONTAINER_SETTINGS["devices"]),
        "pid_mode": NITRO_CONTAINER_SETTINGS["pid_mode"],
        "volumes": {path: {"bind": path, "mode": "rw"} for path in shared.values()},
        "environment": dict(shared),
    }


def container_spec(image: str, name: str | None, config: SleeveConfig) -> dict[str, Any]:
    """Keyword arguments for ``client.containers.create`` (docker SDK) running the release image."""
    spec: dict[str, Any] = {
        "command": config.sleeve_arguments(),
        "ports": _docker_ports(config.published_ports),
        "environment": {},
        "restart_policy": {"Name": config.restart_policy},
    }
    if config.emulator_root:
        spec.update(emulator_container_settings(config.emulator_root, config.emulator_allocator))
    else:
        spec.update(nitro_container_settings())
    spec["labels"] = {
        SLEEVE_LABEL: "1",
        CONFIG_LABEL: _canonical(config.to_dict()),
        DIGEST_LABEL: spec_digest(spec),
    }
    spec["image"] = image
    if name is not None:
        spec["name"] = name
    return spec


def spec_digest(spec: Mapping[str, Any]) -> str:
    """sha256 of everything that shapes the container but the image, its name and labels."""
    shaping = {key: value for key, value in spec.items() if key not in ("image", "name", "labels")}
    return "sha256:" + hashlib.sha256(_canonical(shaping).encode()).hexdigest()


def _canonical(document: Any) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def _docker_ports(bindings: Iterable[PortBinding]) -> dict[str, list[tuple[str, int]]]:
    ports: dict[str, list[tuple[str, int]]] = {}
    for binding in bindings:
        ports.setdefault(f"{binding.container_port}/tcp", []).append(
            (binding.host_ip, binding.host_port)
        )
    return ports


# --------------------------------------------------------------------------------------------
# Release image references


@dataclasses.dataclass(frozen=True)
class ReleaseImage:
    """A release image reference resolved to the local image a container runs."""

    reference: str  # as given
    image_id: str
    name: str  # its repository[:tag] part; "" when it was an image ID alone
    note: str = ""  # set when its tag points elsewhere than the image ID it pins

    @property
    def pinned(self) -> str:
        """``<repository[:tag]>@<image ID>`` (the image ID alone when no name was given)."""
        return f"{self.name}@{self.image_id}" if self.name else self.image_id


def resolve_release_image(client: DockerClient, reference: str) -> ReleaseImage:
    """The local image ``reference`` names: a tag, an image ID, or ``<tag>@sha256:<image ID>``.

    Docker reads ``name@sha256:…`` as a registry (manifest) digest, which a locally built
    image does not have, so the pinned form is resolved here: the image ID decides what runs
    (exactly what was built and measured); the tag is only checked, and a tag that points
    elsewhere, or nowhere, is said in ``note``. A digest that is no local image ID is passed on
    to Docker, which matches it against registry digests of pulled images.
    """
    pinned = _PINNED.match(reference)
    if pinned is None:
        image = get_image(client, reference)
        return ReleaseImage(
            reference, image.id, "" if _is_id_of(reference, image.id) else reference
        )
    name, image_id = pinned["name"], pinned["id"]
    image = _image_by_id(client, image_id)
    if image is None:
        return ReleaseImage(reference, _by_registry_digest(client, reference, image_id), name)
    return ReleaseImage(reference, image.id, name, _tag_note(client, name, image.id))


def _is_id_of(reference: str, image_id: str) -> bool:
    """Whether ``reference`` is ``image_id`` or a prefix of it, with or without ``sha256:``."""
    bare = reference[len("sha256:") :] if reference.startswith("sha256:") else reference
    return bool(_HEX.match(bare)) and image_id.split(":", 1)[-1].startswith(bare)


def _image_by_id(client: DockerClient, image_id: str) -> Image | None:
    try:
        return get_image(client, image_id)
    except ImageNotFoundError:
        return None


def _by_registry_digest(client: DockerClient, reference: str, image_id: str) -> str:
    try:
        return get_image(client, reference).id
    except ImageNotFoundError:
        raise ImageNotFoundError(
            f"the release image {reference!r} is not present locally: no local image has the ID "
            f"{image_id}; build it on this host (enclaveops build -f enclaver.yaml) or copy it "
            "here (docker save IMAGE | docker load), then use the Image that build printed"
        ) from None


def _tag_note(client: DockerClient, name: str, image_id: str) -> str:
    if ":" not in name.rsplit("/", 1)[-1]:
        return ""
    try:
        tagged: str | None = get_image(client, name).id
    except ImageNotFoundError:
        tagged = None
    if tagged == image_id:
        return ""
    where = f"points to {tagged}" if tagged else "does not exist on this host"
    return f"the tag {name} {where}; running {image_id}, the image ID the reference pins"


# --------------------------------------------------------------------------------------------
# Containers


@dataclasses.dataclass(frozen=True)
class ContainerState:
    """What an existing sleeve container is: enough to decide whether it still fits."""

    id: str
    name: str
    image_id: str
    status: str
    config: dict[str, Any] | None
    digest: str | None
    exit_code: int | None

    @property
    def running(self) -> bool:
        return self.status in ("running", "restarting")

    def as_result(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "image_id": self.image_id, "status": self.status}


def container_state(container: Container) -> ContainerState:
    labels = container.labels or {}
    try:
        config = json.loads(labels[CONFIG_LABEL])
    except (KeyError, ValueError):
        config = None
    state = container.attrs.get("State", {})
    return ContainerState(
        id=container.id,
        name=container.name,
        image_id=container.attrs.get("Image", ""),
        status=container.status,
        config=config,
        digest=labels.get(DIGEST_LABEL),
        exit_code=None if container.status == "running" else state.get("ExitCode"),
    )


def find_container(client: DockerClient, name: str) -> Container | None:
    """The container named ``name``, or None."""
    docker = docker_module()
    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        return None
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(f"cannot look up container {name!r}: {err}") from None


def create_container(client: DockerClient, spec: Mapping[str, Any]) -> Container:
    """Create (not start) the sleeve container ``spec`` describes."""
    docker = docker_module()
    try:
        return client.containers.create(**spec)
    except docker.errors.ImageNotFound:
        raise SleeveContainerError(
            f"the release image {spec['image']!r} is not present locally; build it with "
            "enclaveops build -f enclaver.yaml, or load or pull it"
        ) from None
    except docker.errors.APIError as err:
        raise SleeveContainerError(_api_problem("create", spec.get("name"), err)) from None
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(f"cannot create the sleeve container: {err}") from None


def start_container(container: Container) -> None:
    docker = docker_module()
    try:
        container.start()
    except docker.errors.APIError as err:
        _remove_quietly(container)
        raise SleeveContainerError(_api_problem("start", container.name, err)) from None
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(f"cannot start container {container.name}: {err}") from None


def stop_container(container: Container, timeout: int = STOP_TIMEOUT) -> None:
    """``docker stop``: on SIGTERM the sleeve terminates its enclave; SIGKILL after ``timeout``."""
    docker = docker_module()
    try:
        container.stop(timeout=timeout)
    except docker.errors.NotFound:
        return
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(
            f"cannot stop container {container.name}: {err}; stop it with docker stop "
            f"{container.name} (the sleeve then terminates its enclave)"
        ) from None


def remove_container(container: Container, timeout: int = STOP_TIMEOUT) -> None:
    """Stop first (so the enclave is terminated, not orphaned), then remove."""
    docker = docker_module()
    stop_container(container, timeout)
    try:
        container.remove(v=True, force=True)
    except docker.errors.NotFound:
        return
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(
            f"cannot remove container {container.name}: {err}; remove it with docker rm -f "
            f"{container.name}"
        ) from None


def _remove_quietly(container: Container) -> None:
    docker = docker_module()
    # The start error is the one to report; a leftover would show in docker ps -a.
    with contextlib.suppress(docker.errors.DockerException, OSError):
        container.remove(v=True, force=True)


def _api_problem(action: str, name: str | None, err: Exception) -> str:
    explanation = getattr(err, "explanation", None) or str(err)
    text = f"cannot {action} the sleeve container{f' {name}' if name else ''}: {explanation}"
    if "port is already allocated" in explanation or "address already in use" in explanation:
        return text + "; free that host port or publish the ingress port on another one"
    if "Conflict" in explanation or "already in use by container" in explanation:
        return text + "; choose another name, or remove the old container (docker rm -f NAME)"
    if NITRO_DEVICE in explanation:
        return text + (
            f"; {NITRO_DEVICE} exists only on a Nitro Enclaves-enabled parent instance with the "
            "driver loaded; elsewhere run on the emulator (--emulator)"
        )
    return text


def published_ports(container: Container) -> list[PortBinding]:
    """The host ports Docker actually bound (a requested 0 becomes the port it chose)."""
    container.reload()
    bound = container.attrs.get("NetworkSettings", {}).get("Ports") or {}
    result = []
    for key, hosts in sorted(bound.items()):
        port, _, protocol = key.partition("/")
        for host in hosts or ():
            if protocol == "tcp":
                result.append(PortBinding(int(host["HostPort"]), int(port), host.get("HostIp", "")))
    return result


# --------------------------------------------------------------------------------------------
# Desired state (the Ansible module): decided first, so check mode can predict it

SLEEVE_STATES = ("started", "stopped", "absent")


@dataclasses.dataclass(frozen=True)
class SleevePlan:
    """What reaching a desired state takes; nothing has changed yet."""

    reason: str
    remove: bool = False
    create: bool = False
    start: bool = False
    stop: bool = False

    @property
    def changed(self) -> bool:
        return self.remove or self.create or self.start or self.stop


def plan_sleeve(
    current: ContainerState | None, state: str, image_id: str | None, spec: Mapping[str, Any]
) -> SleevePlan:
    """How to get from ``current`` to ``state`` with the release image ``image_id`` and ``spec``.

    A container is kept when its image ID and its configuration digest both match; otherwise it
    is replaced. ``image_id`` None means the image is not present (yet): only check mode asks.
    """
    name = spec.get("name", "the container")
    if state == "absent":
        if current is None:
            return SleevePlan(f"no container {name} exists")
        return SleevePlan(f"container {name} exists", remove=True)
    start = state == "started"
    if current is None:
        return SleevePlan(f"no container {name} exists", create=True, start=start)
    mismatch = _mismatch(current, image_id, spec)
    if mismatch:
        return SleevePlan(mismatch, remove=True, create=True, start=start)
    if start and not current.running:
        ended = f" (exit status {current.exit_code})" if current.exit_code is not None else ""
        return SleevePlan(f"container {name} is {current.status}{ended}", start=True)
    if not start and current.running:
        return SleevePlan(f"container {name} is running", stop=True)
    return SleevePlan(
        f"container {name} matches the image and configuration and is {current.status}"
    )


def _mismatch(current: ContainerState, image_id: str | None, spec: Mapping[str, Any]) -> str:
    if current.image_id != image_id:
        return f"its image is {current.image_id or 'unknown'}, the release image is {image_id}"
    if current.digest != spec["labels"][DIGEST_LABEL]:
        if current.config != json.loads(spec["labels"][CONFIG_LABEL]):
            return "its configuration differs"
        return "its container specification differs (a newer enclave-runtime runs it differently)"
    return ""


def apply_plan(
    client: DockerClient, plan: SleevePlan, container: Container | None, spec: Mapping[str, Any]
) -> Container | None:
    """Carry out ``plan``; returns the container that now exists (None when removed)."""
    if plan.remove and container is not None:
        remove_container(container)
        container = None
    if plan.create:
        container = create_container(client, spec)
    if container is not None and plan.start:
        start_container(container)
    if container is not None and plan.stop:
        stop_container(container)
    if container is not None:
        container.reload()
    return container


def diff_view(image_id: str | None, state: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """One side of a diff: the image ID, the state (started, stopped) and the configuration."""
    return {"image_id": image_id, "state": state, "config": dict(config or {})}


# --------------------------------------------------------------------------------------------
# The enclave inside


@dataclasses.dataclass(frozen=True)
class EnclaveStarted:
    """What the sleeve says once its enclave has booted."""

    enclave_id: str
    enclave_cid: int


def parse_started_line(line: str) -> EnclaveStarted | None:
    """``sleeve: started enclave ID=…, CID=…`` (its stderr), or None for any other line."""
    match = _STARTED_LINE.match(line)
    if match is None:
        return None
    return EnclaveStarted(match["id"], int(match["cid"]))


def last_started(lines: Sequence[str]) -> EnclaveStarted | None:
    for line in reversed(lines):
        started = parse_started_line(line)
        if started is not None:
            return started
    return None


def _stderr_lines(container: Container) -> list[str]:
    """The current run's stderr (since the container last started)."""
    started_at = container.attrs.get("State", {}).get("StartedAt", "")
    since = _docker_time(started_at)
    kwargs: dict[str, Any] = {"stdout": False, "stderr": True}
    if since:
        kwargs["since"] = since
    return container.logs(**kwargs).decode("utf-8", "replace").splitlines()


def _docker_time(text: str) -> int | None:
    """Whole seconds of Docker's RFC 3339 time (nanoseconds dropped), or None."""
    try:
        moment = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return int(moment.timestamp()) if moment.year > 1 else None


def wait_for_enclave(container: Container, cli: NitroCli, timeout: float) -> EnclaveInfo:
    """Until the sleeve's enclave is RUNNING (its line on stderr, then describe-enclaves).

    ``cli`` runs on the host: it sees the container's enclave because the container shares the
    emulator root, or on Nitro nitro-cli's sockets directory (``NITRO_CONTAINER_SETTINGS``).
    """
    lines: list[str] = []

    def running() -> EnclaveInfo | None:
        nonlocal lines
        container.reload()
        lines = _stderr_lines(container)
        if container.status not in ("running", "restarting", "created"):
            raise _exited(container, lines)
        started = last_started(lines)
        if started is not None:
            for enclave in cli.describe_enclaves():
                if enclave.enclave_id == started.enclave_id and enclave.state == "RUNNING":
                    return enclave
        return None

    def timed_out() -> SleeveContainerError:
        return SleeveContainerError(
            f"the enclave of container {container.name} was not running after {timeout:g} s; "
            f"its last messages:\n{_tail(lines)}\n(docker logs {container.name} shows all)"
        )

    return poll(running, timeout, _POLL_INTERVAL, timed_out)


def _exited(container: Container, lines: Sequence[str]) -> SleeveExitedError:
    code = container.attrs.get("State", {}).get("ExitCode")
    return SleeveExitedError(
        f"the sleeve container {container.name} ended with exit status {code} before its "
        f"enclave was running:\n{_tail(lines)}",
        rc=code,
        stderr="\n".join(lines),
    )


def _tail(lines: Sequence[str]) -> str:
    return "\n".join(lines[-_LOG_TAIL:]) or "(no output)"
