"""The emulator's ramdisk cache keeps nothing an EIF could use on the host (docs/security.md).

An EIF is untrusted input: its ramdisks may carry a set-uid-root shell and a world-writable
block device. Unpacked into the host's cache they must lose both, in directories only the
emulator may enter; owners stay the archive's, so the app user owns its files.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from enclave_runtime.emulator.launcher import unpack_ramdisk
from enclave_runtime.formats.cpio import CpioWriter
from enclave_runtime.formats.eif import build_eif, read_eif

pytestmark = [pytest.mark.security, pytest.mark.root]


def _hostile_ramdisk() -> bytes:
    out = io.BytesIO()
    with CpioWriter(out) as writer:
        writer.add_directory("rootfs", mode=0o755)
        writer.add_file("rootfs/suid-shell", b"#!/bin/sh\n", mode=0o6755, uid=0, gid=0)
        writer.add_file("rootfs/app", b"data", mode=0o640, uid=1000, gid=1000)
        writer.add_device("rootfs/sda", "b", 8, 0, mode=0o666)
        writer.add_device("rootfs/kmsg", "c", 1, 11, mode=0o666)
    return out.getvalue()


@pytest.fixture
def unpacked(tmp_path: Path) -> tuple[Path, Path]:
    if os.geteuid() != 0:
        pytest.skip("unpacking with owners needs root")
    ramdisk = tmp_path / "ramdisk.cpio"
    ramdisk.write_bytes(_hostile_ramdisk())
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"k" * 64)
    eif = tmp_path / "hostile.eif"
    build_eif(kernel, "console=ttyS0", [ramdisk], eif)
    root = tmp_path / "emu"
    (root / "cache").mkdir(parents=True, mode=0o755)  # a cache left world-readable before
    return root, unpack_ramdisk(root, read_eif(eif), 0)


def test_no_set_id_bit_and_the_archives_owners(unpacked: tuple[Path, Path]) -> None:
    _root, target = unpacked
    shell = (target / "rootfs" / "suid-shell").stat()
    assert shell.st_mode & (stat.S_ISUID | stat.S_ISGID) == 0
    assert stat.S_IMODE(shell.st_mode) == 0o755
    assert (shell.st_uid, shell.st_gid) == (0, 0)
    app = (target / "rootfs" / "app").stat()
    assert (app.st_uid, app.st_gid) == (1000, 1000)  # the app user owns its files, as in the image


def test_no_device_node_reaches_the_host(unpacked: tuple[Path, Path]) -> None:
    _root, target = unpacked
    assert not (target / "rootfs" / "sda").exists()
    assert not (target / "rootfs" / "kmsg").exists()
    for path in target.rglob("*"):
        mode = path.lstat().st_mode
        assert not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)), path


def test_the_cache_chain_is_private(unpacked: tuple[Path, Path]) -> None:
    root, target = unpacked
    for directory in (root / "cache", root / "cache" / "ramdisks", target):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
