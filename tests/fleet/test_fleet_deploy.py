"""Build once, deploy many, on the bed: playbooks/build.yml builds on the builder from copies of
the manifest and the app context, from source images it pulls from the bed's registry, and
pushes the release image there; playbooks/rolling-update.yml rolls it to every parent (one
canary, then the rest), each parent pulling it by the recorded digest. From the controller every
parent's app answers and attests the PCRs of the one build record; a second roll changes
nothing; a broken build stops at the canary while the other parents serve without a failed
request.

build.yml and the later rolls run over the ssh connection, the first roll over paramiko."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclave_runtime.host.attestation_client import (
    AttestationSource,
    attest,
    load_root,
    parse_expected_pcrs,
)
from tests.fleet.bed import REGISTRY, REPO_ROOT, Bed, Host

HELLO = yaml.safe_load((REPO_ROOT / "examples" / "hello" / "enclaver.yaml").read_text())
# The images a build starts from, as scripts/build-images.sh tags them on the controller: the
# app's base and the project's runtime and sleeve base. The test puts them in the bed's registry
# (as a fleet's registry holds them) and nowhere else, so every host pulls what it needs.
SOURCE_IMAGES = {
    "base": "enclaveops/debian-base:bookworm",
    "runtime": HELLO["sources"]["odyn"],
    "sleeve": HELLO["sources"]["sleeve"],
}
PCRS = ("PCR0", "PCR1", "PCR2")
RECAP = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0", re.M)
# What a parent of a real fleet has of its own that the bed's hosts share with the controller:
# /opt (it holds this machine's package index), so the runtime's venv and wheels go under
# /var/lib; pip reaches that index (file:///opt/pypi) as a fleet's hosts reach an internal one.
FLEET_VARS = {
    "nitro_host_backend": "emulator",
    "nitro_host_runtime_venv": "/var/lib/enclaveops/venv",
    "nitro_host_runtime_wheel_target_dir": "/var/lib/enclaveops/wheels",
    "nitro_host_pip_extra_args": "--index-url file:///opt/pypi/simple"
    " --extra-index-url file:///opt/pypi-more/simple --find-links /opt/wheels",
}


def _inventory(bed: Bed, directory: Path, connection: str, images: dict[str, str] | None) -> Path:
    """The bed's inventory with FLEET_VARS; with ``images`` the project's images come from the
    registry (pinned digests), without them the nitro_host role builds them on the controller
    and loads them on each host (docker save/load, batch by batch)."""
    inventory = bed.inventory(connection)
    pulled = (
        {}
        if images is None
        else {
            "nitro_host_runtime_image": images["runtime"],
            "nitro_host_sleeve_image": images["sleeve"],
        }
    )
    inventory["all"]["vars"] = {**FLEET_VARS, **pulled}  # type: ignore[index]
    path = directory / f"fleet-{connection}.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def _docker(host: Host | None, *args: str, stdin: Any = None) -> str:
    prefix = ["docker"] if host is None else ["docker", "-H", host.docker_host]
    result = subprocess.run(
        [*prefix, *args],
        check=False,
        stdin=stdin,
        capture_output=True,
        text=stdin is None,
        timeout=300,
    )
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout.strip() if stdin is None else ""


def _repo_digest(host: Host, reference: str) -> str:
    repository = reference.rsplit(":", 1)[0]
    digests = json.loads(
        _docker(host, "image", "inspect", "--format", "{{json .RepoDigests}}", reference)
    )
    return next(d for d in digests if d.startswith(f"{repository}@"))


def _changed_per_host(output: str) -> dict[str, int]:
    return {host: int(changed) for host, changed in RECAP.findall(output)}


def _changed_tasks(output: str) -> str:
    """The tasks that reported a change, for an assertion message."""
    tasks = re.findall(r"^TASK \[(.*?)\] \*+\n((?:(?!TASK \[).*\n)*)", output, re.M)
    return "\n".join(f"{name}: {body.strip()[:300]}" for name, body in tasks if "changed:" in body)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fleet-deploy")


@pytest.fixture(scope="module")
def images(bed: Bed) -> dict[str, str]:
    """SOURCE_IMAGES in the bed's registry only, by digest: the builder's engine loads them
    from the controller's, pushes them and forgets them again."""
    built = subprocess.run(
        [str(REPO_ROOT / "scripts" / "build-images.sh")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    builder = bed.host("builder")
    save = subprocess.Popen(["docker", "save", *SOURCE_IMAGES.values()], stdout=subprocess.PIPE)
    _docker(builder, "load", stdin=save.stdout)
    assert save.wait(timeout=120) == 0
    pushed = {}
    for name, image in SOURCE_IMAGES.items():
        _docker(builder, "tag", image, f"{REGISTRY}/{image}")
        _docker(builder, "push", "--quiet", f"{REGISTRY}/{image}")
        pushed[name] = _repo_digest(builder, f"{REGISTRY}/{image}")
        _docker(builder, "rmi", image, f"{REGISTRY}/{image}")
    return pushed


@pytest.fixture(scope="module")
def build(bed: Bed, work: Path, images: dict[str, str]) -> dict[str, Any]:
    records = work / "records"
    extra = {
        "build_measurements_dir": str(records),
        "build_registry": REGISTRY,
        "build_pull": True,
        "build_app_build_args": {"BASE_IMAGE": images["base"]},
    }
    result = bed.ansible(
        "ansible-playbook",
        "playbooks/build.yml",
        "-e",
        json.dumps(extra),
        inventory=_inventory(bed, work, "ssh", images),
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return json.loads((records / f"{HELLO['name']}.json").read_text())


def _roll(
    bed: Bed, work: Path, images: dict[str, str] | None, record: dict[str, Any], connection: str
) -> str:
    (work / "record.json").write_text(json.dumps(record))
    extra = {
        "rolling_update_record": str(work / "record.json"),
        "rolling_update_serial": [1, "100%"],
    }
    result = bed.ansible(
        "ansible-playbook",
        "playbooks/rolling-update.yml",
        "-e",
        json.dumps(extra),
        inventory=_inventory(bed, work, connection, images),
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def first_roll(bed: Bed, work: Path, build: dict[str, Any]) -> str:
    # The project's images by docker save/load from the controller (the same IDs the images
    # fixture pushed): the second roll pulls them from the registry and must change nothing.
    return _roll(bed, work, None, build, "paramiko")


def _parents(bed: Bed) -> list[Host]:
    return [host for host in bed.hosts if host.enclave_enabled]


def test_build_runs_on_the_builder_and_pushes_one_recorded_image(
    bed: Bed, images: dict[str, str], build: dict[str, Any]
) -> None:
    builder = bed.host("builder")
    assert build["image"] == f"{HELLO['target']}@{build['image_id']}"
    repository = f"{REGISTRY}/{HELLO['target'].rsplit(':', 1)[0]}"
    assert build["repo_digest"].startswith(f"{repository}@sha256:")
    # The inputs were the builder's own copies, and the base came from the registry (--pull).
    assert builder.path("/var/lib/enclaveops/builds/hello/enclaver.yaml").is_file()
    assert builder.path("/var/lib/enclaveops/builds/hello/app/Dockerfile").is_file()
    assert _docker(builder, "image", "inspect", "--format", "{{.Id}}", images["base"])
    labels = json.loads(
        _docker(
            builder, "image", "inspect", "--format", "{{json .Config.Labels}}", build["image_id"]
        )
    )
    labelled = json.loads(labels["org.enclaveops.build.measurements"])
    assert {p: build["measurements"][p] for p in PCRS} == {p: labelled[p] for p in PCRS}


def test_roll_reaches_every_parent_canary_first_and_each_attests_the_record(
    bed: Bed, build: dict[str, Any], first_roll: str
) -> None:
    # serial [1, "100%"]: the play runs twice, p1 alone first.
    batches = first_roll.split("\nPLAY [")[1:]
    assert len(batches) == 2
    assert "[p1]" in batches[0] and "[p2]" not in batches[0] and "[p3]" not in batches[0]
    expected = parse_expected_pcrs({p: build["measurements"][p] for p in PCRS})
    for host in _parents(bed):
        # Pulled by the digest the record holds, and running exactly the recorded image ID.
        digests = _docker(
            host, "image", "inspect", "--format", "{{json .RepoDigests}}", build["image_id"]
        )
        assert build["repo_digest"] in json.loads(digests)
        assert (
            _docker(host, "inspect", "--format", "{{.Image}}", HELLO["name"]) == build["image_id"]
        )
        with urllib.request.urlopen(f"http://{host.address}:8080/", timeout=10) as response:
            assert response.read().decode().startswith("hello from the enclave")
        result = attest(
            AttestationSource(url=f"http://{host.address}:9101"),
            expected_pcrs=expected,
            root=load_root(host.path("/run/nitro-emu/ca/root.pem")),
        )
        attested = {i: v.hex() for i, v in result.verified.document.pcrs.items()}
        assert [attested[i] for i in range(3)] == [build["measurements"][p] for p in PCRS]


def test_a_second_roll_changes_nothing_on_any_parent(
    bed: Bed, work: Path, images: dict[str, str], build: dict[str, Any], first_roll: str
) -> None:
    output = _roll(bed, work, images, build, "ssh")
    changed = _changed_per_host(output)
    assert changed == {host.name: 0 for host in _parents(bed)}, _changed_tasks(output)


@pytest.fixture(scope="module")
def broken_build(bed: Bed, build: dict[str, Any], first_roll: str) -> dict[str, Any]:
    """A record of another release image (the good one with one more label: its own image ID
    and digest, the same EIF) whose PCR0 is wrong, pushed to the registry as build.yml would;
    for after the good build runs everywhere (first_roll)."""
    builder = bed.host("builder")
    repository = build["repo_digest"].split("@")[0]
    tag = f"{repository}:broken"
    built = subprocess.run(
        [
            "docker",
            "-H",
            builder.docker_host,
            "build",
            "--quiet",
            "--label",
            "broken=1",
            "-t",
            tag,
            "-",
        ],
        input=f"FROM {build['image_id']}\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    _docker(builder, "push", "--quiet", tag)
    digests = json.loads(
        _docker(builder, "image", "inspect", "--format", "{{json .RepoDigests}}", tag)
    )
    image_id = built.stdout.strip()
    return {
        **build,
        "image": f"{HELLO['target']}@{image_id}",
        "image_id": image_id,
        "repo_digest": next(d for d in digests if d.startswith(f"{repository}@")),
        "measurements": {**build["measurements"], "PCR0": "ab" * 48},
    }


class _Client(threading.Thread):
    """Asks every parent's app twice a second and counts the failed requests per parent."""

    def __init__(self, parents: list[Host]) -> None:
        super().__init__(daemon=True)
        self.failures = {host.name: 0 for host in parents}
        self.requests = dict.fromkeys(self.failures, 0)
        self.parents = parents
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for host in self.parents:
                self.requests[host.name] += 1
                try:
                    with urllib.request.urlopen(f"http://{host.address}:8080/", timeout=2) as r:
                        r.read()
                except OSError:
                    self.failures[host.name] += 1
            self.done.wait(0.5)


def test_a_broken_build_stops_at_the_canary_and_the_rest_keep_serving(
    bed: Bed,
    work: Path,
    images: dict[str, str],
    build: dict[str, Any],
    broken_build: dict[str, Any],
) -> None:
    parents = _parents(bed)
    client = _Client(parents)
    client.start()
    (work / "broken.json").write_text(json.dumps(broken_build))
    extra = {
        "rolling_update_record": str(work / "broken.json"),
        "rolling_update_serial": [1, "100%"],
    }
    try:
        roll = bed.ansible(
            "ansible-playbook",
            "playbooks/rolling-update.yml",
            "-e",
            json.dumps(extra),
            inventory=_inventory(bed, work, "ssh", images),
        )
    finally:
        client.done.set()
        client.join(timeout=10)
    assert roll.returncode != 0, roll.stdout[-6000:]
    expected_pcr0 = build["measurements"]["PCR0"]
    assert f"pcr 0: expected {'ab' * 48}, document has {expected_pcr0}" in roll.stdout
    assert "previous deployment restored" in roll.stdout
    # The roll ended with the canary: p2 and p3 were never touched, and never failed a request.
    assert roll.stdout.count("\nPLAY [") == 1, roll.stdout[-6000:]
    assert {h: client.failures[h] for h in ("p2", "p3")} == {"p2": 0, "p3": 0}, client.requests
    assert min(client.requests.values()) > 10
    for host in parents:
        assert (
            _docker(host, "inspect", "--format", "{{.Image}}", HELLO["name"]) == build["image_id"]
        )
        with urllib.request.urlopen(f"http://{host.address}:8080/", timeout=10) as response:
            assert response.read().decode().startswith("hello from the enclave")
