"""nitro-emu's persistent state: the enclaves, the emulated instance and the resource books.

Everything lives under the emulator root (``NITRO_EMU_ROOT``, default ``/run/nitro-emu``), so
``describe-enclaves`` in another shell sees what ``run-enclave`` started::

    lock                       flock(2) held across every read-check-write of the books
    instance-id                the emulated EC2 instance ID, made once per root (PCR4 source)
    enclaves/<enclave-id>.json one record per enclave (written to a temporary file, then renamed)
    run/<slot>/                the enclave's run directory, for the launcher (not created here)
    logs/err<time>.log         the backtrace of each [ Exx ] error, as nitro-cli keeps them

An enclave is owned by a process: the run-enclave CLI while it boots (state ``STARTING``, which
nitro-cli never lists), then the enclave process. A record whose owner is gone is stale:
:meth:`EmulatorState.prune_dead` removes it and hands it to the launcher's cleanup first, and every
command starts with it, so a crashed enclave process leaves nothing booked behind.

The resource rules are nitro-cli's (src/enclave_proc/cpu_info.rs, resource_manager.rs, the
nitro_enclaves driver): enclave IDs ``<instance-id>-enc<slot hex>``; CIDs from 16 upward unless
one is asked for, never 0-3 or 0xFFFFFFFF; ``--cpu-count`` takes free CPUs of the pool (the
lowest ids here); memory comes from the pool in 2 MiB huge pages.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats import nitro_cli_errors as errors
from enclave_runtime.formats.allocator_config import AllocatorConfig
from enclave_runtime.formats.vsock_ports import FIRST_ENCLAVE_CID, PARENT_CID
from enclave_runtime.transport.vsock import ENV_ROOT, VMADDR_CID_ANY

DEFAULT_ROOT = Path("/run/nitro-emu")

STATE_STARTING = "STARTING"
STATE_RUNNING = "RUNNING"
FLAGS_NONE = "NONE"
FLAGS_DEBUG_MODE = "DEBUG_MODE"

HUGE_PAGE_MIB = 2
RECORD_VERSION = 1

_INSTANCE_ID = re.compile(r"i-[0-9a-f]{17}")
_ENCLAVE_ID = re.compile(r"i-[0-9a-f]+-enc([0-9a-f]+)")


class StateError(EnclaveOpsError):
    """The state directory cannot be used, or holds a record that is not ours."""


def default_root(environ: Mapping[str, str] | None = None) -> Path:
    """``NITRO_EMU_ROOT`` if set, else /run/nitro-emu."""
    value = (os.environ if environ is None else environ).get(ENV_ROOT)
    return Path(value) if value else DEFAULT_ROOT


@dataclass(frozen=True)
class ResourceRequest:
    """What run-enclave asks for: memory, and a CPU count or explicit CPU ids, maybe a CID."""

    memory_mib: int
    cpu_count: int | None = None
    cpu_ids: tuple[int, ...] | None = None
    enclave_cid: int | None = None


@dataclass(frozen=True)
class EnclaveRecord:
    """One enclave as the emulator remembers it (``enclaves/<enclave_id>.json``)."""

    enclave_name: str
    enclave_id: str
    process_id: int  # the owner: the run-enclave CLI while STARTING, then the enclave process
    enclave_cid: int
    cpu_ids: tuple[int, ...]
    memory_mib: int  # what was allocated: the request rounded up to whole 2 MiB huge pages
    state: str  # STARTING (reserved, booting; never listed) or RUNNING
    flags: str  # NONE or DEBUG_MODE
    eif_path: Path
    start_time: str  # RFC 3339, UTC
    run_dir: Path
    measurements: dict[str, str] = field(default_factory=dict)  # nitro-cli's Measurements
    image_name: str | None = None
    image_version: str | None = None
    metadata: dict[str, Any] | None = None  # describe --metadata's Metadata, None without one
    process_start_ticks: int | None = None  # the owner's start time, to see through PID reuse

    @property
    def debug_mode(self) -> bool:
        return self.flags == FLAGS_DEBUG_MODE

    @property
    def number_of_cpus(self) -> int:
        return len(self.cpu_ids)

    def run_info(self) -> dict[str, Any]:
        """The run-enclave JSON (nitro-cli's EnclaveRunInfo, in its key order)."""
        return {
            "EnclaveName": self.enclave_name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.process_id,
            "EnclaveCID": self.enclave_cid,
            "NumberOfCPUs": self.number_of_cpus,
            "CPUIDs": list(self.cpu_ids),
            "MemoryMiB": self.memory_mib,
        }

    def describe_info(self, with_metadata: bool = False) -> dict[str, Any]:
        """One describe-enclaves entry (nitro-cli's EnclaveDescribeInfo, in its key order)."""
        info = {
            **self.run_info(),
            "State": self.state,
            "Flags": self.flags,
            "Measurements": dict(self.measurements),
        }
        if with_metadata and self.metadata is not None:
            info["ImageName"] = self.image_name
            info["ImageVersion"] = self.image_version
            info["Metadata"] = self.metadata
        return info

    def terminate_info(self) -> dict[str, Any]:
        """The terminate-enclave JSON (nitro-cli's EnclaveTerminateInfo)."""
        return {"EnclaveName": self.enclave_name, "EnclaveID": self.enclave_id, "Terminated": True}

    def to_json(self) -> dict[str, Any]:
        return {
            "RecordVersion": RECORD_VERSION,
            "EnclaveName": self.enclave_name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.process_id,
            "ProcessStartTicks": self.process_start_ticks,
            "EnclaveCID": self.enclave_cid,
            "CPUIDs": list(self.cpu_ids),
            "MemoryMiB": self.memory_mib,
            "State": self.state,
            "Flags": self.flags,
            "EifPath": str(self.eif_path),
            "StartTime": self.start_time,
            "RunDir": str(self.run_dir),
            "Measurements": self.measurements,
            "ImageName": self.image_name,
            "ImageVersion": self.image_version,
            "Metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: object, source: str) -> EnclaveRecord:
        if not isinstance(data, dict) or data.get("RecordVersion") != RECORD_VERSION:
            raise StateError(
                f"{source} is not a nitro-emu enclave record (version {RECORD_VERSION})"
            )
        reader = _RecordReader(data, source)
        return cls(
            enclave_name=reader.get("EnclaveName", str),
            enclave_id=reader.get("EnclaveID", str),
            process_id=reader.get("ProcessID", int),
            process_start_ticks=reader.get("ProcessStartTicks", int, optional=True),
            enclave_cid=reader.get("EnclaveCID", int),
            cpu_ids=tuple(reader.get("CPUIDs", list, items=int)),
            memory_mib=reader.get("MemoryMiB", int),
            state=reader.get("State", str),
            flags=reader.get("Flags", str),
            eif_path=Path(reader.get("EifPath", str)),
            start_time=reader.get("StartTime", str),
            run_dir=Path(reader.get("RunDir", str)),
            measurements=reader.get("Measurements", dict, items=str),
            image_name=reader.get("ImageName", str, optional=True),
            image_version=reader.get("ImageVersion", str, optional=True),
            metadata=reader.get("Metadata", dict, optional=True),
        )


class _RecordReader:
    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data = data
        self.source = source

    def get(
        self, key: str, kind: type, *, optional: bool = False, items: type | None = None
    ) -> Any:
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not _is_a(value, kind) or (items is not None and not _all_are(value, items)):
            raise StateError(
                f"{self.source}: {key} is {value!r}, not a {kind.__name__}; the record is "
                "damaged: terminate the enclave's processes and delete the file"
            )
        return value


def _is_a(value: object, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _all_are(container: object, kind: type) -> bool:
    elements = container.values() if isinstance(container, dict) else container
    return all(_is_a(element, kind) for element in elements)  # type: ignore[union-attr]


@dataclass(frozen=True)
class PrunedEnclave:
    """A stale record prune_dead removed, and what went wrong cleaning up after it, if anything."""

    record: EnclaveRecord
    cleanup_error: str | None = None


Cleanup = Callable[[EnclaveRecord], None]


class EmulatorState:
    """The state directory of one emulator root."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.enclaves_dir = self.root / "enclaves"
        self.run_root = self.root / "run"
        self.log_dir = self.root / "logs"
        self.lock_path = self.root / "lock"
        self.instance_id_path = self.root / "instance-id"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the root's lock: one writer of the books across processes.

        Re-entrant within a thread, for every EmulatorState of this root in the process, so code
        called under the lock (the cleanup hook of prune_dead) may use the state freely.
        """
        with _root_lock(self.lock_path).held(self._open_lock):
            yield

    def instance_id(self) -> str:
        """The emulated instance ID (``i-`` and 17 hex digits), created on first use."""
        with self.locked():
            try:
                text = self.instance_id_path.read_text(encoding="ascii").strip()
            except FileNotFoundError:
                text = "i-" + secrets.token_hex(9)[:17]
                _write_atomically(self.instance_id_path, text + "\n")
            except (OSError, UnicodeDecodeError) as err:
                raise StateError(f"cannot read {self.instance_id_path}: {err}") from None
            if not _INSTANCE_ID.fullmatch(text):
                raise StateError(
                    f"{self.instance_id_path} holds {text!r}, not an instance ID like "
                    "i-0123456789abcdef0; delete it (no enclave may be running) to make a new one"
                )
            return text

    def records(self) -> list[EnclaveRecord]:
        """Every record, oldest first (STARTING ones included)."""
        try:
            paths = sorted(self.enclaves_dir.glob("*.json"))
        except OSError as err:
            raise StateError(f"cannot list {self.enclaves_dir}: {err}") from None
        records = [record for record in map(self._read, paths) if record is not None]
        return sorted(records, key=lambda record: (record.start_time, record.enclave_id))

    def running(self) -> list[EnclaveRecord]:
        """The enclaves nitro-cli would list: booted (prune_dead first drops the dead ones)."""
        return [record for record in self.records() if record.state == STATE_RUNNING]

    def get(self, enclave_id: str) -> EnclaveRecord | None:
        if not _ENCLAVE_ID.fullmatch(enclave_id):
            return None
        return self._read(self._record_path(enclave_id))

    def save(self, record: EnclaveRecord) -> None:
        with self.locked():
            _write_atomically(
                self._record_path(record.enclave_id), json.dumps(record.to_json(), indent=2)
            )

    def remove(self, enclave_id: str) -> bool:
        """Forget an enclave and free its resources; False when there was no such record."""
        if not _ENCLAVE_ID.fullmatch(enclave_id):
            return False
        with self.locked():
            try:
                self._record_path(enclave_id).unlink()
            except FileNotFoundError:
                return False
            return True

    def is_alive(self, record: EnclaveRecord) -> bool:
        return process_alive(record.process_id, record.process_start_ticks)

    def prune_dead(self, cleanup: Cleanup | None = None) -> list[PrunedEnclave]:
        """Remove the records whose owner process is gone, after calling ``cleanup`` on each."""
        if not self.enclaves_dir.is_dir():
            return []
        pruned = []
        with self.locked():
            for record in self.records():
                if self.is_alive(record):
                    continue
                pruned.append(PrunedEnclave(record, _run_cleanup(cleanup, record)))
                self.remove(record.enclave_id)
        return pruned

    def reserve(
        self,
        pool: AllocatorConfig,
        request: ResourceRequest,
        *,
        name: str,
        eif_path: Path,
        debug_mode: bool,
        owner_pid: int | None = None,
    ) -> EnclaveRecord:
        """Book memory, CPUs, a CID, an ID and a unique name for a new enclave, atomically.

        The record is saved as STARTING and owned by ``owner_pid`` (this process by default);
        raises the nitro-cli error the driver would give (E20-E22, E26, E27, E29).
        """
        check_cpu_request(pool, request)
        owner = os.getpid() if owner_pid is None else owner_pid
        with self.locked():
            others = self.records()
            enclave_id = self._new_enclave_id(others)
            record = EnclaveRecord(
                enclave_name=unique_enclave_name(name, (other.enclave_name for other in others)),
                enclave_id=enclave_id,
                process_id=owner,
                process_start_ticks=process_start_ticks(owner),
                enclave_cid=_claim_cid(request.enclave_cid, others),
                cpu_ids=_claim_cpus(pool, request, others),
                memory_mib=_claim_memory(pool, request.memory_mib, others),
                state=STATE_STARTING,
                flags=FLAGS_DEBUG_MODE if debug_mode else FLAGS_NONE,
                eif_path=Path(eif_path),
                start_time=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                run_dir=self.run_root / enclave_id.rpartition("-enc")[2],
            )
            self.save(record)
            return record

    def mark_running(self, record: EnclaveRecord, process_id: int) -> EnclaveRecord:
        """Hand a booted enclave to its enclave process; describe-enclaves lists it from now on."""
        running = replace(
            record,
            state=STATE_RUNNING,
            process_id=process_id,
            process_start_ticks=process_start_ticks(process_id),
        )
        self.save(running)
        return running

    def _open_lock(self) -> int:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.enclaves_dir.mkdir(exist_ok=True)
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise StateError(
                f"cannot use the emulator state directory {self.root}: {err.strerror or err}; "
                f"run as root, or point {ENV_ROOT} (or --root) at a directory you can write"
            ) from None

    def _record_path(self, enclave_id: str) -> Path:
        return self.enclaves_dir / f"{enclave_id}.json"

    def _read(self, path: Path) -> EnclaveRecord | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None  # removed by another command since it was listed
        except (OSError, UnicodeDecodeError) as err:
            raise StateError(f"cannot read enclave record {path}: {err}") from None
        try:
            data = json.loads(text)
        except ValueError as err:
            raise StateError(f"{path} is not JSON ({err}); delete it") from None
        return EnclaveRecord.from_json(data, str(path))

    def _new_enclave_id(self, others: Iterable[EnclaveRecord]) -> str:
        taken = {record.enclave_id for record in others}
        instance_id = self.instance_id()
        while True:
            # 16 hex digits like the driver's slot UIDs; bit 60 keeps the leading digit non-zero.
            enclave_id = f"{instance_id}-enc{secrets.randbits(64) | 1 << 60:x}"
            if enclave_id not in taken:
                return enclave_id


class _RootLock:
    """The flock of one root, shared by the threads of this process (one at a time)."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.descriptor: int | None = None

    @contextlib.contextmanager
    def held(self, open_lock_file: Callable[[], int]) -> Iterator[None]:
        with self.thread_lock:
            if self.depth == 0:
                descriptor = open_lock_file()
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                self.descriptor = descriptor
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0 and self.descriptor is not None:
                    os.close(self.descriptor)  # the last descriptor closed releases the flock
                    self.descriptor = None

    def forget_after_fork(self) -> None:
        """In a child: the parent holds the flock, not us; drop our copy of its descriptor."""
        self.thread_lock = threading.RLock()
        self.depth = 0
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None


_ROOT_LOCKS: dict[str, _RootLock] = {}
_ROOT_LOCKS_GUARD = threading.Lock()


def _root_lock(lock_path: Path) -> _RootLock:
    with _ROOT_LOCKS_GUARD:
        return _ROOT_LOCKS.setdefault(os.path.abspath(lock_path), _RootLock())


def _forget_root_locks_after_fork() -> None:
    global _ROOT_LOCKS_GUARD  # noqa: PLW0603 - a lock held by another thread at fork is stuck
    _ROOT_LOCKS_GUARD = threading.Lock()
    for root_lock in _ROOT_LOCKS.values():
        root_lock.forget_after_fork()


os.register_at_fork(after_in_child=_forget_root_locks_after_fork)


def check_cpu_request(pool: AllocatorConfig, request: ResourceRequest) -> None:
    """nitro-cli's checks of the CPU request against the whole pool: E20, E21, E22."""
    pool_ids = pool.pool_cpu_ids()
    if request.cpu_ids is not None:
        duplicates = sorted({cpu for cpu in request.cpu_ids if request.cpu_ids.count(cpu) > 1})
        if duplicates:
            raise errors.duplicate_cpu_ids(duplicates)
        for cpu in sorted(request.cpu_ids):
            if cpu not in pool_ids:
                raise errors.cpu_not_in_pool(cpu)
    elif request.cpu_count is not None and request.cpu_count > len(pool_ids):
        raise errors.insufficient_cpus(request.cpu_count, len(pool_ids))


def allocated_memory_mib(memory_mib: int) -> int:
    """The memory an enclave gets for a request: whole 2 MiB huge pages."""
    return -(-memory_mib // HUGE_PAGE_MIB) * HUGE_PAGE_MIB


def default_enclave_name(eif_path: str) -> str:
    """nitro-cli's name for an unnamed enclave: the EIF's file name without ``.eif``."""
    name = eif_path.rsplit("/", maxsplit=1)[-1]
    while name.endswith(".eif"):
        name = name[: -len(".eif")]
    return name


def unique_enclave_name(name: str, taken: Iterable[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... when taken, as nitro-cli renames duplicates."""
    taken_names = set(taken)
    candidate, index = name, 0
    while candidate in taken_names:
        index += 1
        candidate = f"{name}_{index}"
    return candidate


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), if visible."""
    fields = _proc_stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs and is the process that started at ``start_ticks`` (not a reuse)."""
    if pid <= 0:
        return False
    fields = _proc_stat_fields(pid)
    if fields is None:
        return _signal_zero_reaches(pid)
    if fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or len(fields) <= 19 or int(fields[19]) == start_ticks


def _proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after ``comm`` (state first), or None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text[text.rfind(")") + 1 :].split()


def _signal_zero_reaches(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, but hidden from /proc (hidepid) and owned by someone else
    return True


def _claim_memory(pool: AllocatorConfig, memory_mib: int, others: list[EnclaveRecord]) -> int:
    if memory_mib <= 0:
        raise errors.insufficient_memory_requested(memory_mib, None)
    allocated = allocated_memory_mib(memory_mib)
    free = pool.memory_mib - sum(record.memory_mib for record in others)
    if allocated > free:
        raise errors.insufficient_memory_available(memory_mib, max(free, 0))
    return allocated


def _claim_cpus(
    pool: AllocatorConfig, request: ResourceRequest, others: list[EnclaveRecord]
) -> tuple[int, ...]:
    owners = {cpu: record.enclave_id for record in others for cpu in record.cpu_ids}
    if request.cpu_ids is not None:
        busy = [cpu for cpu in request.cpu_ids if cpu in owners]
        if busy:
            raise errors.ioctl_failure(
                "The provided vCPU is already used: "
                + ", ".join(f"CPU {cpu} by enclave {owners[cpu]}" for cpu in busy)
            )
        wanted: tuple[int, ...] = tuple(request.cpu_ids)
    else:
        free = [cpu for cpu in pool.pool_cpu_ids() if cpu not in owners]
        count = request.cpu_count or 0
        if len(free) < count:
            raise errors.ioctl_failure(
                "The enclave cannot be created because no CPUs are available in the pool "
                f"({count} requested, {len(free)} of {len(pool.pool_cpu_ids())} free)"
            )
        wanted = tuple(free[:count])
    if not wanted:
        raise errors.ioctl_failure("The enclave cannot start because no vCPUs have been added")
    return wanted


def _claim_cid(requested: int | None, others: list[EnclaveRecord]) -> int:
    owners = {record.enclave_cid: record.enclave_id for record in others}
    if requested is None:
        cid = FIRST_ENCLAVE_CID
        while cid in owners:
            cid += 1
        return cid
    if requested <= PARENT_CID or requested >= VMADDR_CID_ANY:
        raise errors.ioctl_failure(
            f"The provided enclave CID is invalid, being a well-known CID or the parent VM CID "
            f"({requested}; use {PARENT_CID + 1}..{VMADDR_CID_ANY - 1})"
        )
    if requested in owners:
        raise errors.ioctl_failure(
            f"The enclave CID {requested} is already used by enclave {owners[requested]}"
        )
    return requested


def _run_cleanup(cleanup: Cleanup | None, record: EnclaveRecord) -> str | None:
    if cleanup is None:
        return None
    try:
        cleanup(record)
    except (EnclaveOpsError, OSError) as err:
        return str(err)
    return None


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise StateError(f"cannot write {path}: {err.strerror or err}") from None
