"""The bed itself: hosts over SSH, with files and engines of their own, and one registry."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.fleet import bed as fleet_bed
from tests.fleet.bed import REGISTRY, REPO_ROOT, Bed


def test_every_host_answers_over_ssh_with_its_own_files(bed: Bed) -> None:
    for host in bed.hosts:
        result = bed.ssh(
            host,
            "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1;"
            f" test -e {REPO_ROOT} && echo visible || echo absent",
        )
        address, visibility = result.stdout.split()
        assert address == host.address
        assert visibility == "absent", f"{host.name} sees the controller's checkout"
    first, second = bed.hosts[0], bed.hosts[1]
    bed.ssh(first, "echo first > /etc/nitro_enclaves/marker")
    assert bed.ssh(second, "cat /etc/nitro_enclaves/marker", check=False).returncode != 0
    assert first.path("/etc/nitro_enclaves/marker").read_text() == "first\n"


def test_each_engine_is_its_own_and_pulls_from_the_registry(bed: Bed) -> None:
    builder = bed.host("builder")
    ids = {bed.ssh(h, "docker info --format '{{.ID}}'").stdout.strip() for h in bed.hosts}
    assert len(ids) == len(bed.hosts)
    image = f"{REGISTRY}/bed/probe:1"
    subprocess.run(
        ["docker", "-H", builder.docker_host, "import", "-", image],
        input=_one_file_tar(),
        check=True,
        capture_output=True,
        timeout=60,
    )
    bed.ssh(builder, f"docker push {image}")
    for host in bed.hosts:
        if host.enclave_enabled:
            assert bed.ssh(host, f"docker image inspect {image}", check=False).returncode != 0
            bed.ssh(host, f"docker pull {image}")
            inspected = bed.ssh(host, f"docker image inspect --format '{{{{.Id}}}}' {image}")
            assert inspected.stdout.strip().startswith("sha256:")


def test_hosts_reach_each_other_across_the_bridge(bed: Bed) -> None:
    first, second = bed.hosts[0], bed.hosts[1]
    result = bed.ssh(first, f"timeout 5 bash -c '</dev/tcp/{second.address}/22' && echo open")
    assert result.stdout.strip() == "open"


def _one_file_tar() -> bytes:
    data = b"fleet bed probe\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("probe.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_the_checkout_is_hidden_wherever_it_was_cloned() -> None:
    assert fleet_bed.hidden_dirs(Path("/work/main")) == fleet_bed.HIDDEN_DIRS
    assert fleet_bed.hidden_dirs(Path("/check/work/main")) == (*fleet_bed.HIDDEN_DIRS, "/check")
    assert fleet_bed.hidden_dirs(Path("/root/src/enclaveops")) == fleet_bed.HIDDEN_DIRS
    with pytest.raises(fleet_bed.BedError, match="under /opt"):
        fleet_bed.hidden_dirs(Path("/opt/enclaveops"))
    with pytest.raises(fleet_bed.BedError, match="copied onto every host"):
        fleet_bed.hidden_dirs(Path("/etc/enclaveops"))
