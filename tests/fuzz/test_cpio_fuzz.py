"""Ramdisks come from EIFs someone hands us: whatever bytes arrive, reading and extracting may
only fail with CpioError (never another exception, never a hang), and extraction never creates
or changes anything outside its destination."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Callable

from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.cpio import CpioError, CpioWriter, extract, iter_entries, read_archive
from tests.unit.test_cpio import raw_archive, raw_entry

OUTSIDE = b"@OUTSIDE@"  # replaced by the real path of the directory next to the destination


def _valid_archive() -> bytes:
    out = io.BytesIO()
    with CpioWriter(out) as writer:
        writer.add_file("cmd", b"/bin/app\n")
        writer.add_directory("rootfs", mode=0o755)
        writer.add_directory("rootfs/bin", mode=0o555)
        writer.add_file("rootfs/bin/app", b"\x7fELF" + bytes(range(200)), mode=0o4755, nlink=2)
        writer.add_symlink("rootfs/bin/sh", "app")
        writer.add_hardlink("rootfs/bin/app2", "rootfs/bin/app")
        writer.add_fifo("rootfs/fifo")
        writer.add_device("rootfs/null", "c", 1, 3, mode=0o666)
        writer.add_symlink("rootfs/abs", "/etc/passwd")
    return out.getvalue()


VALID = _valid_archive()
VALID_CRC = raw_archive(
    raw_entry(b"d", mode=0o40755),
    raw_entry(b"d/f", b"checksummed", magic=b"070702", check=sum(b"checksummed")),
    raw_entry(b"d/l", b"f", mode=0o120777, magic=b"070702"),
)
HEX = b"0123456789ABCDEFabcdef"


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        operation = draw(st.sampled_from(["flip", "hex", "insert", "delete", "truncate"]))
        if operation == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "hex" and data:
            data[position] = draw(st.sampled_from(HEX))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    return bytes(data)


SAFE_PARTS = st.sampled_from([b"a", b"b", b"link", b"x\xe9"])
ODD_PARTS = st.sampled_from([b"..", b".", b""])
NAME_PARTS = st.one_of(*[SAFE_PARTS] * 8, ODD_PARTS)
LINK_TARGETS = st.sampled_from(
    [OUTSIDE, OUTSIDE + b"/victim", b"../outside", b"..", b"/", b"a", b"../../..", b"link"]
)


@st.composite
def hostile_entry(draw: st.DrawFn) -> tuple[bytes, bytes, dict[str, int]]:
    """(name, data, header fields) with OUTSIDE still a placeholder."""
    # Mostly plausible names, so archives get past the first entry and symlinks, hard links,
    # directories and FIFOs meet; now and then an absolute or '..' path.
    name = b"/".join([draw(SAFE_PARTS), *draw(st.lists(NAME_PARTS, max_size=3))])
    if draw(st.integers(0, 15)) == 0:
        name = draw(st.sampled_from([OUTSIDE, b"..", b""])) + b"/" + name
    kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]))
    if kind == "dir":
        return name, b"", {"mode": 0o40000 | draw(st.sampled_from([0o755, 0o555, 0o000]))}
    if kind == "symlink":
        return name, draw(LINK_TARGETS), {"mode": 0o120777}
    if kind == "fifo":
        return name, b"", {"mode": 0o10644}
    data = draw(st.sampled_from([b"", b"PWNED"]))
    if kind == "hardlink":
        return name, data, {"ino": draw(st.integers(1, 3)), "nlink": 2, "mode": 0o100444}
    return name, data, {"mode": 0o100644}


def _read_or_reject(data: bytes) -> None:
    try:
        read_archive(data)
    except CpioError:
        return
    for _, body in iter_entries(io.BytesIO(data)):
        body.read(3)


def _extract_in_sandbox(build: Callable[[bytes], bytes]) -> None:
    """Extract ``build(outside path)`` below sandbox/dest; check sandbox/outside and the sandbox
    itself are exactly as before."""
    with tempfile.TemporaryDirectory() as sandbox_name:
        sandbox = Path(sandbox_name)
        outside = sandbox / "outside"
        outside.mkdir()
        (outside / "victim").write_bytes(b"precious")
        with contextlib.suppress(CpioError):
            extract(io.BytesIO(build(os.fsencode(outside))), sandbox / "dest", skip_devices=True)
        assert sorted(p.name for p in sandbox.iterdir()) == ["dest", "outside"]
        assert [p.name for p in outside.iterdir()] == ["victim"]
        assert not (outside / "victim").is_symlink()
        assert (outside / "victim").read_bytes() == b"precious"
        for directory, _, _ in os.walk(sandbox / "dest"):
            os.chmod(directory, 0o755)


@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_cpio_error(data: bytes) -> None:
    _read_or_reject(data)


@given(st.binary(max_size=1024))
def test_random_headers_after_the_magic_only_raise_cpio_error(data: bytes) -> None:
    _read_or_reject(b"070701" + data)
    _read_or_reject(b"070702" + data.hex().upper().encode())


@given(st.one_of(mutated(VALID), mutated(VALID_CRC)))
def test_mutated_archives_only_raise_cpio_error(data: bytes) -> None:
    _read_or_reject(data)


@given(mutated(VALID))
def test_extracting_mutated_archives_stays_inside_the_destination(data: bytes) -> None:
    _extract_in_sandbox(lambda _: data)


@given(st.lists(hostile_entry(), min_size=1, max_size=6))
def test_extracting_hostile_names_and_links_stays_inside_the_destination(
    entries: list[tuple[bytes, bytes, dict[str, int]]],
) -> None:
    def build(outside: bytes) -> bytes:
        return raw_archive(
            *(
                raw_entry(name.replace(OUTSIDE, outside), data.replace(OUTSIDE, outside), **fields)
                for name, data, fields in entries
            )
        )

    _extract_in_sandbox(build)
