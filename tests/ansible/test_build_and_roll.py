"""Build once, roll many: playbooks/build.yml records the release image and its measurements,
playbooks/rolling-update.yml deploys that record on the emulator, attested against the recorded
PCRs; a second roll changes nothing; a record whose PCR0 is wrong fails the roll with the PCR
reason while the previous deployment keeps answering. playbooks/teardown.yml ends it."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from enclave_runtime.host.attestation_client import (
    AttestationSource,
    attest,
    load_root,
    parse_expected_pcrs,
)
from tests.ansible.playbook_runner import (
    VENV_BIN,
    PlaybookRun,
    extra_vars,
    private_emulator_root,
    run_playbook,
)
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

HELLO = yaml.safe_load((REPO_ROOT / "examples" / "hello" / "enclaver.yaml").read_text())
# A container name and host ports of this test's own: other tests deploy "hello" on theirs.
ROLL_NAME = "enclaveops-test-roll"
APP_HOST_PORT = 28180
AUX_API_HOST_PORT = 29201
ROLL_VARS = {
    "enclave_name": ROLL_NAME,
    "teardown_enclave_name": ROLL_NAME,
    "enclave_published_ports": [f"{APP_HOST_PORT}:8080", f"{AUX_API_HOST_PORT}:9101"],
}
TEST_LABEL = "org.enclaveops.test=build-and-roll"
PCRS = ("PCR0", "PCR1", "PCR2")


def _docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def _container_image_id() -> str:
    return _docker("inspect", "--format", "{{.Image}}", ROLL_NAME)


def _app_answers() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{APP_HOST_PORT}/", timeout=10) as response:
        return response.read().decode()


def _attested_pcrs(emulator_root: Path, record: dict) -> dict[int, str]:
    """A fresh document from the published aux API, verified against the emulator's root and
    the recorded PCR0-2 (raises, naming the check, when it does not verify)."""
    result = attest(
        AttestationSource(url=f"http://127.0.0.1:{AUX_API_HOST_PORT}"),
        expected_pcrs=parse_expected_pcrs({p: record["measurements"][p] for p in PCRS}),
        root=load_root(emulator_root / "ca" / "root.pem"),
    )
    return {index: value.hex() for index, value in result.verified.document.pcrs.items()}


def _eif_measurements(image_id: str, work: Path) -> dict[str, str]:
    """`enclaveops eif describe` of the EIF the release image carries."""
    container = _docker("create", "--label", TEST_LABEL, image_id)
    try:
        _docker("cp", f"{container}:/enclave/application.eif", str(work / "application.eif"))
    finally:
        _docker("rm", container)
    described = subprocess.run(
        [str(VENV_BIN / "enclaveops"), "eif", "describe", str(work / "application.eif")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert described.returncode == 0, described.stderr
    return json.loads(described.stdout)["Measurements"]


@pytest.fixture(scope="module")
def emulator_root() -> Iterator[Path]:
    root = private_emulator_root()
    yield root
    teardown = run_playbook("teardown.yml", "-e", extra_vars(root, **ROLL_VARS))
    left = subprocess.run(["docker", "inspect", ROLL_NAME], capture_output=True, check=False)
    shutil.rmtree(root, ignore_errors=True)
    assert teardown.returncode == 0, teardown.output[-4000:]
    assert left.returncode != 0, f"teardown.yml left the container {ROLL_NAME}"


@pytest.fixture(scope="module")
def record_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="enclaveops-build-record-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def record(emulator_root: Path, record_dir: Path) -> dict:
    build = run_playbook(
        "build.yml", "-e", extra_vars(emulator_root, build_measurements_dir=str(record_dir))
    )
    assert build.returncode == 0, build.output[-6000:]
    return json.loads((record_dir / f"{HELLO['name']}.json").read_text())


@pytest.fixture(scope="module")
def first_roll(emulator_root: Path, record_dir: Path, record: dict) -> PlaybookRun:
    return _roll(emulator_root, record_dir / f"{HELLO['name']}.json")


def _roll(emulator_root: Path, record_file: Path) -> PlaybookRun:
    return run_playbook(
        "rolling-update.yml",
        "-e",
        extra_vars(emulator_root, rolling_update_record=str(record_file), **ROLL_VARS),
    )


def test_build_records_the_release_image_as_build_prints_it_and_its_eif_pcrs(
    record: dict, record_dir: Path
) -> None:
    assert record["name"] == HELLO["name"]
    assert record["image"] == f"{HELLO['target']}@{record['image_id']}"
    assert (record["ingress_ports"], record["aux_api_port"]) == ([8080, 9101], 9101)
    labels = json.loads(
        _docker("image", "inspect", "--format", "{{json .Config.Labels}}", record["image_id"])
    )
    labelled = json.loads(labels["org.enclaveops.build.measurements"])
    described = _eif_measurements(record["image_id"], record_dir)
    for pcr in PCRS:
        assert record["measurements"][pcr] == labelled[pcr] == described[pcr]


def test_roll_deploys_the_recorded_image_attested_against_the_recorded_pcrs(
    first_roll: PlaybookRun, record: dict, emulator_root: Path
) -> None:
    assert first_roll.returncode == 0, first_roll.output[-6000:]
    assert _container_image_id() == record["image_id"]
    assert _app_answers()
    attested = _attested_pcrs(emulator_root, record)
    for index, pcr in enumerate(PCRS):
        assert attested[index] == record["measurements"][pcr]
        assert f"PCR{index} {record['measurements'][pcr]}" in first_roll.output
    assert f"(sleeve, {record['image']})" in first_roll.output


def test_a_second_roll_changes_nothing(
    first_roll: PlaybookRun, record_dir: Path, emulator_root: Path
) -> None:
    assert first_roll.returncode == 0, first_roll.output[-6000:]
    second = _roll(emulator_root, record_dir / f"{HELLO['name']}.json")
    assert second.returncode == 0, second.output[-6000:]
    assert second.changed == 0, second.output[-6000:]


@pytest.fixture
def relabelled_release(record: dict) -> Iterator[str]:
    """The recorded release image with one more label: another image ID, the same EIF."""
    tag = "enclaveops-test/hello-release:wrong-pcr0"
    built = subprocess.run(
        ["docker", "build", "--quiet", "--label", TEST_LABEL, "--tag", tag, "-"],
        input=f"FROM {record['image_id']}\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    yield f"{tag}@{built.stdout.strip()}"
    subprocess.run(["docker", "rmi", "--force", tag], capture_output=True, check=False)


def test_a_record_with_a_wrong_pcr0_fails_the_roll_and_the_previous_deployment_answers(
    first_roll: PlaybookRun,
    record: dict,
    emulator_root: Path,
    relabelled_release: str,
    tmp_path: Path,
) -> None:
    assert first_roll.returncode == 0, first_roll.output[-6000:]
    wrong_pcr0 = "ab" * 48
    wrong = {
        **record,
        "image": relabelled_release,
        "image_id": relabelled_release.rsplit("@", 1)[1],
        "measurements": {**record["measurements"], "PCR0": wrong_pcr0},
    }
    (tmp_path / "hello.json").write_text(json.dumps(wrong))

    roll = _roll(emulator_root, tmp_path / "hello.json")

    assert roll.returncode != 0, roll.output[-6000:]
    assert f"pcr 0: expected {wrong_pcr0}, document has {record['measurements']['PCR0']}" in (
        roll.output
    ), roll.output[-6000:]
    assert "previous deployment restored" in roll.output, roll.output[-6000:]
    assert _container_image_id() == record["image_id"]
    assert _app_answers()
    assert _attested_pcrs(emulator_root, record)[0] == record["measurements"]["PCR0"]
