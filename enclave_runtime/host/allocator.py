"""Ensure a parent instance's allocator.yaml: desired vs actual, host checks, atomic write, restart.

The file format lives in :mod:`enclave_runtime.formats.allocator_config`; this module decides
whether the file must change (by meaning, so an operator's comments in an equivalent file are
left alone), checks the request against the CPUs and memory this host has, writes the canonical
file atomically and restarts ``nitro-enclaves-allocator.service`` so the driver takes the new pool.

Host rules, from aws/aws-nitro-enclaves-cli (bootstrap/nitro-enclaves-allocator and the
nitro_enclaves driver's ``ne_setup_cpu_pool``): the pool is made of whole cores (every hyperthread
sibling of a pooled CPU is pooled too), CPU 0 and its siblings stay with the parent, and the memory
is taken from the parent's RAM, so it must be less than what the host has.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats import allocator_config
from enclave_runtime.formats.allocator_config import AllocatorConfig, AllocatorConfigError

SERVICE_NAME = "nitro-enclaves-allocator.service"
FILE_MODE = 0o644
SYSFS_CPU = Path("/sys/devices/system/cpu")
PROC_MEMINFO = Path("/proc/meminfo")
KIB_PER_MIB = 1024
SYSTEMCTL_TIMEOUT = 300.0


class AllocatorHostError(EnclaveOpsError):
    """The requested pool does not fit this host's CPUs or memory."""


class AllocatorWriteError(EnclaveOpsError):
    """allocator.yaml could not be written."""


class AllocatorServiceError(EnclaveOpsError):
    """``systemctl restart`` of the allocator service failed; carries cmd/rc/stdout/stderr."""

    def __init__(self, message: str, *, command: Sequence[str], rc: int, stdout: str, stderr: str):
        super().__init__(message)
        self.command = list(command)
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class HostResources:
    """The CPUs and memory of this host as the allocator sees them."""

    online_cpus: tuple[int, ...]
    # CPU id -> the CPUs of its core (itself included); a CPU without topology is its own core.
    core_of: dict[int, tuple[int, ...]]
    memory_mib: int

    def core(self, cpu: int) -> tuple[int, ...]:
        return self.core_of.get(cpu, (cpu,))


@dataclass(frozen=True)
class AllocatorPlan:
    """What :func:`plan` found: the file now (text and meaning) and what it must become."""

    path: Path
    desired: AllocatorConfig
    actual: AllocatorConfig | None
    before: str | None  # the file's text, None when it does not exist
    after: str  # the canonical text of ``desired``
    problem: str | None  # why the current file cannot be used as it is (unreadable, invalid)

    @property
    def changed(self) -> bool:
        return self.actual != self.desired

    def diff(self) -> dict[str, str]:
        """Ansible's before/after diff of the file."""
        return {
            "before": self.before or "",
            "after": self.after if self.changed else (self.before or ""),
            "before_header": str(self.path),
            "after_header": str(self.path),
        }


def desired_config(
    memory_mib: int, cpu_count: int | None = None, cpu_pool: str | None = None
) -> AllocatorConfig:
    """The configuration an operator asks for; ``cpu_pool`` in the kernel's list format."""
    if (cpu_count is None) == (cpu_pool is None):
        raise AllocatorConfigError(
            'give exactly one of cpu_count (a number of CPUs) or cpu_pool (CPU ids such as "2,3")'
        )
    pool = allocator_config.parse_cpu_list(cpu_pool) if cpu_pool is not None else None
    return AllocatorConfig(memory_mib=memory_mib, cpu_count=cpu_count, cpu_pool=pool)


def plan(path: str | os.PathLike[str], desired: AllocatorConfig) -> AllocatorPlan:
    """Compare the file at ``path`` with ``desired``; a missing or invalid file must change."""
    path = Path(path)
    before = _read_text(path)
    actual: AllocatorConfig | None = None
    problem: str | None = None
    if before is not None:
        try:
            actual = allocator_config.parse(before, str(path))
        except AllocatorConfigError as err:
            problem = str(err)
    return AllocatorPlan(
        path=path,
        desired=desired,
        actual=actual,
        before=before,
        after=desired.render(),
        problem=problem,
    )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise AllocatorWriteError(f"cannot read {path}: {err.strerror or err}") from None


def read_host_resources(sysfs_cpu: Path = SYSFS_CPU, meminfo: Path = PROC_MEMINFO) -> HostResources:
    """Online CPUs, their cores (thread siblings) and total memory, from sysfs and /proc."""
    online = _sysfs_cpu_list(_read(sysfs_cpu / "online").strip())
    core_of = {}
    for cpu in online:
        siblings = sysfs_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        if siblings.exists():
            core_of[cpu] = _sysfs_cpu_list(_read(siblings).strip())
    return HostResources(online_cpus=online, core_of=core_of, memory_mib=_memory_mib(meminfo))


def _sysfs_cpu_list(text: str) -> tuple[int, ...]:
    """A CPU list as sysfs writes it ("0-3,6"); unlike cpu_pool it may hold CPU 0."""
    cpus: set[int] = set()
    for token in filter(None, text.split(",")):
        first, _, last = token.partition("-")
        try:
            cpus.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise AllocatorHostError(f"unexpected CPU list {text!r} in sysfs") from None
    return tuple(sorted(cpus))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise AllocatorHostError(f"cannot read {path} to check the host: {err}") from None


def _memory_mib(meminfo: Path) -> int:
    match = re.search(r"^MemTotal:\s+([0-9]+) kB$", _read(meminfo), re.MULTILINE)
    if match is None:
        raise AllocatorHostError(f"{meminfo} has no MemTotal line; cannot check memory_mib")
    return int(match.group(1)) // KIB_PER_MIB


def check_host(config: AllocatorConfig, host: HostResources) -> None:
    """Raise :class:`AllocatorHostError` when the pool cannot be carved out of ``host``."""
    if config.memory_mib >= host.memory_mib:
        raise AllocatorHostError(
            f"memory_mib {config.memory_mib} is not less than this host's memory "
            f"({host.memory_mib} MiB): the parent instance needs memory of its own; lower "
            "memory_mib or use a larger instance type"
        )
    parent_core = host.core(0)
    if config.cpu_pool is not None:
        _check_pool(config.cpu_pool, host, parent_core)
    else:
        _check_count(config.cpu_count or 0, host, parent_core)


def _check_pool(pool: tuple[int, ...], host: HostResources, parent_core: tuple[int, ...]) -> None:
    offline = [cpu for cpu in pool if cpu not in host.online_cpus]
    if offline:
        raise AllocatorHostError(
            f"cpu_pool names CPUs this host does not have online: {_cpus(offline)} (online: "
            f"{_cpus(host.online_cpus)}); pick CPUs from that list"
        )
    with_parent = [cpu for cpu in pool if cpu in parent_core]
    if with_parent:
        raise AllocatorHostError(
            f"cpu_pool includes {_cpus(with_parent)}, a sibling of CPU 0 (core "
            f"{_cpus(parent_core)}), which stays with the parent instance; leave that core out"
        )
    for cpu in pool:
        missing = [sibling for sibling in host.core(cpu) if sibling not in pool]
        if missing:
            raise AllocatorHostError(
                f"cpu_pool must hold whole cores: CPU {cpu} shares its core with "
                f"{_cpus(missing)}, which is not in the pool; add it or remove CPU {cpu}"
            )


def _check_count(count: int, host: HostResources, parent_core: tuple[int, ...]) -> None:
    threads = len(parent_core)
    available = len(host.online_cpus) - threads
    if count > available:
        raise AllocatorHostError(
            f"cpu_count {count} is more than this host can give: it has "
            f"{len(host.online_cpus)} online CPUs and CPU 0's core ({threads} CPU(s)) stays "
            f"with the parent, so at most {available}; lower cpu_count"
        )
    if count % threads:
        raise AllocatorHostError(
            f"cpu_count {count} is not a whole number of cores: this host has {threads} "
            f"threads per core, so use a multiple of {threads}"
        )


def _cpus(cpu_ids: Sequence[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpu_ids))


def write(current: AllocatorPlan) -> None:
    """Write ``current.after`` to its path atomically (temporary file in the same directory)."""
    path = current.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as err:
        raise AllocatorWriteError(
            f"cannot write {path}: {err.strerror or err}; run as root (become: true)"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(current.after)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except OSError as err:
        os.unlink(temporary)
        raise AllocatorWriteError(f"cannot write {path}: {err.strerror or err}") from None


def restart_service(service_name: str = SERVICE_NAME, systemctl: str = "systemctl") -> None:
    """``systemctl restart`` the allocator so the driver reserves the new pool."""
    command = [systemctl, "restart", service_name]
    try:
        completed = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise AllocatorServiceError(
            f"cannot restart {service_name}: {err}; is this a systemd host? On the emulator "
            "set restart: false (nitro-emu reads the file on every run-enclave)",
            command=command,
            rc=-1,
            stdout="",
            stderr=str(err),
        ) from None
    if completed.returncode != 0:
        raise AllocatorServiceError(
            f"`{' '.join(command)}` failed with exit status {completed.returncode}: "
            f"{completed.stderr.strip() or '(no message)'}; the pool may not fit free memory "
            f"(read `journalctl -u {service_name}`), or stop the running enclaves first",
            command=command,
            rc=completed.returncode,
            stdout=completed.stdout,
            stderr=completed.stderr,
        )


__all__ = [
    "SERVICE_NAME",
    "AllocatorHostError",
    "AllocatorPlan",
    "AllocatorServiceError",
    "AllocatorWriteError",
    "HostResources",
    "check_host",
    "desired_config",
    "plan",
    "read_host_resources",
    "restart_service",
    "write",
]
