"""The native EIF builder without a Docker engine: command and environment derivation, blobs,
the bootstrap ramdisk, the flattened root file system and the build over a stand-in client."""

from __future__ import annotations

import hashlib
import io
import random
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import docker
import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.build import docker_rootfs
from enclave_runtime.build.docker_rootfs import (
    FlatRootfs,
    ImageConfig,
    ImageConfigError,
    RootfsError,
    cmd_file,
    docker_info,
    env_file,
    image_config,
)
from enclave_runtime.build.eif_builder import (
    PLACEHOLDER_BLOBS,
    BlobError,
    bootstrap_ramdisk,
    build_eif_from_image,
    build_from_docker_image,
    customer_ramdisk,
    find_blobs,
    kernel_build_info,
    repository_name,
)
from enclave_runtime.emulator.sandbox import read_config_lines
from enclave_runtime.formats.cpio import CpioEntry, CpioWriter, extract, read_archive
from enclave_runtime.formats.eif import read_eif
from enclave_runtime.formats.eif_metadata import EifMetadataError, read_custom_metadata
from enclave_runtime.formats.nitro_cli_errors import NitroCliError
from enclave_runtime.formats.pcr import pcr_of
from enclave_runtime.host import docker_engine
from enclave_runtime.host.docker_engine import DockerUnavailableError, ImageNotFoundError

# The placeholder blobs are part of every emulator EIF's PCR0/PCR1: they must never change.
PLACEHOLDER_DIGESTS = {
    "Image": "7061dfb12225bee1a1df9c21e70ebe51f5d3bc648f4367a31c20299ad7aed099",
    "Image.config": "234b0a1b79539d0c3d4d9dfc57e415fa89d4141dbc44ef37121a1d3d6cc89cae",
    "bzImage": "4e01c395f0ff878084d7d2dc0bbc813c0200b468f5fde0014e4b73c5a8d5a334",
    "bzImage.config": "5a3ee9e9f157a9020e1c89a4e4b5f2f2b146a0daec39e851d305d120032c62cc",
    "cmdline": "14e94d3f403f6d15192ca6f964e35a628cf19620ee945fa89d0f772a09d056ed",
    "init": "b756d1e96b8c0189a50c02c2ce725451c0a1f8b34bb6a30715740ff598fe83f8",
    "nsm.ko": "a78f609188657c9d5e552c80ac0d459438ff99c06135f30bb1d9f4f577235ac4",
}
PLACEHOLDER_PCR1 = (
    "0c18a7fbcb7a6614b0489d0d000ba64ed0a0227bb79a55c549738471d78f623d"
    "ef22ee1fcb9ccd6fee31b1ec1911842c"
)
AWS_KERNEL_CONFIG = (
    "#\n# Automatically generated file; DO NOT EDIT.\n"
    "# Linux/x86_64 4.14.256-209.484.amzn2.x86_64 Kernel Configuration\n#\nCONFIG_64BIT=y\n"
)
IMAGE_ID = "sha256:" + "ab" * 32


def inspect(config: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A ``docker inspect`` document shaped like the engine's."""
    attrs: dict[str, Any] = {
        "Id": IMAGE_ID,
        "RepoTags": ["app:1"],
        "RepoDigests": [],
        "Parent": "",
        "Created": "2024-05-01T10:00:00Z",
        "DockerVersion": "24.0.7",
        "Author": "",
        "Architecture": "amd64",
        "Os": "linux",
        "Size": 123,
        "GraphDriver": {"Data": {"MergedDir": "/var/lib/docker/overlay2/x/merged"}},
        "RootFS": {"Type": "layers", "Layers": ["sha256:" + "cd" * 32]},
        "Metadata": {"LastTagTime": "2024-05-02T11:22:33.123Z"},
        "Config": {
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hi there"],
            "Cmd": ["/app/server", "--port", "8000"],
            "Entrypoint": None,
            "WorkingDir": "/app",
            "User": "app",
            **(config or {}),
        },
    }
    attrs.update(top)
    return attrs


# --------------------------------------------------------------------------------------------
# cmd and env


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "expected"),
    [
        (None, ["/app/server", "-v"], ("/app/server", "-v")),
        (["/app/entry"], None, ("/app/entry",)),
        # nitro-cli runs CMD alone when both are set; docker run would run both.
        (["/app/entry", "--flag"], ["serve"], ("serve",)),
        (["/app/entry"], [], ("/app/entry",)),
    ],
)
def test_the_enclave_command_follows_nitro_cli(
    entrypoint: list[str] | None, cmd: list[str] | None, expected: tuple[str, ...]
) -> None:
    config = image_config(inspect({"Entrypoint": entrypoint, "Cmd": cmd}))

    assert config.enclave_command() == expected


def test_docker_command_is_entrypoint_then_cmd() -> None:
    config = image_config(inspect({"Entrypoint": ["/app/entry", "--flag"], "Cmd": ["serve"]}))

    assert config.docker_command() == ("/app/entry", "--flag", "serve")


def test_an_image_without_a_command_is_refused() -> None:
    config = image_config(inspect({"Entrypoint": None, "Cmd": None}))

    with pytest.raises(ImageConfigError, match="neither CMD nor ENTRYPOINT"):
        cmd_file(config)


def test_cmd_and_env_files_are_one_entry_per_line_as_aws_init_reads_them(tmp_path) -> None:
    config = image_config(inspect())
    (tmp_path / "cmd").write_bytes(cmd_file(config))
    (tmp_path / "env").write_bytes(env_file(config))

    assert cmd_file(config) == b"/app/server\n--port\n8000\n"
    assert env_file(config) == b"PATH=/usr/bin:/bin\nGREETING=hi there\n"
    assert read_config_lines(tmp_path / "cmd") == ["/app/server", "--port", "8000"]
    assert read_config_lines(tmp_path / "env") == ["PATH=/usr/bin:/bin", "GREETING=hi there"]


def test_an_image_without_env_gets_an_empty_env_file() -> None:
    assert env_file(image_config(inspect({"Env": None}))) == b""


def test_a_newline_inside_an_argument_is_refused_with_its_position() -> None:
    config = image_config(inspect({"Cmd": ["/bin/sh", "-c", "echo a\necho b"]}))

    with pytest.raises(ImageConfigError, match=r"entry 2 .* one entry per line"):
        cmd_file(config)


def test_the_image_config_keeps_workdir_and_user() -> None:
    config = image_config(inspect())

    assert (config.working_dir, config.user, config.image_id) == ("/app", "app", IMAGE_ID)


@pytest.mark.parametrize(("docker_arch", "eif_arch"), [("amd64", "x86_64"), ("arm64", "aarch64")])
def test_image_architectures_map_to_eif_architectures(docker_arch: str, eif_arch: str) -> None:
    assert image_config(inspect(Architecture=docker_arch)).eif_arch == eif_arch


def test_an_unsupported_architecture_is_refused() -> None:
    with pytest.raises(ImageConfigError, match=r"'s390x'.*amd64 or arm64"):
        _ = image_config(inspect(Architecture="s390x")).eif_arch


def test_a_config_that_is_not_a_list_of_strings_is_refused() -> None:
    with pytest.raises(ImageConfigError, match=r"Config\.Cmd"):
        image_config(inspect({"Cmd": [1, 2]}))


# --------------------------------------------------------------------------------------------
# metadata


def test_docker_info_keeps_only_what_the_image_id_covers() -> None:
    info = docker_info(inspect())

    assert set(info) == {
        "Id",
        "Created",
        "Author",
        "DockerVersion",
        "Architecture",
        "Os",
        "Config",
        "RootFS",
    }


@pytest.mark.parametrize(
    ("reference", "name"),
    [
        ("hello", "hello"),
        ("hello:1.0", "hello"),
        ("registry.example.com:5000/team/app:2", "registry.example.com:5000/team/app"),
        ("localhost:5000/app", "localhost:5000/app"),
        ("app@sha256:" + "0" * 64, "app"),
    ],
)
def test_the_default_image_name_is_the_reference_without_tag(reference: str, name: str) -> None:
    assert repository_name(reference) == name


def test_build_info_is_parsed_from_the_third_line_of_the_kernel_config(tmp_path) -> None:
    config = tmp_path / "bzImage.config"
    config.write_text(AWS_KERNEL_CONFIG)

    info = kernel_build_info(config)

    assert (info.operating_system, info.kernel_version) == ("Linux", "4.14.256")
    assert info.build_time == "1970-01-01T00:00:00+00:00"


def test_build_time_comes_from_source_date_epoch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")

    info = kernel_build_info(PLACEHOLDER_BLOBS / "bzImage.config")

    assert info.build_time == "2023-11-14T22:13:20+00:00"
    assert info.kernel_version == "nitro_emu_placeholder"


def test_a_short_kernel_config_gives_unknown(tmp_path) -> None:
    config = tmp_path / "bzImage.config"
    config.write_text("#\n")

    info = kernel_build_info(config)

    assert (info.operating_system, info.kernel_version) == ("Unknown", "Unknown")


def test_custom_metadata_follows_nitro_cli_limits(tmp_path) -> None:
    good, big, bad = tmp_path / "good.json", tmp_path / "big.json", tmp_path / "bad.json"
    good.write_text('{"commit": "abc"}')
    big.write_text(f'{{"x": "{"y" * 4100}"}}')
    bad.write_text("{not json")

    assert read_custom_metadata(good) == {"commit": "abc"}
    with pytest.raises(EifMetadataError, match="4096"):
        read_custom_metadata(big)
    with pytest.raises(EifMetadataError, match="not JSON"):
        read_custom_metadata(bad)
    with pytest.raises(EifMetadataError, match="does not exist"):
        read_custom_metadata(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------
# blobs and the bootstrap ramdisk


def test_the_placeholder_blobs_never_change() -> None:
    digests = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in PLACEHOLDER_BLOBS.iterdir()
        if path.name != "README.md"
    }

    assert digests == PLACEHOLDER_DIGESTS
    for name in ("bzImage", "Image", "init", "nsm.ko"):
        assert (
            (PLACEHOLDER_BLOBS / name)
            .read_text()
            .startswith("nitro-emu placeholder, not bootable.")
        )


def test_pcr1_of_the_placeholder_blobs_is_pinned() -> None:
    blobs = find_blobs(PLACEHOLDER_BLOBS)

    pcr1 = pcr_of(
        blobs.kernel.read_bytes(), blobs.read_cmdline().encode(), bootstrap_ramdisk(blobs)
    )

    assert pcr1.hex() == PLACEHOLDER_PCR1


def test_the_bootstrap_ramdisk_holds_dev_init_and_nsm_ko() -> None:
    entries = read_archive(bootstrap_ramdisk(PLACEHOLDER_BLOBS))

    assert [(e.name, e.kind, e.permissions, e.uid, e.mtime) for e in entries] == [
        ("dev", "directory", 0o755, 0, 0),
        ("init", "file", 0o755, 0, 0),
        ("nsm.ko", "file", 0o755, 0, 0),
    ]
    assert entries[1].data == (PLACEHOLDER_BLOBS / "init").read_bytes()
    assert entries[2].data == (PLACEHOLDER_BLOBS / "nsm.ko").read_bytes()


def test_blobs_come_from_the_argument_then_nitro_cli_blobs_then_placeholders(
    tmp_path, monkeypatch
) -> None:
    copy = _copy_blobs(tmp_path / "env-blobs")
    monkeypatch.delenv("NITRO_CLI_BLOBS", raising=False)
    assert find_blobs().directory == PLACEHOLDER_BLOBS

    monkeypatch.setenv("NITRO_CLI_BLOBS", str(copy))
    assert find_blobs().directory == copy
    assert find_blobs(PLACEHOLDER_BLOBS).directory == PLACEHOLDER_BLOBS


def test_a_missing_blob_is_named_with_the_fix(tmp_path) -> None:
    blobs = _copy_blobs(tmp_path / "blobs")
    (blobs / "nsm.ko").unlink()

    with pytest.raises(BlobError, match=r"lacks nsm\.ko .*NITRO_CLI_BLOBS") as caught:
        find_blobs(blobs)

    assert caught.value.missing == (blobs / "nsm.ko",)


def test_arm64_images_take_the_image_kernel() -> None:
    blobs = find_blobs(PLACEHOLDER_BLOBS, "aarch64")

    assert blobs.kernel.name == "Image"
    assert blobs.kernel_config.name == "Image.config"


def _copy_blobs(target: Path) -> Path:
    target.mkdir()
    for path in PLACEHOLDER_BLOBS.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


# --------------------------------------------------------------------------------------------
# the flattened root file system


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = fields.pop("mtime", 1_700_000_000)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def make_tar(members: Sequence[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return out.getvalue()


def export_like_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    """What ``docker export`` gives for a small image, in its (walk) order."""
    return [
        (_member(".dockerenv", mtime=1_800_000_000, mode=0o755), b""),
        (_member("app", tarfile.DIRTYPE, mtime=1_800_000_000), b""),
        (_member("app/run.sh", mode=0o4755, uid=1000, gid=1001), b"#!/bin/sh\necho hi\n"),
        (_member("app/run-link.sh", tarfile.LNKTYPE, linkname="app/run.sh"), b""),
        (_member("app/current", tarfile.SYMTYPE, linkname="run.sh", mtime=1_600_000_000), b""),
        (_member("dev", tarfile.DIRTYPE), b""),
        (_member("dev/console", mode=0o755), b""),
        (_member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3), b""),
        (_member("dev/pts", tarfile.DIRTYPE), b""),
        (_member("etc", tarfile.DIRTYPE, mtime=1_800_000_000), b""),
        (_member("etc/hostname", mode=0o755), b""),
        (_member("etc/hosts", mode=0o755, mtime=1_800_000_000), b""),
        (_member("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n"),
        (_member("etc/resolv.conf", mode=0o755), b""),
        (_member("proc", tarfile.DIRTYPE), b""),
        (_member("run/fifo", tarfile.FIFOTYPE, mode=0o600), b""),
        (_member("sys", tarfile.DIRTYPE), b""),
        (_member("tmp", tarfile.DIRTYPE, mode=0o1777), b""),
    ]


def ramdisk_of(tar: bytes, config: ImageConfig | None = None, **options: Any) -> bytes:
    out = io.BytesIO()
    with FlatRootfs.read(io.BytesIO(tar)) as rootfs:
        customer_ramdisk(rootfs, config or image_config(inspect()), out, **options)
    return out.getvalue()


def by_name(archive: bytes) -> dict[str, CpioEntry]:
    return {entry.name: entry for entry in read_archive(archive)}


def test_the_customer_ramdisk_is_cmd_env_and_rootfs_in_bytewise_order() -> None:
    entries = read_archive(ramdisk_of(make_tar(export_like_members())))
    names = [entry.name for entry in entries]

    assert names[:3] == ["cmd", "env", "rootfs"]
    assert names == sorted(names, key=lambda name: name.encode())
    assert entries[0].data == b"/app/server\n--port\n8000\n"
    assert (entries[0].permissions, entries[1].permissions) == (0o644, 0o644)


def test_linuxkit_rules_drop_replace_and_add_what_nitro_cli_does() -> None:
    entries = by_name(ramdisk_of(make_tar(export_like_members())))

    for left_out in (".dockerenv", "dev/console", "etc/hostname"):
        assert f"rootfs/{left_out}" not in entries
    assert "rootfs/dev/pts" in entries  # linuxkit's exclude never matches directories
    hosts = entries["rootfs/etc/hosts"]
    assert hosts.data.startswith(b"127.0.0.1       localhost\n::1     localhost")
    assert (hosts.permissions, hosts.mtime) == (0o755, 0)
    assert entries["rootfs/etc/resolv.conf"].data == b"\n# no resolv.conf configured\n"
    assert entries["rootfs/etc/mtab"].data == b"/proc/mounts"
    for directory in ("dev/shm", "run", "var"):
        assert entries[f"rootfs/{directory}"].kind == "directory"


def test_owners_modes_links_and_devices_are_kept() -> None:
    entries = by_name(ramdisk_of(make_tar(export_like_members())))

    run, link = entries["rootfs/app/run.sh"], entries["rootfs/app/run-link.sh"]
    assert (run.uid, run.gid, run.permissions) == (1000, 1001, 0o4755)
    assert (run.ino, run.nlink, link.nlink) == (link.ino, 2, 2)
    assert run.data + link.data == b"#!/bin/sh\necho hi\n"
    assert entries["rootfs/app/current"].data == b"run.sh"
    null = entries["rootfs/dev/null"]
    assert (null.kind, null.rdevmajor, null.rdevminor, null.permissions) == ("char", 1, 3, 0o666)
    assert entries["rootfs/run/fifo"].kind == "fifo"
    assert entries["rootfs/tmp"].permissions == 0o1777


def test_directories_get_a_fixed_time_and_files_keep_the_images() -> None:
    entries = by_name(ramdisk_of(make_tar(export_like_members())))

    assert entries["rootfs/app"].mtime == 0
    assert entries["rootfs/etc"].mtime == 0
    assert entries["rootfs/app/run.sh"].mtime == 1_700_000_000
    assert entries["rootfs/app/current"].mtime == 1_600_000_000


def test_an_explicit_mtime_replaces_every_time() -> None:
    entries = read_archive(ramdisk_of(make_tar(export_like_members()), mtime=42))

    assert {entry.mtime for entry in entries} == {42}


def test_the_ramdisk_does_not_depend_on_the_export_order() -> None:
    members = export_like_members()
    shuffled = members[:]
    random.Random(7).shuffle(shuffled)
    # Hard links must still follow their targets, as in any tar stream.
    shuffled.sort(key=lambda member: member[0].islnk())

    assert ramdisk_of(make_tar(members)) == ramdisk_of(make_tar(shuffled))


def test_missing_parent_directories_are_created(tmp_path) -> None:
    tar = make_tar([(_member("opt/app/bin/tool", mode=0o755), b"x")])
    entries = by_name(ramdisk_of(tar))

    assert entries["rootfs/opt"].kind == entries["rootfs/opt/app/bin"].kind == "directory"
    extract(io.BytesIO(ramdisk_of(tar)), tmp_path / "out")
    assert (tmp_path / "out" / "rootfs" / "opt" / "app" / "bin" / "tool").read_bytes() == b"x"


def test_hard_links_unpack_as_one_inode(tmp_path) -> None:
    extract(io.BytesIO(ramdisk_of(make_tar(export_like_members()))), tmp_path, skip_devices=True)

    run, link = tmp_path / "rootfs/app/run.sh", tmp_path / "rootfs/app/run-link.sh"
    assert run.stat().st_ino == link.stat().st_ino
    assert link.read_bytes() == b"#!/bin/sh\necho hi\n"


def test_extended_attributes_are_reported_as_dropped() -> None:
    member = _member("usr/bin/ping", mode=0o755)
    member.pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}

    with FlatRootfs.read(io.BytesIO(make_tar([(member, b"elf")]))) as rootfs:
        assert rootfs.summary.xattrs_dropped == ("usr/bin/ping",)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(_member("../escape"), b"x")], r"'\.\./escape' is absolute or has a '\.\.'"),
        ([(_member("/etc/passwd"), b"x")], "absolute"),
        ([(_member("a", tarfile.LNKTYPE, linkname="missing"), b"")], "not an earlier file"),
        ([(_member("f"), b"x"), (_member("f/g"), b"y")], "'f', which is a file"),
    ],
)
def test_unsafe_or_inconsistent_exports_are_refused(
    members: list[tuple[tarfile.TarInfo, bytes]], message: str
) -> None:
    with pytest.raises(RootfsError, match=message):
        FlatRootfs.read(io.BytesIO(make_tar(members)))


def test_an_export_cut_between_members_is_refused() -> None:
    # tarfile alone would stop quietly there, and the ramdisk would lack the remaining files.
    data = make_tar(export_like_members())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmembers()[5].offset

    with pytest.raises(RootfsError, match=r"end-of-archive blocks .* truncated"):
        FlatRootfs.read(io.BytesIO(data[:cut]))


@pytest.mark.parametrize(
    ("pax", "expected_mtime"),
    [
        ({"mtime": "nan"}, 0),
        ({"mtime": "-5"}, 0),
        ({"mtime": "1e400"}, 0),
        ({"mtime": "1e20"}, 2**32 - 1),
    ],
)
def test_odd_file_times_are_clamped_to_what_newc_holds(
    pax: dict[str, str], expected_mtime: int
) -> None:
    member = _member("a")
    member.pax_headers = pax

    assert by_name(ramdisk_of(make_tar([(member, b"x")])))["rootfs/a"].mtime == expected_mtime


def test_an_owner_beyond_32_bits_is_refused() -> None:
    member = _member("a")
    member.pax_headers = {"uid": str(2**40)}

    with pytest.raises(RootfsError, match="'a' has uid 1099511627776"):
        FlatRootfs.read(io.BytesIO(make_tar([(member, b"x")])))


def test_a_stream_that_is_not_tar_is_refused() -> None:
    with pytest.raises(RootfsError, match="not a readable tar stream"):
        FlatRootfs.read(io.BytesIO(b"this is not a tar archive" * 40))


def test_a_spool_in_a_missing_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(docker_rootfs.SpoolError, match="TMPDIR"):
        FlatRootfs.read(io.BytesIO(make_tar([])), spool_dir=tmp_path / "missing")


VALID_TAR = make_tar(export_like_members())


@given(st.binary(max_size=4096))
def test_random_bytes_give_only_rootfs_errors(data: bytes) -> None:
    _read_or_refuse(data)


@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID_TAR) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, len(VALID_TAR)),
)
def test_mutated_exports_give_only_rootfs_errors(
    changes: list[tuple[int, int]], length: int
) -> None:
    data = bytearray(VALID_TAR)
    for offset, value in changes:
        data[offset] = value
    _read_or_refuse(bytes(data[:length]))


def _read_or_refuse(data: bytes) -> None:
    try:
        with FlatRootfs.read(io.BytesIO(data)) as rootfs, CpioWriter(io.BytesIO()) as writer:
            rootfs.write_to(writer)
    except RootfsError:
        pass


# --------------------------------------------------------------------------------------------
# building over a stand-in Docker client


class FakeContainer:
    def __init__(self, engine: FakeEngine, number: int) -> None:
        self.engine = engine
        self.id = f"container{number:04d}"

    def export(self, chunk_size: int) -> Iterator[bytes]:
        data = self.engine.export_data
        step = self.engine.chunk
        for start in range(0, len(data), step):
            yield data[start : start + step]

    def remove(self, v: bool, force: bool) -> None:
        self.engine.removed.append(self.id)


class FakeImage:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs
        self.id = attrs["Id"]


class FakeEngine:
    """What the builder uses of docker.DockerClient: images.get, containers.create, export."""

    def __init__(self, attrs: dict[str, Any], export_data: bytes, chunk: int = 4096) -> None:
        self.image = FakeImage(attrs)
        self.export_data = export_data
        self.chunk = chunk
        self.created: list[dict[str, Any]] = []
        self.removed: list[str] = []
        self.images = self
        self.containers = self

    def get(self, reference: str) -> FakeImage:
        if reference != "app:1":
            raise docker.errors.ImageNotFound(f"No such image: {reference}")
        return self.image

    def create(self, image_id: str, **options: Any) -> FakeContainer:
        self.created.append({"image": image_id, **options})
        return FakeContainer(self, len(self.created))


def test_builds_of_the_same_image_are_identical_whatever_the_container(tmp_path) -> None:
    tar = make_tar(export_like_members())
    first = FakeEngine(inspect(), tar, chunk=1000)
    second = FakeEngine(inspect(), tar, chunk=7)
    second.created.append({})  # so its container gets another ID

    pcrs = build_eif_from_image("app:1", tmp_path / "a.eif", client=first)
    again = build_eif_from_image("app:1", tmp_path / "b.eif", client=second)

    assert (tmp_path / "a.eif").read_bytes() == (tmp_path / "b.eif").read_bytes()
    assert pcrs == again
    assert first.removed == ["container0001"]
    assert second.removed == ["container0002"]
    assert first.created[0]["image"] == IMAGE_ID


def test_the_eif_carries_nitro_cli_metadata_without_host_state(tmp_path) -> None:
    engine = FakeEngine(inspect(), make_tar(export_like_members()))

    build_eif_from_image("app:1", tmp_path / "a.eif", client=engine, custom_metadata={"v": 1})

    metadata = read_eif(tmp_path / "a.eif").metadata
    assert metadata is not None
    assert (metadata.image_name, metadata.image_version) == ("app", "ab" * 32)
    assert metadata.build_info.build_time == "1970-01-01T00:00:00+00:00"
    assert metadata.build_info.kernel_version == "nitro_emu_placeholder"
    assert "GraphDriver" not in metadata.docker_info
    assert "Metadata" not in metadata.docker_info
    assert metadata.custom_metadata == {"v": 1}


def test_a_truncated_export_leaves_no_eif_and_no_container(tmp_path) -> None:
    tar = make_tar(export_like_members())
    engine = FakeEngine(inspect(), tar[: len(tar) // 2])

    with pytest.raises(RootfsError):
        build_eif_from_image("app:1", tmp_path / "a.eif", client=engine)

    assert list(tmp_path.iterdir()) == []
    assert engine.removed == ["container0001"]


def test_an_image_without_a_command_fails_before_the_export(tmp_path) -> None:
    engine = FakeEngine(inspect({"Cmd": None}), make_tar(export_like_members()))

    with pytest.raises(ImageConfigError):
        build_eif_from_image("app:1", tmp_path / "a.eif", client=engine)

    assert engine.created == []


def test_a_missing_image_is_not_pulled_by_default(tmp_path) -> None:
    engine = FakeEngine(inspect(), b"")

    with pytest.raises(ImageNotFoundError, match="'other:2' is not present locally"):
        build_eif_from_image("other:2", tmp_path / "a.eif", client=engine)


# --------------------------------------------------------------------------------------------
# errors before any image is touched


def test_without_the_docker_sdk_the_error_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "docker", None)

    with pytest.raises(DockerUnavailableError, match="pip install docker"):
        docker_engine.docker_client()


def test_an_engine_that_does_not_answer_is_named(monkeypatch, tmp_path) -> None:
    socket = tmp_path / "no-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket}")

    with pytest.raises(DockerUnavailableError, match=f"unix://{socket}.*start it"):
        docker_engine.docker_client()


def _build_enclave(tmp_path: Path, blobs: Path, metadata: Path | None = None) -> None:
    build_from_docker_image(
        docker_uri="app:1",
        output_path=tmp_path / "out.eif",
        blobs_dir=blobs,
        signing_certificate=None,
        private_key=None,
        image_name=None,
        image_version=None,
        metadata_path=metadata,
    )


def test_build_enclave_without_a_cmdline_blob_is_e19(tmp_path) -> None:
    blobs = _copy_blobs(tmp_path / "blobs")
    (blobs / "cmdline").unlink()

    with pytest.raises(NitroCliError) as caught:
        _build_enclave(tmp_path, blobs)

    assert caught.value.code == "E19"
    assert f"File: '{blobs / 'cmdline'}', failing operation: 'Open'." in str(caught.value)


def test_build_enclave_without_docker_is_e50(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")

    with pytest.raises(NitroCliError) as caught:
        _build_enclave(tmp_path, PLACEHOLDER_BLOBS)

    assert caught.value.code == "E50"
    assert "cannot reach the Docker engine" in str(caught.value)


def test_build_enclave_checks_the_metadata_file_first(tmp_path) -> None:
    with pytest.raises(EifMetadataError, match="does not exist"):
        _build_enclave(tmp_path, PLACEHOLDER_BLOBS, tmp_path / "missing.json")
