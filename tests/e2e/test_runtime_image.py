"""The project's images: the self-contained runtime in images without Python (or without libc and
a shell at all), its isolation from the image's PYTHON* variables, its reproducibility, and the
sleeve-emulator container running an enclave that host tools see. Needs root and Docker.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.build.project_images import (
    RUNTIME_PREFIX,
    ProjectImages,
    ensure_project_images,
    prepare_runtime_context,
    runtime_command,
)
from enclave_runtime.host.emulator_container import emulator_docker_run_args

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

NITRO_EMU = str(Path(sys.executable).parent / "nitro-emu")
APP_IMAGE = "enclaveops-test/runtime-no-python:latest"
REBUILT_RUNTIME = "enclaveops-test/runtime-rebuilt:build"
TEST_LABEL = "org.enclaveops.purpose=test"
APP_DOCKERFILE = f"""\
ARG BASE_IMAGE
ARG RUNTIME_IMAGE
FROM ${{RUNTIME_IMAGE}} AS runtime
FROM ${{BASE_IMAGE}}
RUN rm -rf /usr/bin/python3* /usr/lib/python3* /usr/local/lib/python3*
COPY trap/ /trap/
COPY --from=runtime /opt/ /opt/
COPY enclaver.yaml /etc/enclaver/enclaver.yaml
ENV PYTHONPATH=/trap PYTHONHOME=/trap
LABEL {TEST_LABEL}
CMD ["{RUNTIME_PREFIX}/bin/odyn", "--config-dir", "/etc/enclaver", "--", "/bin/sleep", "infinity"]
"""
MANIFEST = """\
version: v1
name: no-python
target: enclaveops-test/runtime-no-python-release:latest
sources:
  app: enclaveops-test/runtime-no-python:latest
defaults:
  cpu_count: 1
  memory_mb: 1024
"""
# Imported instead of the runtime's own modules if PYTHONPATH leaked into the runtime.
TRAP = 'raise SystemExit("the runtime imported a module from the image\'s PYTHONPATH")\n'


def _docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _built(*args: str) -> None:
    result = _docker("build", "-q", *args, timeout=900)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def images(base_image: str) -> ProjectImages:
    return ensure_project_images(base_image=base_image)


@pytest.fixture(scope="module")
def app_image(images: ProjectImages, base_image: str) -> Iterator[str]:
    """A Debian image with Python removed, the runtime added and a PYTHONPATH trap set."""
    context = Path(tempfile.mkdtemp(prefix="rtapp"))
    (context / "Dockerfile").write_text(APP_DOCKERFILE)
    (context / "enclaver.yaml").write_text(MANIFEST)
    (context / "trap").mkdir()
    for module in ("cbor2", "yaml", "encodings", "enclave_runtime"):
        (context / "trap" / f"{module}.py").write_text(TRAP)
    _built(
        "--build-arg",
        f"BASE_IMAGE={base_image}",
        "--build-arg",
        f"RUNTIME_IMAGE={images.runtime}",
        "-t",
        APP_IMAGE,
        str(context),
    )
    yield APP_IMAGE
    _docker("rmi", "-f", APP_IMAGE)
    shutil.rmtree(context, ignore_errors=True)


def _run(image: str, *command: str) -> subprocess.CompletedProcess[str]:
    return _docker("run", "--rm", "--entrypoint", command[0], image, *command[1:])


@pytest.mark.parametrize("command", ["odyn", "nitro-emu", "sleeve", "initctl", "enclaveops"])
def test_every_command_runs_in_an_image_without_python(app_image: str, command: str) -> None:
    assert _run(app_image, "/bin/ls", "/usr/bin/python3").returncode != 0  # really none
    result = _run(app_image, runtime_command(command), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {command}")


def test_the_compiled_dependencies_load_from_the_runtime(app_image: str) -> None:
    probe = (
        "import cbor2, jsonschema, yaml, ssl\n"
        "from cryptography.hazmat.primitives.asymmetric import ec\n"
        "key = ec.generate_private_key(ec.SECP384R1())\n"
        "print(cbor2.loads(cbor2.dumps({'k': [1, 2]})), yaml.safe_load('a: 1'),"
        " ssl.OPENSSL_VERSION)"
    )
    result = _run(app_image, runtime_command("python3"), "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("{'k': [1, 2]} {'a': 1} OpenSSL")


def test_the_runtime_needs_no_libc_and_no_shell_of_the_image(images: ProjectImages) -> None:
    # The runtime image is FROM scratch: /opt/enclave-runtime is all there is.
    assert _run(images.runtime, "/bin/sh", "-c", "true").returncode != 0
    odyn = _run(images.runtime, runtime_command("odyn"), "--help")
    assert odyn.returncode == 0, odyn.stderr
    listing = _run(
        images.runtime, runtime_command("python3"), "-c", "import os; print(os.listdir('/opt'))"
    )
    assert listing.stdout.strip() == "['enclave-runtime']"


def test_the_images_pythonpath_and_pythonhome_are_ignored(app_image: str) -> None:
    probe = (
        "import os, sys, cbor2, yaml\n"
        "print(os.environ['PYTHONPATH'], os.environ['PYTHONHOME'])\n"
        "print(cbor2.__file__)\n"
        "print(':'.join(sys.path))"
    )
    result = _run(app_image, runtime_command("python3"), "-c", probe)
    assert result.returncode == 0, result.stderr
    environment, cbor2_file, path = result.stdout.splitlines()
    assert environment == "/trap /trap"  # set in the image, and still there for the app
    assert cbor2_file.startswith(f"{RUNTIME_PREFIX}/lib/python3.11/site-packages/cbor2/")
    assert all(entry.startswith(RUNTIME_PREFIX) for entry in path.split(":"))


def _tree_digest(image: str) -> tuple[str, tarfile.TarFile]:
    """A digest of /opt/enclave-runtime as a tar stream: names, modes, owners, times, bytes."""
    container = _docker("create", image).stdout.strip()
    try:
        stream = subprocess.run(
            ["docker", "cp", f"{container}:{RUNTIME_PREFIX}", "-"],
            capture_output=True,
            check=True,
            timeout=300,
        ).stdout
    finally:
        _docker("rm", container)
    return hashlib.sha256(stream).hexdigest(), tarfile.open(fileobj=io.BytesIO(stream))


def _build_stages() -> list[str]:
    return _docker(
        "images", "-q", "-f", "dangling=true", "-f", "label=org.enclaveops.purpose=runtime-build"
    ).stdout.split()


@pytest.fixture
def two_runtime_builds(base_image: str) -> Iterator[tuple[str, str]]:
    """The runtime image built twice from one context: as usual, then without any build cache."""
    context = Path(tempfile.mkdtemp(prefix="rtctx", dir="/var/tmp"))
    prepare_runtime_context(context)  # one snapshot: the tree may change while the test runs
    stages_before = set(_build_stages())
    tags = (f"{REBUILT_RUNTIME}-a", f"{REBUILT_RUNTIME}-b")
    for tag, options in zip(tags, ([], ["--no-cache"])):
        _built(*options, "--build-arg", f"BASE_IMAGE={base_image}", "-t", tag, str(context))
    yield tags
    _docker("rmi", "-f", *tags)
    leftovers = set(_build_stages()) - stages_before  # the untagged build stages of these builds
    if leftovers:
        _docker("rmi", *leftovers)
    shutil.rmtree(context, ignore_errors=True)


def test_two_builds_give_the_same_runtime_bytes(two_runtime_builds: tuple[str, str]) -> None:
    first, second = two_runtime_builds
    digest, tree = _tree_digest(first)
    assert _tree_digest(second)[0] == digest
    members = tree.getmembers()
    assert {member.mtime for member in members} == {0}
    flags = set()
    for member in members:
        if member.name.endswith(".pyc"):
            pyc = tree.extractfile(member)
            assert pyc is not None
            flags.add(pyc.read(8)[4:8])
    assert flags == {b"\x01\x00\x00\x00"}  # all hash-based, unchecked: times never matter


@dataclass
class Emulator:
    root: Path
    allocator: Path

    def describe(self) -> list[dict[str, Any]]:
        result = subprocess.run(
            [NITRO_EMU, "describe-enclaves", "--root", str(self.root)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(result.stdout)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    root = Path(tempfile.mkdtemp(prefix="rti", dir="/tmp"))  # short: Unix socket paths
    allocator = root / "allocator.yaml"
    allocator.write_text("---\nmemory_mib: 2048\ncpu_count: 2\n")
    yield Emulator(root, allocator)
    subprocess.run(
        [NITRO_EMU, "terminate-enclave", "--all", "--root", str(root)],
        capture_output=True,
        check=False,
    )
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sleeve_container() -> Iterator[str]:
    name = f"enclaveops-test-sleeve-{int(time.time() * 1000)}"
    yield name
    _docker("rm", "-f", name)


def _output(container: str) -> str:
    logs = _docker("logs", container)
    return logs.stdout + logs.stderr


def _wait_for_log(container: str, pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + 120
    while True:
        output = _output(container)
        found = re.search(pattern, output)
        if found:
            return found
        running = _docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        assert running == "true" and time.monotonic() < deadline, output
        time.sleep(0.5)


def test_the_sleeve_emulator_container_runs_an_enclave_the_host_sees(
    images: ProjectImages, app_image: str, emulator: Emulator, sleeve_container: str
) -> None:
    eif = emulator.root / "app.eif"
    subprocess.run(
        [NITRO_EMU, "build-enclave", "--docker-uri", app_image, "--output-file", str(eif)],
        capture_output=True,
        check=True,
        timeout=600,
    )
    (emulator.root / "enclaver.yaml").write_text(MANIFEST)
    started = _docker(
        "run",
        "-d",
        "--name",
        sleeve_container,
        "--label",
        TEST_LABEL,
        *emulator_docker_run_args(emulator.root, emulator.allocator),
        images.sleeve_emulator,
        "--eif-file",
        str(eif),
        "--manifest-file",
        str(emulator.root / "enclaver.yaml"),
    )
    assert started.returncode == 0, started.stderr
    started_line = _wait_for_log(sleeve_container, r"started enclave ID=(\S+), CID=(\d+)")
    (enclave,) = emulator.describe()  # the host sees the enclave the container started
    assert (enclave["EnclaveID"], enclave["EnclaveCID"], enclave["State"]) == (
        started_line.group(1),
        int(started_line.group(2)),
        "RUNNING",
    )
    _wait_for_log(sleeve_container, "starting the application")  # odyn, from the runtime
    assert _docker("stop", "-t", "60", sleeve_container).returncode == 0
    exit_code = _docker("inspect", "-f", "{{.State.ExitCode}}", sleeve_container).stdout.strip()
    assert exit_code == "109"  # the sleeve's code for "interrupted, enclave terminated"
    assert emulator.describe() == []
