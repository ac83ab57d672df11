"""Push to a real registry, pull by digest, check against the record (Docker, Debian's registry).

A ``docker-registry`` (Debian's package, the distribution registry) serves on 127.0.0.1 with
htpasswd credentials, for this module only. The release images are tiny: one file imported
with ``docker import`` and the release labels a build writes, so nothing comes from Docker Hub.
Run under the Docker lock: ``flock /tmp/enclaveops-docker.lock .venv/bin/python -m pytest
tests/e2e/test_registry.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave_runtime.build.registry_push import RegistryPushError, push_release
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.formats.release_labels import (
    LABEL_EIF,
    LABEL_MEASUREMENTS,
    ReleaseLabelError,
    eif_label,
)
from enclave_runtime.host import release_pull
from enclave_runtime.host.docker_engine import ImagePullError, RegistryAuth, docker_client
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.docker, pytest.mark.slow]
docker = pytest.importorskip("docker")

REGISTRY_BINARY = "/usr/bin/docker-registry"
USER, PASSWORD = "fleet", "registry-pass"
PCRS = Measurements(b"\xa0" * 48, b"\x01" * 48, b"\x02" * 48)
EIF_SHA384 = "38" * 48
LOCAL = "enclaveops-test/registry-release"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``127.0.0.1:PORT`` of a registry that wants USER/PASSWORD; stopped after the module."""
    if not Path(REGISTRY_BINARY).exists():
        pytest.fail(f"{REGISTRY_BINARY} is missing: scripts/ensure-packages.sh installs it")
    bcrypt = pytest.importorskip("bcrypt")
    root = tmp_path_factory.mktemp("registry")
    (root / "htpasswd").write_bytes(
        USER.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)) + b"\n"
    )
    address = f"127.0.0.1:{_free_port()}"
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": address},
        "auth": {"htpasswd": {"realm": "enclaveops-test", "path": str(root / "htpasswd")}},
    }
    (root / "config.yml").write_text(json.dumps(config))
    with (root / "registry.log").open("wb") as log:
        server = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(root / "config.yml")], stdout=log, stderr=log
        )
    try:
        _wait_for_port(address, server, root / "registry.log")
        yield address
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_port(address: str, server: subprocess.Popen, log: Path) -> None:
    host, port = address.split(":")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"docker-registry exited ({server.returncode}):\n{log.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"docker-registry did not listen on {address}:\n{log.read_text()}")


@pytest.fixture(scope="module")
def client():
    engine = docker_client()
    yield engine
    for image in engine.images.list(name=LOCAL) + _registry_images(engine):
        with contextlib.suppress(docker.errors.NotFound):  # gone already, with another tag
            engine.images.remove(image.id, force=True)


def _registry_images(engine) -> list:
    return [
        image
        for image in engine.images.list()
        if any(tag.startswith("127.0.0.1:") and "/hello" in tag for tag in image.tags)
        or any("/hello@" in digest for digest in image.attrs.get("RepoDigests") or ())
    ]


def release_image(client, content: bytes, tag: str, measurements: Measurements = PCRS) -> str:
    """A tiny image with one file and the labels a build writes; its ID."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        member = tarfile.TarInfo("enclave/application.eif")
        member.size = len(content)
        tar.addfile(member, io.BytesIO(content))
    labels = {
        LABEL_MEASUREMENTS: json.dumps(measurements.to_nitro_cli(), sort_keys=True),
        LABEL_EIF: eif_label("56" * 32, EIF_SHA384, len(content)),
    }
    # Dockerfile syntax: a JSON string literal is a valid double-quoted LABEL value.
    changes = [f"LABEL {json.dumps(key)}={json.dumps(value)}" for key, value in labels.items()]
    # A command, so that a container can be created (never started: there is no sleeve inside).
    changes.append('CMD ["/enclave/application.eif"]')
    client.api.import_image_from_data(
        archive.getvalue(), repository=LOCAL, tag=tag, changes=changes
    )
    return str(client.images.get(f"{LOCAL}:{tag}").id)


def _forget(client, *references: str) -> None:
    """Remove the local copies, so the next step must pull."""
    for reference in references:
        with contextlib.suppress(docker.errors.NotFound):
            client.images.remove(reference, force=True)


AUTH = RegistryAuth(USER, PASSWORD)


def test_push_pull_by_digest_and_check_against_the_record(registry, client) -> None:
    repository = f"{registry}/hello"
    original = release_image(client, b"the recorded EIF", "a")

    pushed = push_release(client, original, f"{repository}:1.0", auth=AUTH)
    assert pushed.pushed is True
    assert pushed.repo_digest.startswith(f"{repository}@sha256:")
    again = push_release(client, original, f"{repository}:1.0", auth=AUTH)
    assert (again.pushed, again.digest) == (False, pushed.digest)  # idempotent against a registry
    checked = push_release(client, original, f"{repository}:1.0", auth=AUTH, check_mode=True)
    assert checked.pushed is False

    # the parent: nothing local, pull by digest, check digest, EIF hash and PCRs
    _forget(client, f"{repository}:1.0", f"{LOCAL}:a", original)
    expected = release_pull.expectation_for(
        pushed.repo_digest, eif_sha384=EIF_SHA384, pcrs=PCRS.as_pcrs()
    )
    would = release_pull.prepare_release_image(
        client, pushed.repo_digest, pull="missing", auth=AUTH, expected=expected, check_mode=True
    )
    assert (would.release, would.pulled) == (None, True)
    prepared = release_pull.prepare_release_image(
        client, pushed.repo_digest, pull="missing", auth=AUTH, expected=expected
    )
    assert (prepared.pulled, prepared.release.image_id) == (True, original)
    assert pushed.repo_digest in client.images.get(original).attrs["RepoDigests"]
    kept = release_pull.prepare_release_image(
        client, pushed.repo_digest, pull="missing", auth=AUTH, expected=expected
    )
    assert kept.pulled is False


def test_wrong_credentials_are_refused_with_what_to_check(registry, client) -> None:
    image_id = release_image(client, b"some EIF", "creds")
    with pytest.raises(RegistryPushError, match=r"unauthorized|authentication required"):
        push_release(client, image_id, f"{registry}/hello:creds", auth=RegistryAuth(USER, "no"))
    with pytest.raises(ImagePullError):
        release_pull.prepare_release_image(
            client, f"{registry}/hello@sha256:{'0' * 64}", pull="missing", auth=AUTH
        )


def test_an_image_pushed_over_the_recorded_tag_is_refused_by_digest(registry, client) -> None:
    repository = f"{registry}/hello"
    recorded = push_release(
        client, release_image(client, b"the recorded EIF", "r"), f"{repository}:2.0", auth=AUTH
    )
    # Someone pushes another image under the same tag, with the labels copied.
    impostor = release_image(client, b"another EIF, same labels", "i")
    replaced = push_release(client, impostor, f"{repository}:2.0", auth=AUTH)
    assert replaced.pushed is True and replaced.digest != recorded.digest
    _forget(client, f"{repository}:2.0", f"{LOCAL}:i", impostor)

    by_tag = f"{repository}:2.0"
    with pytest.raises(ReleaseLabelError) as refused:
        release_pull.prepare_release_image(
            client,
            by_tag,
            pull="always",
            auth=AUTH,
            expected=release_pull.expectation_for(by_tag, digest=recorded.digest),
        )
    assert refused.value.fields == ("digest",)
    assert f"expected {recorded.digest}" in str(refused.value)
    # The recorded digest still pulls the recorded image: the registry is content-addressed.
    exact = release_pull.prepare_release_image(
        client,
        recorded.repo_digest,
        pull="always",
        auth=AUTH,
        expected=release_pull.expectation_for(recorded.repo_digest, pcrs=PCRS.as_pcrs()),
    )
    assert exact.release.image_id != impostor


def test_an_image_with_other_pcrs_is_refused_naming_the_pcr(registry, client) -> None:
    other = Measurements(b"\xff" * 48, PCRS.pcr1, PCRS.pcr2)
    pushed = push_release(
        client,
        release_image(client, b"a rebuilt EIF", "o", measurements=other),
        f"{registry}/hello:3.0",
        auth=AUTH,
    )
    with pytest.raises(ReleaseLabelError) as refused:
        release_pull.prepare_release_image(
            client,
            pushed.repo_digest,
            pull="missing",
            auth=AUTH,
            expected=release_pull.expectation_for(
                pushed.repo_digest, eif_sha384=EIF_SHA384, pcrs=PCRS.as_pcrs()
            ),
        )
    assert refused.value.fields == ("PCR0",)


# --- the sleeve module through ansible-playbook ------------------------------------------------

CONTAINER = "enclaveops-test-registry-sleeve"


def play(work: Path, args: dict, check_mode: bool = False) -> dict:
    """One enclaveops.nitro.sleeve task run by ansible-playbook; its registered result."""
    out = work / "result.json"
    task = {
        "enclaveops.nitro.sleeve": args,
        "register": "result",
        "ignore_errors": True,
        "check_mode": check_mode,
    }
    save = {"ansible.builtin.copy": {"content": "{{ result | to_json }}", "dest": str(out)}}
    (work / "play.yml").write_text(
        json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": [task, save]}])
    )
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            *("-i", "localhost,", "-c", "local"),
            *("-e", f"ansible_python_interpreter={sys.executable}"),
            str(work / "play.yml"),
        ],
        cwd=work,  # away from the repository's ansible.cfg
        env=dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "collections")),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(out.read_text())


@pytest.fixture
def sleeve_work(tmp_path: Path, client) -> Iterator[Path]:
    yield tmp_path
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(CONTAINER).remove(force=True)


def test_the_sleeve_module_pulls_the_record_by_digest_and_refuses_another_build(
    registry, client, sleeve_work
) -> None:
    pushed = push_release(
        client, release_image(client, b"the EIF a parent runs", "s"), f"{registry}/hello:4.0",
        auth=AUTH,
    )  # fmt: skip
    _forget(client, f"{registry}/hello:4.0", f"{LOCAL}:s")
    args = {
        "name": CONTAINER,
        "image": pushed.repo_digest,
        "state": "stopped",  # created, not started: the tiny image has no sleeve
        "emulator_root": str(sleeve_work / "emu"),
        "pull": "missing",
        "registry_username": USER,
        "registry_password": PASSWORD,
        "expected_eif_sha384": EIF_SHA384,
        "expected_pcrs": PCRS.to_nitro_cli(),
    }

    predicted = play(sleeve_work, args, check_mode=True)
    assert (predicted["changed"], predicted["pulled"]) == (True, True), predicted
    assert predicted["reason"].startswith(f"would pull {pushed.repo_digest}")
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(pushed.repo_digest)  # check mode pulled nothing

    created = play(sleeve_work, args)
    assert created.get("failed") is not True, created
    assert (created["changed"], created["pulled"]) == (True, True)
    image_id = client.images.get(pushed.repo_digest).id
    assert created["container"]["image_id"] == image_id
    assert PASSWORD not in json.dumps(created)

    again = play(sleeve_work, args)
    assert again.get("failed") is not True, again
    assert (again["changed"], again["pulled"]) == (False, False)

    wrong = dict(args, expected_pcrs={**PCRS.to_nitro_cli(), "PCR2": "00" * 48})
    refused = play(sleeve_work, wrong)
    assert refused["failed"] is True
    assert f"PCR2 is {'02' * 48}, expected {'00' * 48}" in refused["msg"]
    assert client.containers.get(CONTAINER).image.id == image_id  # left as it was
