# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""enclaveops.nitro.sleeve: created and started once, left alone, replaced when the image or the
configuration changes, predicted in check mode, stopped and removed.

Docker is a stand-in (FakeDocker) that keeps containers as the engine does; nitro-cli is the
stateful fake (fake_nitro_cli), which lists the enclave a started container's sleeve announces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils import basic
from ansible_collections.enclaveops.nitro.plugins.modules import sleeve
from ansible_collections.enclaveops.nitro.tests.unit.plugins.modules import fake_nitro_cli

docker = pytest.importorskip("docker")
docker_engine = pytest.importorskip("enclave_runtime.host.docker_engine")
labels = pytest.importorskip("enclave_runtime.formats.release_labels")

RELEASE = "hello-release:latest"
RELEASE_ID = "sha256:" + "a" * 64
NEXT_ID = "sha256:" + "b" * 64
ZERO_PCR = "0" * 96


class FakeContainer:
    def __init__(self, engine: FakeDocker, spec: dict[str, Any]) -> None:
        self.engine = engine
        self.spec = spec
        self.name = spec["name"]
        self.id = f"c{len(engine.created):04d}"
        self.labels = spec["labels"]
        self.status = "created"
        self.attrs: dict[str, Any] = {
            "Image": engine.images.get(spec["image"]).id,
            "State": {"ExitCode": 0, "StartedAt": "0001-01-01T00:00:00Z"},
        }
        self.log = b""

    def start(self) -> None:
        self.status = "running"
        self.engine.actions.append(("start", self.name))
        cid = 16 + len(self.engine.actions)
        enclave_id = f"i-0000000000000000-enc{cid:016x}"
        self.log += f"sleeve: started enclave ID={enclave_id}, CID={cid}\n".encode()
        self.engine.enclave_started(enclave_id, cid)

    def stop(self, timeout: int) -> None:
        if self.status == "running":
            self.status = "exited"
            self.attrs["State"]["ExitCode"] = 109
            self.engine.actions.append(("stop", self.name))

    def remove(self, **_kwargs: Any) -> None:
        del self.engine.running[self.name]
        self.engine.actions.append(("remove", self.name))

    def reload(self) -> None:
        pass

    def logs(self, **_kwargs: Any) -> bytes:
        return self.log


class FakeImages:
    def __init__(self) -> None:
        self.ids = {RELEASE: RELEASE_ID}
        self.attrs: dict[str, dict[str, Any]] = {}  # image ID -> RepoDigests and Config

    def get(self, reference: str) -> Any:
        """By tag, by image ID or by registry digest, as the engine looks images up (not by a
        pinned reference)."""
        image_id = self.ids.get(reference) or (reference if reference in self.ids.values() else "")
        if not image_id:
            raise docker.errors.ImageNotFound(reference)
        return type("Image", (), {"id": image_id, "attrs": self.attrs.get(image_id, {})})()


class FakeContainers:
    def __init__(self, engine: FakeDocker) -> None:
        self.engine = engine

    def get(self, name: str) -> FakeContainer:
        if name not in self.engine.running:
            raise docker.errors.NotFound(name)
        return self.engine.running[name]

    def create(self, **spec: Any) -> FakeContainer:
        self.engine.created.append(spec)
        container = FakeContainer(self.engine, spec)
        self.engine.running[spec["name"]] = container
        self.engine.actions.append(("create", spec["name"]))
        return container


class FakeDocker:
    """The engine calls the module makes (images.get, api.pull, containers.get/create), as a
    client; ``registry`` holds what a pull by digest brings: reference -> (ID, attrs)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.images = FakeImages()
        self.containers = FakeContainers(self)
        self.running: dict[str, FakeContainer] = {}
        self.created: list[dict[str, Any]] = []
        self.actions: list[tuple[str, str]] = []
        self.registry: dict[str, tuple[str, dict[str, Any]]] = {}
        self.api = self

    def pull(self, repository: str, tag: str, stream: bool, decode: bool, **kwargs: Any):
        reference = f"{repository}@{tag}"
        self.actions.append(("pull", reference))
        self.pull_auth = kwargs.get("auth_config")
        if reference not in self.registry:
            return iter([{"error": f"manifest for {reference} not found: manifest unknown"}])
        image_id, attrs = self.registry[reference]
        self.images.ids[reference] = image_id
        self.images.attrs[image_id] = attrs
        return iter([{"status": "Downloaded newer image"}])

    def enclave_started(self, enclave_id: str, cid: int) -> None:
        """What the sleeve's run-enclave leaves in nitro-cli's view of the host."""
        state_file = self.state_dir / "fake-state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {"enclaves": []}
        state["enclaves"].append(
            {
                "EnclaveName": "application",
                "EnclaveID": enclave_id,
                "ProcessID": 1000 + cid,
                "EnclaveCID": cid,
                "NumberOfCPUs": 2,
                "CPUIDs": [1, 2],
                "MemoryMiB": 1024,
                "State": "RUNNING",
                "Flags": "NONE",
                "Measurements": {
                    "HashAlgorithm": "Sha384 { ... }",
                    **{f"PCR{index}": ZERO_PCR for index in range(3)},
                },
            }
        )
        state_file.write_text(json.dumps(state))


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDocker:
    root = tmp_path / "emu"
    root.mkdir()
    fake = FakeDocker(root)
    monkeypatch.setattr(docker_engine, "docker_client", lambda: fake)
    return fake


@pytest.fixture
def args(tmp_path: Path, engine: FakeDocker) -> dict[str, Any]:
    """The options a play would give on the emulator (module_defaults included)."""
    return {
        "nitro_cli_path": str(fake_nitro_cli.install(tmp_path)),
        "emulator_root": str(engine.state_dir),
        "emulator_allocator": str(tmp_path / "allocator.yaml"),
        "name": "hello",
        "image": RELEASE,
        "published_ports": ["8080:8080"],
        "wait_timeout": 10,
    }


def test_starts_waits_for_the_enclave_then_leaves_it_alone(run_module, engine, args) -> None:
    first = run_module(sleeve.main, args)
    assert first["changed"] is True, first
    assert first["container"]["status"] == "running"
    assert first["container"]["image_id"] == RELEASE_ID
    assert first["image"] == f"{RELEASE}@{RELEASE_ID}"
    assert engine.created[0]["image"] == RELEASE_ID  # the ID: a moved tag changes nothing
    assert first["enclave"]["State"] == "RUNNING"
    assert first["enclave"]["EnclaveCID"] == 18
    spec = engine.created[0]
    assert spec["volumes"][args["emulator_root"]]["bind"] == args["emulator_root"]
    assert spec["ports"] == {"8080/tcp": [("", 8080)]}

    second = run_module(sleeve.main, args)
    assert second["changed"] is False
    assert second["enclave"] == first["enclave"]
    assert engine.actions == [("create", "hello"), ("start", "hello")]


def test_a_new_release_image_replaces_the_container(run_module, engine, args) -> None:
    run_module(sleeve.main, args)
    engine.images.ids[RELEASE] = NEXT_ID
    result = run_module(sleeve.main, args, diff=True)
    assert result["changed"] is True
    assert RELEASE_ID in result["reason"] and NEXT_ID in result["reason"]
    assert result["diff"]["before"]["image_id"] == RELEASE_ID
    assert result["diff"]["after"]["image_id"] == NEXT_ID
    assert engine.actions[2:] == [
        ("stop", "hello"),
        ("remove", "hello"),
        ("create", "hello"),
        ("start", "hello"),
    ]


@pytest.fixture
def warnings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the module warns about (the real exit_json, stubbed here, would return them)."""
    said: list[str] = []
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda _self, text: said.append(text))
    return said


def test_the_image_build_printed_is_run_and_left_alone_like_its_tag(
    run_module, engine, args, warnings
) -> None:
    run_module(sleeve.main, args)
    pinned = run_module(sleeve.main, dict(args, image=f"{RELEASE}@{RELEASE_ID}"))
    assert (pinned["changed"], pinned["image"]) == (False, f"{RELEASE}@{RELEASE_ID}")
    assert warnings == []


def test_a_pinned_image_whose_tag_moved_runs_the_pinned_id_with_a_warning(
    run_module, engine, args, warnings
) -> None:
    engine.images.ids["hello-release:old"] = RELEASE_ID
    engine.images.ids[RELEASE] = NEXT_ID
    result = run_module(sleeve.main, dict(args, image=f"{RELEASE}@{RELEASE_ID}"))
    assert result["container"]["image_id"] == RELEASE_ID
    assert warnings == [
        f"sleeve container hello: the tag {RELEASE} points to {NEXT_ID}; running {RELEASE_ID}, "
        "the image ID the reference pins"
    ]


def test_a_pinned_image_that_is_not_here_fails_with_what_to_do(run_module, engine, args) -> None:
    result = run_module(sleeve.main, dict(args, image=f"{RELEASE}@{NEXT_ID}"))
    assert result["failed"] is True
    assert f"no local image has the ID {NEXT_ID}" in result["msg"]
    assert engine.actions == []


def test_check_mode_predicts_a_configuration_change_and_changes_nothing(
    run_module, engine, args
) -> None:
    run_module(sleeve.main, args)
    result = run_module(sleeve.main, dict(args, memory_mib=2048), check_mode=True, diff=True)
    assert result["changed"] is True
    assert result["reason"] == "its configuration differs"
    assert result["diff"]["before"]["config"]["memory_mb"] is None
    assert result["diff"]["after"]["config"]["memory_mb"] == 2048
    assert engine.actions == [("create", "hello"), ("start", "hello")]


def test_check_mode_with_the_image_not_built_yet_predicts_a_change(
    run_module, engine, args
) -> None:
    result = run_module(sleeve.main, dict(args, image="not-built:yet"), check_mode=True)
    assert (result["changed"], result["failed"]) == (True, False)
    assert engine.actions == []


def test_a_missing_image_fails_with_what_to_do(run_module, engine, args) -> None:
    result = run_module(sleeve.main, dict(args, image="not-built:yet"))
    assert result["failed"] is True
    assert "sleeve container hello" in result["msg"]
    assert "'not-built:yet' is not present locally" in result["msg"]


def test_stopped_then_absent(run_module, engine, args) -> None:
    run_module(sleeve.main, args)
    stopped = run_module(sleeve.main, dict(args, state="stopped"))
    assert (stopped["changed"], stopped["container"]["status"]) == (True, "exited")
    assert run_module(sleeve.main, dict(args, state="stopped"))["changed"] is False
    absent = run_module(sleeve.main, {"name": "hello", "state": "absent"})
    assert (absent["changed"], absent["container"]) == (True, None)
    assert run_module(sleeve.main, {"name": "hello", "state": "absent"})["changed"] is False


def test_a_bad_published_port_names_the_forms(run_module, engine, args) -> None:
    result = run_module(sleeve.main, dict(args, published_ports=["8080"]))
    assert result["failed"] is True
    assert "is not HOST:CONTAINER or IP:HOST:CONTAINER" in result["msg"]


def test_a_sleeve_that_exits_before_its_enclave_runs_fails_with_its_log(
    run_module, engine, args, monkeypatch
) -> None:
    def fail_to_boot(container: FakeContainer) -> None:
        container.status = "exited"
        container.attrs["State"]["ExitCode"] = 1
        container.log = b"sleeve: `nitro-emu run-enclave ...` failed with [ E26 ] ...\n"

    monkeypatch.setattr(FakeContainer, "start", fail_to_boot)
    result = run_module(sleeve.main, args)
    assert result["failed"] is True
    assert result["rc"] == 1
    assert "ended with exit status 1 before its enclave was running" in result["msg"]
    assert "[ E26 ]" in result["msg"]


# --- fleets: pulled by digest, checked against the build record --------------------------

REPO = "10.231.0.1:5000/hello"
DIGEST = "sha256:" + "d" * 64
PUSHED = f"{REPO}@{DIGEST}"
RECORD_PCRS = {"PCR0": "a0" * 48, "PCR1": "01" * 48, "PCR2": "02" * 48}
EIF_SHA384 = "38" * 48


def release_attrs(pcr0: str = RECORD_PCRS["PCR0"]) -> dict[str, Any]:
    return {
        "RepoDigests": [PUSHED],
        "Config": {
            "Labels": {
                labels.LABEL_MEASUREMENTS: json.dumps({**RECORD_PCRS, "PCR0": pcr0}),
                labels.LABEL_EIF: labels.eif_label("56" * 32, EIF_SHA384, 100),
            }
        },
    }


@pytest.fixture
def fleet_args(args: dict[str, Any], engine: FakeDocker) -> dict[str, Any]:
    engine.registry[PUSHED] = (NEXT_ID, release_attrs())
    return dict(
        args,
        image=PUSHED,
        pull="missing",
        registry_username="ci",
        registry_password="s3cret",
        expected_eif_sha384=EIF_SHA384,
        expected_pcrs=RECORD_PCRS,
    )


def test_a_parent_pulls_the_recorded_digest_once_and_runs_it(
    run_module, engine, fleet_args
) -> None:
    first = run_module(sleeve.main, fleet_args)
    assert (first["failed"], first["changed"], first["pulled"]) == (False, True, True), first
    assert first["container"]["image_id"] == NEXT_ID
    assert first["reason"] == f"pulled {PUSHED}; no container hello exists"
    assert engine.pull_auth == {"username": "ci", "password": "s3cret"}
    assert "s3cret" not in json.dumps(first)

    second = run_module(sleeve.main, fleet_args)
    assert (second["changed"], second["pulled"]) == (False, False)
    assert [action for action in engine.actions if action[0] == "pull"] == [("pull", PUSHED)]


def test_check_mode_reports_the_pull_and_pulls_nothing(run_module, engine, fleet_args) -> None:
    predicted = run_module(sleeve.main, fleet_args, check_mode=True)
    assert (predicted["changed"], predicted["pulled"], predicted["failed"]) == (True, True, False)
    assert predicted["reason"].startswith(f"would pull {PUSHED}")
    assert engine.actions == []


def test_an_image_whose_labels_differ_from_the_record_is_refused_before_it_runs(
    run_module, engine, fleet_args
) -> None:
    run_module(
        sleeve.main,
        dict(fleet_args, image=RELEASE, pull="never", expected_pcrs=None, expected_eif_sha384=None),
    )
    engine.registry[PUSHED] = (NEXT_ID, release_attrs(pcr0="ff" * 48))
    refused = run_module(sleeve.main, fleet_args)
    assert refused["failed"] is True
    assert f"PCR0 is {'ff' * 48}, expected {'a0' * 48}" in refused["msg"]
    assert "Refusing to run it" in refused["msg"]
    # the running container (the old deployment) is left as it is
    assert ("remove", "hello") not in engine.actions
    assert engine.running["hello"].status == "running"


def test_a_wrong_eif_hash_is_named(run_module, engine, fleet_args) -> None:
    refused = run_module(sleeve.main, dict(fleet_args, expected_eif_sha384="00" * 48))
    assert refused["failed"] is True
    assert f"eif_sha384 is {EIF_SHA384}, expected {'00' * 48}" in refused["msg"]
    assert not engine.created


def test_a_malformed_digest_is_refused_without_asking_the_registry(
    run_module, engine, fleet_args
) -> None:
    refused = run_module(sleeve.main, dict(fleet_args, image=f"{REPO}@sha256:1234"))
    assert refused["failed"] is True
    assert "is not sha256: followed by 64 lower-case hex digits" in refused["msg"]
    assert engine.actions == []


def test_without_pull_a_missing_digest_fails_as_before(run_module, engine, fleet_args) -> None:
    failed = run_module(sleeve.main, dict(fleet_args, pull="never"))
    assert failed["failed"] is True
    assert "is not present locally" in failed["msg"]
    assert engine.actions == []
