"""The enclaveops.nitro.enclave role's bare path: an EIF run directly, proved over the fabric.

A bare enclave has no published ports, so everything the test checks goes over the emulated
fabric of a private emulator root: the role attests by CID and the aux API's port, the test asks
the app for its answer and for its own attestation document the same way. One module-scoped
deployment of the hello example (its own tags, enclave name and emulator root, so it runs beside
other tests) through ansible-playbook on localhost. Needs root and Docker (CI has both).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.build.project_images import ensure_project_images
from enclave_runtime.host.attestation_client import (
    AttestationSource,
    attest,
    load_root,
    parse_expected_pcrs,
)
from enclave_runtime.host.service_state import enclave_init_client, read_services
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.ansible.role_support import (
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

NAME = "rbare-hello"
APP_IMAGE = "enclaveops-test/rbare-hello:latest"
RELEASE_IMAGE = "enclaveops-test/rbare-hello-release:latest"
# A second build of the same app with another manifest (another target): another EIF, other PCRs.
OTHER_RELEASE_IMAGE = "enclaveops-test/rbare-hello-release:other"
# Each build also leaves its amended image (the build's intermediate) beside its target.
BUILT_IMAGES = [
    RELEASE_IMAGE,
    OTHER_RELEASE_IMAGE,
    "enclaveops-test/rbare-hello-release-amended:latest",
    "enclaveops-test/rbare-hello-release-amended:other",
]
TEST_LABEL = "org.enclaveops.test=enclave-role-bare"
APP_PORT = 8080
AUX_API_PORT = 9101
HELLO = b"hello from the enclave\n"


class _FabricHTTPConnection(http.client.HTTPConnection):
    """HTTP to an enclave's ingress port over the emulator's fabric (no TCP reaches it)."""

    def __init__(self, fabric: EmulatedFabric, cid: int, port: int) -> None:
        super().__init__(f"enclave-{cid}", port, timeout=10)
        self._fabric, self._cid = fabric, cid

    def connect(self) -> None:
        self.sock = self._fabric.connect(self._cid, self.port, timeout=self.timeout)


@dataclass
class Deployment:
    work: Path
    root: Path
    playbook: Path
    eif: Path
    other_eif: Path
    manifest: Path
    measurements: dict[str, str]

    @property
    def last_good_eif(self) -> Path:
        return self.work / "state" / f"{NAME}.eif"

    def play(self, *options: str, **variables: Any) -> subprocess.CompletedProcess[str]:
        return play(self.playbook, self.work, *options, **variables)

    def good(self, **overrides: Any) -> dict[str, Any]:
        return {
            "enclave_deploy_mode": "bare",
            "enclave_eif": str(self.eif),
            "enclave_name": NAME,
            "enclave_cpu_count": 2,
            "enclave_memory_mib": 1024,
            "enclave_aux_api_port": AUX_API_PORT,
            "enclave_state_dir": str(self.work / "state"),
            "enclave_services": [{"name": "heartbeat", "state": "stopped", "enabled": False}],
            **overrides,
        }

    def enclaves(self) -> list[dict[str, Any]]:
        described = run(
            [str(VENV_BIN / "nitro-emu"), "describe-enclaves"],
            env=dict(os.environ, NITRO_EMU_ROOT=str(self.root)),
        )
        assert described.returncode == 0, described.stderr
        return [e for e in json.loads(described.stdout) if e["EnclaveName"] == NAME]

    def running(self) -> dict[str, Any]:
        enclaves = self.enclaves()
        assert len(enclaves) == 1, enclaves
        return enclaves[0]

    def get(self, cid: int, path: str = "/") -> bytes:
        connection = _FabricHTTPConnection(EmulatedFabric(self.root), cid, APP_PORT)
        try:
            connection.request("GET", path)
            return connection.getresponse().read()
        finally:
            connection.close()

    def answers(self, cid: int, timeout: float = 60) -> bytes:
        """The app's answer; after a restore the app may still be starting."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.get(cid)
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def attested_pcrs(self, cid: int) -> dict[int, bytes]:
        """PCRs of a fresh document from the aux API, verified against the emulator's root."""
        result = attest(
            AttestationSource(enclave_cid=cid, port=AUX_API_PORT),
            expected_pcrs=parse_expected_pcrs(self.measurements),
            root=load_root(self.root / "ca" / "root.pem"),
            fabric=EmulatedFabric(self.root),
        )
        return dict(result.verified.document.pcrs)


def _build(manifest: Path, eif: Path) -> dict[str, Any]:
    built = run(
        [
            str(VENV_BIN / "enclaveops"), "build", "-f", str(manifest), "--builder", "native",
            "--eif-output", str(eif), "--json",
        ]
    )  # fmt: skip
    assert built.returncode == 0, output(built)
    return json.loads(built.stdout)


@pytest.fixture(scope="module")
def deployment(base_image: str) -> Iterator[Deployment]:  # noqa: F811
    ensure_project_images(base_image=base_image)
    work = Path(tempfile.mkdtemp(prefix="ebare", dir="/tmp"))  # short: Unix socket paths
    root = work / "emu"
    try:
        build_app_image(base_image, APP_IMAGE, TEST_LABEL)
        manifest = write_hello_manifest(work / "enclaver.yaml", NAME, APP_IMAGE, RELEASE_IMAGE)
        other = write_hello_manifest(work / "other.yaml", NAME, APP_IMAGE, OTHER_RELEASE_IMAGE)
        first = _build(manifest, work / "hello.eif")
        _build(other, work / "other.eif")
        playbook = write_playbook(work, root)
        yield Deployment(
            work,
            root,
            playbook,
            work / "hello.eif",
            work / "other.eif",
            work / "enclaver.yaml",
            first["Measurements"],
        )
    finally:
        terminate_all(root)
        run(["docker", "rmi", "-f", *BUILT_IMAGES, APP_IMAGE])
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.root
@pytest.mark.docker
@pytest.mark.slow
def test_bare_deploy_verify_idempotence_and_safe_replacement(deployment: Deployment) -> None:
    pcr0 = deployment.measurements["PCR0"]

    # 1. A first deployment: running, answering, attested with the EIF's PCRs, services applied.
    first = deployment.play(**deployment.good())
    assert first.returncode == 0, output(first)
    deployed = json.loads((deployment.work / "deployment.json").read_text())
    cid = int(deployed["enclave_cid"])
    assert deployed["mode"] == "bare"
    assert cid == deployment.running()["EnclaveCID"]
    assert deployed["verified_pcrs"]["0"] == pcr0
    assert deployment.answers(cid) == HELLO
    assert deployment.attested_pcrs(cid)[0].hex() == pcr0
    heartbeat = {
        info.name: info
        for info in read_services(enclave_init_client(cid, emulator_root=str(deployment.root)))
    }["heartbeat"]
    assert heartbeat.state.value == "inactive"
    assert deployment.last_good_eif.read_bytes() == deployment.eif.read_bytes()
    enclave_id = deployment.running()["EnclaveID"]

    # 2. The same again changes nothing (the enclave is left alone), nor does check mode predict.
    again = deployment.play(**deployment.good())
    assert again.returncode == 0, output(again)
    assert recap(again)["changed"] == 0, output(again)
    checked = deployment.play("--check", "--diff", **deployment.good())
    assert checked.returncode == 0, output(checked)
    assert recap(checked)["changed"] == 0, output(checked)
    assert deployment.running()["EnclaveID"] == enclave_id

    # 3. The same enclave from its manifest: the role copies the manifest to the target, finds
    # the release image the CLI built from it (the inputs digest does not depend on the path),
    # builds the EIF of its amended image with the same PCRs, and leaves the enclave alone.
    from_manifest = deployment.good(enclave_eif="", enclave_manifest=str(deployment.manifest))
    built = deployment.play(**from_manifest)
    assert built.returncode == 0, output(built)
    build_task = "Build the release image from the manifest (skipped when its inputs are unchanged)"
    assert task_outcome(built, build_task) == "ok", output(built)
    deployed = json.loads((deployment.work / "deployment.json").read_text())
    assert deployed["eif"] == str(deployment.work / "state" / NAME / "enclave.eif")
    assert deployed["measurements"]["PCR0"] == pcr0
    assert deployed["image"].startswith(f"{RELEASE_IMAGE}@sha256:")
    assert deployed["verified_pcrs"]["0"] == pcr0
    assert deployment.running()["EnclaveID"] == enclave_id
    again = deployment.play(**from_manifest)
    assert again.returncode == 0, output(again)
    assert recap(again)["changed"] == 0, output(again)

    # 4. Another EIF, expected to carry the first one's PCRs: it boots but cannot attest, so the
    # role runs the last good EIF again and fails with the reason.
    bad = deployment.play(
        **deployment.good(
            enclave_eif=str(deployment.other_eif), enclave_expected_pcrs=deployment.measurements
        )
    )
    assert bad.returncode != 0
    failure = " ".join(bad.stdout.split())
    assert (
        "deployment failed at Verify attestation against the PCRs the build measured: "
        f"attestation failed: pcr 0: expected {pcr0}"
    ) in failure, output(bad)
    assert f"previous deployment restored ({deployment.last_good_eif})" in failure, output(bad)
    restored = deployment.running()
    assert restored["EnclaveID"] != enclave_id
    assert restored["Measurements"]["PCR0"] == pcr0
    cid = int(restored["EnclaveCID"])
    assert deployment.answers(cid) == HELLO
    assert deployment.attested_pcrs(cid)[0].hex() == pcr0
    assert deployment.last_good_eif.read_bytes() == deployment.eif.read_bytes()

    # 5. A new enclave that cannot start (the pool's CPUs are taken), with nothing to go back to:
    # the play says so, and the enclave that runs under the other name is left alone.
    unstartable = deployment.play(**deployment.good(enclave_name=f"{NAME}-new"))
    assert unstartable.returncode != 0
    failure = " ".join(unstartable.stdout.split())
    assert f"enclave {NAME}-new: deployment failed at Run the EIF as a bare enclave:" in failure
    assert (
        "there was no previous deployment to restore, so the failed one was terminated" in failure
    ), output(unstartable)
    assert deployment.running()["EnclaveID"] == restored["EnclaveID"]

    # 6. A running enclave but no last good EIF (as after a deployment made without the role):
    # the replacement terminated it, and the play says it cannot be restored.
    unkept = deployment.play(
        **deployment.good(
            enclave_eif=str(deployment.other_eif),
            enclave_expected_pcrs=deployment.measurements,
            enclave_state_dir=str(deployment.work / "fresh-state"),
        )
    )
    assert unkept.returncode != 0
    failure = " ".join(unkept.stdout.split())
    assert (
        f"previous enclave {restored['EnclaveID']} was terminated and cannot be restored (no last "
        f"good EIF at {deployment.work / 'fresh-state' / NAME}.eif), and the failed one was "
        "terminated"
    ) in failure, output(unkept)
    assert deployment.enclaves() == []
