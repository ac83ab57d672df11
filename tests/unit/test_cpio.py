"""cpio newc: the layout the kernel's initramfs unpacker reads, reproducible trees, and an
extractor that keeps every byte of a hostile archive inside its destination."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.cpio import (
    CpioError,
    CpioWriter,
    SourceFile,
    archive_directory,
    extract,
    iter_entries,
    read_archive,
    write_tree,
)

IS_ROOT = os.geteuid() == 0
NOBODY = 65534
CPIO = shutil.which("cpio")
needs_cpio = pytest.mark.skipif(
    CPIO is None, reason="GNU cpio not installed (apt-get install cpio)"
)


# -- hand-built archives (the writer refuses to produce hostile ones) ------------------------


def raw_entry(
    name: bytes,
    data: bytes = b"",
    *,
    mode: int = 0o100644,
    ino: int = 1,
    nlink: int = 1,
    magic: bytes = b"070701",
    check: int = 0,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name) + 1, check)
    out = magic + b"".join(b"%08X" % value for value in fields) + name + b"\0"
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def raw_archive(*entries: bytes) -> bytes:
    return b"".join(entries) + raw_entry(b"TRAILER!!!", mode=0, ino=0)


def _expect_error(data: bytes, *fragments: str) -> CpioError:
    with pytest.raises(CpioError) as caught:
        read_archive(data)
    for fragment in fragments:
        assert fragment in str(caught.value)
    return caught.value


def _archive(build: Callable[[CpioWriter], None]) -> bytes:
    out = io.BytesIO()
    with CpioWriter(out) as writer:
        build(writer)
    return out.getvalue()


# -- a representative tree -------------------------------------------------------------------


TREE: tuple[tuple[str, str, object], ...] = (
    ("etc", "dir", None),
    ("etc/passwd", "file", b"root:x:0:0::/root:/bin/sh\n"),
    ("bin", "dir", None),
    ("bin/tool", "file", bytes(range(256)) * 40),
    ("bin/empty", "file", b""),
    ("bin/sh", "symlink", "tool"),
    ("abs-link", "symlink", "/etc/passwd"),
    ("dangling", "symlink", "does/not/exist"),
    ("locked", "dir", None),
    ("locked/ro", "file", b"read only"),
    ("fifo", "fifo", None),
    ("a-b", "file", b"sorts between a and a/"),
    ("a", "dir", None),
    ("a/z", "file", b"z"),
    ("caf\udce9", "dir", None),  # not UTF-8 on disk: b"caf\xe9"
)


def _create(root: Path, relative: str, kind: str, payload: object) -> None:
    path = os.fsencode(root) + b"/" + relative.encode("utf-8", "surrogateescape")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "dir":
        os.makedirs(path, exist_ok=True)
    elif kind == "file":
        Path(os.fsdecode(path)).write_bytes(payload)  # type: ignore[arg-type]
    elif kind == "symlink":
        os.symlink(payload, path)  # type: ignore[arg-type]
    else:
        os.mkfifo(path)


def make_tree(root: Path, *, reverse: bool = False, umask: int = 0o022, stamp: int = 0) -> None:
    """Files of every kind with explicit modes; creation order, umask and times vary by call."""
    old_umask = os.umask(umask)
    try:
        for relative, kind, payload in reversed(TREE) if reverse else TREE:
            _create(root, relative, kind, payload)
    finally:
        os.umask(old_umask)
    _link_and_chmod(root, stamp)


def _link_and_chmod(root: Path, stamp: int) -> None:
    os.link(root / "bin" / "tool", root / "bin" / "tool-hardlink")
    os.link(root / "bin" / "tool", root / "a" / "tool-again")
    modes = {
        "etc": 0o755,
        "etc/passwd": 0o644,
        "bin": 0o755,
        "bin/tool": 0o4755,
        "bin/empty": 0o600,
        "locked/ro": 0o444,
        "locked": 0o555,
        "fifo": 0o640,
        "a-b": 0o644,
        "a": 0o700,
        "a/z": 0o664,
        "caf\udce9": 0o750,
    }
    for name, mode in modes.items():
        os.chmod(os.fsencode(root) + b"/" + name.encode("utf-8", "surrogateescape"), mode)
    for path in [*root.rglob("*"), root]:
        os.utime(path, (stamp, stamp), follow_symlinks=False)


def _prepare(tmp_path: Path, name: str, **kwargs: int | bool) -> Path:
    """The tree is built in a fresh directory, so the files get fresh inode numbers."""
    root = tmp_path / name
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    make_tree(root, **kwargs)  # type: ignore[arg-type]
    return root


def _snapshot(root: Path) -> dict[bytes, tuple[object, ...]]:
    """What a user relies on: type, mode, mtime, contents, link targets, which names share data."""
    inode_names: dict[int, bytes] = {}
    result = {}
    base = os.fsencode(root)
    for path in sorted(os.fsencode(p) for p in root.rglob("*")):
        relative = path[len(base) + 1 :]
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            content: object = Path(os.fsdecode(path)).read_bytes()
            first_name = inode_names.setdefault(st.st_ino, relative)
        elif stat.S_ISLNK(st.st_mode):
            content, first_name = os.readlink(path), relative
        else:
            content, first_name = None, relative
        result[relative] = (
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            int(st.st_mtime),
            content,
            first_name,
        )
    return result


# -- the newc layout -------------------------------------------------------------------------


def test_header_fields_padding_and_trailer_follow_the_kernel_layout() -> None:
    data = _archive(
        lambda w: (
            w.add_directory("rootfs", mode=0o755, mtime=0x5F5E100),
            w.add_file("rootfs/ab", b"xyz", mode=0o640, uid=1000, gid=0x2A, mtime=0x5F5E100),
        )
    )
    directory = b"070701" + b"".join(
        b"%08X" % v for v in (0, 0o40755, 0, 0, 2, 0x5F5E100, 0, 0, 0, 0, 0, 7, 0)
    )
    assert data.startswith(directory + b"rootfs\0")
    assert len(directory) == 110
    assert data[117:120] == b"\0\0\0"  # 110 + 7 ("rootfs" + NUL) = 117, padded to 120
    file_header = data[120 : 120 + 110]
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    assert file_header == (
        b"070701" + b"00000001" + b"000081A0" + b"000003E8" + b"0000002A" + b"00000001"
        + b"05F5E100" + b"00000003" + b"00000000" * 4 + b"0000000A" + b"00000000"
    )  # fmt: skip
    assert data[230:240] == b"rootfs/ab\0"  # 110 + 10 = 120: already aligned, no padding
    assert data[240:244] == b"xyz\0"  # data, padded to 4
    trailer = data[244:]
    trailer_header = (
        b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B" + b"00000000"
    )
    assert trailer.startswith(trailer_header + b"TRAILER!!!\0")
    assert len(data) % 512 == 0 and not trailer[110 + 11 :].strip(b"\0")


@pytest.mark.parametrize("name_length", range(1, 9))
@pytest.mark.parametrize("data_length", [0, 1, 3, 4, 5])
def test_every_header_and_data_start_on_a_four_byte_boundary(
    name_length: int, data_length: int
) -> None:
    name = "n" * name_length
    data = _archive(lambda w: w.add_file(name, b"d" * data_length))
    (entry,) = read_archive(data)
    data_offset = 110 + name_length + 1
    data_offset += -data_offset % 4
    assert data[data_offset : data_offset + data_length] == b"d" * data_length
    trailer_offset = data_offset + data_length + (-(data_offset + data_length) % 4)
    assert data[trailer_offset : trailer_offset + 6] == b"070701"
    assert entry.offset == 0 and entry.data == b"d" * data_length


@needs_cpio
def test_tree_archive_is_byte_identical_to_gnu_cpio_reproducible(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"hello")
    (root / "z").write_bytes(b"x" * 1001)
    (root / "a-b").write_bytes(b"")
    (root / "s").symlink_to("d/a")
    os.mkfifo(root / "f")
    if IS_ROOT:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(root / "d", 0o750)
    for path in root.rglob("*"):
        os.utime(path, (0, 0), follow_symlinks=False)
    if os.stat(root / "d").st_nlink != 3:
        pytest.skip("this filesystem does not count directory links the classic way")

    ours = io.BytesIO()
    archive_directory(root, ours, prefix="", uid=None, gid=None)
    names = sorted(os.fsencode(p.relative_to(root)) for p in root.rglob("*"))
    gnu = subprocess.run(
        [CPIO, "-o", "-H", "newc", "--reproducible", "--quiet"],
        cwd=root,
        input=b"\n".join(names) + b"\n",
        capture_output=True,
        check=True,
    ).stdout
    assert ours.getvalue() == gnu


@needs_cpio
def test_gnu_cpio_extracts_our_archive_including_hard_links(tmp_path: Path) -> None:
    source = _prepare(tmp_path, "source")
    archive = tmp_path / "tree.cpio"
    with archive.open("wb") as out:
        archive_directory(source, out, prefix="", uid=None, gid=None)
    dest = tmp_path / "gnu"
    dest.mkdir()
    with archive.open("rb") as stream:
        subprocess.run(
            [CPIO, "-i", "-d", "-m", "--quiet", "--no-absolute-filenames"],
            cwd=dest,
            stdin=stream,
            check=True,
        )
    # GNU cpio restores the mtimes of files, not of directories and symlinks.
    assert _without_times(_snapshot(dest), stat.S_IFDIR, stat.S_IFLNK) == _without_times(
        _snapshot(source), stat.S_IFDIR, stat.S_IFLNK
    )


def _without_times(snapshot: dict[bytes, tuple[object, ...]], *types: int) -> dict:
    return {
        name: (kind, mode, None if kind in types else mtime, *rest)
        for name, (kind, mode, mtime, *rest) in snapshot.items()
    }


@needs_cpio
@pytest.mark.parametrize("cpio_format", ["newc", "crc"])
def test_we_extract_what_gnu_cpio_writes(tmp_path: Path, cpio_format: str) -> None:
    source = _prepare(tmp_path, "source")
    names = sorted(os.fsencode(p.relative_to(source)) for p in source.rglob("*"))
    archive = subprocess.run(
        [CPIO, "-o", "-H", cpio_format, "--quiet"],
        cwd=source,
        input=b"\n".join(names) + b"\n",
        capture_output=True,
        check=True,
    ).stdout
    dest = tmp_path / "dest"
    extract(io.BytesIO(archive), dest, preserve_owner=True)
    assert _snapshot(dest) == _snapshot(source)
    if cpio_format == "crc":
        assert all(entry.has_crc for entry in read_archive(archive))


# -- reproducibility -------------------------------------------------------------------------


def test_same_tree_gives_identical_bytes_whatever_order_umask_or_clock(tmp_path: Path) -> None:
    first = _prepare(tmp_path, "first", reverse=False, umask=0o022, stamp=1_700_000_000)
    second = _prepare(tmp_path, "second", reverse=True, umask=0o077, stamp=12345)
    archives = []
    for root in (first, second):
        out = io.BytesIO()
        archive_directory(root, out, prefix="rootfs", mtime=0)
        archives.append(out.getvalue())
    assert archives[0] == archives[1]
    entries = read_archive(archives[0])
    names = [entry.name_bytes for entry in entries]
    assert names == sorted(names)
    assert [entry.ino for entry in entries if entry.nlink == 1] == sorted(
        entry.ino for entry in entries if entry.nlink == 1
    )
    assert {entry.mtime for entry in entries} == {0}
    assert {(entry.uid, entry.gid) for entry in entries} == {(0, 0)}


def test_entries_are_sorted_bytewise_with_parents_first(tmp_path: Path) -> None:
    root = _prepare(tmp_path, "tree")
    entries = read_archive(_tree_bytes(root))
    names = [entry.name for entry in entries]
    assert names.index("rootfs/a") < names.index("rootfs/a-b") < names.index("rootfs/a/z")
    seen: set[str] = {""}
    for name in names:
        assert name.rpartition("/")[0] in seen or name == "rootfs"
        seen.add(name)


def _tree_bytes(root: Path, **kwargs: object) -> bytes:
    out = io.BytesIO()
    archive_directory(root, out, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


def test_tree_entries_carry_normalised_metadata(tmp_path: Path) -> None:
    root = _prepare(tmp_path, "tree")
    entries = {entry.name: entry for entry in read_archive(_tree_bytes(root, mtime=77))}
    assert entries["rootfs"].kind == "directory" and entries["rootfs"].permissions == 0o755
    # rootfs holds a, bin, caf\xe9, etc, locked: nlink = 2 + 5 subdirectories
    assert entries["rootfs"].nlink == 7
    assert entries["rootfs/bin/tool"].permissions == 0o4755
    assert entries["rootfs/locked"].permissions == 0o555
    assert entries["rootfs/bin/sh"].kind == "symlink" and entries["rootfs/bin/sh"].data == b"tool"
    assert entries["rootfs/abs-link"].data == b"/etc/passwd"
    assert entries["rootfs/fifo"].kind == "fifo" and entries["rootfs/fifo"].permissions == 0o640
    assert "rootfs/caf\udce9" in entries
    assert {entry.mtime for entry in entries.values()} == {77}


def test_hard_links_share_an_inode_and_carry_data_once_on_the_last_name(tmp_path: Path) -> None:
    root = _prepare(tmp_path, "tree")
    entries = read_archive(_tree_bytes(root))
    group = [e for e in entries if e.name.endswith(("/tool", "/tool-hardlink", "/tool-again"))]
    assert [e.name for e in group] == [
        "rootfs/a/tool-again",
        "rootfs/bin/tool",
        "rootfs/bin/tool-hardlink",
    ]
    assert {e.ino for e in group} == {group[0].ino} and {e.nlink for e in group} == {3}
    assert [e.size for e in group] == [0, 0, 256 * 40]
    others = [e.ino for e in entries if e not in group]
    assert group[0].ino not in others


def test_owner_is_zero_by_default_and_kept_on_request(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    if IS_ROOT:
        os.chown(root / "f", 1234, 5678)
    kept = {e.name: e for e in read_archive(_tree_bytes(root, prefix="", uid=None, gid=None))}
    st = os.stat(root / "f")
    assert (kept["f"].uid, kept["f"].gid) == (st.st_uid, st.st_gid)
    forced = {e.name: e for e in read_archive(_tree_bytes(root, prefix="", uid=7, gid=8))}
    assert (forced["f"].uid, forced["f"].gid) == (7, 8)


def test_sockets_are_skipped_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "file").write_bytes(b"x")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(os.fspath(root / "control.sock"))
        out = io.BytesIO()
        summary = archive_directory(root, out, prefix="rootfs")
    finally:
        server.close()
    assert summary.skipped_sockets == ("rootfs/control.sock",)
    assert summary.entries == 2
    assert [e.name for e in read_archive(out.getvalue())] == ["rootfs", "rootfs/file"]


def test_nested_prefix_directories_come_first(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir(mode=0o711)
    os.chmod(root, 0o711)
    (root / "f").write_bytes(b"x")
    entries = read_archive(_tree_bytes(root, prefix="opt/app"))
    assert [(e.name, e.permissions, e.nlink) for e in entries] == [
        ("opt", 0o711, 3),
        ("opt/app", 0o711, 2),
        ("opt/app/f", 0o644, 1),
    ]


def test_customer_ramdisk_layout_with_cmd_env_and_rootfs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "app").write_bytes(b"\x7fELF")
    out = io.BytesIO()
    with CpioWriter(out) as writer:
        writer.add_file("cmd", b"/bin/app\n")
        writer.add_file("env", b"PATH=/bin\n")
        write_tree(writer, rootfs, prefix="rootfs")
    entries = read_archive(out.getvalue())
    assert [e.name for e in entries] == ["cmd", "env", "rootfs", "rootfs/bin", "rootfs/bin/app"]
    assert entries[0].data == b"/bin/app\n"


# -- streaming -------------------------------------------------------------------------------


def test_large_files_are_streamed_not_loaded(tmp_path: Path) -> None:
    size = 48 * 1024 * 1024
    root = tmp_path / "tree"
    root.mkdir()
    with (root / "big").open("wb") as big:
        big.truncate(size)
    archive = tmp_path / "big.cpio"
    tracemalloc.start()
    try:
        with archive.open("wb") as out:
            archive_directory(root, out, prefix="")
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with archive.open("rb") as stream:
            extract(stream, tmp_path / "dest")
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert write_peak < size / 8 and read_peak < size / 8
    assert os.path.getsize(tmp_path / "dest" / "big") == size


def test_add_file_copies_a_non_seekable_stream_with_a_declared_size() -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, payload: bytes) -> None:
            self._payload = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            chunk = self._payload.read(min(len(buffer), 1000))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    payload = os.urandom(10_000)
    data = _archive(lambda w: w.add_file("f", Pipe(payload), size=len(payload)))
    assert read_archive(data)[0].data == payload
    with pytest.raises(CpioError, match="size= is required"):
        _archive(lambda w: w.add_file("f", Pipe(payload)))


def test_iter_entries_reads_data_lazily_and_skips_what_is_not_read() -> None:
    data = _archive(lambda w: (w.add_file("a", b"A" * 5000), w.add_file("b", b"bee")))
    seen = []
    for header, body in iter_entries(io.BytesIO(data)):
        seen.append((header.name, body.read(2) if header.name == "a" else body.read()))
    assert seen == [("a", b"AA"), ("b", b"bee")]


# -- writer refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda w: w.add_file("/abs", b""), "must be relative"),
        (lambda w: w.add_file("a/../b", b""), "'..'"),
        (lambda w: w.add_file("a//b", b""), "normalised"),
        (lambda w: w.add_file("dir/file", b""), "add the directory 'dir' before"),
        (lambda w: (w.add_file("x", b""), w.add_file("x", b"")), "already in the archive"),
        (lambda w: (w.add_file("x", b""), w.add_hardlink("y", "x")), "nlink=N"),
        (lambda w: w.add_file("x", b"", mode=0o40755), "permission bits"),
        (lambda w: w.add_file("x", io.BytesIO(b"ab"), size=3), "ended after 2 of 3 bytes"),
        (lambda w: w.add_file("x", io.BytesIO(), size=1 << 32), "does not fit"),
        (lambda w: w.add_file("x", "not bytes"), "data must be bytes"),
        (lambda w: w.add_file("x", b"", uid=-1), "uid"),
        (lambda w: w.add_device("d", "x", 1, 3), "'c' or 'b'"),
        (lambda w: w.add_symlink("s", ""), "target"),
        (lambda w: w.add_file("n" * 4096, b""), "4096 bytes or more"),
    ],
)
def test_writer_refuses_what_the_kernel_would_mishandle(
    build: Callable[[CpioWriter], None], message: str
) -> None:
    with pytest.raises(CpioError, match=message) as caught:
        _archive(build)
    assert isinstance(caught.value, FormatError)


def test_a_refused_entry_leaves_the_archive_usable() -> None:
    def build(writer: CpioWriter) -> None:
        with pytest.raises(CpioError, match="uid"):
            writer.add_file("x", b"data", uid=1 << 40)
        writer.add_file("x", b"data")

    assert [entry.name for entry in read_archive(_archive(build))] == ["x"]


def test_hard_link_groups_must_be_complete_before_close() -> None:
    writer = CpioWriter(io.BytesIO())
    writer.add_file("a", b"data", nlink=3)
    writer.add_hardlink("b", "a")
    with pytest.raises(CpioError, match="inode 0 has 2 of 3 names"):
        writer.close()
    writer.add_hardlink("c", "b")
    with pytest.raises(CpioError, match="already written"):
        writer.add_hardlink("d", "a")


def test_a_failed_writer_never_writes_a_trailer() -> None:
    out = io.BytesIO()
    with pytest.raises(RuntimeError), CpioWriter(out) as writer:
        writer.add_file("a", b"data")
        raise RuntimeError("build step failed")
    assert b"TRAILER!!!" not in out.getvalue()
    broken = CpioWriter(io.BytesIO())
    with pytest.raises(CpioError):
        broken.add_file("x", io.BytesIO(b""), size=5)
    with pytest.raises(CpioError, match="incomplete after an earlier error"):
        broken.close()


def test_writer_cannot_be_used_after_close() -> None:
    writer = CpioWriter(io.BytesIO())
    writer.close()
    writer.close()
    with pytest.raises(CpioError, match="already closed"):
        writer.add_file("late", b"")


def test_tree_file_replaced_while_archiving_is_an_error(tmp_path: Path) -> None:
    original = tmp_path / "f"
    original.write_bytes(b"old")
    identity = (os.stat(original).st_dev, os.stat(original).st_ino)
    (tmp_path / "new").write_bytes(b"new")
    os.replace(tmp_path / "new", original)
    with pytest.raises(CpioError, match="replaced while being archived"):
        _archive(lambda w: w.add_file("f", SourceFile(os.fspath(original), identity), size=3))


# -- reader refusals -------------------------------------------------------------------------


def test_reader_accepts_lower_case_hex_and_a_nul_terminated_symlink_target(
    tmp_path: Path,
) -> None:
    data = raw_archive(raw_entry(b"link", b"target\0", mode=0o120777)).lower()
    data = data.replace(b"trailer!!!", b"TRAILER!!!")
    (entry,) = read_archive(data)
    assert entry.kind == "symlink"
    extract(io.BytesIO(data), tmp_path / "dest")
    assert os.readlink(tmp_path / "dest" / "link") == "target"


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (b"", ("empty input",)),
        (b"\x1f\x8b\x08\x00" + b"\0" * 200, ("gzip-compressed",)),
        (raw_archive(raw_entry(b"x", magic=b"070707")), ("070707", "-H newc")),
        (b"hello world" * 20, ("expected magic 070701 or 070702", "not a cpio newc archive")),
        (raw_entry(b"x", b"data"), ("without the TRAILER!!! entry", "after 1 entries")),
        (raw_archive(raw_entry(b"x", b"data"))[:118], ("truncated",)),
        (raw_archive(raw_entry(b"x", b"data"))[:60], ("inside the 110-byte header",)),
        (raw_archive(raw_entry(b"d", b"oops", mode=0o40755)), ("directory entry carries 4 bytes",)),
        (raw_archive(raw_entry(b"x", mode=0o170644)), ("not a known file type",)),
        (raw_archive(raw_entry(b"x", mode=0o1100644)), ("not a known file type",)),
        (raw_archive(raw_entry(b"s", b"", mode=0o120777)), ("symlink target must be 1..4096",)),
        (raw_archive(raw_entry(b"x")) + b"0707010000", ("after the TRAILER!!! entry",)),
    ],
)
def test_malformed_archives_are_rejected_with_where_and_why(
    data: bytes, fragments: tuple[str, ...]
) -> None:
    _expect_error(data, *fragments)


def test_zero_padding_after_the_trailer_is_accepted() -> None:
    data = raw_archive(raw_entry(b"x", b"data")) + b"\0" * 1000
    assert [entry.name for entry in read_archive(data)] == ["x"]


def test_non_hex_header_field_is_named() -> None:
    good = raw_archive(raw_entry(b"file", b"data"))
    filesize_at = 6 + 6 * 8
    for bad in (b"0000000G", b"  000004", b"+0000004", b"0x000004", b"0000_004"):
        data = good[:filesize_at] + bad + good[filesize_at + 8 :]
        _expect_error(data, "cpio entry #0 at offset 0", "'filesize'", "not 8 hex digits")


def test_name_size_and_nul_termination_are_checked() -> None:
    entry = raw_entry(b"file")
    namesize_at = 6 + 11 * 8
    huge = entry[:namesize_at] + b"00100000" + entry[namesize_at + 8 :]
    _expect_error(huge + raw_entry(b"TRAILER!!!"), "name size 1048576 is outside 2..4096")
    unterminated = entry.replace(b"file\0", b"fileX")
    _expect_error(unterminated + raw_entry(b"TRAILER!!!"), "NUL-terminated")
    _expect_error(raw_archive(raw_entry(b"fi\0le")), "NUL-terminated")


def test_errors_name_the_entry_index_offset_and_name() -> None:
    first = raw_entry(b"ok", b"1234")
    second = raw_entry(b"rootfs/bad", b"x", mode=0o20644)
    error = _expect_error(raw_archive(first, second))
    assert f"cpio entry #1 'rootfs/bad' at offset {len(first)}" in str(error)


def test_crc_format_checksums_are_verified() -> None:
    payload = b"checksummed data"
    good = raw_archive(raw_entry(b"f", payload, magic=b"070702", check=sum(payload)))
    assert read_archive(good)[0].data == payload
    bad = raw_archive(raw_entry(b"f", payload, magic=b"070702", check=sum(payload) + 1))
    _expect_error(bad, "data checksum", "does not match", "070702")
    empty = raw_archive(raw_entry(b"f", b"", magic=b"070702", check=5))
    _expect_error(empty, "data checksum 00000000")


# -- extraction ------------------------------------------------------------------------------


def test_round_trip_through_extract_preserves_what_matters(tmp_path: Path) -> None:
    source = _prepare(tmp_path, "source")
    data = _tree_bytes(source, prefix="", uid=None, gid=None)
    dest = tmp_path / "dest"
    result = extract(io.BytesIO(data), dest, preserve_owner=True)
    assert result.entries == len(read_archive(data))
    assert _snapshot(dest) == _snapshot(source)
    tool = os.stat(dest / "bin" / "tool")
    assert tool.st_nlink == 3 and os.stat(dest / "a" / "tool-again").st_ino == tool.st_ino


@pytest.mark.root
def test_device_nodes_are_created_when_running_as_root(tmp_path: Path) -> None:
    data = _archive(lambda w: (w.add_directory("dev"), w.add_device("dev/null", "c", 1, 3)))
    extract(io.BytesIO(data), tmp_path / "dest", preserve_owner=True)
    st = os.lstat(tmp_path / "dest" / "dev" / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_set_id_bits_are_dropped_unless_owners_are_preserved(tmp_path: Path) -> None:
    data = _archive(lambda w: w.add_file("suid", b"#!", mode=0o6755))
    extract(io.BytesIO(data), tmp_path / "plain")
    assert stat.S_IMODE(os.stat(tmp_path / "plain" / "suid").st_mode) == 0o755
    if IS_ROOT:
        extract(io.BytesIO(data), tmp_path / "kept", preserve_owner=True)
        assert stat.S_IMODE(os.stat(tmp_path / "kept" / "suid").st_mode) == 0o6755


def test_hard_link_data_on_the_first_name_is_kept_like_the_kernel_does(tmp_path: Path) -> None:
    data = raw_archive(
        raw_entry(b"first", b"payload", ino=9, nlink=2),
        raw_entry(b"second", b"", ino=9, nlink=2),
    )
    extract(io.BytesIO(data), tmp_path / "dest")
    first, second = tmp_path / "dest" / "first", tmp_path / "dest" / "second"
    assert first.read_bytes() == second.read_bytes() == b"payload"
    assert os.stat(first).st_ino == os.stat(second).st_ino


@pytest.mark.parametrize("with_data_after", [False, True])
def test_a_fifo_replacing_a_hard_linked_file_never_blocks_extraction(
    tmp_path: Path, with_data_after: bool
) -> None:
    # Found by the property tests: opening the FIFO to fix the file's mode waited for a writer.
    entries = [raw_entry(b"f", b"", ino=1, nlink=2), raw_entry(b"f", mode=0o10644)]
    if with_data_after:
        entries.append(raw_entry(b"f", b"data", ino=1, nlink=2))
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(extract(io.BytesIO(raw_archive(*entries)), tmp_path / "dest"))
        except CpioError as err:
            outcome.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "extract blocked on a FIFO"
    if with_data_after:
        assert isinstance(outcome[0], CpioError) and "was replaced" in str(outcome[0])
    else:
        assert stat.S_ISFIFO(os.lstat(tmp_path / "dest" / "f").st_mode)


def test_later_entries_replace_files_but_never_directories(tmp_path: Path) -> None:
    data = raw_archive(raw_entry(b"f", b"old"), raw_entry(b"f", b"new"))
    extract(io.BytesIO(data), tmp_path / "dest")
    assert (tmp_path / "dest" / "f").read_bytes() == b"new"
    with pytest.raises(CpioError, match="a directory of that name already exists"):
        extract(
            io.BytesIO(raw_archive(raw_entry(b"d", mode=0o40755), raw_entry(b"d", b"x"))),
            tmp_path / "again",
        )


def test_leading_dot_slash_names_are_accepted_and_dot_is_the_destination(tmp_path: Path) -> None:
    data = raw_archive(raw_entry(b".", mode=0o40700), raw_entry(b"./sub", mode=0o40755))
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o755)
    os.chmod(dest, 0o755)
    extract(io.BytesIO(data), dest)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o755
    assert (dest / "sub").is_dir()


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (lambda outside: raw_archive(raw_entry(os.fsencode(outside / "abs"), b"x")), "absolute"),
        (lambda outside: raw_archive(raw_entry(b"../outside/dotdot", b"x")), "'..'"),
        (lambda outside: raw_archive(raw_entry(b"a/../../outside/x", b"x")), "'..'"),
        (
            lambda outside: raw_archive(
                raw_entry(b"link", os.fsencode(outside), mode=0o120777),
                raw_entry(b"link/escaped", b"x"),
            ),
            "its parent 'link' is a symlink",
        ),
        (
            lambda outside: raw_archive(
                raw_entry(b"rel", b"../outside", mode=0o120777),
                raw_entry(b"rel/deeper/escaped", b"x"),
            ),
            "its parent 'rel' is a symlink",
        ),
        (
            lambda outside: raw_archive(
                raw_entry(b"f", b"", ino=5, nlink=2),
                raw_entry(b"f", os.fsencode(outside / "target"), mode=0o120777),
                raw_entry(b"g", b"PWNED", ino=5, nlink=2),
            ),
            "hard-link source 'f' was replaced",
        ),
    ],
)
def test_extract_refuses_to_write_outside_the_destination(
    tmp_path: Path, archive: Callable[[Path], bytes], message: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_bytes(b"precious")
    with pytest.raises(CpioError, match=message):
        extract(io.BytesIO(archive(outside)), tmp_path / "dest")
    assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert (outside / "target").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "outside"]


def test_replacing_a_symlink_with_a_file_does_not_write_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    data = raw_archive(
        raw_entry(b"x", os.fsencode(outside), mode=0o120777), raw_entry(b"x", b"PWNED")
    )
    extract(io.BytesIO(data), tmp_path / "dest")
    assert outside.read_bytes() == b"precious"
    assert (tmp_path / "dest" / "x").read_bytes() == b"PWNED"
    assert not (tmp_path / "dest" / "x").is_symlink()


def test_symlinks_already_in_the_destination_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "pre").symlink_to(outside)
    with pytest.raises(CpioError, match="its parent 'pre' is a symlink"):
        extract(io.BytesIO(raw_archive(raw_entry(b"pre/x", b"x"))), dest)
    assert list(outside.iterdir()) == []


# -- without root ----------------------------------------------------------------------------


def _unprivileged(action: Callable[[], object]) -> object:
    """Run ``action`` as an unprivileged user: in a forked child as nobody when we are root."""
    if not IS_ROOT:
        return action()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome: tuple[str, object]
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome = ("ok", action())
        except BaseException as err:
            outcome = ("error", err)
        finally:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pickle.dumps(outcome))
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        status, value = pickle.loads(pipe.read())
    os.waitpid(pid, 0)
    if status == "error":
        raise value  # type: ignore[misc]
    return value


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can write (tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="cpio-test-"))
    os.chmod(path, 0o755)
    if IS_ROOT:
        os.chown(path, NOBODY, NOBODY)
    yield path
    for directory, _, _ in os.walk(path):
        os.chmod(directory, 0o755)
    shutil.rmtree(path)


def test_unprivileged_extract_handles_read_only_dirs_and_files(
    tmp_path: Path, shared_dir: Path
) -> None:
    source = _prepare(tmp_path, "source")
    data = _tree_bytes(source, prefix="")
    dest = shared_dir / "dest"
    result = _unprivileged(lambda: extract(io.BytesIO(data), dest))
    assert result.entries == len(read_archive(data))  # type: ignore[attr-defined]
    expected = _snapshot(source)
    for name in (b"bin/tool", b"bin/tool-hardlink", b"a/tool-again"):  # set-uid dropped
        kind, _, *rest = expected[name]
        expected[name] = (kind, 0o755, *rest)
    assert _snapshot(dest) == expected
    assert stat.S_IMODE(os.stat(dest / "locked").st_mode) == 0o555


def test_unprivileged_device_nodes_error_or_are_skipped_on_request(shared_dir: Path) -> None:
    data = _archive(lambda w: (w.add_directory("dev"), w.add_device("dev/null", "c", 1, 3)))
    with pytest.raises(CpioError, match=r"needs root .*skip_devices=True"):
        _unprivileged(lambda: extract(io.BytesIO(data), shared_dir / "strict"))
    result = _unprivileged(
        lambda: extract(io.BytesIO(data), shared_dir / "lenient", skip_devices=True)
    )
    assert result.skipped_devices == ("dev/null",)  # type: ignore[attr-defined]
    assert list((shared_dir / "lenient" / "dev").iterdir()) == []


def test_unprivileged_preserve_owner_is_a_clear_error(shared_dir: Path) -> None:
    data = _archive(lambda w: w.add_file("f", b"x", uid=4321, gid=4321))
    with pytest.raises(CpioError, match="preserve_owner=True needs root"):
        _unprivileged(lambda: extract(io.BytesIO(data), shared_dir / "owned", preserve_owner=True))
