"""Native EIF build time, phase by phase, against reading the same bytes (``cat > /dev/null``).

Two images: examples/hello amended with the project's runtime (what ``enclaveops build`` feeds
the builder), and a ~300 MB one (the Debian base plus 180 MB of files). For each, best of 3:

- export: ``docker export`` of the image, indexed and staged in the spool (``FlatRootfs.read``),
  against ``cat`` of that export tar;
- ramdisk: the customer ramdisk written from the spool (``customer_ramdisk``), against ``cat`` of
  the ramdisk;
- EIF+PCR: the EIF written and measured from the ramdisks (``build_eif``), against ``cat`` of the
  EIF.

The ratio is phase time / cat time (1.0: as fast as reading the bytes once). Needs root and
Docker; the images it makes are labelled and removed. ``--quick`` (CI's smoke run) times each
phase once and makes the large image ~126 MB.

    .venv/bin/python bench/build.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from enclave_runtime.build.docker_rootfs import FlatRootfs, export_rootfs, image_config
from enclave_runtime.build.eif_builder import bootstrap_ramdisk, customer_ramdisk, find_blobs
from enclave_runtime.build.image_layers import LayerBuilder, append_layer, container_config
from enclave_runtime.build.pipeline import amend, amended_reference
from enclave_runtime.build.project_images import ensure_project_images
from enclave_runtime.formats.eif import build_eif
from enclave_runtime.host.docker_engine import docker_client, get_image

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "enclaveops/debian-base:bookworm"
HELLO_APP = "enclaveops-bench/build-hello:latest"
HELLO_RELEASE = "enclaveops-bench/build-hello-release:latest"  # the amended image's label only
LARGE_IMAGE = "enclaveops-bench/build-300mb:latest"
LABEL = "org.enclaveops.bench=build"
LARGE_FILE_MB = 3
MB = 1 << 20


@dataclass(frozen=True)
class Scale:
    """How much work: ``rounds`` timings of each phase (the best counts), ``large_files`` files
    of LARGE_FILE_MB in the large image."""

    rounds: int
    large_files: int


FULL = Scale(rounds=3, large_files=60)
QUICK = Scale(rounds=1, large_files=2)  # CI's smoke run: every line, no meaningful timing


def best(action: Callable[[], object], rounds: int) -> float:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return min(timings)


def cat_seconds(path: Path, rounds: int) -> float:
    return best(
        lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True), rounds
    )


def hello_image(client, work: Path) -> str:
    """examples/hello built on the local base and amended with the project's runtime."""
    images = ensure_project_images(base_image=BASE_IMAGE)
    subprocess.run(
        [
            "docker",
            "build",
            "-q",
            "--label",
            LABEL,
            "-t",
            HELLO_APP,
            str(REPO / "examples" / "hello"),
        ],
        check=True,
        capture_output=True,
    )
    sources = {
        "app": (HELLO_APP, get_image(client, HELLO_APP)),
        "odyn": (images.runtime, get_image(client, images.runtime)),
    }
    manifest = (REPO / "examples" / "hello" / "enclaver.yaml").read_bytes()
    amended = amend(
        client, sources, manifest, amended_reference(HELLO_APP), work, target=HELLO_RELEASE
    )
    return amended.reference


def large_image(client, work: Path, files_count: int) -> str:
    """The base image plus ``files_count`` random files, appended as one layer."""
    files = work / "large"
    files.mkdir()
    with LayerBuilder(spool_dir=work) as layer:
        for index in range(files_count):
            path = files / f"blob{index:03d}"
            path.write_bytes(os.urandom(LARGE_FILE_MB * MB))
            layer.add_path(f"data/blob{index:03d}", path)
        base = get_image(client, BASE_IMAGE)
        config = {**container_config(base.attrs), "Cmd": ["sleep", "infinity"]}
        config["Labels"] = {"org.enclaveops.bench": "build"}
        append_layer(client, base, layer, config, reference=LARGE_IMAGE, created_by="bench")
    shutil.rmtree(files)
    return LARGE_IMAGE


def phases(client, reference: str, work: Path, rounds: int) -> list[tuple[str, int, float, float]]:
    """(phase, bytes, seconds, cat seconds) for export, ramdisk and EIF+PCR."""
    image = get_image(client, reference)
    config = image_config(image)
    blobs = find_blobs(None, config.eif_arch)
    export_tar, ramdisk, eif = work / "export.tar", work / "ramdisk.cpio", work / "app.eif"

    def export() -> None:
        with export_rootfs(client, image) as tar, FlatRootfs.read(tar, spool_dir=work):
            pass

    def write_ramdisk() -> None:
        with export_rootfs(client, image) as tar, FlatRootfs.read(tar, spool_dir=work) as root:
            started = time.perf_counter()
            with ramdisk.open("wb") as out:
                customer_ramdisk(root, config, out)
            ramdisk_times.append(time.perf_counter() - started)

    def write_eif() -> None:
        build_eif(blobs.kernel, blobs.read_cmdline(), [bootstrap_ramdisk(blobs), ramdisk], eif)

    with export_rootfs(client, image) as tar, export_tar.open("wb") as out:
        shutil.copyfileobj(tar, out, MB)
    ramdisk_times: list[float] = []
    export_seconds = best(export, rounds)
    best(write_ramdisk, rounds)
    eif_seconds = best(write_eif, rounds)
    rows = [
        ("export", export_tar.stat().st_size, export_seconds, cat_seconds(export_tar, rounds)),
        ("ramdisk", ramdisk.stat().st_size, min(ramdisk_times), cat_seconds(ramdisk, rounds)),
        ("EIF+PCR", eif.stat().st_size, eif_seconds, cat_seconds(eif, rounds)),
    ]
    for path in (export_tar, ramdisk, eif):
        path.unlink()
    return rows


def report(name: str, rows: list[tuple[str, int, float, float]], rounds: int) -> None:
    total = sum(row[2] for row in rows)
    print(f"{name}: native build {total:.2f} s (sum of phases, best of {rounds} each)")
    for phase, size, seconds, cat in rows:
        print(
            f"  {phase:<8} {size / MB:7.0f} MB  {seconds:6.2f} s  cat {cat:6.3f} s  "
            f"ratio {seconds / cat:6.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, a small large image")
    scale = QUICK if parser.parse_args().quick else FULL
    if os.geteuid() != 0:
        print("bench/build.py needs root (Docker, the base image)", file=sys.stderr)
        return 1
    subprocess.run([str(REPO / "scripts" / "build-base-image.sh"), BASE_IMAGE], check=True)
    client = docker_client()
    made = [HELLO_APP, amended_reference(HELLO_APP), LARGE_IMAGE]
    try:
        with tempfile.TemporaryDirectory(prefix="build-bench-", dir="/var/tmp") as work_text:
            work = Path(work_text)
            hello = hello_image(client, work)
            report(
                "examples/hello (amended)", phases(client, hello, work, scale.rounds), scale.rounds
            )
            large = large_image(client, work, scale.large_files)
            size = f"~{120 + scale.large_files * LARGE_FILE_MB} MB image"
            report(size, phases(client, large, work, scale.rounds), scale.rounds)
    finally:
        subprocess.run(["docker", "rmi", "-f", *made], capture_output=True, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
