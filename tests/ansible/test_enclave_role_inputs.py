"""The enclave role's inputs from a manifest: the runtime's defaults reach the role (no Docker).

The role asks enclaveops.nitro.manifest_info (the runtime) for the deployment: a manifest with
``aux_api: {}`` has its aux API at the API port + 1, and one without ``defaults`` runs a bare
enclave with the runtime's 2 CPUs and 4096 MiB, in both deployment modes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.ansible.role_support import output, play
from tests.unit.test_deployment import MINIMAL

# The manifest of tests/unit/test_deployment.py: aux_api {} and no defaults.
MANIFEST = MINIMAL
PLAYBOOK = """\
- name: Work out the enclave role's inputs
  hosts: localhost
  gather_facts: false
  tasks:
    - name: The role's inputs
      ansible.builtin.import_role:
        name: enclaveops.nitro.enclave
        tasks_from: inputs
    - name: Record them for the test
      ansible.builtin.copy:
        content: >-
          {{{{ {{'name': enclave_effective_name, 'ports': enclave_effective_ports,
          'aux_api_port': enclave_effective_aux_api_port | int,
          'ingress_port': enclave_effective_ingress_port | int,
          'cpu_count': enclave_effective_cpu_count | int,
          'memory_mib': enclave_effective_memory_mib | int,
          'ingress_url': enclave_ingress_url, 'attestation_url': enclave_attestation_url}}
          | to_json }}}}
        dest: {work}/inputs.json
        mode: "0600"
"""


def _inputs(tmp_path: Path, manifest: str = MANIFEST, **variables: Any) -> dict[str, Any]:
    (tmp_path / "enclaver.yaml").write_text(manifest)
    playbook = tmp_path / "inputs.yml"
    playbook.write_text(PLAYBOOK.format(work=tmp_path))
    result = play(
        playbook,
        tmp_path,
        timeout=120,
        enclave_manifest=str(tmp_path / "enclaver.yaml"),
        enclave_state_dir=str(tmp_path / "state"),
        **variables,
    )
    assert result.returncode == 0, output(result)
    return json.loads((tmp_path / "inputs.json").read_text())


@pytest.mark.parametrize("mode", ["sleeve", "bare"])
def test_aux_api_without_a_port_and_no_defaults_take_the_runtimes_defaults(
    tmp_path: Path, mode: str
) -> None:
    inputs = _inputs(tmp_path, enclave_deploy_mode=mode)
    assert inputs["name"] == "app"
    assert inputs["aux_api_port"] == 9101  # api.listen_port + 1
    assert inputs["ingress_port"] == 8080
    assert inputs["ports"] == ["8080:8080", "9101:9101"]
    assert (inputs["cpu_count"], inputs["memory_mib"]) == (2, 4096)
    assert inputs["ingress_url"] == "http://127.0.0.1:8080/"
    assert inputs["attestation_url"] == "http://127.0.0.1:9101"


def test_published_ports_and_explicit_resources_win(tmp_path: Path) -> None:
    inputs = _inputs(
        tmp_path,
        enclave_published_ports=["127.0.0.1:18080:8080", "19101:9101"],
        enclave_cpu_count=4,
        enclave_memory_mib=1024,
    )
    assert inputs["ports"] == ["127.0.0.1:18080:8080", "19101:9101"]
    assert inputs["ingress_url"] == "http://127.0.0.1:18080/"
    assert inputs["attestation_url"] == "http://127.0.0.1:19101"
    assert (inputs["cpu_count"], inputs["memory_mib"]) == (4, 1024)


def test_an_invalid_manifest_fails_with_the_runtimes_message(tmp_path: Path) -> None:
    (tmp_path / "enclaver.yaml").write_text(MANIFEST.replace("aux_api: {}\n", "aux_api: 7\n"))
    playbook = tmp_path / "inputs.yml"
    playbook.write_text(PLAYBOOK.format(work=tmp_path))
    result = play(playbook, tmp_path, timeout=120, enclave_manifest=str(tmp_path / "enclaver.yaml"))
    assert result.returncode != 0
    assert "aux_api" in result.stdout, output(result)
    assert "manifest_info" in result.stdout or "Work out the deployment" in result.stdout
