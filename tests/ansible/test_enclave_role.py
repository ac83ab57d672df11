"""The enclaveops.nitro.enclave role: deploy, prove, stay idempotent, and replace safely.

One module-scoped deployment of the hello example (its own tags, ports and emulator root, so it
runs beside other tests) through ansible-playbook on localhost with the emulator. Needs root and
Docker (CI has both); the input checks at the end need neither.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclave_runtime.build.project_images import ensure_project_images
from enclave_runtime.host.service_state import enclave_init_client, read_services
from tests.ansible.role_support import (
    EXAMPLE,
    VENV_BIN,
    build_app_image,
    output,
    play,
    recap,
    run,
    task_outcome,
    terminate_all,
    write_hello_manifest,
    write_playbook,
)
from tests.e2e.conftest import base_image  # noqa: F401 (the fixture: the local Debian base image)

NAME = "role-hello"
APP_IMAGE = "enclaveops-test/role-hello:latest"
RELEASE_IMAGE = "enclaveops-test/role-hello-release:latest"
AMENDED_IMAGE = "enclaveops-test/role-hello-release-amended:latest"  # the build's intermediate
# The same release image under another ID: a replacement that boots and answers but whose
# attestation is made to mismatch, so the role must roll back to the first one.
OTHER_RELEASE_IMAGE = "enclaveops-test/role-hello-release:other"
TEST_LABEL = "org.enclaveops.test=enclave-role"
WRONG_PCR = "00" * 48


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Deployment:
    work: Path
    root: Path
    playbook: Path
    manifest: Path
    ports: dict[int, int]

    def play(self, *options: str, **variables: Any) -> subprocess.CompletedProcess[str]:
        return play(self.playbook, self.work, *options, **variables)

    def good(self, **overrides: Any) -> dict[str, Any]:
        return {
            "enclave_manifest": str(self.manifest),
            "enclave_published_ports": [f"{host}:{port}" for port, host in self.ports.items()],
            "enclave_services": [{"name": "heartbeat", "state": "stopped"}],
            "enclave_state_dir": str(self.work / "state"),
            **overrides,
        }

    def get(self, path: str = "/") -> bytes:
        url = f"http://127.0.0.1:{self.ports[8080]}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()

    def container_image(self) -> str:
        result = run(["docker", "container", "inspect", "--format", "{{.Image}}", NAME])
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def container_id(self) -> str:
        result = run(["docker", "container", "inspect", "--format", "{{.Id}}", NAME])
        return result.stdout.strip()


def _answers(deployment: Deployment, timeout: float = 30) -> bytes:
    """The app's answer; the app may still be coming back after a restore."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return deployment.get()
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def deployment(base_image: str) -> Iterator[Deployment]:  # noqa: F811
    ensure_project_images(base_image=base_image)
    work = Path(tempfile.mkdtemp(prefix="erole", dir="/tmp"))  # short: Unix socket paths
    root = work / "emu"
    build_app_image(base_image, APP_IMAGE, TEST_LABEL)
    manifest_path = write_hello_manifest(work / "enclaver.yaml", NAME, APP_IMAGE, RELEASE_IMAGE)
    playbook = write_playbook(work, root)
    yield Deployment(work, root, playbook, manifest_path, {8080: _free_port(), 9101: _free_port()})
    run(["docker", "rm", "-f", NAME])
    terminate_all(root)
    run(["docker", "rmi", "-f", OTHER_RELEASE_IMAGE, RELEASE_IMAGE, AMENDED_IMAGE, APP_IMAGE])
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.root
@pytest.mark.docker
@pytest.mark.slow
def test_deploy_verify_idempotence_and_safe_replacement(deployment: Deployment) -> None:
    # 1. A first deployment: built, running, answering, attested, services applied.
    first = deployment.play(**deployment.good())
    assert first.returncode == 0, output(first)
    assert deployment.get() == b"hello from the enclave\n"
    deployed = json.loads((deployment.work / "deployment.json").read_text())
    assert deployed["verified_pcrs"]["0"] == deployed["measurements"]["PCR0"]
    client = enclave_init_client(int(deployed["enclave_cid"]), emulator_root=str(deployment.root))
    heartbeat = {info.name: info for info in read_services(client)}["heartbeat"]
    assert heartbeat.state.value == "inactive"
    image, container = deployment.container_image(), deployment.container_id()
    policy = run(
        ["docker", "container", "inspect", "--format", "{{.HostConfig.RestartPolicy.Name}}", NAME]
    )
    assert policy.stdout.strip() == "unless-stopped", "the sleeve must come back after a reboot"
    # The build read the manifest's copy in the work directory on the target, and its inputs
    # digest does not depend on that path: the CLI finds the same build from the original.
    copied = deployment.work / "state" / NAME / "enclaver.yaml"
    assert copied.read_bytes() == deployment.manifest.read_bytes()
    rebuilt = run(
        [str(VENV_BIN / "enclaveops"), "build", "-f", str(deployment.manifest), "--json"],
        env=dict(os.environ, NITRO_EMU_ROOT=str(deployment.root)),
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["Skipped"] is True, rebuilt.stdout

    # 2. The same again changes nothing, and check mode predicts no change.
    again = deployment.play(**deployment.good())
    assert again.returncode == 0, output(again)
    assert recap(again)["changed"] == 0, output(again)
    assert deployment.container_id() == container
    checked = deployment.play("--check", "--diff", **deployment.good())
    assert checked.returncode == 0, output(checked)
    assert recap(checked)["changed"] == 0, output(checked)

    # 3. Check mode previews a service change on the enclave of the unchanged container...
    started = [{"name": "heartbeat", "state": "started"}]
    preview = deployment.play("--check", "--diff", **deployment.good(enclave_services=started))
    assert preview.returncode == 0, output(preview)
    assert task_outcome(preview, "Bring each in-enclave service to its desired state") == "changed"
    assert {info.name: info for info in read_services(client)}["heartbeat"].state.value == (
        "inactive"
    )

    # ... and a manifest change as the replacement of the running container, making neither.
    manifest = yaml.safe_load(deployment.manifest.read_text())
    manifest["egress"]["allow"].append("example.org")
    changed_manifest = deployment.work / "changed" / "enclaver.yaml"
    changed_manifest.parent.mkdir()
    changed_manifest.write_text(yaml.safe_dump(manifest))
    preview = deployment.play(
        "--check", "--diff", **deployment.good(enclave_manifest=str(changed_manifest))
    )
    assert preview.returncode == 0, output(preview)
    predicted = "Predict the replacement by the rebuilt release image"
    assert task_outcome(preview, predicted) == "changed", output(preview)
    assert f"sleeve {NAME}: would replace the container running {image}" in " ".join(
        preview.stdout.split()
    ), output(preview)
    assert copied.read_bytes() == deployment.manifest.read_bytes()
    assert deployment.container_id() == container

    # 4. A replacement that boots and answers but does not attest: rolled back.
    tagged = run(
        ["docker", "build", "-q", "--label", TEST_LABEL, "-t", OTHER_RELEASE_IMAGE, "-"],
        input=f"FROM {RELEASE_IMAGE}\nLABEL org.enclaveops.test.variant=other\n",
    )
    assert tagged.returncode == 0, tagged.stderr
    bad = deployment.play(
        **deployment.good(
            enclave_manifest="",
            enclave_release_image=OTHER_RELEASE_IMAGE,
            enclave_name=NAME,
            enclave_ingress_port=8080,
            enclave_aux_api_port=9101,
            enclave_expected_pcrs={"0": WRONG_PCR},
        )
    )
    assert bad.returncode != 0
    failure = " ".join(bad.stdout.split())
    assert (
        "deployment failed at Verify attestation against the PCRs the build measured: "
        f"attestation failed: pcr 0: expected {WRONG_PCR}"
    ) in failure, output(bad)
    assert f"previous deployment restored (image {image})" in failure, output(bad)
    assert deployment.container_image() == image
    assert _answers(deployment) == b"hello from the enclave\n"


def _input_check(tmp_path: Path, variables: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "check.yml"
    playbook.write_text(
        "- name: Check the inputs\n  hosts: localhost\n  gather_facts: false\n"
        "  roles:\n    - role: enclaveops.nitro.enclave\n"
    )
    return play(playbook, tmp_path, timeout=120, **variables)


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"enclave_manifest": "/srv/a/enclaver.yaml", "enclave_eif": "/srv/a.eif"},
            "give exactly one of enclave_manifest (an enclaver.yaml to build)",
        ),
        (
            {"enclave_manifest": "/srv/nowhere/enclaver.yaml"},
            "enclave_manifest: /srv/nowhere/enclaver.yaml is not a file on the controller",
        ),
        (
            {
                "enclave_release_image": "registry.example/app-release:1",
                "enclave_expected_pcrs": {"0": WRONG_PCR},
                "enclave_deploy_mode": "bare",
            },
            "a bare enclave runs an EIF, not a release image: give enclave_eif",
        ),
        (
            {"enclave_release_image": "registry.example/app-release:1"},
            "a prebuilt release image carries no build record here: give enclave_expected_pcrs",
        ),
        (
            {"enclave_eif": "/srv/app.eif"},
            "an EIF runs as a bare enclave: set enclave_deploy_mode: bare",
        ),
        (
            {"enclave_eif": "/srv/app.eif", "enclave_deploy_mode": "bare", "enclave_name": "app"},
            "a bare enclave needs enclave_cpu_count and enclave_memory_mib",
        ),
    ],
)
def test_inputs_that_cannot_deploy_fail_first_with_what_to_give(
    tmp_path: Path, variables: dict[str, Any], message: str
) -> None:
    result = _input_check(tmp_path, variables)
    assert result.returncode != 0
    assert message in " ".join(result.stdout.split()), output(result)


def test_a_signing_key_on_the_controller_is_refused_and_never_copied(tmp_path: Path) -> None:
    source = tmp_path / "app"
    source.mkdir()
    manifest = yaml.safe_load((EXAMPLE / "enclaver.yaml").read_text())
    manifest["signature"] = {"certificate": "cert.pem", "key": "key.pem"}
    (source / "enclaver.yaml").write_text(yaml.safe_dump(manifest))
    (source / "cert.pem").write_text("certificate\n")
    (source / "key.pem").write_text("PRIVATE KEY\n")
    state = tmp_path / "state"

    result = _input_check(
        tmp_path,
        {"enclave_manifest": str(source / "enclaver.yaml"), "enclave_state_dir": str(state)},
    )

    assert result.returncode != 0
    failure = " ".join(result.stdout.split())
    assert (
        f"signature.key in {source / 'enclaver.yaml'} (key.pem) is a private key on the "
        "controller, and the role does not copy signing keys to parents"
    ) in failure, output(result)
    copies = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_text() == "PRIVATE KEY\n"]
    assert copies == [source / "key.pem"]
