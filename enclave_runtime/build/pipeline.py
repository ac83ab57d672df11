"""``enclaveops build``: app image → amended image → EIF → release image, reproducibly.

1. **Sources**: ``sources.app``, ``sources.odyn`` (the runtime image) and ``sources.sleeve`` (the
   sleeve base) are local images; with ``pull`` each is pulled first, present or not, except the
   project's own ``enclaveops/…`` images (no registry serves them). The image IDs, not the tags,
   are what the build records and depends on.
2. **Amend**: one layer on the app image (:mod:`.image_layers`, no ``docker build``): the runtime
   at ``/opt/enclave-runtime`` and the manifest at ``/etc/enclaver/enclaver.yaml``; ENTRYPOINT
   ``odyn --config-dir /etc/enclaver [--workdir W] [--user U] -- <app ENTRYPOINT + CMD>``, no
   CMD (nitro-cli would run a CMD alone), no USER (odyn starts as root and drops to U itself).
3. **EIF** of the amended image: ``nitro-cli build-enclave`` or the native builder.
4. **Release image** ``target``: the sleeve base + ``/enclave/application.eif`` +
   ``/enclave/enclaver.yaml``, its ENTRYPOINT kept, labels recording sources, measurements and
   the digest of every input. A target whose label shows the same inputs digest is left as it
   is (the build is skipped), which is what makes the Ansible ``image`` module idempotent.
5. **Housekeeping**: the untagged images earlier builds of the same target left behind (label
   ``org.enclaveops.build.target``) are removed, except the release image the target named
   before this build (a failed replacement restores it) and any image a container uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

import enclave_runtime
from enclave_runtime.build.docker_rootfs import (
    ARCHITECTURES,
    ImageConfig,
    ImageConfigError,
    SpoolError,
    export_rootfs,
    image_config,
)
from enclave_runtime.build.eif_builder import AWS_BLOBS, ENV_BLOBS, build_eif_from_image, find_blobs
from enclave_runtime.build.image_layers import (
    AppendedImage,
    LayerBuilder,
    LayerError,
    append_layer,
    canonical_json,
    container_config,
    disk_error,
    require_classic_image_store,
)
from enclave_runtime.build.project_images import (
    RUNTIME_PREFIX,
    runtime_command,
    runtime_image_tag,
    sleeve_emulator_image_tag,
    sleeve_nitro_image_tag,
)
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.file_digest import file_digests
from enclave_runtime.formats.manifest import Manifest, load_manifest
from enclave_runtime.formats.nitro_cli_rules import minimum_memory_mib
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.formats.release_labels import (
    LABEL_AMEND_INPUTS,
    LABEL_EIF,
    LABEL_INPUTS,
    LABEL_MEASUREMENTS,
    LABEL_SOURCES,
    LABEL_TARGET,
    eif_label,
)
from enclave_runtime.host.docker_engine import (
    DockerError,
    ImageNotFoundError,
    ImagePullError,
    docker_client,
    docker_module,
    get_image,
)
from enclave_runtime.host.nitro_cli import NitroCli

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.images import Image

BUILDERS = ("auto", "nitro-cli", "native")
ODYN = runtime_command("odyn")
CONFIG_DIR = "/etc/enclaver"
AMENDED_MANIFEST = "etc/enclaver/enclaver.yaml"
RELEASE_EIF = "enclave/application.eif"
RELEASE_MANIFEST = "enclave/enclaver.yaml"
# The project's own images: built locally by scripts/build-images.sh and served by no registry,
# so ``pull`` never asks Docker Hub for them (an image there under that name is a stranger's).
PROJECT_IMAGE_PREFIX = "enclaveops/"
_HASH_CHUNK = 1 << 20

Progress = Callable[[str], None]


class SourceImageError(EnclaveOpsError):
    """A source image of the manifest is missing, or does not fit the others."""


class BuilderChoiceError(EnclaveOpsError):
    """An unknown builder, or signing files that are not there."""


class EifTooLargeError(EnclaveOpsError):
    """The EIF needs more memory than the manifest gives the enclave (nitro-cli's E26)."""


class ReleaseEifMismatchError(EnclaveOpsError):
    """The EIF inside a release image is not the one its labels record."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What ``enclaveops build`` takes besides the manifest. The paths may be given as strings
    (the Ansible modules do); they are Paths once the options exist."""

    pull: bool = False
    builder: str = "auto"
    nitro_cli: str = "nitro-cli"
    blobs: Path | None = None
    force: bool = False
    eif_output: Path | None = None
    work_dir: Path | None = None
    # The parent's CPU (``uname -m``, Ansible's ansible_architecture): x86_64 or aarch64.
    target_architecture: str | None = None

    def __post_init__(self) -> None:
        for name in ("blobs", "eif_output", "work_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """One resolved ``sources.*`` image."""

    name: str  # app, odyn or sleeve
    reference: str
    image_id: str
    architecture: str

    def to_json(self) -> dict[str, str]:
        return {"Reference": self.reference, "ImageID": self.image_id}


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What a build made, or found already made (``skipped``)."""

    target: str
    image_id: str
    sources: tuple[SourceImage, ...]
    measurements: Measurements
    eif_sha256: str
    eif_size: int
    builder: str
    inputs_digest: str
    skipped: bool
    reason: str
    # SHA-384 of the EIF file (what a build record and a parent's check compare); None for a
    # release image built before its label recorded it.
    eif_sha384: str | None = None
    # The amended image the EIF was built from; None when it is no longer present locally.
    amended: AppendedImage | None = None
    # Whether this call wrote ``BuildOptions.eif_output`` (in check mode: would write it); a
    # skipped build copies the EIF out of the release image only when the file there is missing
    # or another.
    eif_written: bool = False

    @property
    def image(self) -> str:
        return f"{self.target}@{self.image_id}"

    @property
    def amended_image(self) -> str | None:
        """The amended image as ``reference@id``, or None."""
        if self.amended is None:
            return None
        return f"{self.amended.reference}@{self.amended.image_id}"

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "Sources": {source.name: source.to_json() for source in self.sources},
            "Measurements": self.measurements.to_nitro_cli(),
            "Image": self.image,
            "ImageID": self.image_id,
            "Eif": {"SHA256": self.eif_sha256, "SHA384": self.eif_sha384, "Size": self.eif_size},
            "Builder": self.builder,
            "InputsDigest": self.inputs_digest,
            "Skipped": self.skipped,
            "Reason": self.reason,
        }
        if self.amended_image is not None:
            document["AmendedImage"] = self.amended_image
        return document


# --------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What a build would use, known before anything is written (check mode stops here).

    In check mode nothing is pulled: ``would_pull`` lists what a real run pulls first, the
    sources are the local images as they are now (a missing one is left out), and
    ``inputs_digest`` is None when a source is missing.
    """

    manifest: Manifest
    manifest_bytes: bytes
    images: Mapping[str, tuple[str, Image]]
    sources: tuple[SourceImage, ...]
    builder: str
    signing: tuple[Path, Path] | None
    inputs_digest: str | None
    would_pull: tuple[str, ...] = ()


def plan_build(
    manifest_path: str | os.PathLike[str],
    options: BuildOptions,
    client: DockerClient,
    *,
    check_mode: bool = False,
) -> BuildPlan:
    """Check the engine, read the manifest, resolve the sources and digest every input."""
    require_classic_image_store(client)
    manifest = load_manifest(manifest_path)
    manifest_bytes = Path(manifest_path).read_bytes()
    builder = choose_builder(options.builder, options.nitro_cli)
    references = source_references(manifest, builder)
    images = resolve_sources(
        client, manifest, pull=options.pull, builder=builder, check_mode=check_mode
    )
    sources = tuple(_source(name, reference, image) for name, (reference, image) in images.items())
    signing = signing_files(manifest)
    check_target_architecture(sources, options.target_architecture)
    digest = None
    if len(images) == len(references):
        check_architectures(sources)
        digest = inputs_digest(build_inputs(sources, manifest_bytes, builder, options, signing))
    would_pull = tuple(
        reference
        for reference in references.values()
        if check_mode and options.pull and pulled_on_request(reference)
    )
    return BuildPlan(
        manifest, manifest_bytes, images, sources, builder, signing, digest, would_pull
    )


def build(
    manifest_path: str | os.PathLike[str],
    options: BuildOptions = BuildOptions(),
    *,
    client: DockerClient | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Build (or find up to date) the release image of the manifest at ``manifest_path``."""
    say = progress or (lambda message: None)
    client = docker_client() if client is None else client
    plan = plan_build(manifest_path, options, client)
    existing, reason = existing_release(client, plan, force=options.force)
    if existing is None:
        return _build_release(client, plan, options, reason, say)
    say(f"{existing.target} is up to date (inputs digest {plan.inputs_digest})")
    if options.eif_output is None:
        return existing
    return provide_eif(client, existing, options.eif_output, say)


def provide_eif(
    client: DockerClient,
    release: BuildResult,
    output: Path,
    say: Progress | None = None,
    *,
    check_mode: bool = False,
) -> BuildResult:
    """Make ``output`` the EIF of the up-to-date ``release``: left alone when it already is (same
    SHA-256 as the release records), else copied out of the release image and checked. In check
    mode nothing is copied; ``eif_written`` and the reason say whether it would be."""
    missing = eif_output_reason(output, release.eif_sha256)
    if missing is None:
        return release
    if check_mode:
        reason = f"{release.reason}; {missing}: would copy the EIF out of the release image"
        return dataclasses.replace(release, eif_written=True, reason=reason)
    if say is not None:
        say(f"{missing}: copying the EIF out of {release.target}")
    extract_file(client, release.image_id, "/" + RELEASE_EIF, output, sha256=release.eif_sha256)
    reason = f"{release.reason}; {missing}: copied the EIF out of the release image"
    return dataclasses.replace(release, eif_written=True, reason=reason)


def eif_output_reason(output: Path, sha256: str) -> str | None:
    """Why ``output`` is not the EIF whose SHA-256 is ``sha256``; None when it is."""
    if not output.is_file():
        return f"{output} does not exist"
    if file_sha256(output) != sha256:
        return f"{output} is not the EIF of this build"
    return None


def existing_release(
    client: DockerClient, plan: BuildPlan, *, force: bool = False
) -> tuple[BuildResult | None, str]:
    """The release image already built from the plan's inputs, or None and why to build."""
    target = plan.manifest.target
    if plan.would_pull:
        return None, (
            f"would pull {', '.join(plan.would_pull)} first (pull), then build {target} when a "
            "pulled image is new or another input changed"
        )
    if force:
        return None, "forced (--force)"
    if plan.inputs_digest is None:
        return None, "a source image is missing"
    found = up_to_date_release(client, target, plan.inputs_digest)
    if found is None:
        return None, rebuild_reason(client, target)
    found = dataclasses.replace(
        found, sources=plan.sources, builder=plan.builder, amended=current_amended(client, plan)
    )
    return found, found.reason


def current_amended(client: DockerClient, plan: BuildPlan) -> AppendedImage | None:
    """The local amended image of the plan's target when it was made from the plan's inputs (a
    skipped build reports it); None when it was removed or retagged since."""
    reference = amended_reference(plan.manifest.target)
    image = _local_image(client, reference)
    digest = amend_inputs_digest(plan.images, plan.manifest_bytes)
    if image is None or _labels(image).get(LABEL_AMEND_INPUTS) != digest:
        return None
    return AppendedImage(str(image.id), reference)


def _build_release(
    client: DockerClient, plan: BuildPlan, options: BuildOptions, reason: str, say: Progress
) -> BuildResult:
    target = plan.manifest.target
    assert plan.inputs_digest is not None  # only check mode plans without a source
    previous = _local_image(client, target)
    work_parent = options.work_dir or Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="enclaveops-build-", dir=work_parent) as work_text:
        work = Path(work_text)
        say(f"amending {plan.images['app'][0]} with the runtime {plan.images['odyn'][0]}")
        amended = amend(
            client,
            plan.images,
            plan.manifest_bytes,
            amended_reference(target),
            work,
            target=target,
        )
        say(f"building the EIF of {amended.reference} with the {plan.builder} builder")
        eif = work / "application.eif"
        measurements = build_enclave_image(
            client,
            plan.builder,
            reference=amended.reference,
            eif=eif,
            options=options,
            signing=plan.signing,
        )
        check_memory(eif, plan.manifest)
        eif_sha256, eif_sha384 = file_digests(eif)
        eif_size = eif.stat().st_size
        labels = {
            LABEL_SOURCES: json.dumps({s.name: s.to_json() for s in plan.sources}, sort_keys=True),
            LABEL_INPUTS: plan.inputs_digest,
            LABEL_MEASUREMENTS: json.dumps(measurements.to_nitro_cli(), sort_keys=True),
            LABEL_EIF: eif_label(eif_sha256, eif_sha384, eif_size),
            LABEL_TARGET: target,
        }
        say(f"writing the release image {target}")
        release = release_image(
            client,
            plan.images["sleeve"][1],
            eif=eif,
            manifest_bytes=plan.manifest_bytes,
            target=target,
            labels=labels,
            work=work,
        )
        if options.eif_output is not None:
            _copy_out(eif, options.eif_output)
    kept = {release.image_id, amended.image_id}
    if previous is not None:
        kept.add(str(previous.id))
    removed = prune_superseded(client, target, kept)
    if removed:
        say(f"removed {len(removed)} untagged image(s) earlier builds of {target} left")
    return BuildResult(
        target=target,
        image_id=release.image_id,
        sources=plan.sources,
        measurements=measurements,
        eif_sha256=eif_sha256,
        eif_size=eif_size,
        eif_sha384=eif_sha384,
        builder=plan.builder,
        inputs_digest=plan.inputs_digest,
        skipped=False,
        reason=reason,
        amended=amended,
        eif_written=options.eif_output is not None,
    )


# --------------------------------------------------------------------------------------------
# Sources


def source_references(manifest: Manifest, builder: str = "native") -> dict[str, str]:
    """``sources.app/odyn/sleeve`` of the manifest; where absent, the project's runtime image
    and its sleeve base for Nitro hosts (nitro-cli builder) or for the emulator (native)."""
    sleeve = sleeve_nitro_image_tag() if builder == "nitro-cli" else sleeve_emulator_image_tag()
    return {
        "app": manifest.sources.app,
        "odyn": manifest.sources.odyn or runtime_image_tag(),
        "sleeve": manifest.sources.sleeve or sleeve,
    }


def pulled_on_request(reference: str) -> bool:
    """Whether ``pull`` pulls this source: every one but the project's own images."""
    return not reference.startswith(PROJECT_IMAGE_PREFIX)


def resolve_sources(
    client: DockerClient,
    manifest: Manifest,
    *,
    pull: bool = False,
    builder: str = "native",
    check_mode: bool = False,
) -> dict[str, tuple[str, Image]]:
    """Each source's reference and local image. With ``pull`` the sources
    :func:`pulled_on_request` allows are pulled first, present or not (a tag that moved in its
    registry is refreshed). In check mode nothing is pulled: a missing source that a real run
    would pull is left out of the answer."""
    resolved = {}
    for name, reference in source_references(manifest, builder).items():
        pulling = pull and pulled_on_request(reference)
        try:
            image = get_image(client, reference, pull=pulling and not check_mode)
        except ImageNotFoundError:
            if pulling:
                continue
            raise SourceImageError(_missing_source_message(name, reference, manifest)) from None
        except ImagePullError as err:
            raise SourceImageError(f"sources.{name} in {manifest.source}: {err}") from None
        resolved[name] = (reference, image)
    return resolved


def _missing_source_message(name: str, reference: str, manifest: Manifest) -> str:
    missing = f"sources.{name} in {manifest.source}: the image {reference!r} is not present locally"
    if not pulled_on_request(reference):
        return (
            f"{missing}; build the project's images with scripts/build-images.sh (they are "
            "never pulled: no registry serves them)"
        )
    if name == "app":
        how = f"build it (docker build -t {reference} <app directory>)"
    else:
        how = f"build or load it (docker build -t {reference} ..., or docker load)"
    return f"{missing}; {how}, or pass --pull to pull it from its registry"


def _source(name: str, reference: str, image: Image) -> SourceImage:
    return SourceImage(name, reference, str(image.id), str(image.attrs.get("Architecture", "")))


def check_architectures(sources: tuple[SourceImage, ...]) -> None:
    """The runtime and the sleeve base must be built for the app image's architecture."""
    app = next(source for source in sources if source.name == "app")
    for source in sources:
        if source.architecture != app.architecture:
            raise SourceImageError(
                f"sources.{source.name} ({source.reference}) is built for "
                f"{source.architecture or 'an unknown architecture'}, but sources.app "
                f"({app.reference}) for {app.architecture}: an enclave runs the runtime on the "
                f"app's CPU and the sleeve on the same host; use {source.name} images built for "
                f"{app.architecture} (docker build --platform linux/{app.architecture})"
            )


def check_target_architecture(sources: tuple[SourceImage, ...], target: str | None) -> None:
    """Refuse, before anything is built, an app image the target parent's CPU cannot run.

    Docker names architectures as Go does (amd64, arm64), the kernel as ``uname -m`` does
    (x86_64, aarch64); docs/build.md, "Architecture".
    """
    app = next((source for source in sources if source.name == "app"), None)
    if not target or app is None:
        return
    kernel_names = {**ARCHITECTURES, **{name: name for name in ARCHITECTURES.values()}}
    wanted = kernel_names.get(target, target)
    found = kernel_names.get(app.architecture, app.architecture)
    if found != wanted:
        docker_name = {kernel: go for go, kernel in ARCHITECTURES.items()}.get(wanted, wanted)
        built_for = app.architecture or "an unknown architecture"
        raise SourceImageError(
            f"sources.app ({app.reference}) is built for {built_for}, but the target parent "
            f"is {target}: an enclave runs on the parent's CPU; build the "
            f"app for it (docker build --platform linux/{docker_name}) or name an image built "
            "for it in a registry (Graviton parents: an arm64 image)"
        )


# --------------------------------------------------------------------------------------------
# Inputs digest and skipping


def choose_builder(requested: str, nitro_cli: str = "nitro-cli") -> str:
    """``auto`` is ``nitro-cli`` where the real AWS nitro-cli runs, else ``native``."""
    if requested not in BUILDERS:
        raise BuilderChoiceError(f"unknown builder {requested!r}; use one of {', '.join(BUILDERS)}")
    if requested != "auto":
        return requested
    return "nitro-cli" if nitro_cli_version(nitro_cli).startswith("Nitro CLI") else "native"


def nitro_cli_version(nitro_cli: str) -> str:
    """``nitro-cli --version`` (``Nitro CLI 1.3.1``; nitro-emu says ``nitro-emu …``), or ""."""
    executable = shutil.which(nitro_cli)
    if executable is None:
        return ""
    try:
        answer = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return answer.stdout.strip()


def signing_files(manifest: Manifest) -> tuple[Path, Path] | None:
    """``signature.certificate`` and ``signature.key``, resolved beside the manifest."""
    if manifest.signature is None:
        return None
    files = (
        manifest.resolve_path(manifest.signature.certificate),
        manifest.resolve_path(manifest.signature.key),
    )
    return require_signing_files(
        files,
        (f"signature.certificate in {manifest.source}", f"signature.key in {manifest.source}"),
        "relative paths are relative to the manifest",
    )


def require_signing_files(
    files: tuple[str | os.PathLike[str], str | os.PathLike[str]],
    names: tuple[str, str] = ("signing_certificate", "signing_key"),
    hint: str = "",
) -> tuple[Path, Path]:
    """The certificate and key as paths, each checked to be a file (the one missing is named)."""
    paths = (Path(files[0]), Path(files[1]))
    for name, path in zip(names, paths):
        if not path.is_file():
            raise BuilderChoiceError(
                f"{name}: {path} is not a file; give the path of the PEM file"
                + (f" ({hint})" if hint else "")
            )
    return paths


def build_inputs(
    sources: tuple[SourceImage, ...],
    manifest_bytes: bytes,
    builder: str,
    options: BuildOptions,
    signing: tuple[Path, Path] | None,
) -> dict[str, Any]:
    """Everything the release image depends on, as digests (see docs/build.md)."""
    app = next(source for source in sources if source.name == "app")
    inputs: dict[str, Any] = {
        "sources": {source.name: source.image_id for source in sources},
        "manifest": hashlib.sha256(manifest_bytes).hexdigest(),
        "enclaveops": enclave_runtime.__version__,
        "builder": builder,
        "blobs": blobs_digests(builder, options, app.architecture),
        "signing_certificate": file_sha256(signing[0]) if signing else None,
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
    }
    if builder == "nitro-cli":
        inputs["nitro_cli"] = nitro_cli_version(options.nitro_cli)
    return inputs


def blobs_digests(builder: str, options: BuildOptions, architecture: str) -> dict[str, str]:
    """SHA-256 of each blob the EIF takes (the kernel, cmdline, init, nsm.ko...)."""
    if builder == "native":
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(architecture, architecture)
        files = find_blobs(options.blobs, arch).files()
    else:
        directory = options.blobs or Path(os.environ.get(ENV_BLOBS) or AWS_BLOBS)
        files = (
            tuple(sorted(p for p in directory.glob("*") if p.is_file()))
            if directory.is_dir()
            else ()
        )
    return {path.name: file_sha256(path) for path in files}


def inputs_digest(inputs: Mapping[str, Any]) -> str:
    """The digest of build inputs: SHA-256 of their canonical JSON."""
    return "sha256:" + hashlib.sha256(canonical_json(inputs)).hexdigest()


def _labels(image: Image) -> dict[str, str]:
    return dict((image.attrs.get("Config") or {}).get("Labels") or {})


def _local_image(client: DockerClient, reference: str) -> Image | None:
    try:
        return get_image(client, reference)
    except ImageNotFoundError:
        return None


def up_to_date_release(client: DockerClient, target: str, digest: str) -> BuildResult | None:
    """The build that made ``target``, when its inputs digest is ``digest``; else None."""
    image = _local_image(client, target)
    if image is None or _labels(image).get(LABEL_INPUTS) != digest:
        return None
    labels = _labels(image)
    try:
        measurements = Measurements.from_nitro_cli(json.loads(labels[LABEL_MEASUREMENTS]))
        eif = json.loads(labels[LABEL_EIF])
        if "SHA384" not in eif:
            return None  # built before the label held the SHA-384 a build record needs
        return BuildResult(
            target=target,
            image_id=str(image.id),
            sources=(),
            measurements=measurements,
            eif_sha256=str(eif["SHA256"]),
            eif_size=int(eif["Size"]),
            eif_sha384=eif.get("SHA384"),
            builder="",
            inputs_digest=digest,
            skipped=True,
            reason=f"inputs unchanged: {target} already holds this build",
        )
    except (KeyError, TypeError, ValueError, EnclaveOpsError):
        return None  # labels damaged by hand: build again


def rebuild_reason(client: DockerClient, target: str) -> str:
    image = _local_image(client, target)
    if image is None:
        return f"no local image {target}"
    labels = _labels(image)
    if LABEL_INPUTS not in labels:
        return f"{target} was not made by enclaveops build"
    if '"SHA384"' not in labels.get(LABEL_EIF, ""):
        return f"{target} does not record its EIF's SHA-384 (an older enclave-runtime built it)"
    return "inputs changed since the last build"


# --------------------------------------------------------------------------------------------
# Amend


def amended_reference(target: str) -> str:
    """The amended image's tag: ``repo-amended:tag`` beside the target ``repo:tag``."""
    name = target.partition("@")[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    repository, tag = (name[:colon], name[colon + 1 :]) if colon > slash else (name, "latest")
    return f"{repository}-amended:{tag}"


def odyn_entrypoint(app: ImageConfig) -> list[str]:
    """The amended ENTRYPOINT: odyn, then the app's working directory, user and command."""
    command = app.docker_command()
    if not command:
        raise ImageConfigError(
            "sources.app has neither ENTRYPOINT nor CMD, so odyn would have nothing to run; add "
            "a CMD (or ENTRYPOINT) to the app's Dockerfile"
        )
    argv = [ODYN, "--config-dir", CONFIG_DIR]
    if app.working_dir:
        argv += ["--workdir", app.working_dir]
    if app.user:
        argv += ["--user", app.user]
    return [*argv, "--", *command]


def amended_config(app_attrs: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """The app's config with odyn as ENTRYPOINT, no CMD and no USER, ``labels`` added."""
    config = container_config(app_attrs)
    config["Entrypoint"] = odyn_entrypoint(image_config(app_attrs))
    config.pop("Cmd", None)
    config.pop("User", None)
    config["Labels"] = {**config.get("Labels", {}), **labels}
    return config


def amend_inputs_digest(images: Mapping[str, tuple[str, Image]], manifest_bytes: bytes) -> str:
    """What the amended image depends on (label :data:`LABEL_AMEND_INPUTS`)."""
    inputs = {
        "app": images["app"][1].id,
        "odyn": images["odyn"][1].id,
        "manifest": hashlib.sha256(manifest_bytes).hexdigest(),
        "enclaveops": enclave_runtime.__version__,
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
    }
    return inputs_digest(inputs)


def amend(
    client: DockerClient,
    images: Mapping[str, tuple[str, Image]],
    manifest_bytes: bytes,
    reference: str,
    work: Path,
    *,
    target: str,
) -> AppendedImage:
    """The amended image of the release ``target``: reused when ``reference`` was made from the
    same inputs."""
    app, runtime = images["app"][1], images["odyn"][1]
    digest = amend_inputs_digest(images, manifest_bytes)
    existing = _local_image(client, reference)
    if existing is not None and _labels(existing).get(LABEL_AMEND_INPUTS) == digest:
        return AppendedImage(str(existing.id), reference)
    labels = {
        LABEL_AMEND_INPUTS: digest,
        "org.enclaveops.amend.app": str(app.id),
        "org.enclaveops.amend.odyn": str(runtime.id),
        LABEL_TARGET: target,
    }
    config = amended_config(app.attrs, labels)
    with LayerBuilder(_layer_mtime(), spool_dir=work) as layer:
        with export_rootfs(client, runtime) as tar:
            try:
                layer.add_tree(tar, RUNTIME_PREFIX)
            except LayerError as err:
                raise SourceImageError(
                    f"sources.odyn ({images['odyn'][0]}) cannot be used as the runtime: {err}; "
                    "it must be an EnclaveOps runtime image (scripts/build-images.sh builds "
                    f"{runtime_image_tag()})"
                ) from None
        layer.add_bytes(AMENDED_MANIFEST, manifest_bytes)
        return append_layer(
            client,
            app,
            layer,
            config,
            reference=reference,
            created_by=f"enclaveops amend: {RUNTIME_PREFIX} of {runtime.id}, /{AMENDED_MANIFEST}",
        )


def _layer_mtime() -> int:
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(epoch) if epoch.isdigit() else 0


# --------------------------------------------------------------------------------------------
# EIF


def build_enclave_image(
    client: DockerClient,
    builder: str,
    *,
    reference: str,
    eif: Path,
    options: BuildOptions,
    signing: tuple[Path, Path] | None,
) -> Measurements:
    """The EIF of a local image, with nitro-cli or the native builder."""
    certificate, key = signing if signing else (None, None)
    try:
        if builder == "nitro-cli":
            env = {ENV_BLOBS: str(options.blobs)} if options.blobs is not None else None
            return NitroCli(options.nitro_cli, env=env).build_enclave(
                reference, eif, certificate, key
            )
        return build_eif_from_image(
            reference,
            eif,
            client=client,
            blobs_dir=options.blobs,
            signing_certificate=certificate,
            private_key=key,
            spool_dir=eif.parent,
        )
    except OSError as err:
        raise disk_error(err, eif.parent, 2 * _image_size(client, reference)) from None
    except SpoolError as err:
        size = _image_size(client, reference)
        raise SpoolError(f"{err} (the image is about {size / 1e6:.0f} MB)") from None


def _image_size(client: DockerClient, reference: str) -> int:
    try:
        return int(client.images.get(reference).attrs.get("Size") or 0)
    except Exception:
        return 0


def check_memory(eif: Path, manifest: Manifest) -> None:
    """nitro-cli refuses (E26) an enclave with less memory than 4 × the EIF's size."""
    size = eif.stat().st_size
    minimum = minimum_memory_mib(size)
    if manifest.defaults.memory_mb < minimum:
        raise EifTooLargeError(
            f"the EIF is {size / (1 << 20):.0f} MiB, so nitro-cli needs at least {minimum} MiB "
            f"of enclave memory for it (4 × its size; [ E26 ] otherwise), but defaults.memory_mb "
            f"in {manifest.source} is {manifest.defaults.memory_mb}: raise defaults.memory_mb "
            f"to {minimum} or more (and the allocator's memory_mib with it), or make the app "
            "image smaller"
        )


def file_sha256(path: str | os.PathLike[str]) -> str:
    return file_digests(path)[0]


@contextlib.contextmanager
def replaced_on_success(destination: Path) -> Iterator[Path]:
    """A path beside ``destination`` to write to, renamed over it when the block succeeds and
    removed when it fails: a failed or interrupted build never leaves a truncated EIF where a
    working one was. Beside it, so the rename stays on one file system (atomic). An OSError
    while writing or renaming becomes the error naming the directory (and the space needed)."""
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, destination)
    except OSError as err:
        raise disk_error(err, destination.parent, _size_or_zero(partial)) from None
    finally:
        partial.unlink(missing_ok=True)


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# Release image


def release_image(
    client: DockerClient,
    sleeve: Image,
    *,
    eif: Path,
    manifest_bytes: bytes,
    target: str,
    labels: Mapping[str, str],
    work: Path,
) -> AppendedImage:
    """The sleeve base + the EIF + the manifest, tagged ``target``; ENTRYPOINT kept."""
    config = container_config(sleeve.attrs)
    config["Labels"] = {**config.get("Labels", {}), **labels}
    with LayerBuilder(_layer_mtime(), spool_dir=work) as layer:
        layer.add_path(RELEASE_EIF, eif)
        layer.add_bytes(RELEASE_MANIFEST, manifest_bytes)
        return append_layer(
            client,
            sleeve,
            layer,
            config,
            reference=target,
            created_by=f"enclaveops build: /{RELEASE_EIF}, /{RELEASE_MANIFEST}",
        )


def extract_file(
    client: DockerClient, image_id: str, path: str, output: Path, *, sha256: str | None = None
) -> None:
    """Copy one file out of an image (the EIF of an up-to-date release image) to ``output``,
    replaced only once the copy is whole and, when ``sha256`` is given, has that digest."""
    docker = docker_module()
    try:
        container = client.containers.create(image_id, entrypoint=["/enclaveops-extract-only"])
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(f"cannot create a container of {image_id}: {err}") from None
    try:
        chunks, _ = container.get_archive(path)
        with tempfile.TemporaryFile(dir=output.parent) as archive:
            for chunk in chunks:
                archive.write(chunk)
            archive.seek(0)
            with replaced_on_success(output) as partial:
                _write_single_member(archive, partial)
                if sha256 is not None:
                    _check_extracted(partial, sha256, image_id, path)
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(f"cannot copy {path} out of {image_id}: {err}") from None
    finally:
        container.remove(force=True)


def _check_extracted(copy: Path, sha256: str, image_id: str, path: str) -> None:
    found = file_sha256(copy)
    if found != sha256:
        raise ReleaseEifMismatchError(
            f"{path} in the release image {image_id} has SHA-256 {found}, but the image's label "
            f"{LABEL_EIF} records {sha256}: the image was altered after enclaveops built it; "
            "build it again (enclaveops build --force, or the image module's force: true)"
        )


def _write_single_member(archive: IO[bytes], output: Path) -> None:
    with tarfile.open(fileobj=archive, mode="r|") as tar:
        member = tar.next()
        data = tar.extractfile(member) if member is not None else None
        if data is None:
            raise DockerError(f"the image gave no file for {output.name}")
        with output.open("wb") as out:
            shutil.copyfileobj(data, out, _HASH_CHUNK)


def _copy_out(eif: Path, destination: Path) -> None:
    with replaced_on_success(destination) as partial:
        shutil.copyfile(eif, partial)


# --------------------------------------------------------------------------------------------
# Housekeeping


def prune_superseded(client: DockerClient, target: str, keep: Collection[str]) -> list[str]:
    """Remove the untagged images that earlier builds of ``target`` left (release and amended
    images carry :data:`LABEL_TARGET`), except those in ``keep`` and those any container, running
    or stopped, uses; returns the IDs removed. Nothing is forced, so the engine also refuses an
    image that became used meanwhile or has child images; such an image is left, as is
    everything when the engine does not answer: a finished build never fails here."""
    docker = docker_module()
    try:
        candidates = client.images.list(
            filters={"dangling": True, "label": f"{LABEL_TARGET}={target}"}
        )
        used = {str(container.get("ImageID")) for container in client.api.containers(all=True)}
    except (docker.errors.DockerException, OSError):
        return []
    removed = []
    for image in candidates:
        image_id = str(image.id)
        if image_id in keep or image_id in used:
            continue
        try:
            client.images.remove(image_id)
        except (docker.errors.DockerException, OSError):
            continue
        removed.append(image_id)
    return removed
