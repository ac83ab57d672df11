"""One deterministic layer on an image: the layer tar, the image config and the docker load
tarball, without a Docker engine (a stand-in client records what would be loaded)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from enclave_runtime.build.image_layers import (
    ImageLoadError,
    ImageStoreError,
    LayerBuilder,
    LayerDigest,
    LayerError,
    NoSpaceError,
    append_layer,
    appended_config,
    canonical_json,
    container_config,
    creation_time,
    disk_error,
    image_id,
    parent_history,
)

LONG_NAME = "opt/enclave-runtime/lib/python3.11/site-packages/" + "deep/" * 20 + "module.py"


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, **fields: Any):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.uid, info.gid, info.uname, info.gname = 1000, 1000, "builder", "builder"
    info.mtime = fields.pop("mtime", 1_700_000_000)
    info.mode = fields.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    for key, value in fields.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
    return info, data


def export_of_runtime() -> bytes:
    """A ``docker export`` of a runtime image: the runtime plus Docker's container files."""
    return _tar(
        [
            _member(".dockerenv", data=b""),
            _member("etc/hostname", data=b"abc123\n"),
            _member("opt", tarfile.DIRTYPE, mtime=1_800_000_000),
            _member("opt/enclave-runtime", tarfile.DIRTYPE, mtime=1_800_000_000),
            _member("opt/enclave-runtime/bin", tarfile.DIRTYPE),
            _member("opt/enclave-runtime/bin/python3", data=b"\x7fELF python", mode=0o755),
            _member("opt/enclave-runtime/bin/odyn", data=b"#!/opt/enclave-runtime/bin/python3\n"),
            _member("opt/enclave-runtime/bin/python", tarfile.SYMTYPE, linkname="python3"),
            # a hard link whose name sorts before the file it links to
            _member(
                "opt/enclave-runtime/bin/a-python",
                tarfile.LNKTYPE,
                linkname="opt/enclave-runtime/bin/python3",
            ),
            _member(LONG_NAME, data=b"x = 1\n"),
            _member("opt/other/file", data=b"not the runtime"),
        ]
    )


def read_layer(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def write(builder: LayerBuilder) -> tuple[bytes, LayerDigest]:
    out = io.BytesIO()
    digest = builder.write(out)
    return out.getvalue(), digest


# --------------------------------------------------------------------------------------------
# The layer tar


def test_the_same_files_added_in_any_order_give_the_same_bytes_and_diff_id(tmp_path) -> None:
    first = LayerBuilder(spool_dir=tmp_path)
    first.add_bytes("etc/enclaver/enclaver.yaml", b"version: v1\n")
    first.add_directory("enclave")
    first.add_bytes("enclave/a", b"A", mode=0o600)
    second = LayerBuilder(spool_dir=tmp_path)
    second.add_bytes("enclave/a", b"A", mode=0o600)
    second.add_bytes("/etc/enclaver/enclaver.yaml", b"version: v1\n")

    data, digest = write(first)

    assert write(second) == (data, digest)
    assert digest == LayerDigest("sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def test_entries_are_sorted_root_owned_with_parents_and_no_pax_headers(tmp_path) -> None:
    with LayerBuilder(mtime=1234, spool_dir=tmp_path) as builder:
        builder.add_bytes("etc/enclaver/enclaver.yaml", b"version: v1\n")
        builder.add_tree(io.BytesIO(export_of_runtime()), "/opt/enclave-runtime")
        data, _ = write(builder)

    members = read_layer(data)
    names = [member.name for member in members]
    assert names == sorted(names, key=lambda name: name.encode())
    assert names[:3] == ["etc", "etc/enclaver", "etc/enclaver/enclaver.yaml"]
    assert "opt" in names and LONG_NAME in names
    assert not {".dockerenv", "etc/hostname", "opt/other/file"} & set(names)
    assert all((m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "") for m in members)
    assert all(not m.pax_headers for m in members)
    assert b"PaxHeader" not in data and b"././@LongLink" in data


def test_directories_get_the_fixed_time_and_copied_files_keep_theirs(tmp_path) -> None:
    with LayerBuilder(mtime=1234, spool_dir=tmp_path) as builder:
        builder.add_tree(io.BytesIO(export_of_runtime()), "opt/enclave-runtime")
        builder.add_bytes("etc/enclaver/enclaver.yaml", b"v")
        members = {m.name: m for m in read_layer(write(builder)[0])}

    assert members["opt/enclave-runtime"].mtime == 1234
    assert members["opt"].mtime == 1234
    assert members["etc/enclaver/enclaver.yaml"].mtime == 1234
    assert members["opt/enclave-runtime/bin/python3"].mtime == 1_700_000_000
    assert members["opt/enclave-runtime/bin/python3"].mode == 0o755


def test_links_stay_links_and_file_data_is_written_once(tmp_path) -> None:
    with LayerBuilder(spool_dir=tmp_path) as builder:
        builder.add_tree(io.BytesIO(export_of_runtime()), "opt/enclave-runtime")
        data, _ = write(builder)
        via_symlink = builder.open("opt/enclave-runtime/bin/python").read()

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        first = tar.getmember("opt/enclave-runtime/bin/a-python")
        second = tar.getmember("opt/enclave-runtime/bin/python3")
        symlink = tar.getmember("opt/enclave-runtime/bin/python")
        extracted = tar.extractfile(first)
        assert extracted is not None
        assert extracted.read() == b"\x7fELF python"
    assert first.isreg() and second.islnk()
    assert second.linkname == "opt/enclave-runtime/bin/a-python"
    assert symlink.issym() and symlink.linkname == "python3"
    assert via_symlink == b"\x7fELF python"


def test_a_tree_without_the_prefix_is_an_error(tmp_path) -> None:
    with LayerBuilder(spool_dir=tmp_path) as builder, pytest.raises(LayerError) as err:
        builder.add_tree(io.BytesIO(export_of_runtime()), "opt/missing")

    assert str(err.value) == "the source has nothing at /opt/missing"


def test_device_nodes_and_unsafe_names_are_refused(tmp_path) -> None:
    device = _tar([_member("opt/enclave-runtime/null", tarfile.CHRTYPE, devmajor=1, devminor=3)])
    with LayerBuilder(spool_dir=tmp_path) as builder:
        with pytest.raises(LayerError, match="is a device node or FIFO"):
            builder.add_tree(io.BytesIO(device), "opt/enclave-runtime")
        with pytest.raises(LayerError, match=r"has a '\.\.' component"):
            builder.add_bytes("etc/../../x", b"")


def test_a_file_cannot_lie_below_a_file(tmp_path) -> None:
    builder = LayerBuilder(spool_dir=tmp_path)
    builder.add_bytes("enclave", b"a file")

    with pytest.raises(LayerError, match="/enclave/x would lie below /enclave, which is a file"):
        builder.add_bytes("enclave/x", b"")


def test_a_full_disk_is_reported_with_the_directory_and_the_size_needed(tmp_path) -> None:
    err = disk_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path, 300_000_000)

    assert isinstance(err, NoSpaceError)
    assert f"no space left on the device of {tmp_path}: about 300 MB are needed" in str(err)
    assert "TMPDIR" in str(err)


# --------------------------------------------------------------------------------------------
# The image config


def inspect(**config: Any) -> dict[str, Any]:
    return {
        "Id": "sha256:" + "11" * 32,
        "Created": "2024-05-01T10:00:00.123456789Z",
        "Architecture": "arm64",
        "Variant": "v8",
        "Os": "linux",
        "RootFS": {"Type": "layers", "Layers": ["sha256:" + "aa" * 32, "sha256:" + "bb" * 32]},
        "Config": {
            "Hostname": "",
            "AttachStdin": False,
            "Env": ["PATH=/usr/bin:/bin"],
            "Cmd": ["python3", "app.py"],
            "Entrypoint": None,
            "WorkingDir": "",
            "Labels": None,
            **config,
        },
    }


HISTORY = [  # docker history: newest first; size 0 for entries that made no layer
    {"Created": 1714557600, "CreatedBy": 'CMD ["python3"]', "Size": 0, "Id": "sha256:x"},
    {"Created": 1714557500, "CreatedBy": "COPY app.py /", "Size": 100, "Id": "<missing>"},
    {"Created": 1700000000, "CreatedBy": "", "Comment": "Imported from -", "Size": 9, "Tags": None},
]


def test_only_image_spec_keys_with_values_are_carried_over() -> None:
    assert container_config(inspect()) == {
        "Env": ["PATH=/usr/bin:/bin"],
        "Cmd": ["python3", "app.py"],
    }


def test_the_config_appends_the_layer_and_keeps_platform_and_history(monkeypatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    layer = LayerDigest("sha256:" + "cc" * 32, 2048)

    document = appended_config(inspect(), HISTORY, {"Env": ["A=1"]}, layer, "enclaveops amend")

    assert document["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + "aa" * 32, "sha256:" + "bb" * 32, "sha256:" + "cc" * 32],
    }
    assert (document["architecture"], document["variant"], document["os"]) == (
        "arm64",
        "v8",
        "linux",
    )
    assert document["created"] == "2024-05-01T10:00:00.123456789Z"
    assert document["history"] == [
        {"created": "2023-11-14T22:13:20Z", "comment": "Imported from -"},
        {"created": "2024-05-01T09:58:20Z", "created_by": "COPY app.py /"},
        {"created": "2024-05-01T10:00:00Z", "created_by": 'CMD ["python3"]', "empty_layer": True},
        {"created": "2024-05-01T10:00:00.123456789Z", "created_by": "enclaveops amend"},
    ]


def test_history_that_does_not_match_the_layers_is_left_out() -> None:
    assert parent_history(HISTORY, layer_count=3) == []


def test_source_date_epoch_fixes_the_creation_time(monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert creation_time(inspect()) == "2023-11-14T22:13:20Z"

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(LayerError, match="SOURCE_DATE_EPOCH is 'yesterday'; set it to whole"):
        creation_time(inspect())


def test_canonical_json_has_one_spelling_and_the_id_is_its_sha256() -> None:
    assert canonical_json({"b": [1, "é"], "a": None}) == '{"a":null,"b":[1,"é"]}'.encode()
    assert image_id(b"{}") == "sha256:" + hashlib.sha256(b"{}").hexdigest()


# --------------------------------------------------------------------------------------------
# Loading, over a stand-in engine


class FakeImage:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs
        self.id = attrs["Id"]


class FakeEngine:
    """What append_layer uses: api.history, api.load_image, images.get, info."""

    def __init__(
        self,
        load_events: list[dict[str, Any]] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.answer = info or {"DockerRootDir": "/var/lib/docker", "Driver": "overlay2"}
        self.loaded = b""
        self.loaded_id = ""
        self.load_events = load_events
        self.api = self
        self.images = self

    def history(self, image_id: str) -> list[dict[str, Any]]:
        return HISTORY[1:]

    def load_image(self, tarball: Iterator[bytes]) -> Iterator[dict[str, Any]]:
        self.loaded = b"".join(tarball)
        with tarfile.open(fileobj=io.BytesIO(self.loaded)) as tar:
            extracted = tar.extractfile("manifest.json")
            assert extracted is not None
            config_name = json.loads(extracted.read())[0]["Config"]
        self.loaded_id = "sha256:" + config_name.removesuffix(".json")
        return iter(self.load_events or [{"stream": "Loaded image: app-amended:1\n"}])

    def get(self, reference: str) -> FakeImage:
        if not self.loaded_id:
            raise docker.errors.ImageNotFound(reference)
        return FakeImage({"Id": self.loaded_id})

    def info(self) -> dict[str, Any]:
        return self.answer


def _append(engine: FakeEngine, tmp_path: Path):
    parent = FakeImage(inspect())
    with LayerBuilder(spool_dir=tmp_path) as builder:
        builder.add_bytes("etc/enclaver/enclaver.yaml", b"version: v1\n")
        return append_layer(
            engine, parent, builder, {"Env": ["A=1"]}, reference="app-amended:1", created_by="t"
        )


def test_the_load_tarball_holds_the_new_layer_the_config_and_the_manifest(tmp_path) -> None:
    engine = FakeEngine()

    appended = _append(engine, tmp_path)

    with tarfile.open(fileobj=io.BytesIO(engine.loaded)) as tar:
        contents = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert appended.layer is not None
    layer_path = appended.layer.diff_id.removeprefix("sha256:") + "/layer.tar"
    config_name = appended.image_id.removeprefix("sha256:") + ".json"
    assert sorted(contents) == sorted([layer_path, config_name, "manifest.json"])
    assert image_id(contents[config_name]) == appended.image_id
    assert json.loads(contents["manifest.json"]) == [
        {
            "Config": config_name,
            "RepoTags": ["app-amended:1"],
            "Layers": ["aa" * 32 + "/layer.tar", "bb" * 32 + "/layer.tar", layer_path],
        }
    ]
    assert hashlib.sha256(contents[layer_path]).hexdigest() == layer_path.split("/")[0]


def test_appending_twice_gives_the_same_image_id(tmp_path) -> None:
    assert _append(FakeEngine(), tmp_path) == _append(FakeEngine(), tmp_path)


def test_a_full_docker_root_is_reported_with_its_path(tmp_path) -> None:
    full = [{"error": "write /var/lib/docker/tmp/x: no space left on device"}]

    with pytest.raises(NoSpaceError, match="the Docker data root /var/lib/docker: about"):
        _append(FakeEngine(full), tmp_path)


def test_an_engine_that_refuses_the_image_says_why(tmp_path) -> None:
    refused = [{"error": "invalid manifest, layers length mismatch"}]

    with pytest.raises(ImageLoadError, match="refused the new image: invalid manifest"):
        _append(FakeEngine(refused), tmp_path)


def test_the_containerd_image_store_is_refused_before_loading(tmp_path) -> None:
    containerd = {
        "Driver": "overlayfs",
        "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]],
    }
    engine = FakeEngine(info=containerd)

    with pytest.raises(ImageStoreError, match=r"containerd image store .*/etc/docker/daemon\.json"):
        _append(engine, tmp_path)

    assert engine.loaded == b""
