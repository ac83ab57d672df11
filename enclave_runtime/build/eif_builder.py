"""The native EIF builder: a Docker image to an enclave image file, without nitro-cli.

It writes what ``nitro-cli build-enclave`` writes (aws/aws-nitro-enclaves-cli ``src/lib.rs``
``build_from_docker``, ``enclave_build/src/lib.rs``, ``yaml_generator.rs``):

- Kernel: ``bzImage`` (x86_64) or ``Image`` (aarch64) from the blobs directory; Cmdline: the
  ``cmdline`` blob with surrounding white space trimmed.
- Metadata: ImageName (default: the reference without its tag), ImageVersion (default: the image
  ID without ``sha256:``), BuildMetadata (OperatingSystem and KernelVersion from line 3 of the
  kernel's ``.config``, as ``generate_build_info`` parses it), DockerInfo, CustomMetadata (the
  ``--metadata`` JSON file, at most 4096 bytes).
- Ramdisk 1, bootstrap: ``dev/`` (0755), ``init`` and ``nsm.ko`` (0755) from the blobs.
- Ramdisk 2, customer: ``cmd`` and ``env`` (0644, see :mod:`.docker_rootfs`) and the image's
  flattened file system under ``rootfs/``.

Reproducibility (docs/reproducible-builds.md): entries in bytewise order, owners and modes as in
the image, fixed times where Docker or the build would put the clock, BuildTime from
``SOURCE_DATE_EPOCH`` (else the Unix epoch), no host name, DockerInfo without host-specific keys.
So the same image and blobs give the same bytes, whatever container ``docker create`` made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from enclave_runtime.build.docker_rootfs import (
    NORMALISED_MTIME,
    FlatRootfs,
    ImageConfig,
    RootfsSummary,
    cmd_file,
    docker_info,
    env_file,
    export_rootfs,
    image_config,
)
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats import nitro_cli_errors
from enclave_runtime.formats.cpio import CpioWriter
from enclave_runtime.formats.eif import build_eif
from enclave_runtime.formats.eif_metadata import (
    EifBuildInfo,
    EifIdentity,
    read_custom_metadata,
    reproducible_build_time,
)
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.host.docker_engine import (
    DockerError,
    ImageNotFoundError,
    docker_client,
    get_image,
    pull_image,
)

if TYPE_CHECKING:
    from docker import DockerClient

ENV_BLOBS = "NITRO_CLI_BLOBS"
PLACEHOLDER_BLOBS = Path(__file__).resolve().parent.parent / "emulator" / "blobs"
AWS_BLOBS = Path("/usr/share/nitro_enclaves/blobs")
KERNEL_NAMES = {"x86_64": "bzImage", "aarch64": "Image"}
# nitro-cli refuses --metadata files above this size (MAX_META_FILE_SIZE, identity.rs).
UNKNOWN = "Unknown"
_CONFIG_SEPARATORS = re.compile(r"[ /-]")
# The pipe carries the customer ramdisk to the EIF writer; a larger buffer means fewer wake-ups.
_PIPE_BUFFER = 1 << 20


class BlobError(EnclaveOpsError):
    """A blobs directory that lacks a file the EIF needs."""

    def __init__(self, message: str, missing: tuple[Path, ...]) -> None:
        super().__init__(message)
        self.missing = missing


# --------------------------------------------------------------------------------------------
# Blobs


@dataclasses.dataclass(frozen=True)
class Blobs:
    """The files of a blobs directory that go into an EIF of one architecture."""

    directory: Path
    arch: str = "x86_64"

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL_NAMES[self.arch]

    @property
    def kernel_config(self) -> Path:
        return self.directory / f"{KERNEL_NAMES[self.arch]}.config"

    @property
    def cmdline(self) -> Path:
        return self.directory / "cmdline"

    @property
    def init(self) -> Path:
        return self.directory / "init"

    @property
    def nsm(self) -> Path:
        return self.directory / "nsm.ko"

    def files(self) -> tuple[Path, ...]:
        return (self.kernel, self.kernel_config, self.cmdline, self.init, self.nsm)

    def read_cmdline(self) -> str:
        """The kernel command line, trimmed as nitro-cli trims it."""
        try:
            return self.cmdline.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise BlobError(f"cannot read {self.cmdline}: {err}", (self.cmdline,)) from None


def blobs_directory(blobs_dir: str | os.PathLike[str] | None = None) -> Path:
    """``blobs_dir`` if given, else ``$NITRO_CLI_BLOBS``, else nitro-emu's placeholder blobs."""
    if blobs_dir is not None:
        return Path(blobs_dir)
    from_environment = os.environ.get(ENV_BLOBS)
    return Path(from_environment) if from_environment else PLACEHOLDER_BLOBS


def find_blobs(blobs_dir: str | os.PathLike[str] | None = None, arch: str = "x86_64") -> Blobs:
    """The blobs for ``arch``, every file checked to exist (a missing one is named)."""
    if arch not in KERNEL_NAMES:
        raise BlobError(f"no kernel blob is known for architecture {arch!r}", ())
    blobs = Blobs(blobs_directory(blobs_dir), arch)
    missing = tuple(path for path in blobs.files() if not path.is_file())
    if missing:
        names = ", ".join(path.name for path in missing)
        raise BlobError(
            f"the blobs directory {blobs.directory} lacks {names} (needed for an {arch} EIF); "
            f"use a complete blobs directory (on a Nitro host {AWS_BLOBS}, from "
            f"aws-nitro-enclaves-cli), point {ENV_BLOBS} or --blobs at one, or unset them to "
            f"use nitro-emu's placeholders ({PLACEHOLDER_BLOBS})",
            missing,
        )
    return blobs


def kernel_build_info(kernel_config: Path, build_time: str | None = None) -> EifBuildInfo:
    """BuildMetadata as nitro-cli derives it from the kernel's ``.config`` (its third line, e.g.
    ``# Linux/x86_64 4.14.256-209.484.amzn2.x86_64 Kernel Configuration``), split at spaces,
    slashes and dashes: word 1 is the OperatingSystem, word 3 the KernelVersion."""
    try:
        with kernel_config.open(encoding="utf-8", errors="replace") as config:
            lines = [line.rstrip("\n") for _, line in zip(range(3), config)]
    except OSError as err:
        raise BlobError(f"cannot read {kernel_config}: {err.strerror}", (kernel_config,)) from None
    words = _CONFIG_SEPARATORS.split(lines[2]) if len(lines) == 3 else []
    return EifBuildInfo(
        build_time=reproducible_build_time() if build_time is None else build_time,
        operating_system=words[1] if len(words) > 1 else UNKNOWN,
        kernel_version=words[3] if len(words) > 3 else UNKNOWN,
    )


# --------------------------------------------------------------------------------------------
# Ramdisks


def bootstrap_ramdisk(blobs: Blobs | str | os.PathLike[str] | None = None) -> bytes:
    """The first ramdisk: ``dev/``, ``init`` and ``nsm.ko``, as nitro-cli's bootstrap ramfs.

    ``blobs`` is a :class:`Blobs` or a blobs directory (see :func:`blobs_directory`).
    """
    if not isinstance(blobs, Blobs):
        blobs = find_blobs(blobs)
    out = io.BytesIO()
    with CpioWriter(out) as writer:
        writer.add_directory("dev", mode=0o755, mtime=NORMALISED_MTIME)
        writer.add_file("init", blobs.init, mode=0o755, mtime=NORMALISED_MTIME)
        writer.add_file("nsm.ko", blobs.nsm, mode=0o755, mtime=NORMALISED_MTIME)
    return out.getvalue()


def customer_ramdisk(
    rootfs: FlatRootfs, config: ImageConfig, out: BinaryIO, *, mtime: int | None = None
) -> RootfsSummary:
    """The second ramdisk: ``cmd``, ``env`` (0644) and ``rootfs/…``, in bytewise order.

    ``mtime`` (default: keep the image's file times, directories at 0) sets every time.
    """
    fixed = NORMALISED_MTIME if mtime is None else mtime
    with CpioWriter(out) as writer:
        writer.add_file("cmd", cmd_file(config), mode=0o644, mtime=fixed)
        writer.add_file("env", env_file(config), mode=0o644, mtime=fixed)
        rootfs.write_to(writer, prefix="rootfs", mtime=mtime)
    return rootfs.summary


class _ProducedStream(io.RawIOBase):
    """What a producer thread writes, readable as a stream through a pipe.

    The customer ramdisk flows into the EIF writer this way, so it never sits on disk as a
    second copy. A failure of the producer is raised to the reader when the data ends, so a
    truncated ramdisk never passes for a complete one.
    """

    def __init__(self, produce: Callable[[BinaryIO], object]) -> None:
        super().__init__()
        self._read_fd, write_fd = os.pipe()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(produce, write_fd), name="customer-ramdisk", daemon=True
        )
        self._thread.start()

    def _run(self, produce: Callable[[BinaryIO], object], write_fd: int) -> None:
        try:
            with open(write_fd, "wb", buffering=_PIPE_BUFFER) as sink:
                produce(sink)
        except BaseException as err:  # handed to the reading thread
            self._failure = err

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = os.readv(self._read_fd, [buffer])
        if size == 0:
            self._thread.join()
            if self._failure is not None:
                raise self._failure
        return size

    def close(self) -> None:
        if not self.closed:
            os.close(self._read_fd)  # a producer still writing gets EPIPE and ends
            self._thread.join()
        super().close()


# --------------------------------------------------------------------------------------------
# Building


def image_identity(
    reference: str,
    image_attrs: dict[str, Any],
    blobs: Blobs,
    *,
    image_name: str | None = None,
    image_version: str | None = None,
    custom_metadata: Any = None,
) -> EifIdentity:
    """The metadata section nitro-cli writes for ``reference``, minus what depends on the host."""
    default_version = str(image_attrs.get("Id", "")).removeprefix("sha256:")
    return EifIdentity(
        image_name=image_name if image_name is not None else repository_name(reference),
        image_version=image_version if image_version is not None else default_version,
        build_info=kernel_build_info(blobs.kernel_config),
        docker_info=docker_info(image_attrs),
        custom_metadata=custom_metadata,
    )


def repository_name(reference: str) -> str:
    """``reference`` without its ``:tag`` or ``@digest`` (nitro-cli's default ImageName)."""
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def build_eif_from_image(
    reference: str,
    output_path: str | os.PathLike[str],
    *,
    client: DockerClient | None = None,
    pull: bool = False,
    blobs_dir: str | os.PathLike[str] | None = None,
    signing_certificate: str | os.PathLike[str] | None = None,
    private_key: str | os.PathLike[str] | None = None,
    image_name: str | None = None,
    image_version: str | None = None,
    custom_metadata: Any = None,
    spool_dir: str | os.PathLike[str] | None = None,
) -> Measurements:
    """Build the EIF of a local Docker image (``pull`` pulls it first, even when present).

    The exported file system is staged once in a spool file under ``spool_dir`` (default
    ``$TMPDIR``): it needs about the image's size in free space.
    """
    client = docker_client() if client is None else client
    image = get_image(client, reference, pull=pull)
    config = image_config(image)
    blobs = find_blobs(blobs_dir, config.eif_arch)
    cmdline = blobs.read_cmdline()
    cmd_file(config)  # an image without a usable command fails before the export, not after
    env_file(config)
    identity = image_identity(
        reference,
        image.attrs,
        blobs,
        image_name=image_name,
        image_version=image_version,
        custom_metadata=custom_metadata,
    )
    with contextlib.ExitStack() as stack:
        with export_rootfs(client, image) as tar:
            rootfs = stack.enter_context(FlatRootfs.read(tar, spool_dir=spool_dir))
        customer = stack.enter_context(
            _ProducedStream(lambda out: customer_ramdisk(rootfs, config, out))
        )
        return build_eif(
            blobs.kernel,
            cmdline,
            [bootstrap_ramdisk(blobs), customer],
            output_path,
            metadata=identity,
            signing_certificate=signing_certificate,
            private_key=private_key,
            arch=config.eif_arch,
        )


def build_from_docker_image(  # noqa: PLR0917 - the signature nitro-emu's CLI calls
    docker_uri: str,
    output_path: Path,
    blobs_dir: Path | None,
    signing_certificate: Path | None,
    private_key: Path | None,
    image_name: str | None,
    image_version: str | None,
    metadata_path: Path | None,
) -> Measurements:
    """``nitro-cli build-enclave --docker-uri``: nitro-cli's order of checks and its errors.

    The image is pulled when it is not present locally (E50 when that fails, or when Docker does
    not answer); a missing ``cmdline`` blob is E19; the caller reports any other
    :class:`EnclaveOpsError` as E48.
    """
    blobs = Blobs(blobs_directory(blobs_dir))
    if not blobs.cmdline.is_file():
        raise nitro_cli_errors.file_operation_failure(
            str(blobs.cmdline),
            "Open",
            reason=f"the blobs directory {blobs.directory} has no cmdline file",
        )
    custom_metadata = read_custom_metadata(metadata_path) if metadata_path is not None else None
    try:
        client = docker_client()
        _obtain_image(client, docker_uri)
    except DockerError as err:
        raise nitro_cli_errors.docker_image_pull_error(str(err)) from None
    return build_eif_from_image(
        docker_uri,
        output_path,
        client=client,
        blobs_dir=blobs.directory,
        signing_certificate=signing_certificate,
        private_key=private_key,
        image_name=image_name,
        image_version=image_version,
        custom_metadata=custom_metadata,
    )


def _obtain_image(client: DockerClient, reference: str) -> None:
    """nitro-cli's pull step: a local image is used as is, a missing one is pulled."""
    try:
        get_image(client, reference)
    except ImageNotFoundError:
        pull_image(client, reference)
        return
    print("Using the locally available Docker image...", file=sys.stderr)
