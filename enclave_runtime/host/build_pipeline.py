"""``enclaveops build``: app image → amended image → EIF → release image, reproducibly.

1. **Sources**: ``sources.app``, ``sources.odyn`` (the runtime image) and ``sources.sleeve`` (the
   sleeve base) are local images, pulled only when missing and pulling is asked for. The image
   IDs, not the tags, are what the build records and depends on.
2. **Amend**: one layer on the app image (:mod:`.image_layers`, no ``docker build``): the runtime
   at ``/opt/enclave-runtime`` and the manifest at ``/etc/enclaver/enclaver.yaml``; ENTRYPOINT
   ``odyn --config-dir /etc/enclaver [--workdir W] [--user U] -- <app ENTRYPOINT + CMD>``, no
   CMD (nitro-cli would run a CMD alone), no USER (odyn starts as root and drops to U itself).
3. **EIF** of the amended image: ``nitro-cli build-enclave`` or the native builder.
4. **Release image** ``target``: the sleeve base + ``/enclave/application.eif`` +
   ``/enclave/enclaver.yaml``, its ENTRYPOINT kept, labels recording sources, measurements and
   the digest of every input. A target whose label shows the same inputs digest is left as it
   is (the build is skipped), which is what makes the Ansible ``image`` module idempotent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

import enclave_runtime
from enclave_runtime.emulator.state import minimum_memory_mib
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.eif import SectionType, read_eif
from enclave_runtime.formats.manifest import Manifest, load_manifest
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.host.docker_rootfs import (
    DockerError,
    ImageConfig,
    ImageConfigError,
    ImageNotFoundError,
    SpoolError,
    docker_client,
    docker_module,
    export_rootfs,
    get_image,
    image_config,
)
from enclave_runtime.host.eif_builder import AWS_BLOBS, ENV_BLOBS, build_eif_from_image, find_blobs
from enclave_runtime.host.image_layers import (
    AppendedImage,
    LayerBuilder,
    LayerError,
    append_layer,
    canonical_json,
    container_config,
    disk_error,
)
from enclave_runtime.host.nitro_cli import NitroCli
from enclave_runtime.host.project_images import (
    RUNTIME_PREFIX,
    runtime_command,
    runtime_image_tag,
    sleeve_emulator_image_tag,
    sleeve_nitro_image_tag,
)

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.images import Image

BUILDERS = ("auto", "nitro-cli", "native")
ODYN = runtime_command("odyn")
CONFIG_DIR = "/etc/enclaver"
AMENDED_MANIFEST = "etc/enclaver/enclaver.yaml"
RELEASE_EIF = "enclave/application.eif"
RELEASE_MANIFEST = "enclave/enclaver.yaml"
LABEL_SOURCES = "org.enclaveops.build.sources"
LABEL_INPUTS = "org.enclaveops.build.inputs"
LABEL_MEASUREMENTS = "org.enclaveops.build.measurements"
LABEL_EIF = "org.enclaveops.build.eif"
LABEL_AMEND_INPUTS = "org.enclaveops.amend.inputs"
_HASH_CHUNK = 1 << 20

Progress = Callable[[str], None]


class SourceImageError(EnclaveOpsError):
    """A source image of the manifest is missing, or does not fit the others."""


class BuilderChoiceError(EnclaveOpsError):
    """An unknown builder, or signing files that are not there."""


class EifTooLargeError(EnclaveOpsError):
    """The EIF needs more memory than the manifest gives the enclave (nitro-cli's E26)."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What ``enclaveops build`` takes besides the manifest."""

    pull: bool = False
    builder: str = "auto"
    nitro_cli: str = "nitro-cli"
    blobs: Path | None = None
    force: bool = False
    eif_output: Path | None = None
    work_dir: Path | None = None


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
    amended: str | None = None

    @property
    def image(self) -> str:
        return f"{self.target}@{self.image_id}"

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "Sources": {source.name: source.to_json() for source in self.sources},
            "Measurements": self.measurements.to_nitro_cli(),
            "Image": self.image,
            "ImageID": self.image_id,
            "Eif": {"SHA256": self.eif_sha256, "Size": self.eif_size},
            "Builder": self.builder,
            "InputsDigest": self.inputs_digest,
            "Skipped": self.skipped,
            "Reason": self.reason,
        }
        if self.amended is not None:
            document["AmendedImage"] = self.amended
        return document


@dataclasses.dataclass(frozen=True)
class SectionDigest:
    """One EIF section as ``--explain`` shows it: what it is, its size and digest, its PCRs."""

    index: int
    kind: str
    size: int
    sha384: str
    pcrs: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "Index": self.index,
            "Type": self.kind,
            "Size": self.size,
            "SHA384": self.sha384,
            "PCRs": list(self.pcrs),
        }


# --------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What a build would use, known before anything is written (check mode stops here)."""

    manifest: Manifest
    manifest_bytes: bytes
    images: Mapping[str, tuple[str, Image]]
    sources: tuple[SourceImage, ...]
    builder: str
    signing: tuple[Path, Path] | None
    inputs_digest: str


def plan_build(
    manifest_path: str | os.PathLike[str], options: BuildOptions, client: DockerClient
) -> BuildPlan:
    """Read the manifest, resolve the sources and digest every input."""
    manifest = load_manifest(manifest_path)
    manifest_bytes = Path(manifest_path).read_bytes()
    builder = choose_builder(options.builder, options.nitro_cli)
    images = resolve_sources(client, manifest, pull=options.pull, builder=builder)
    sources = tuple(_source(name, reference, image) for name, (reference, image) in images.items())
    check_architectures(sources)
    signing = signing_files(manifest)
    inputs = build_inputs(sources, manifest_bytes, builder, options, signing)
    return BuildPlan(manifest, manifest_bytes, images, sources, builder, signing, _digest(inputs))


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
    if options.eif_output is not None:
        extract_file(client, existing.image_id, "/" + RELEASE_EIF, options.eif_output)
    return existing


def existing_release(
    client: DockerClient, plan: BuildPlan, *, force: bool = False
) -> tuple[BuildResult | None, str]:
    """The release image already built from the plan's inputs, or None and why to build."""
    target = plan.manifest.target
    if force:
        return None, "forced (--force)"
    found = up_to_date_release(client, target, plan.inputs_digest)
    if found is None:
        return None, rebuild_reason(client, target)
    return dataclasses.replace(found, sources=plan.sources, builder=plan.builder), found.reason


def _build_release(
    client: DockerClient, plan: BuildPlan, options: BuildOptions, reason: str, say: Progress
) -> BuildResult:
    target = plan.manifest.target
    work_parent = options.work_dir or Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="enclaveops-build-", dir=work_parent) as work_text:
        work = Path(work_text)
        say(f"amending {plan.images['app'][0]} with the runtime {plan.images['odyn'][0]}")
        amended = amend(client, plan.images, plan.manifest_bytes, amended_reference(target), work)
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
        eif_sha256, eif_size = file_sha256(eif), eif.stat().st_size
        labels = {
            LABEL_SOURCES: json.dumps({s.name: s.to_json() for s in plan.sources}, sort_keys=True),
            LABEL_INPUTS: plan.inputs_digest,
            LABEL_MEASUREMENTS: json.dumps(measurements.to_nitro_cli(), sort_keys=True),
            LABEL_EIF: json.dumps({"SHA256": eif_sha256, "Size": eif_size}, sort_keys=True),
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
    return BuildResult(
        target=target,
        image_id=release.image_id,
        sources=plan.sources,
        measurements=measurements,
        eif_sha256=eif_sha256,
        eif_size=eif_size,
        builder=plan.builder,
        inputs_digest=plan.inputs_digest,
        skipped=False,
        reason=reason,
        amended=f"{amended.reference}@{amended.image_id}",
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


def resolve_sources(
    client: DockerClient, manifest: Manifest, *, pull: bool = False, builder: str = "native"
) -> dict[str, tuple[str, Image]]:
    """Each source's reference and local image (pulled when missing only with ``pull``)."""
    resolved = {}
    for name, reference in source_references(manifest, builder).items():
        try:
            resolved[name] = (reference, get_image(client, reference, pull=pull))
        except ImageNotFoundError:
            raise SourceImageError(_missing_source_message(name, reference, manifest)) from None
    return resolved


def _missing_source_message(name: str, reference: str, manifest: Manifest) -> str:
    if reference.startswith("enclaveops/"):
        how = "build the project's images with scripts/build-images.sh"
    elif name == "app":
        how = f"build it (docker build -t {reference} <app directory>)"
    else:
        how = f"build or load it (docker build -t {reference} ..., or docker load)"
    return (
        f"sources.{name} in {manifest.source}: the image {reference!r} is not present locally; "
        f"{how}, or pass --pull to pull it from its registry"
    )


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


def _digest(inputs: Mapping[str, Any]) -> str:
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
        return BuildResult(
            target=target,
            image_id=str(image.id),
            sources=(),
            measurements=measurements,
            eif_sha256=str(eif["SHA256"]),
            eif_size=int(eif["Size"]),
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
    if LABEL_INPUTS not in _labels(image):
        return f"{target} was not made by enclaveops build"
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


def amend(
    client: DockerClient,
    images: Mapping[str, tuple[str, Image]],
    manifest_bytes: bytes,
    reference: str,
    work: Path,
) -> AppendedImage:
    """The amended image: reused when ``reference`` was made from the same inputs."""
    app, runtime = images["app"][1], images["odyn"][1]
    inputs = {
        "app": app.id,
        "odyn": runtime.id,
        "manifest": hashlib.sha256(manifest_bytes).hexdigest(),
        "enclaveops": enclave_runtime.__version__,
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
    }
    digest = _digest(inputs)
    existing = _local_image(client, reference)
    if existing is not None and _labels(existing).get(LABEL_AMEND_INPUTS) == digest:
        return AppendedImage(str(existing.id), reference)
    labels = {
        LABEL_AMEND_INPUTS: digest,
        "org.enclaveops.amend.app": str(app.id),
        "org.enclaveops.amend.odyn": str(runtime.id),
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
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def explain(eif: str | os.PathLike[str]) -> list[SectionDigest]:
    """Each section of the EIF with its size, SHA-384 and the PCRs that measure it."""
    image = read_eif(eif)
    first_ramdisk = image.ramdisk_sections()[0].index if image.ramdisk_sections() else -1
    digests = []
    for section in image.sections:
        hasher = hashlib.sha384()
        with image.open_section(section) as data:
            for chunk in iter(lambda: data.read(_HASH_CHUNK), b""):
                hasher.update(chunk)
        digests.append(
            SectionDigest(
                section.index,
                section.section_type.label,
                section.size,
                hasher.hexdigest(),
                _pcrs_of(section.section_type, section.index == first_ramdisk),
            )
        )
    return digests


def _pcrs_of(kind: SectionType, first_ramdisk: bool) -> tuple[int, ...]:
    if kind in (SectionType.KERNEL, SectionType.CMDLINE) or first_ramdisk:
        return (0, 1)
    if kind is SectionType.RAMDISK:
        return (0, 2)
    if kind is SectionType.SIGNATURE:
        return (8,)  # PCR8 measures the certificate inside it, not the section
    return ()


# --------------------------------------------------------------------------------------------
# A standalone EIF (the Ansible eif module)


@dataclasses.dataclass(frozen=True)
class EifBuild:
    """An EIF built from a local image, or found up to date (``skipped``)."""

    path: Path
    image_id: str
    measurements: Measurements
    sha256: str
    size: int
    builder: str
    inputs_digest: str
    skipped: bool
    reason: str

    def record(self) -> dict[str, Any]:
        """What :func:`eif_record_path` keeps beside the EIF."""
        return {
            "ImageID": self.image_id,
            "Measurements": self.measurements.to_nitro_cli(),
            "SHA256": self.sha256,
            "Size": self.size,
            "Builder": self.builder,
            "InputsDigest": self.inputs_digest,
        }


def eif_record_path(eif: Path) -> Path:
    """``app.eif`` → ``app.eif.build.json``: the inputs digest and measurements of its build."""
    return eif.with_name(eif.name + ".build.json")


def plan_eif(
    client: DockerClient, reference: str, options: BuildOptions, signing: tuple[Path, Path] | None
) -> tuple[Image, str, str]:
    """The local image, the builder and the inputs digest of an EIF of ``reference``."""
    if signing is not None:
        signing = require_signing_files(signing)
    image = get_image(client, reference, pull=options.pull)
    builder = choose_builder(options.builder, options.nitro_cli)
    architecture = str(image.attrs.get("Architecture", ""))
    inputs: dict[str, Any] = {
        "image": str(image.id),
        "enclaveops": enclave_runtime.__version__,
        "builder": builder,
        "blobs": blobs_digests(builder, options, architecture),
        "signing_certificate": file_sha256(signing[0]) if signing else None,
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
    }
    if builder == "nitro-cli":
        inputs["nitro_cli"] = nitro_cli_version(options.nitro_cli)
    return image, builder, _digest(inputs)


def up_to_date_eif(
    output: str | os.PathLike[str], digest: str, *, force: bool = False
) -> tuple[EifBuild | None, str]:
    """The recorded build of ``output`` when its inputs digest is ``digest`` and the file is the
    one recorded (same SHA-256); else None and why a build is needed."""
    eif = Path(output)
    if force:
        return None, "forced (force)"
    record_path = eif_record_path(eif)
    if not eif.is_file():
        return None, f"{eif} does not exist"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        recorded = EifBuild(
            path=eif,
            image_id=str(record["ImageID"]),
            measurements=Measurements.from_nitro_cli(record["Measurements"]),
            sha256=str(record["SHA256"]),
            size=int(record["Size"]),
            builder=str(record["Builder"]),
            inputs_digest=str(record["InputsDigest"]),
            skipped=True,
            reason=f"inputs unchanged: {eif} was built from them",
        )
    except (OSError, ValueError, KeyError, TypeError, EnclaveOpsError):
        return None, f"{record_path} is missing or unreadable"
    if recorded.inputs_digest != digest:
        return None, "inputs changed since the last build"
    if file_sha256(eif) != recorded.sha256:
        return None, f"{eif} changed since it was built"
    return recorded, recorded.reason


def build_eif_file(
    reference: str,
    output: str | os.PathLike[str],
    options: BuildOptions = BuildOptions(),
    *,
    signing: tuple[Path, Path] | None = None,
    client: DockerClient | None = None,
) -> EifBuild:
    """Build the EIF of the local image ``reference`` at ``output``, unless the EIF there was
    built from the same inputs; the build is recorded in :func:`eif_record_path`."""
    eif = Path(output)
    client = docker_client() if client is None else client
    image, builder, digest = plan_eif(client, reference, options, signing)
    existing, reason = up_to_date_eif(eif, digest, force=options.force)
    if existing is not None:
        return existing
    measurements = build_enclave_image(
        client, builder, reference=reference, eif=eif, options=options, signing=signing
    )
    built = EifBuild(
        path=eif,
        image_id=str(image.id),
        measurements=measurements,
        sha256=file_sha256(eif),
        size=eif.stat().st_size,
        builder=builder,
        inputs_digest=digest,
        skipped=False,
        reason=reason,
    )
    _write_record(eif_record_path(eif), built.record())
    return built


def _write_record(path: Path, record: Mapping[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise disk_error(err, path.parent, 4096) from None


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


def extract_file(client: DockerClient, image_id: str, path: str, output: Path) -> None:
    """Copy one file out of an image (the EIF of an up-to-date release image)."""
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
            _write_single_member(archive, output)
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(f"cannot copy {path} out of {image_id}: {err}") from None
    finally:
        container.remove(force=True)


def _write_single_member(archive: IO[bytes], output: Path) -> None:
    with tarfile.open(fileobj=archive, mode="r|") as tar:
        member = tar.next()
        data = tar.extractfile(member) if member is not None else None
        if data is None:
            raise DockerError(f"the image gave no file for {output.name}")
        with output.open("wb") as out:
            shutil.copyfileobj(data, out, _HASH_CHUNK)


def _copy_out(eif: Path, destination: Path) -> None:
    try:
        shutil.copyfile(eif, destination)
    except OSError as err:
        raise disk_error(err, destination.parent, eif.stat().st_size) from None
