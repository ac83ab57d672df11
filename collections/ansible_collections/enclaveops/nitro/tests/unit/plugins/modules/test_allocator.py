"""enclaveops.nitro.allocator: writes allocator.yaml once, diffs it, predicts in check mode."""

from __future__ import annotations

from ansible_collections.enclaveops.nitro.plugins.modules import allocator

# Files for the emulator, written without restarting a service or checking this host's size.
BASE = dict(restart=False, validate_host=False)


def test_writes_the_file_then_reports_no_change(run_module, tmp_path) -> None:
    path = tmp_path / "allocator.yaml"
    first = run_module(allocator.main, dict(BASE, path=str(path), memory_mib=2048, cpu_count=2))
    assert first["changed"] is True
    assert first["config"] == {"memory_mib": 2048, "cpu_count": 2, "cpu_pool": None}
    assert first["restarted"] is False
    assert "memory_mib: 2048\n" in path.read_text()
    second = run_module(allocator.main, dict(BASE, path=str(path), memory_mib=2048, cpu_count=2))
    assert second["changed"] is False


def test_diff_shows_the_file_before_and_after(run_module, tmp_path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text("---\nmemory_mib: 512\ncpu_count: 2\n")
    result = run_module(
        allocator.main, dict(BASE, path=str(path), memory_mib=1024, cpu_pool="2-3"), diff=True
    )
    assert result["diff"]["before"] == "---\nmemory_mib: 512\ncpu_count: 2\n"
    assert "memory_mib: 1024\n" in result["diff"]["after"]
    assert "cpu_pool: 2-3\n" in result["diff"]["after"]
    assert result["config"]["cpu_pool"] == "2-3"


def test_check_mode_predicts_the_change_and_writes_nothing(run_module, tmp_path) -> None:
    path = tmp_path / "allocator.yaml"
    result = run_module(
        allocator.main,
        dict(path=str(path), memory_mib=2048, cpu_count=2, validate_host=False),
        check_mode=True,
    )
    assert result["changed"] is True
    assert result["restarted"] is True, "the default restart would follow the write"
    assert not path.exists()


def test_an_invalid_file_is_replaced_and_its_problem_returned(run_module, tmp_path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text("memory_mib: 2048\ncpu_count: 2\n")
    result = run_module(allocator.main, dict(BASE, path=str(path), memory_mib=2048, cpu_count=2))
    assert result["changed"] is True
    assert "add a line '---' before the settings" in result["previous_problem"]
    assert path.read_text().startswith("---\n")


def test_cpu_count_and_cpu_pool_together_are_refused(run_module, tmp_path) -> None:
    result = run_module(
        allocator.main,
        dict(BASE, path=str(tmp_path / "a.yaml"), memory_mib=512, cpu_count=2, cpu_pool="2,3"),
    )
    assert result["failed"]
    assert "mutually exclusive: cpu_count|cpu_pool" in result["msg"]


def test_a_pool_with_cpu_0_fails_with_the_reason(run_module, tmp_path) -> None:
    result = run_module(
        allocator.main, dict(BASE, path=str(tmp_path / "a.yaml"), memory_mib=512, cpu_pool="0,1")
    )
    assert result["failed"]
    assert "CPU 0, which must remain available to the parent instance" in result["msg"]
    assert result["changed"] is False


def test_more_memory_than_this_host_has_fails_before_writing(run_module, tmp_path) -> None:
    path = tmp_path / "allocator.yaml"
    result = run_module(
        allocator.main,
        dict(path=str(path), memory_mib=1 << 30, cpu_count=1, restart=False),
    )
    assert result["failed"]
    assert "is not less than this host's memory" in result["msg"]
    assert not path.exists()
