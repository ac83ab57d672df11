"""nitro-emu's state directory: records, allocation rules, the lock, and pruning dead enclaves."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from enclave_runtime.emulator.state import (
    FLAGS_DEBUG_MODE,
    STATE_RUNNING,
    STATE_STARTING,
    EmulatorState,
    EnclaveRecord,
    ResourceRequest,
    StateError,
    allocated_memory_mib,
    default_enclave_name,
    default_root,
    process_alive,
    process_start_ticks,
    unique_enclave_name,
)
from enclave_runtime.formats.allocator_config import AllocatorConfig
from enclave_runtime.formats.nitro_cli_errors import NitroCliError
from enclave_runtime.formats.nitro_cli_rules import check_memory_for_eif, minimum_memory_mib

POOL = AllocatorConfig(memory_mib=1024, cpu_count=4)
MIB = 1024 * 1024


def reserve(state: EmulatorState, pool: AllocatorConfig = POOL, **request) -> EnclaveRecord:
    name = request.pop("name", "app")
    request.setdefault("memory_mib", 128)
    if "cpu_ids" not in request:
        request.setdefault("cpu_count", 1)
    return state.reserve(
        pool, ResourceRequest(**request), name=name, eif_path=Path("/x/app.eif"), debug_mode=False
    )


def raises_code(code: str):
    return pytest.raises(NitroCliError, match=rf"^\[ {code} \]")


@pytest.fixture
def state(tmp_path) -> EmulatorState:
    return EmulatorState(tmp_path / "emu")


@pytest.fixture
def sleeper():
    """A real process to own records; killed (and reaped) at the end."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def test_root_comes_from_nitro_emu_root_or_defaults_to_run_nitro_emu() -> None:
    assert default_root({"NITRO_EMU_ROOT": "/tmp/emu"}) == Path("/tmp/emu")
    assert default_root({}) == Path("/run/nitro-emu")


def test_instance_id_looks_like_an_ec2_instance_and_is_kept(state) -> None:
    instance_id = state.instance_id()

    assert re.fullmatch(r"i-[0-9a-f]{17}", instance_id)
    assert EmulatorState(state.root).instance_id() == instance_id
    assert state.instance_id_path.read_text() == instance_id + "\n"


def test_a_damaged_instance_id_is_reported_not_replaced(state) -> None:
    state.root.mkdir(parents=True)
    state.instance_id_path.write_text("garbage\n")

    with pytest.raises(StateError, match="not an instance ID"):
        state.instance_id()


def test_enclave_id_is_the_instance_id_then_enc_and_16_hex_digits(state) -> None:
    record = reserve(state)

    assert re.fullmatch(rf"{state.instance_id()}-enc[1-9a-f][0-9a-f]{{15}}", record.enclave_id)
    assert record.run_dir == state.root / "run" / record.enclave_id.rpartition("-enc")[2]


def test_reservation_is_saved_as_starting_and_owned_by_this_process(state) -> None:
    record = reserve(state, memory_mib=100, cpu_count=2)

    assert record.state == STATE_STARTING
    assert record.process_id == os.getpid()
    assert record.process_start_ticks == process_start_ticks(os.getpid())
    assert state.get(record.enclave_id) == record
    assert state.running() == []  # nitro-cli lists an enclave only once it has booted


def test_record_file_is_json_written_whole(state) -> None:
    record = reserve(state)
    files = sorted(path.name for path in state.enclaves_dir.iterdir())

    assert files == [f"{record.enclave_id}.json"]  # no temporary file left behind
    data = json.loads((state.enclaves_dir / files[0]).read_text())
    assert data["EnclaveID"] == record.enclave_id
    assert EnclaveRecord.from_json(data, "x") == record


def test_mark_running_hands_the_enclave_to_its_process(state, sleeper) -> None:
    record = state.mark_running(reserve(state), sleeper.pid)

    assert state.running() == [record]
    assert record.state == STATE_RUNNING
    assert record.process_id == sleeper.pid


def test_cpu_count_takes_the_lowest_free_cpus_of_the_pool(state) -> None:
    first = reserve(state, cpu_count=2)
    second = reserve(state, cpu_count=1)

    assert first.cpu_ids == (1, 2)
    assert second.cpu_ids == (3,)


def test_cpu_ids_are_kept_in_the_order_given(state) -> None:
    assert reserve(state, cpu_ids=(4, 2)).cpu_ids == (4, 2)


def test_cpus_in_use_are_an_ioctl_failure(state) -> None:
    reserve(state, cpu_ids=(1, 2))

    with raises_code("E29") as caught:
        reserve(state, cpu_ids=(2, 3))
    assert "The provided vCPU is already used: CPU 2 by enclave i-" in str(caught.value)
    with raises_code("E29") as caught:
        reserve(state, cpu_count=3)
    assert "no CPUs are available in the pool (3 requested, 2 of 4 free)" in str(caught.value)


def test_cpu_requests_beyond_the_pool_are_e20_e21_e22(state) -> None:
    with raises_code("E22"):
        reserve(state, cpu_count=5)
    with raises_code("E21"):
        reserve(state, cpu_ids=(1, 9))
    with raises_code("E20"):
        reserve(state, cpu_ids=(1, 1))


def test_zero_cpus_cannot_start(state) -> None:
    with raises_code("E29") as caught:
        reserve(state, cpu_count=0)
    assert "no vCPUs have been added" in str(caught.value)


def test_cids_start_at_16_and_skip_the_ones_in_use(state) -> None:
    assert reserve(state, enclave_cid=17).enclave_cid == 17
    assert reserve(state).enclave_cid == 16
    assert reserve(state).enclave_cid == 18


@pytest.mark.parametrize("cid", [0, 1, 2, 3, 0xFFFFFFFF, 1 << 40])
def test_well_known_cids_are_refused(state, cid: int) -> None:
    with raises_code("E29") as caught:
        reserve(state, enclave_cid=cid)
    assert "well-known CID or the parent VM CID" in str(caught.value)


def test_a_cid_in_use_is_refused(state) -> None:
    first = reserve(state, enclave_cid=20)

    with raises_code("E29") as caught:
        reserve(state, enclave_cid=20)
    assert f"CID 20 is already used by enclave {first.enclave_id}" in str(caught.value)


def test_memory_is_booked_in_2_mib_pages_against_the_pool(state) -> None:
    assert reserve(state, memory_mib=511).memory_mib == 512
    assert reserve(state, memory_mib=512).memory_mib == 512

    with raises_code("E27") as caught:
        reserve(state, memory_mib=2)
    assert "User provided `memory` is 2 MB, which is more than the available" in str(caught.value)
    assert "the enclave memory pool has 0 MiB free" in str(caught.value)


def test_zero_memory_is_e26(state) -> None:
    with raises_code("E26"):
        reserve(state, memory_mib=0)


def test_removing_a_record_frees_its_resources(state) -> None:
    record = reserve(state, memory_mib=1024, cpu_count=4, enclave_cid=16)

    assert state.remove(record.enclave_id) is True
    assert state.remove(record.enclave_id) is False
    assert reserve(state, memory_mib=1024, cpu_count=4, enclave_cid=16).cpu_ids == (1, 2, 3, 4)


def test_names_are_made_unique_as_nitro_cli_does(state) -> None:
    assert [reserve(state, name="app").enclave_name for _ in range(3)] == ["app", "app_1", "app_2"]
    assert unique_enclave_name("web", ["web", "web_2"]) == "web_1"


def test_default_name_is_the_eif_file_name_without_eif() -> None:
    assert default_enclave_name("/path/to/hello.eif") == "hello"
    assert default_enclave_name("image.eif.eif") == "image"
    assert default_enclave_name("relative/image") == "image"


def test_e26_rule_is_four_times_the_eif_size() -> None:
    assert minimum_memory_mib(11 * MIB) == 44
    assert minimum_memory_mib(11 * MIB + 1) == 48  # whole MiB of EIF, then times four
    check_memory_for_eif(44, 11 * MIB)

    with raises_code("E26") as caught:
        check_memory_for_eif(43, 11 * MIB)
    assert "User provided `memory` is 43 MB, but based on the EIF file size, the minimum" in str(
        caught.value
    )


def test_allocated_memory_rounds_up_to_huge_pages() -> None:
    assert [allocated_memory_mib(size) for size in (1, 2, 3, 64, 65)] == [2, 2, 4, 64, 66]


def test_describe_info_has_nitro_cli_keys_in_order(state) -> None:
    record = reserve(state, memory_mib=64)

    assert list(record.describe_info()) == [
        "EnclaveName",
        "EnclaveID",
        "ProcessID",
        "EnclaveCID",
        "NumberOfCPUs",
        "CPUIDs",
        "MemoryMiB",
        "State",
        "Flags",
        "Measurements",
    ]
    assert record.describe_info()["Flags"] == "NONE"


def test_debug_flag_is_recorded(state) -> None:
    record = state.reserve(
        POOL, ResourceRequest(64, cpu_count=1), name="d", eif_path=Path("e"), debug_mode=True
    )

    assert record.flags == FLAGS_DEBUG_MODE
    assert record.debug_mode


def test_a_damaged_record_is_reported_with_what_to_do(state) -> None:
    record = reserve(state)
    path = state.enclaves_dir / f"{record.enclave_id}.json"
    data = json.loads(path.read_text())
    data["CPUIDs"] = ["one"]
    path.write_text(json.dumps(data))

    with pytest.raises(StateError, match=r"CPUIDs is .*delete the file"):
        state.records()
    path.write_text("{")
    with pytest.raises(StateError, match="is not JSON"):
        state.records()


def test_lookups_of_malformed_ids_find_nothing(state) -> None:
    reserve(state)

    assert state.get("../lock") is None
    assert state.remove("../../etc/passwd") is False


def test_prune_removes_records_whose_process_is_gone_and_cleans_up(state, sleeper) -> None:
    alive = state.mark_running(reserve(state, name="alive"), sleeper.pid)
    dead_process = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_process.wait()
    dead = state.mark_running(reserve(state, name="dead"), dead_process.pid)
    cleaned = []

    pruned = state.prune_dead(cleaned.append)

    assert [entry.record for entry in pruned] == [dead]
    assert cleaned == [dead]
    assert state.records() == [alive]


def test_prune_treats_a_zombie_as_dead(state) -> None:
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        state.mark_running(reserve(state), zombie.pid)

        assert [entry.record.process_id for entry in state.prune_dead()] == [zombie.pid]
    finally:
        zombie.wait()


def test_prune_sees_through_pid_reuse(state) -> None:
    record = reserve(state)
    state.save(dataclasses.replace(record, process_start_ticks=1))  # same PID, another process

    assert len(state.prune_dead()) == 1
    assert state.records() == []


def test_cleanup_may_use_the_state_while_prune_holds_the_lock(state) -> None:
    dead_process = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_process.wait()
    record = state.mark_running(reserve(state), dead_process.pid)
    seen = []

    def cleanup(pruned: EnclaveRecord) -> None:
        other = EmulatorState(state.root)  # e.g. the launcher's own view of the root
        with other.locked():
            seen.extend(other.records())

    state.prune_dead(cleanup)

    assert seen == [record]


def test_a_failing_cleanup_is_reported_and_the_record_still_goes(state) -> None:
    dead_process = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_process.wait()
    state.mark_running(reserve(state), dead_process.pid)

    def cleanup(record: EnclaveRecord) -> None:
        raise OSError(16, "Device or resource busy")

    pruned = state.prune_dead(cleanup)

    assert pruned[0].cleanup_error == "[Errno 16] Device or resource busy"
    assert state.records() == []


def test_prune_of_a_root_that_does_not_exist_creates_nothing(tmp_path) -> None:
    state = EmulatorState(tmp_path / "none")

    assert state.prune_dead() == []
    assert not state.root.exists()


def test_process_alive() -> None:
    assert process_alive(os.getpid(), process_start_ticks(os.getpid()))
    assert not process_alive(0)
    assert not process_alive(os.getpid(), -1)


def test_unusable_root_says_how_to_fix_it(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(StateError, match=r"cannot use the emulator state directory .*NITRO_EMU"):
        EmulatorState(blocker / "emu").instance_id()


def test_lock_is_reentrant_here_and_exclusive_across_processes(state) -> None:
    with state.locked(), state.locked():
        descriptor = os.open(state.lock_path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(descriptor)
    descriptor = os.open(state.lock_path, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the outer block ends
    finally:
        os.close(descriptor)


def _reserve_in_child(root: str, request: ResourceRequest, barrier, results) -> None:
    state = EmulatorState(root)
    barrier.wait()
    try:
        record = state.reserve(POOL, request, name="race", eif_path=Path("e"), debug_mode=False)
        results.put(("ok", record.enclave_id, record.cpu_ids, record.enclave_cid))
    except NitroCliError as err:
        results.put(("error", err.code, (), 0))


def _race(root: Path, requests: list[ResourceRequest]) -> list[tuple]:
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(len(requests)), context.Queue()
    children = [
        context.Process(target=_reserve_in_child, args=(str(root), request, barrier, results))
        for request in requests
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    return outcomes


def test_two_processes_reserving_the_whole_pool_at_once_get_it_once(state) -> None:
    outcomes = _race(state.root, [ResourceRequest(512, cpu_count=4)] * 2)

    assert sorted(outcome[0] for outcome in outcomes) == ["error", "ok"]
    assert [outcome[1] for outcome in outcomes if outcome[0] == "error"] == ["E29"]


def test_concurrent_reservations_never_share_a_cpu_cid_name_or_id(state) -> None:
    outcomes = _race(state.root, [ResourceRequest(64, cpu_count=1)] * 4)
    records = state.records()

    assert all(outcome[0] == "ok" for outcome in outcomes)
    assert sorted(cpu for record in records for cpu in record.cpu_ids) == [1, 2, 3, 4]
    assert sorted(record.enclave_cid for record in records) == [16, 17, 18, 19]
    assert sorted(record.enclave_name for record in records) == [
        "race",
        "race_1",
        "race_2",
        "race_3",
    ]
    assert len({record.enclave_id for record in records}) == 4


def test_threads_reserving_at_once_never_share_a_cpu(state) -> None:
    records: list[EnclaveRecord] = []

    def book() -> None:
        records.append(reserve(EmulatorState(state.root), name="thread"))

    threads = [threading.Thread(target=book) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(cpu for record in records for cpu in record.cpu_ids) == [1, 2, 3, 4]
    assert len({record.enclave_cid for record in state.records()}) == 4
