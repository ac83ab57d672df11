"""Bytes per EIF component (formats/eif_sizes.py) and ``enclaveops eif describe --sizes``."""

from __future__ import annotations

import io
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.cli import build_cmd, enclaveops
from enclave_runtime.formats.cpio import CpioWriter
from enclave_runtime.formats.eif import build_eif
from enclave_runtime.formats.eif_sizes import (
    ComponentSizes,
    component_sizes,
    split_customer_ramdisk,
)

RUNTIME_FILE = "rootfs/opt/enclave-runtime/x"  # 28 characters


def customer_ramdisk(app_files: dict[str, bytes], runtime_data: bytes) -> bytes:
    """cmd, env, the app's files and one runtime file, in bytewise order as builds write them."""
    out = io.BytesIO()
    members = {"cmd": b"/app\x00", "env": b"", **app_files, RUNTIME_FILE: runtime_data}
    directories: set[str] = set()
    with CpioWriter(out) as writer:
        for name in sorted(members):
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    writer.add_directory(directory, mode=0o755)
                    directories.add(directory)
            writer.add_file(name, members[name])
    return out.getvalue()


def test_the_runtime_members_count_with_their_headers_and_padding() -> None:
    ramdisk = customer_ramdisk({"rootfs/app": b"a" * 5000}, b"r" * 1001)
    runtime, app = split_customer_ramdisk(io.BytesIO(ramdisk), len(ramdisk))
    # newc: 110-byte header + name + NUL, padded to 4; the data padded to 4.
    directory = 140  # 110 + 26 + 1 = 137 -> 140, no data
    file = 140 + 1004  # 110 + 28 + 1 = 139 -> 140; 1001 -> 1004
    assert runtime == directory + file
    assert app == len(ramdisk) - runtime


def test_a_runtime_member_last_in_the_archive_counts_whole() -> None:
    ramdisk = customer_ramdisk({"rootfs/bin/busybox": b"b" * 300}, b"r" * 10)
    runtime, _ = split_customer_ramdisk(io.BytesIO(ramdisk), len(ramdisk))
    assert runtime == 140 + 140 + 12


@given(
    app=st.dictionaries(
        st.sampled_from(["rootfs/a", "rootfs/usr/lib/z", "rootfs/opt/other", "rootfs/optx"]),
        st.binary(max_size=64),
    ),
    runtime_data=st.binary(max_size=64),
)
def test_only_the_runtime_prefix_counts_for_the_runtime(app, runtime_data) -> None:
    with_app = customer_ramdisk(app, runtime_data)
    alone = customer_ramdisk({}, runtime_data)
    runtime, app_bytes = split_customer_ramdisk(io.BytesIO(with_app), len(with_app))
    assert runtime == split_customer_ramdisk(io.BytesIO(alone), len(alone))[0]
    assert runtime + app_bytes == len(with_app)


def _eif(tmp_path: Path) -> Path:
    (tmp_path / "kernel").write_bytes(b"k" * 7000)
    (tmp_path / "bootstrap").write_bytes(b"b" * 3000)
    (tmp_path / "customer").write_bytes(customer_ramdisk({"rootfs/app": b"a" * 9000}, b"r" * 4000))
    eif = tmp_path / "sizes.eif"
    ramdisks = [tmp_path / "bootstrap", tmp_path / "customer"]
    build_eif(tmp_path / "kernel", "console=ttyS0", ramdisks, eif)
    return eif


def test_the_components_add_up_to_the_eif(tmp_path: Path) -> None:
    eif = _eif(tmp_path)
    sizes = component_sizes(eif)
    assert sizes.kernel == 7000 + len("console=ttyS0")
    assert sizes.bootstrap == 3000
    assert sizes.runtime == 140 + 140 + 4000
    assert sizes.app == (tmp_path / "customer").stat().st_size - sizes.runtime
    assert 0 < sizes.other < 4096  # EIF and section headers, metadata
    assert sizes.total == eif.stat().st_size


def test_describe_sizes_adds_them_to_the_json(tmp_path: Path, capsys) -> None:
    eif = _eif(tmp_path)
    assert enclaveops.main(["eif", "describe", str(eif)]) == 0
    assert "Sizes" not in json.loads(capsys.readouterr().out)  # nitro-cli's keys by default
    assert enclaveops.main(["eif", "describe", "--sizes", str(eif)]) == 0
    sizes = json.loads(capsys.readouterr().out)["Sizes"]
    assert sizes == component_sizes(eif).to_json()
    assert list(sizes) == ["kernel", "bootstrap", "runtime", "app", "other", "total"]


def test_build_explain_summarises_the_parts_and_the_memory_they_need() -> None:
    sizes = ComponentSizes(kernel=1, bootstrap=2, runtime=3 << 20, app=(1 << 20) - 3, other=0)
    lines = build_cmd._size_lines(sizes)
    assert lines[0] == "  bytes each part adds to the EIF:"
    runtime = next(line for line in lines if line.split()[0] == "runtime")
    assert runtime.split()[1:4] == [str(3 << 20), "bytes", "3.0"]
    assert runtime.endswith("75.0 %")
    assert lines[-1].strip().startswith("enclave memory needed: >= 16 MiB")  # 4 MiB EIF, 4 x
    assert build_cmd._size_lines(None) == []
