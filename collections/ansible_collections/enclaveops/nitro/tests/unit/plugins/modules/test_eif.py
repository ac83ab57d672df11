# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""enclaveops.nitro.eif: a real native build over a stand-in Docker engine (FakeEngine serves
one image and its export), skipped when the inputs are unchanged, predicted in check mode."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest
from ansible_collections.enclaveops.nitro.plugins.modules import eif

docker = pytest.importorskip("docker")
docker_engine = pytest.importorskip("enclave_runtime.host.docker_engine")
eif_format = pytest.importorskip("enclave_runtime.formats.eif")

IMAGE = "app:1"
ATTRS = {
    "Id": "sha256:" + "ab" * 32,
    "Created": "2024-05-01T10:00:00Z",
    "Architecture": "amd64",
    "Os": "linux",
    "Config": {"Cmd": ["/app/server"], "Env": ["PATH=/bin"]},
    "RootFS": {"Type": "layers", "Layers": ["sha256:" + "cd" * 32]},
}


def export_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("app/server", b"#!/bin/sh\necho hi\n"), ("bin/sh", b"\x7fELF")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class FakeContainer:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.id = f"c{len(engine.containers_made):04d}"

    def export(self, chunk_size: int) -> Iterator[bytes]:
        yield self.engine.export

    def remove(self, **_options: Any) -> None:
        pass


class FakeImage:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs
        self.id = attrs["Id"]


class FakeEngine:
    """images.get and containers.create/export: what the native builder uses."""

    def __init__(self) -> None:
        self.known = {IMAGE: ATTRS}
        self.export = export_tar()
        self.containers_made: list[dict[str, Any]] = []
        self.images = self
        self.containers = self

    def get(self, reference: str) -> FakeImage:
        if reference not in self.known:
            raise docker.errors.ImageNotFound(f"No such image: {reference}")
        return FakeImage(self.known[reference])

    def create(self, image: str, **options: Any) -> FakeContainer:
        self.containers_made.append(dict(options, image=image))
        return FakeContainer(self)


@pytest.fixture
def engine(monkeypatch) -> FakeEngine:
    fake = FakeEngine()
    monkeypatch.setattr(docker_engine, "docker_client", lambda: fake)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.delenv("NITRO_CLI_BLOBS", raising=False)
    return fake


def args(tmp_path, **extra: Any) -> dict[str, Any]:
    return {"image": IMAGE, "output": str(tmp_path / "app.eif"), "builder": "native", **extra}


def test_builds_then_leaves_an_unchanged_eif_alone(run_module, engine, tmp_path) -> None:
    built = run_module(eif.main, args(tmp_path))
    again = run_module(eif.main, args(tmp_path))

    assert built["changed"] is True and not built["failed"]
    assert built["reason"] == f"{tmp_path / 'app.eif'} does not exist"
    assert built["measurements"] == eif_format.measure(tmp_path / "app.eif").to_nitro_cli()
    assert (built["image_id"], built["builder"]) == (ATTRS["Id"], "native")
    assert again["changed"] is False
    assert again["reason"] == f"inputs unchanged: {tmp_path / 'app.eif'} was built from them"
    assert (again["measurements"], again["inputs_digest"]) == (
        built["measurements"],
        built["inputs_digest"],
    )
    assert len(engine.containers_made) == 1


def test_check_mode_predicts_without_writing(run_module, engine, tmp_path) -> None:
    predicted = run_module(eif.main, args(tmp_path), check_mode=True)

    assert predicted["changed"] is True
    assert predicted["measurements"] is None
    assert not (tmp_path / "app.eif").exists()
    built = run_module(eif.main, args(tmp_path))
    assert predicted["inputs_digest"] == built["inputs_digest"]
    unchanged = run_module(eif.main, args(tmp_path), check_mode=True)
    assert (unchanged["changed"], unchanged["measurements"]) == (False, built["measurements"])


def test_an_eif_changed_since_its_build_is_rebuilt(run_module, engine, tmp_path) -> None:
    run_module(eif.main, args(tmp_path))
    with (tmp_path / "app.eif").open("ab") as eif_file:
        eif_file.write(b"tampered")

    rebuilt = run_module(eif.main, args(tmp_path))

    assert rebuilt["changed"] is True
    assert rebuilt["reason"] == f"{tmp_path / 'app.eif'} changed since it was built"


def test_a_new_image_id_or_force_rebuilds(run_module, engine, tmp_path) -> None:
    first = run_module(eif.main, args(tmp_path))
    forced = run_module(eif.main, args(tmp_path, force=True))
    engine.known[IMAGE] = dict(ATTRS, Id="sha256:" + "ef" * 32)
    changed = run_module(eif.main, args(tmp_path))

    assert (forced["changed"], forced["reason"]) == (True, "forced (force)")
    assert changed["reason"] == "inputs changed since the last build"
    assert changed["inputs_digest"] != first["inputs_digest"]


def test_a_missing_image_fails_with_what_to_do(run_module, engine, tmp_path) -> None:
    result = run_module(eif.main, args(tmp_path, image="absent:1"))

    assert result["failed"]
    assert result["msg"].startswith(
        "cannot build the EIF of absent:1: the Docker image 'absent:1' is not present locally"
    )


def test_a_missing_signing_key_is_named(run_module, engine, tmp_path) -> None:
    (tmp_path / "cert.pem").write_text("cert")
    extra = dict(signing_certificate=str(tmp_path / "cert.pem"), signing_key="/none/key.pem")

    result = run_module(eif.main, args(tmp_path, **extra))

    assert result["failed"]
    assert result["msg"] == (
        "cannot build the EIF of app:1: signing_key: /none/key.pem is not a file; give the path "
        "of the PEM file"
    )


# A stand-in for AWS's nitro-cli build-enclave: it records the NITRO_CLI_BLOBS it was given,
# writes the EIF bytes it finds in ./eif (or half an EIF), then answers as nitro-cli does.
NITRO_CLI = """\
#!/bin/sh
here=$(dirname "$0")
if [ "$1" = "--version" ]; then echo "Nitro CLI 1.4.2"; exit 0; fi
while [ $# -gt 0 ]; do [ "$1" = "--output-file" ] && out="$2"; shift; done
printf '%s' "$NITRO_CLI_BLOBS" > "$here/blobs-seen"
if [ -f "$here/eif" ]; then
    cat "$here/eif" > "$out"
    printf '{"Measurements": {"HashAlgorithm": "Sha384 { ... }", '
    printf '"PCR0": "@0", "PCR1": "@1", "PCR2": "@2"}}\n'
    exit 0
fi
printf 'half an EIF' > "$out"
echo "[ E48 ] EIF building error. Such error appears when trying to build an EIF file." >&2
exit 48
"""
PCRS = {f"PCR{index}": f"{index:02x}" * 48 for index in range(3)}


@pytest.fixture
def nitro_cli(tmp_path) -> dict[str, Any]:
    """Arguments for a nitro-cli build with ``blobs`` given as a string, as YAML gives it."""
    tools = tmp_path / "tools"
    (tools / "blobs").mkdir(parents=True)
    (tools / "blobs" / "bzImage").write_bytes(b"kernel")
    script = tools / "nitro-cli"
    text = NITRO_CLI
    for index in range(3):
        text = text.replace(f"@{index}", PCRS[f"PCR{index}"])
    script.write_text(text)
    script.chmod(0o755)
    return {"builder": "nitro-cli", "nitro_cli_path": str(script), "blobs": str(tools / "blobs")}


def test_nitro_cli_builds_with_the_blobs_directory_given_as_a_string(
    run_module, engine, tmp_path, nitro_cli
) -> None:
    tools = tmp_path / "tools"
    (tools / "eif").write_bytes(b"an EIF from nitro-cli")

    built = run_module(eif.main, args(tmp_path, **nitro_cli))

    assert not built["failed"], built["msg"]
    assert (built["changed"], built["builder"]) == (True, "nitro-cli")
    assert {key: built["measurements"][key] for key in PCRS} == PCRS
    assert (tmp_path / "app.eif").read_bytes() == b"an EIF from nitro-cli"
    assert (tools / "blobs-seen").read_text() == str(tools / "blobs")
    assert run_module(eif.main, args(tmp_path, **nitro_cli))["changed"] is False


def test_a_failed_build_leaves_the_previous_eif_whole(run_module, engine, tmp_path, nitro_cli):
    run_module(eif.main, args(tmp_path))
    working = (tmp_path / "app.eif").read_bytes()

    failed = run_module(eif.main, args(tmp_path, **nitro_cli))

    assert failed["failed"]
    assert failed["msg"].startswith("cannot build the EIF of app:1: ")
    assert "[ E48 ] EIF building error" in failed["msg"]
    assert (tmp_path / "app.eif").read_bytes() == working
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "app.eif",
        "app.eif.build.json",
        "tools",
    ]
