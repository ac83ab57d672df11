"""The project's own images: the self-contained runtime and the two sleeve bases.

One place for what others build on (docs/images.md explains each):

- the tags: ``runtime_image_tag()``, ``sleeve_emulator_image_tag()``, ``sleeve_nitro_image_tag()``
  and the runtime's fixed paths (``RUNTIME_PREFIX``, ``runtime_command(name)``);
- ``ensure_project_images()``: runs scripts/build-images.sh, which rebuilds an image only when
  the digest of its inputs (``inputs_digest``, stored in the ``INPUTS_LABEL`` label) changed;
- ``provide_image()``: the same tag from a registry instead (a parent that cannot build);
- ``runtime_wheel()``: the enclave-runtime wheel of a checkout, named by version and the digest of
  its sources, so a deployment ships the code it was given and rebuilds only when it changed.

``python -m enclave_runtime.build.project_images`` is the script's helper (it prepares the
runtime's build context, computes input digests and prints tags) and the nitro_host role's
(``runtime-wheel``, ``provide``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import enclave_runtime
from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.host.docker_engine import DockerError, docker_client, docker_module, pull_image

RUNTIME_PREFIX = "/opt/enclave-runtime"
# build/runtime_bundle.RUNTIME_DISTRIBUTION; that module needs `packaging` (a host extra), and this
# one is imported by commands the runtime itself ships (enclaveops run), so it is imported lazily.
RUNTIME_DISTRIBUTION = "enclave-runtime"
RUNTIME_REPOSITORY = "enclaveops/runtime"
SLEEVE_EMULATOR_REPOSITORY = "enclaveops/sleeve-emulator"
SLEEVE_NITRO_REPOSITORY = "enclaveops/sleeve"
DEFAULT_BASE_IMAGE = "enclaveops/debian-base:bookworm"
DEFAULT_NITRO_BASE_IMAGE = "amazonlinux:2023"
# The digest of an image's inputs; the build script skips an image whose label matches.
INPUTS_LABEL = "org.enclaveops.inputs"
SOURCE_TREE = Path(enclave_runtime.__file__).resolve().parent.parent
BUILD_SCRIPT = SOURCE_TREE / "scripts" / "build-images.sh"
RUNTIME_IMAGE_DIR = SOURCE_TREE / "images" / "runtime"
RUNTIME_CONTEXT_FILES = ("Dockerfile", "assemble.py")
BUILD_TIMEOUT = 1800.0
# What `pip wheel` of a checkout packages (pyproject.toml's readme, packages and package data);
# the wheel is built from a copy of exactly these, so stale setuptools build/ output never leaks in.
WHEEL_INPUTS = ("pyproject.toml", "README.md", "enclave_runtime")
# Byte code is written by whoever imports the checkout: it is no input.
DIGEST_IGNORED = ("__pycache__",)
WHEEL_TIMEOUT = 600.0
_VERSION_LINE = re.compile(r"""^__version__ = ["']([^"']+)["']""", re.M)


class ProjectImagesError(EnclaveOpsError):
    """The project's images cannot be built or run as asked."""


@dataclass(frozen=True)
class ProjectImages:
    """The tags scripts/build-images.sh made sure of."""

    runtime: str
    sleeve_emulator: str
    sleeve_nitro: str | None = None


def runtime_image_tag(version: str = enclave_runtime.__version__) -> str:
    return f"{RUNTIME_REPOSITORY}:{version}"


def sleeve_emulator_image_tag(version: str = enclave_runtime.__version__) -> str:
    return f"{SLEEVE_EMULATOR_REPOSITORY}:{version}"


def sleeve_nitro_image_tag(version: str = enclave_runtime.__version__) -> str:
    return f"{SLEEVE_NITRO_REPOSITORY}:{version}"


def runtime_command(name: str) -> str:
    """The absolute path of a runtime command (python3, odyn, sleeve, nitro-emu, ...)."""
    return f"{RUNTIME_PREFIX}/bin/{name}"


def _digest_tree(digest: Any, path: Path) -> None:
    entries = [path] if not path.is_dir() else sorted(path.rglob("*"))
    for entry in entries:
        if any(part in DIGEST_IGNORED for part in entry.parts) or entry.suffix == ".pyc":
            continue
        name = entry.name if entry == path else entry.relative_to(path).as_posix()
        if entry.is_symlink():
            record = f"link {name} {os.readlink(entry)}"
        elif entry.is_dir():
            record = f"dir {name}"
        else:
            executable = "x" if os.access(entry, os.X_OK) else "-"
            record = f"file {name} {executable} {entry.stat().st_size}"
        digest.update(record.encode() + b"\0")
        if entry.is_file() and not entry.is_symlink():
            digest.update(entry.read_bytes())


def inputs_digest(paths: Sequence[Path], extras: Sequence[str] = ()) -> str:
    """A digest of files and trees (names, contents, executable bits; not times) and strings."""
    digest = hashlib.sha256()
    for path in paths:
        if not path.exists():
            raise ProjectImagesError(f"image input {path} does not exist")
        digest.update(f"input {path.name}\0".encode())
        _digest_tree(digest, path)
    for extra in extras:
        digest.update(f"extra {extra}\0".encode())
    return "sha256:" + digest.hexdigest()


def runtime_entry_points() -> list[str]:
    """``name = module:function`` for each console script of the installed enclave-runtime."""
    try:
        distribution = metadata.distribution(RUNTIME_DISTRIBUTION)
    except metadata.PackageNotFoundError as err:
        raise ProjectImagesError(
            f"{RUNTIME_DISTRIBUTION} is not installed in {sys.prefix}: its console scripts are "
            "the runtime's commands; install it (pip install -e .) and build again"
        ) from err
    scripts = [e for e in distribution.entry_points if e.group == "console_scripts"]
    return [f"{e.name} = {e.value}" for e in sorted(scripts, key=lambda e: e.name)]


def prepare_runtime_context(context: Path) -> None:
    """Fill ``context`` with what images/runtime/Dockerfile builds from."""
    from enclave_runtime.build.runtime_bundle import bundle_runtime  # noqa: PLC0415 - see above

    context.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_CONTEXT_FILES:
        shutil.copyfile(RUNTIME_IMAGE_DIR / name, context / name)
    (context / "entry-points.txt").write_text("".join(f"{e}\n" for e in runtime_entry_points()))
    bundle_runtime(context / "site-packages")


def _script_failure(result: subprocess.CompletedProcess[str], script: Path) -> ProjectImagesError:
    tail = "\n".join(result.stderr.strip().splitlines()[-20:])
    return ProjectImagesError(
        f"{script} failed with exit status {result.returncode}; its output ends with:\n{tail}\n"
        "Fix the cause above (Docker not running: scripts/ensure-docker.sh; no Debian mirror: "
        "set DEBIAN_MIRROR) and run it again."
    )


def ensure_project_images(
    nitro: bool = False,
    base_image: str | None = None,
    script: Path = BUILD_SCRIPT,
    timeout: float = BUILD_TIMEOUT,
) -> ProjectImages:
    """Build whatever project image is missing or stale (fast when none is); return the tags."""
    if not script.is_file():
        raise ProjectImagesError(
            f"{script} not found: enclave-runtime was installed without the EnclaveOps source "
            "tree (scripts/ and images/ are not in the wheel), so the project's images cannot be "
            "built here. Build them in a checkout (scripts/build-images.sh) and bring them over "
            "(docker save TAG | docker load), pull them from your registry and tag them "
            f"{runtime_image_tag()} and {sleeve_emulator_image_tag()}, or let the nitro_host role "
            "do either (nitro_host_runtime_image and nitro_host_sleeve_image, or a controller "
            "with a checkout)"
        )
    env = dict(os.environ, PYTHON=sys.executable)
    if base_image is not None:
        env["BASE_IMAGE"] = base_image
    command = [str(script), *(["--nitro"] if nitro else [])]
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise ProjectImagesError(f"{script} did not finish within {timeout:g} s") from err
    if result.returncode != 0:
        raise _script_failure(result, script)
    tags = result.stdout.split()
    wanted = [runtime_image_tag(), sleeve_emulator_image_tag()]
    if nitro:
        wanted.append(sleeve_nitro_image_tag())
    if tags != wanted:
        raise ProjectImagesError(f"{script} printed {tags}, expected the tags {wanted}")
    return ProjectImages(*wanted)


@dataclass(frozen=True)
class ProvidedImage:
    """A project tag made to name an image pulled from a registry."""

    tag: str
    reference: str
    image_id: str
    changed: bool


def provide_image(client: Any, reference: str, tag: str) -> ProvidedImage:
    """Pull ``reference`` and tag it ``tag``; changed when ``tag`` named another image before.

    It is pulled every time (a quick no-op when current), so a tag that moved in the registry is
    followed; pin a digest (``name@sha256:...``) to stay on one image.
    """
    errors = docker_module().errors
    try:
        before = client.images.get(tag).id
    except errors.ImageNotFound:
        before = None
    except (errors.DockerException, OSError) as err:
        raise DockerError(f"cannot look up the Docker image {tag!r}: {err}") from None
    image = pull_image(client, reference)
    if image.id != before:
        repository, _, version = tag.rpartition(":")
        try:
            image.tag(repository, version)
        except (errors.DockerException, OSError) as err:
            raise DockerError(f"cannot tag {reference} as {tag}: {err}") from None
    return ProvidedImage(tag, reference, image.id, image.id != before)


@dataclass(frozen=True)
class RuntimeWheel:
    """The enclave-runtime wheel of a checkout: ``path`` exists once built."""

    version: str
    digest: str
    path: Path
    built: bool


def checkout_version(source: Path) -> str:
    """The version a checkout's enclave_runtime/__init__.py declares."""
    init = source / "enclave_runtime" / "__init__.py"
    match = _VERSION_LINE.search(init.read_text()) if init.is_file() else None
    if match is None:
        raise ProjectImagesError(
            f"{source} is not an EnclaveOps checkout (no __version__ in {init}): point "
            "nitro_host_runtime_checkout at the repository root that holds pyproject.toml"
        )
    return match.group(1)


def _wheel_sources(source: Path, destination: Path) -> None:
    for name in WHEEL_INPUTS:
        if (source / name).is_dir():
            shutil.copytree(
                source / name, destination / name, ignore=shutil.ignore_patterns(*DIGEST_IGNORED)
            )
        else:
            shutil.copyfile(source / name, destination / name)


def _pip_wheel(source: Path, output: Path, python: str, timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="enclave-runtime-wheel-") as scratch:
        tree = Path(scratch) / "src"
        tree.mkdir()
        _wheel_sources(source, tree)
        command = [python, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(output), str(tree)]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise ProjectImagesError(f"pip wheel did not finish within {timeout:g} s") from err
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise ProjectImagesError(
            f"pip wheel of {source} failed with exit status {result.returncode}; it ends with:\n"
            f"{tail}\nIt needs setuptools>=77 from the package index (PIP_INDEX_URL for a mirror)."
        )


def runtime_wheel(
    source: Path,
    wheel_dir: Path,
    build: bool = True,
    python: str = sys.executable,
    timeout: float = WHEEL_TIMEOUT,
) -> RuntimeWheel:
    """The checkout's wheel in ``wheel_dir/<version>-<digest>/``, built when missing.

    Other builds in ``wheel_dir`` are removed once a new one is in place.
    """
    version = checkout_version(source)
    for name in WHEEL_INPUTS:
        if not (source / name).exists():
            raise ProjectImagesError(f"{source / name} is missing: {source} is no full checkout")
    digest = inputs_digest([source / name for name in WHEEL_INPUTS]).split(":")[1][:16]
    build_dir = wheel_dir / f"{version}-{digest}"
    wheel = build_dir / f"enclave_runtime-{version}-py3-none-any.whl"
    if wheel.is_file() or not build:
        return RuntimeWheel(version, digest, wheel, built=False)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=wheel_dir))
    try:
        _pip_wheel(source, staging, python, timeout)
        if not (staging / wheel.name).is_file():
            raise ProjectImagesError(
                f"pip wheel of {source} made {sorted(p.name for p in staging.iterdir())}, "
                f"not {wheel.name}"
            )
        shutil.rmtree(build_dir, ignore_errors=True)
        staging.rename(build_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for other in wheel_dir.iterdir():
        if other.is_dir() and other != build_dir and not other.name.startswith("."):
            shutil.rmtree(other, ignore_errors=True)
    return RuntimeWheel(version, digest, wheel, built=True)


TAGS = {
    "runtime": runtime_image_tag,
    "sleeve-emulator": sleeve_emulator_image_tag,
    "sleeve-nitro": sleeve_nitro_image_tag,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m enclave_runtime.build.project_images",
        description="helper of scripts/build-images.sh",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    context = commands.add_parser("runtime-context", help="prepare the runtime's build context")
    context.add_argument("directory", type=Path)
    digest = commands.add_parser("digest", help="print the digest of image inputs")
    digest.add_argument("paths", type=Path, nargs="+")
    digest.add_argument("--extra", action="append", default=[], help="a string input (image ID)")
    tag = commands.add_parser("tag", help="print an image's tag")
    tag.add_argument("image", choices=sorted(TAGS))
    wheel = commands.add_parser("runtime-wheel", help="build a checkout's wheel; print JSON")
    wheel.add_argument("source", type=Path, help="the checkout (the directory of pyproject.toml)")
    wheel.add_argument("wheel_dir", type=Path, help="where builds are kept")
    wheel.add_argument("--no-build", action="store_true", help="only say where it would be")
    provide = commands.add_parser("provide", help="pull REFERENCE as IMAGE's tag; print JSON")
    provide.add_argument("image", choices=sorted(TAGS))
    provide.add_argument("reference")
    args = parser.parse_args(argv)
    try:
        if args.command == "runtime-context":
            prepare_runtime_context(args.directory)
        elif args.command == "digest":
            print(inputs_digest(args.paths, args.extra))
        elif args.command == "runtime-wheel":
            built = runtime_wheel(args.source.resolve(), args.wheel_dir, not args.no_build)
            print(json.dumps({**built.__dict__, "path": str(built.path)}))
        elif args.command == "provide":
            provided = provide_image(docker_client(), args.reference, TAGS[args.image]())
            print(json.dumps(provided.__dict__))
        else:
            print(TAGS[args.image]())
    except EnclaveOpsError as err:
        print(f"project_images: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
