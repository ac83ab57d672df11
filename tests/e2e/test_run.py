"""`enclaveops run --emulator` on examples/hello built by `enclaveops build`: the release image
runs as a container, its enclave serves the app on the host port, attests with the PCRs the build
printed, is seen by host tools, and Ctrl-C stops and removes it. Needs root and Docker; CI has
both.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclave_runtime.build.pipeline import amended_reference
from enclave_runtime.build.project_images import ProjectImages, ensure_project_images
from enclave_runtime.formats.attestation import load_root_certificate, verify_attestation_document
from enclave_runtime.formats.pcr import Measurements
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

BIN = Path(sys.executable).parent
HELLO = REPO_ROOT / "examples" / "hello"
LABEL = "org.enclaveops.test=run"
APP_IMAGE = "enclaveops-test/run-hello:latest"
RELEASE_IMAGE = "enclaveops-test/run-hello-release:latest"
DOCKER_BUILD = ("docker", "build", "-q", "--label", LABEL)
CONTAINER_PREFIX = "enclaveops-test-run-"
RUNNING = re.compile(r"enclaveops: enclave running: ID=(\S+) CID=(\d+) container=(\S+) ports=(.+)$")


@dataclass
class Release:
    manifest: Path
    measurements: Measurements
    root: Path
    env: dict[str, str]


def _hello_manifest(directory: Path, images: ProjectImages) -> Path:
    manifest = yaml.safe_load((HELLO / "enclaver.yaml").read_text())
    manifest["target"] = RELEASE_IMAGE
    manifest["sources"] = {
        "app": APP_IMAGE,
        "odyn": images.runtime,
        "sleeve": images.sleeve_emulator,
    }
    path = directory / "enclaver.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def _build_release(work: Path, base_image: str, env: dict[str, str]) -> Release:
    """examples/hello through `enclaveops build`, as an operator builds it."""
    images = ensure_project_images(base_image=base_image)
    subprocess.run(
        [*DOCKER_BUILD, "--build-arg", f"BASE_IMAGE={base_image}", "-t", APP_IMAGE, str(HELLO)],
        check=True,
        capture_output=True,
    )
    manifest = _hello_manifest(work, images)
    built = subprocess.run(
        [str(BIN / "enclaveops"), "build", "-f", str(manifest), "--builder", "native", "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    measurements = Measurements.from_nitro_cli(json.loads(built.stdout)["Measurements"])
    return Release(manifest, measurements, Path(env["NITRO_EMU_ROOT"]), env)


@pytest.fixture(scope="module")
def release(base_image: str) -> Iterator[Release]:
    work = Path(tempfile.mkdtemp(prefix="run", dir="/tmp"))  # short: Unix socket paths
    allocator = work / "allocator.yaml"
    allocator.write_text("---\nmemory_mib: 2048\ncpu_count: 2\n")
    env = dict(os.environ, NITRO_EMU_ROOT=str(work / "emu"), NITRO_EMU_ALLOCATOR=str(allocator))
    try:
        yield _build_release(work, base_image, env)
    finally:
        subprocess.run(
            [str(BIN / "nitro-emu"), "terminate-enclave", "--all"],
            env=env,
            capture_output=True,
            check=False,
        )
        containers = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"name={CONTAINER_PREFIX}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        if containers:
            subprocess.run(["docker", "rm", "-f", *containers], capture_output=True, check=False)
        images = (RELEASE_IMAGE, amended_reference(RELEASE_IMAGE), APP_IMAGE)
        subprocess.run(["docker", "rmi", "-f", *images], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Run:
    process: subprocess.Popen[str]
    enclave_id: str
    cid: int
    container: str
    ports: dict[int, int]
    lines: list[str] = field(default_factory=list)

    def url(self, port: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(8080, path), timeout=30) as response:
            return json.loads(response.read())


def _start(release: Release, name: str) -> Run:
    command = [str(BIN / "enclaveops"), "run", "--emulator", "-f", str(release.manifest)]
    command += ["-p", "127.0.0.1:0:8080", "-p", "127.0.0.1:0:9101", "--name", name]
    process = subprocess.Popen(
        command, env=release.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    lines: list[str] = []
    for line in process.stderr:
        lines.append(line.rstrip("\n"))
        found = RUNNING.search(line)
        if found:
            break
    else:
        raise AssertionError("enclaveops run never said the enclave runs:\n" + "\n".join(lines))
    ports = {}
    for mapping in found[4].split(", "):
        host, _, container_port = mapping.partition("->")
        ports[int(container_port)] = int(host.rpartition(":")[2])
    run = Run(process, found[1], int(found[2]), found[3], ports, lines)
    threading.Thread(target=lambda: run.lines.extend(process.stderr), daemon=True).start()
    return run


def _answered(run: Run, path: str) -> bytes:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(run.url(8080, path), timeout=30) as response:
                return response.read()
        except (OSError, urllib.error.URLError):
            assert time.monotonic() < deadline, "\n".join(run.lines)
            time.sleep(0.3)


def _described(release: Release) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(BIN / "nitro-emu"), "describe-enclaves"],
        env=release.env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout)


def _container_exists(name: str) -> bool:
    found = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"name=^{name}$"],
        capture_output=True,
        text=True,
        check=False,
    )
    return bool(found.stdout.strip())


@pytest.fixture(scope="module")
def running(release: Release) -> Iterator[Run]:
    run = _start(release, f"{CONTAINER_PREFIX}{os.getpid()}")
    yield run
    if run.process.poll() is None:
        run.process.send_signal(signal.SIGINT)
        run.process.wait(90)


def test_the_app_answers_on_the_published_host_port(running: Run) -> None:
    assert _answered(running, "/") == b"hello from the enclave\n"


def test_the_second_init_service_beats(running: Run) -> None:
    _answered(running, "/")
    deadline = time.monotonic() + 30
    while True:
        try:
            if running.get_json("/heartbeat")["beats"] >= 2:
                break
        except urllib.error.HTTPError as err:
            assert err.code == 503  # before the first beat
        assert time.monotonic() < deadline, "\n".join(running.lines)
        time.sleep(0.5)


def test_egress_to_a_name_the_manifest_does_not_allow_is_403(running: Run) -> None:
    _answered(running, "/")
    fetched = running.get_json("/fetch?url=http://denied.invalid/")
    assert fetched["status"] == 403


def test_attestation_from_the_aux_api_verifies_with_the_built_pcrs(
    running: Run, release: Release
) -> None:
    _answered(running, "/")
    nonce = os.urandom(32)
    request = urllib.request.Request(
        running.url(9101, "/v1/attestation"),
        data=json.dumps({"nonce": base64.b64encode(nonce).decode()}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        document = response.read()
    root = load_root_certificate((release.root / "ca" / "root.pem").read_bytes())
    verified = verify_attestation_document(
        document,
        root=root,
        expected_pcrs=release.measurements.as_pcrs(),
        expected_nonce=nonce,
    )
    assert verified.document.nonce == nonce


def test_host_tools_see_the_enclave_the_container_started(running: Run, release: Release) -> None:
    (enclave,) = [item for item in _described(release) if item["EnclaveID"] == running.enclave_id]
    assert (enclave["EnclaveCID"], enclave["State"]) == (running.cid, "RUNNING")


def test_ctrl_c_stops_and_removes_the_container_and_the_enclave(
    running: Run, release: Release
) -> None:
    running.process.send_signal(signal.SIGINT)
    assert running.process.wait(90) == 109  # the sleeve's exit status after a stop
    assert not _container_exists(running.container)
    assert all(item["EnclaveID"] != running.enclave_id for item in _described(release))


# --- the enclaveops.nitro.sleeve module on the same release image ---


def _sleeve_module(release: Release, *flags: str, **options: Any) -> dict[str, Any]:
    """One task of enclaveops.nitro.sleeve in a playbook on localhost; its registered result."""
    arguments = {
        "nitro_cli_path": str(BIN / "nitro-emu"),
        "emulator_root": str(release.root),
        "emulator_allocator": release.env["NITRO_EMU_ALLOCATOR"],
        **options,
    }
    result_file = release.root.parent / "module-result.json"
    play = {
        "hosts": "localhost",
        "gather_facts": False,
        "tasks": [
            {"enclaveops.nitro.sleeve": arguments, "register": "outcome", "ignore_errors": True},
            {
                "ansible.builtin.copy": {
                    "content": "{{ outcome | to_json }}",
                    "dest": str(result_file),
                },
                "check_mode": False,  # the result is written in check mode too
            },
        ],
    }
    playbook = release.root.parent / "sleeve-module.yml"
    playbook.write_text(yaml.safe_dump([play]))
    completed = subprocess.run(
        [str(BIN / "ansible-playbook"), *flags, str(playbook)],
        cwd=REPO_ROOT,  # its ansible.cfg: the collection and the local inventory
        env=release.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(result_file.read_text())


def test_the_sleeve_module_starts_waits_keeps_and_removes(release: Release) -> None:
    name = f"{CONTAINER_PREFIX}module-{os.getpid()}"
    wanted = {"name": name, "image": RELEASE_IMAGE, "published_ports": ["127.0.0.1:0:8080"]}
    first = _sleeve_module(release, **wanted)
    try:
        assert first["changed"] is True, first.get("msg")
        assert first["enclave"]["State"] == "RUNNING"
        described = {item["EnclaveID"]: item for item in _described(release)}
        assert (
            described[first["enclave"]["EnclaveID"]]["EnclaveCID"] == first["enclave"]["EnclaveCID"]
        )

        again = _sleeve_module(release, **wanted)
        assert again["changed"] is False, again["reason"]
        assert again["enclave"] == first["enclave"]

        predicted = _sleeve_module(release, "--check", **wanted, debug_mode=True)
        assert (predicted["changed"], predicted["reason"]) == (True, "its configuration differs")
    finally:
        removed = _sleeve_module(release, name=name, state="absent")
    assert removed["changed"] is True
    assert not _container_exists(name)
    assert all(item["EnclaveID"] != first["enclave"]["EnclaveID"] for item in _described(release))
