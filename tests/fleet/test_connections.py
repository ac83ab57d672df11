"""Ansible reaches every host of the bed over SSH, with the ssh and the paramiko connection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.fleet.bed import REPO_ROOT, Bed

PLAY = """
- name: Every bed host over {connection}
  hosts: all
  gather_facts: true
  tasks:
    - name: Write a file of the host's own
      ansible.builtin.copy:
        content: "{{{{ inventory_hostname }}}}\\n"
        dest: /etc/nitro_enclaves/owner
        mode: "0644"

    - name: Look for the controller's checkout
      ansible.builtin.stat:
        path: {repo}
      register: checkout

    - name: Use a controller path on the host
      ansible.builtin.command: cat {repo}/pyproject.toml
      register: controller_path
      changed_when: false
      failed_when: false

    - name: Ask the host's own engine
      ansible.builtin.command: docker info --format '{{{{ "{{{{" }}}} .ID {{{{ "}}}}" }}}}'
      register: engine
      changed_when: false

    - name: Report on the host (the test reads it from the host's own /root)
      ansible.builtin.copy:
        content: "{{{{ {{'host': inventory_hostname, 'address': ansible_default_ipv4.address,
          'checkout': checkout.stat.exists, 'controller_path_rc': controller_path.rc,
          'engine': engine.stdout, 'connection': ansible_connection}} | to_json }}}}"
        dest: /root/bed-report.json
        mode: "0600"
"""


@pytest.mark.parametrize("connection", ["ssh", "paramiko"])
def test_a_play_reaches_every_host(bed: Bed, connection: str, tmp_path: Path) -> None:
    inventory = tmp_path / "bed.yml"
    inventory.write_text(yaml.safe_dump(bed.inventory(connection)))
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAY.format(connection=connection, repo=REPO_ROOT))
    result = bed.ansible("ansible-playbook", str(playbook), "-v", inventory=inventory)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    reports = [json.loads(h.path("/root/bed-report.json").read_text()) for h in bed.hosts]
    assert {r["host"] for r in reports} == {h.name for h in bed.hosts}
    for report in reports:
        host = bed.host(report["host"])
        assert report["connection"] == connection
        assert report["address"] == host.address
        assert report["checkout"] is False
        assert report["controller_path_rc"] != 0
        assert host.path("/etc/nitro_enclaves/owner").read_text() == f"{host.name}\n"
    assert len({r["engine"] for r in reports}) == len(bed.hosts)
