"""The enclave, enclave_info and attestation modules through ansible-playbook, against nitro-emu.

An odyn image (tests/e2e/images/hello-odyn: API on 9000, aux API on 9101 published by ingress) is
built into an EIF with the native builder, then run as a bare enclave by the enclave module: a
second run changes nothing, a new memory size replaces it, and the attestation module verifies
the enclave over the emulator's fabric against the emulator root and the EIF's PCRs, and fails on
a wrong PCR. Needs root and Docker; CI has both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.build.runtime_bundle import bundle_runtime
from enclave_runtime.formats.pcr import Measurements
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

BIN = Path(sys.executable).parent
NITRO_EMU = str(BIN / "nitro-emu")
IMAGE_DIR = Path(__file__).parent / "images" / "hello-odyn"
IMAGE = "enclaveops-test/modules-enclave:latest"
LABEL = "enclaveops.test=modules-enclave"
AUX_API_PORT = 9101


@dataclass
class Deployment:
    work: Path
    root: Path
    eif: Path
    measurements: Measurements
    allocator: Path

    def common(self) -> dict[str, str]:
        """What module_defaults would give every module of the group."""
        return {"nitro_cli_path": NITRO_EMU, "emulator_root": str(self.root)}

    def run(self, module: str, args: dict[str, Any], check_mode: bool = False) -> dict[str, Any]:
        """One task in a playbook run by ansible-playbook; its registered result."""
        out = self.work / "result.json"
        task = {
            "name": module,
            f"enclaveops.nitro.{module}": {**self.common(), **args},
            "register": "result",
            "ignore_errors": True,
            "check_mode": check_mode,
        }
        save = {"ansible.builtin.copy": {"content": "{{ result | to_json }}", "dest": str(out)}}
        play = [{"hosts": "localhost", "gather_facts": False, "tasks": [task, save]}]
        playbook = self.work / "play.yml"
        playbook.write_text(json.dumps(play))
        env = dict(
            os.environ,
            ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "collections"),
            ANSIBLE_NOCOLOR="1",
            # The emulator's pool: nitro-emu, run by the modules, inherits it.
            NITRO_EMU_ALLOCATOR=str(self.allocator),
        )
        completed = subprocess.run(
            [
                str(BIN / "ansible-playbook"),
                "-i",
                "localhost,",
                "-c",
                "local",
                "-e",
                f"ansible_python_interpreter={sys.executable}",
                str(playbook),
            ],
            cwd=self.work,  # away from the repository's ansible.cfg
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        return json.loads(out.read_text())


@pytest.fixture(scope="module")
def deployment(base_image: str) -> Iterator[Deployment]:
    work = Path(tempfile.mkdtemp(prefix="mod", dir="/tmp"))  # short: Unix socket paths
    context = work / "context"
    shutil.copytree(IMAGE_DIR, context)
    config = context / "config"
    config.mkdir()
    (config / "enclaver.yaml").write_text(
        "version: v1\nname: modules-enclave\ntarget: enclaveops-test/unused:latest\n"
        f"sources:\n  app: {IMAGE}\ningress:\n  - listen_port: {AUX_API_PORT}\n"
        f"api:\n  listen_port: 9000\naux_api:\n  listen_port: {AUX_API_PORT}\n"
    )
    bundle_runtime(context / "lib")
    build = ["docker", "build", "-q", "--label", LABEL, "--build-arg"]
    build += [f"BASE_IMAGE={base_image}", "-t", IMAGE, str(context)]
    subprocess.run(build, check=True, capture_output=True)
    root = work / "emu"
    allocator = work / "allocator.yaml"
    allocator.write_text("---\nmemory_mib: 4096\ncpu_count: 2\n")
    env = dict(os.environ, NITRO_EMU_ROOT=str(root), NITRO_EMU_ALLOCATOR=str(allocator))
    eif = work / "app.eif"
    built = subprocess.run(
        [NITRO_EMU, "build-enclave", "--docker-uri", IMAGE, "--output-file", str(eif)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    measurements = Measurements.from_nitro_cli(json.loads(built.stdout)["Measurements"])
    yield Deployment(work, root, eif, measurements, allocator)
    subprocess.run(
        [NITRO_EMU, "terminate-enclave", "--all"], env=env, check=False, capture_output=True
    )
    subprocess.run(["docker", "rmi", "-f", IMAGE], check=False, capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


def app(deployment: Deployment, memory_mib: int = 1024) -> dict[str, Any]:
    return {
        "name": "app",
        "eif_path": str(deployment.eif),
        "cpu_count": 1,
        "memory_mib": memory_mib,
    }


def test_enclave_runs_once_then_is_left_alone(deployment: Deployment) -> None:
    first = deployment.run("enclave", app(deployment))
    assert first.get("failed") is not True, first.get("msg")
    assert first["changed"] is True
    assert first["enclave"]["State"] == "RUNNING"
    assert first["enclave"]["Measurements"] == deployment.measurements.to_nitro_cli()
    second = deployment.run("enclave", app(deployment))
    assert second["changed"] is False
    assert second["enclave"]["EnclaveID"] == first["enclave"]["EnclaveID"]


def test_enclave_info_finds_it_by_name(deployment: Deployment) -> None:
    deployment.run("enclave", app(deployment))
    info = deployment.run("enclave_info", {"name": "app"})
    assert [enclave["EnclaveName"] for enclave in info["enclaves"]] == ["app"]
    assert info["changed"] is False


def test_attestation_verifies_over_the_fabric_and_fails_on_a_wrong_pcr(
    deployment: Deployment,
) -> None:
    running = deployment.run("enclave", app(deployment))["enclave"]
    source = {"enclave_cid": running["EnclaveCID"], "port": AUX_API_PORT, "timeout": 60}
    expected = deployment.measurements.to_nitro_cli()
    verified = deployment.run("attestation", {**source, "expected_pcrs": expected})
    assert verified.get("failed") is not True, verified.get("msg")
    assert verified["changed"] is False
    assert verified["document"]["module_id"] == running["EnclaveID"]
    assert verified["document"]["pcrs"]["0"] == expected["PCR0"]
    wrong = deployment.run("attestation", {**source, "expected_pcrs": {"0": "00" * 48}})
    assert wrong["failed"] is True
    assert wrong["check"] == "pcr 0"
    assert wrong["changed"] is False


def test_check_mode_predicts_a_replacement_that_then_happens(deployment: Deployment) -> None:
    before = deployment.run("enclave", app(deployment))["enclave"]
    predicted = deployment.run("enclave", app(deployment, 1536), check_mode=True)
    assert predicted["changed"] is True and predicted["replaced"] is True
    assert predicted["reasons"] == ["memory_mib is 1024, wanted 1536"]
    replaced = deployment.run("enclave", app(deployment, 1536))
    assert replaced["changed"] is True and replaced["replaced"] is True
    assert replaced["previous"]["EnclaveID"] == before["EnclaveID"]
    assert replaced["enclave"]["MemoryMiB"] == 1536
    assert replaced["enclave"]["EnclaveID"] != before["EnclaveID"]
    gone = deployment.run("enclave", {"name": "app", "state": "absent"})
    assert gone["changed"] is True
    assert deployment.run("enclave_info", {})["enclaves"] == []
