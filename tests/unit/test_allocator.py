"""allocator.yaml ensured: compared by meaning, checked against the host, written atomically."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from enclave_runtime.formats.allocator_config import AllocatorConfig, AllocatorConfigError
from enclave_runtime.host.allocator import (
    AllocatorHostError,
    AllocatorServiceError,
    HostResources,
    check_host,
    desired_config,
    plan,
    read_host_resources,
    restart_service,
    write,
)

# AWS's own default file, comments and all (bootstrap/allocator.yaml in aws-nitro-enclaves-cli).
AWS_DEFAULT = """\
---
# Enclave configuration file.
#
# How much memory to allocate for enclaves (in MiB).
memory_mib: 512
#
# How many CPUs to reserve for enclaves.
cpu_count: 2
#
# Alternatively, the exact CPUs to be reserved for the enclave can be explicitely configured by
# using `cpu_pool` (like below), instead of `cpu_count`.
# Note: cpu_count and cpu_pool conflict with each other. Only use exactly one of them.
# Example of reserving CPUs 2, 3, and 6 through 9:
# cpu_pool: 2,3,6-9
"""

# 8 CPUs, 2 threads per core: cores (0,4) (1,5) (2,6) (3,7), as on an m5.2xlarge.
SMT_HOST = HostResources(
    online_cpus=tuple(range(8)),
    core_of={cpu: (cpu % 4, cpu % 4 + 4) for cpu in range(8)},
    memory_mib=32768,
)


def test_cpu_pool_text_becomes_the_cpu_ids() -> None:
    assert desired_config(1024, cpu_pool="2-3,6").cpu_pool == (2, 3, 6)
    assert desired_config(1024, cpu_count=2).cpu_count == 2


def test_exactly_one_cpu_setting_is_required() -> None:
    with pytest.raises(AllocatorConfigError, match="exactly one of cpu_count"):
        desired_config(1024, cpu_count=2, cpu_pool="2,3")
    with pytest.raises(AllocatorConfigError, match="exactly one of cpu_count"):
        desired_config(1024)


def test_cpu_0_in_the_pool_is_refused_with_the_reason() -> None:
    with pytest.raises(AllocatorConfigError, match="CPU 0, which must remain available"):
        desired_config(1024, cpu_pool="0-1")


def test_missing_file_must_be_written_and_the_diff_shows_the_whole_file(tmp_path: Path) -> None:
    result = plan(tmp_path / "allocator.yaml", desired_config(2048, cpu_count=2))
    assert result.changed
    assert result.before is None
    diff = result.diff()
    assert diff["before"] == ""
    assert "memory_mib: 2048\n" in diff["after"]
    assert "cpu_count: 2\n" in diff["after"]


def test_aws_default_file_with_the_same_values_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text(AWS_DEFAULT)
    result = plan(path, desired_config(512, cpu_count=2))
    assert not result.changed
    assert result.diff()["before"] == result.diff()["after"] == AWS_DEFAULT


def test_a_different_value_changes_the_file_to_the_canonical_text(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text(AWS_DEFAULT)
    desired = desired_config(4096, cpu_pool="2,3")
    result = plan(path, desired)
    assert result.changed
    assert result.actual == AllocatorConfig(memory_mib=512, cpu_count=2)
    assert result.after == desired.render()
    assert "cpu_pool: 2-3\n" in result.after


def test_an_invalid_file_is_replaced_and_its_problem_reported(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text("memory_mib: 512\ncpu_count: 2\n")  # no '---': the allocator ignores it all
    result = plan(path, desired_config(512, cpu_count=2))
    assert result.changed
    assert result.problem is not None
    assert "add a line '---' before the settings" in result.problem


def test_write_replaces_the_file_atomically_with_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "nitro_enclaves" / "allocator.yaml"
    desired = desired_config(2048, cpu_count=2)
    write(plan(path, desired))
    assert path.read_text() == desired.render()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [entry.name for entry in path.parent.iterdir()] == ["allocator.yaml"]
    assert not plan(path, desired).changed


def test_memory_must_leave_some_for_the_parent() -> None:
    with pytest.raises(AllocatorHostError) as caught:
        check_host(desired_config(32768, cpu_count=2), SMT_HOST)
    assert "memory_mib 32768 is not less than this host's memory (32768 MiB)" in str(caught.value)


def test_cpu_count_is_whole_cores_without_cpu_0s_core() -> None:
    check_host(desired_config(1024, cpu_count=6), SMT_HOST)
    with pytest.raises(AllocatorHostError, match="at most 6; lower cpu_count"):
        check_host(desired_config(1024, cpu_count=8), SMT_HOST)
    with pytest.raises(AllocatorHostError, match="use a multiple of 2"):
        check_host(desired_config(1024, cpu_count=3), SMT_HOST)


def test_cpu_pool_must_hold_whole_cores_that_exist() -> None:
    check_host(desired_config(1024, cpu_pool="1,5"), SMT_HOST)
    with pytest.raises(AllocatorHostError) as half_core:
        check_host(desired_config(1024, cpu_pool="1"), SMT_HOST)
    assert "CPU 1 shares its core with 5, which is not in the pool" in str(half_core.value)
    with pytest.raises(AllocatorHostError, match="a sibling of CPU 0"):
        check_host(desired_config(1024, cpu_pool="4"), SMT_HOST)
    with pytest.raises(AllocatorHostError, match="does not have online: 9"):
        check_host(desired_config(1024, cpu_pool="9"), SMT_HOST)


def test_host_resources_are_read_from_sysfs_and_meminfo(tmp_path: Path) -> None:
    sysfs = tmp_path / "cpu"
    sysfs.mkdir()
    (sysfs / "online").write_text("0-3\n")
    for cpu in range(4):
        topology = sysfs / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(f"{cpu % 2},{cpu % 2 + 2}\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8039924 kB\nMemFree:         1000 kB\n")
    host = read_host_resources(sysfs, meminfo)
    assert host.online_cpus == (0, 1, 2, 3)
    assert host.core(1) == (1, 3)
    assert host.memory_mib == 7851


def test_this_hosts_resources_include_cpu_0_and_some_memory() -> None:
    host = read_host_resources()
    assert host.online_cpus[0] == 0
    assert host.memory_mib > 0
    assert 0 in host.core(0)


def _fake_systemctl(tmp_path: Path, rc: int, stderr: str = "") -> Path:
    script = tmp_path / "systemctl"
    script.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"open({str(tmp_path / 'args')!r}, 'w').write(' '.join(sys.argv[1:]))\n"
        f"sys.stderr.write({stderr!r})\nsys.exit({rc})\n"
    )
    script.chmod(0o755)
    return script


def test_restart_runs_systemctl_restart_on_the_service(tmp_path: Path) -> None:
    restart_service("nitro-enclaves-allocator.service", str(_fake_systemctl(tmp_path, 0)))
    assert (tmp_path / "args").read_text() == "restart nitro-enclaves-allocator.service"


def test_a_failed_restart_carries_the_command_and_its_output(tmp_path: Path) -> None:
    systemctl = _fake_systemctl(tmp_path, 1, "Job failed. See journalctl -xe.\n")
    with pytest.raises(AllocatorServiceError) as caught:
        restart_service("nitro-enclaves-allocator.service", str(systemctl))
    err = caught.value
    assert err.rc == 1
    assert err.command == [str(systemctl), "restart", "nitro-enclaves-allocator.service"]
    assert "Job failed" in err.stderr
    assert "journalctl -u nitro-enclaves-allocator.service" in str(err)


def test_no_systemctl_says_to_turn_restart_off_on_the_emulator(tmp_path: Path) -> None:
    with pytest.raises(AllocatorServiceError, match="set restart: false"):
        restart_service(systemctl=os.fspath(tmp_path / "missing-systemctl"))
