"""Ensure an enclave by name: leave it, start it, replace it, restart it or terminate it.

An enclave is identified by its name (``run-enclave --enclave-name``). A running enclave is left
alone when its EIF measurements (PCR0-2, and PCR8 when signed; from ``describe-eif`` of the EIF
asked for) and its resources (CPUs, memory, debug mode, CID when one is asked for) match; any
difference replaces it: terminate, then run the new one, because the allocator's pool usually
cannot hold both. ``run-enclave`` itself waits for the boot heartbeat; :func:`wait_until_running`
then polls ``describe-enclaves`` until the enclave reports RUNNING, like amazon.aws's waiters
(a delay between attempts, a deadline, and the last state seen in the error).
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.file_digest import file_digests
from enclave_runtime.formats.pcr import Measurements, pcr_differences
from enclave_runtime.host.nitro_cli import EnclaveInfo, NitroCli, NitroCliError
from enclave_runtime.waiting import poll

STATES = ("running", "absent", "restarted")
RUNNING = "RUNNING"
FLAGS_DEBUG_MODE = "DEBUG_MODE"
WAIT_DELAY = 0.5
DEFAULT_WAIT_TIMEOUT = 120

ACTION_NONE = "none"
ACTION_START = "start"
ACTION_REPLACE = "replace"
ACTION_RESTART = "restart"
ACTION_TERMINATE = "terminate"


class EnclaveLifecycleError(EnclaveOpsError):
    """The enclave cannot be brought to the state asked for."""


class EifHashMismatchError(EnclaveLifecycleError):
    """The EIF at eif_path is not the one the build record names (its SHA-384 differs)."""


class EnclaveBootError(EnclaveLifecycleError):
    """The enclave started but did not reach RUNNING in time, or went away while booting."""


class EnclaveReplacementError(EnclaveLifecycleError):
    """The replacement did not start after the previous enclave was terminated.

    Carries the failed command's ``command``/``rc``/``stdout``/``stderr`` when it had them.
    """

    def __init__(self, message: str, cause: EnclaveOpsError) -> None:
        super().__init__(message)
        for key in ("command", "rc", "stdout", "stderr"):
            if hasattr(cause, key):
                setattr(self, key, getattr(cause, key))


@dataclass(frozen=True)
class EnclaveSpec:
    """The enclave an operator asks for. Resources are needed only to start one."""

    name: str
    eif_path: str | None = None
    cpu_count: int | None = None
    memory_mib: int | None = None
    debug_mode: bool = False
    enclave_cid: int | None = None
    # The build record's eif.sha384: an EIF copied to the parent must be that build's.
    expected_sha384: str | None = None

    def start_settings(self) -> tuple[str, int, int]:
        """(eif_path, cpu_count, memory_mib), or an error naming the ones missing."""
        if self.eif_path is None or self.cpu_count is None or self.memory_mib is None:
            missing = [
                key for key in ("eif_path", "cpu_count", "memory_mib") if getattr(self, key) is None
            ]
            raise EnclaveLifecycleError(
                f"enclave {self.name!r} must be started, which needs {', '.join(missing)}; "
                "give them (the EIF to run, its CPUs and its memory in MiB)"
            )
        return self.eif_path, self.cpu_count, self.memory_mib


@dataclass(frozen=True)
class EnclavePlan:
    """What :func:`plan_enclave` decided, and why (``reasons`` lists each difference)."""

    action: str
    current: EnclaveInfo | None
    expected_measurements: Measurements | None
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.action != ACTION_NONE

    @property
    def replaces(self) -> bool:
        return self.action in (ACTION_REPLACE, ACTION_RESTART)


@dataclass(frozen=True)
class EnclaveResult:
    """The outcome: the enclave now (None when absent) and the one it replaced or ended."""

    plan: EnclavePlan
    enclave: EnclaveInfo | None
    previous: EnclaveInfo | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        return self.plan.changed

    @property
    def replaced(self) -> bool:
        return self.plan.replaces


def find_enclave(cli: NitroCli, name: str) -> EnclaveInfo | None:
    """The running enclave called ``name``, or None."""
    found = [info for info in cli.describe_enclaves() if info.enclave_name == name]
    if len(found) > 1:
        ids = ", ".join(info.enclave_id for info in found)
        raise EnclaveLifecycleError(
            f"{len(found)} enclaves are called {name!r} ({ids}); terminate all but one with "
            "`nitro-cli terminate-enclave --enclave-id ID`"
        )
    return found[0] if found else None


def differences(
    spec: EnclaveSpec, current: EnclaveInfo, expected: Measurements | None
) -> tuple[list[str], list[str]]:
    """(reasons to replace ``current``, warnings) comparing it with ``spec``."""
    reasons: list[str] = []
    warnings: list[str] = []
    if current.state != RUNNING:
        reasons.append(f"state is {current.state}, not {RUNNING}")
    if expected is not None:
        if current.measurements is None:
            warnings.append(
                f"nitro-cli does not report the measurements of enclave {spec.name!r}; "
                "its EIF cannot be compared and it was left running (use state=restarted to "
                "replace it)"
            )
        else:
            reasons += _measurement_differences(current.measurements, expected)
    _compare(reasons, "cpu_count", current.number_of_cpus, spec.cpu_count)
    _compare(reasons, "memory_mib", current.memory_mib, spec.memory_mib)
    _compare(reasons, "debug_mode", current.flags == FLAGS_DEBUG_MODE, spec.debug_mode)
    _compare(reasons, "enclave_cid", current.enclave_cid, spec.enclave_cid)
    return reasons, warnings


def _compare(reasons: list[str], key: str, actual: Any, wanted: Any) -> None:
    if wanted is not None and actual != wanted:
        reasons.append(f"{key} is {actual}, wanted {wanted}")


def _measurement_differences(actual: Measurements, expected: Measurements) -> list[str]:
    return [
        f"PCR{index} of the running enclave differs from the EIF's "
        f"({None if have is None else have.hex()} != {want.hex()})"
        for index, want, have in pcr_differences(expected.as_pcrs(), actual.as_pcrs())
    ]


def plan_enclave(cli: NitroCli, spec: EnclaveSpec, state: str = "running") -> EnclavePlan:
    """Decide what :func:`ensure_enclave` would do, changing nothing (check mode runs this)."""
    if state not in STATES:
        raise EnclaveLifecycleError(f"state {state!r} is not one of {', '.join(STATES)}")
    current = find_enclave(cli, spec.name)
    if state == "absent":
        action = ACTION_TERMINATE if current is not None else ACTION_NONE
        return EnclavePlan(action=action, current=current, expected_measurements=None)
    expected = _eif_measurements(cli, spec)
    if current is None:
        spec.start_settings()
        return EnclavePlan(action=ACTION_START, current=None, expected_measurements=expected)
    if state == "restarted":
        spec.start_settings()
        return EnclavePlan(
            action=ACTION_RESTART,
            current=current,
            expected_measurements=expected,
            reasons=("state=restarted",),
        )
    reasons, warnings = differences(spec, current, expected)
    if reasons:
        spec.start_settings()
    return EnclavePlan(
        action=ACTION_REPLACE if reasons else ACTION_NONE,
        current=current,
        expected_measurements=expected,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
    )


def _eif_measurements(cli: NitroCli, spec: EnclaveSpec) -> Measurements | None:
    if spec.eif_path is None:
        return None
    if not os.path.isfile(spec.eif_path):
        raise EnclaveLifecycleError(
            f"eif_path {spec.eif_path!r} is not a file; build the EIF first "
            "(enclaveops.nitro.eif) or fix the path"
        )
    if spec.expected_sha384 is not None:
        check_eif_sha384(spec.eif_path, spec.expected_sha384)
    return cli.describe_eif(spec.eif_path).measurements


def check_eif_sha384(path: str, expected: str) -> None:
    """EifHashMismatchError unless the file at ``path`` has SHA-384 ``expected``."""
    found = file_digests(path)[1]
    if not hmac.compare_digest(found, expected.lower()):
        raise EifHashMismatchError(
            f"eif_path {path!r} has SHA-384 {found}, but expected_sha384 is {expected.lower()}: "
            "it is not the recorded build's EIF; copy the EIF of the build record again (its "
            "eif.sha384), nothing was started or terminated"
        )


def ensure_enclave(
    cli: NitroCli,
    spec: EnclaveSpec,
    state: str = "running",
    *,
    wait: bool = True,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    sleep: Callable[[float], None] = time.sleep,
) -> EnclaveResult:
    """Bring the enclave ``spec.name`` to ``state``; see the module docstring for the rules."""
    plan = plan_enclave(cli, spec, state)
    return apply_plan(cli, spec, plan, wait=wait, wait_timeout=wait_timeout, sleep=sleep)


def apply_plan(
    cli: NitroCli,
    spec: EnclaveSpec,
    plan: EnclavePlan,
    *,
    wait: bool = True,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    sleep: Callable[[float], None] = time.sleep,
) -> EnclaveResult:
    """Carry out ``plan`` (from :func:`plan_enclave`).

    Once this raises, the old enclave may already be gone (it is terminated first).
    """
    if plan.action == ACTION_NONE:
        return EnclaveResult(plan=plan, enclave=plan.current, warnings=plan.warnings)
    if plan.current is not None:
        cli.terminate_enclave(enclave_id=plan.current.enclave_id)
    if plan.action == ACTION_TERMINATE:
        return EnclaveResult(plan=plan, enclave=None, previous=plan.current)
    enclave = _start(cli, spec, plan)
    if wait:
        enclave = wait_until_running(cli, spec.name, wait_timeout, sleep=sleep)
    return EnclaveResult(plan=plan, enclave=enclave, previous=plan.current, warnings=plan.warnings)


def _start(cli: NitroCli, spec: EnclaveSpec, plan: EnclavePlan) -> EnclaveInfo | None:
    eif_path, cpu_count, memory_mib = spec.start_settings()
    try:
        cli.run_enclave(
            eif_path,
            memory_mib,
            cpu_count=cpu_count,
            enclave_cid=spec.enclave_cid,
            debug_mode=spec.debug_mode,
            enclave_name=spec.name,
        )
    except NitroCliError as err:
        if plan.current is None:
            raise
        raise EnclaveReplacementError(
            f"{err}\nThe previous enclave {plan.current.enclave_id} was terminated first, to "
            "free its CPUs and memory, and is not running now; fix the cause and run again, or "
            "redeploy the previous EIF to restore it",
            err,
        ) from err
    return find_enclave(cli, spec.name)


def wait_until_running(
    cli: NitroCli,
    name: str,
    timeout: float = DEFAULT_WAIT_TIMEOUT,
    *,
    delay: float = WAIT_DELAY,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> EnclaveInfo:
    """Poll ``describe-enclaves`` until ``name`` is RUNNING; raise EnclaveBootError otherwise."""
    last_state = "not listed"

    def running() -> EnclaveInfo | None:
        nonlocal last_state
        current = find_enclave(cli, name)
        if current is not None and current.state == RUNNING:
            return current
        if current is None and last_state != "not listed":
            raise EnclaveBootError(
                f"enclave {name!r} went away while booting (last state {last_state}); run it "
                "with debug_mode: true and read `nitro-cli console` to see why"
            )
        last_state = current.state if current is not None else last_state
        return None

    def timed_out() -> EnclaveBootError:
        return EnclaveBootError(
            f"enclave {name!r} did not reach {RUNNING} within {timeout:g} s (last state "
            f"{last_state}); raise wait_timeout, or read `nitro-cli console` in debug mode"
        )

    return poll(running, timeout, delay, timed_out, clock=clock, sleep=sleep)


def describe(info: EnclaveInfo) -> dict[str, Any]:
    """``describe-enclaves`` data for one enclave, with nitro-cli's keys."""
    data: dict[str, Any] = {
        "EnclaveName": info.enclave_name,
        "EnclaveID": info.enclave_id,
        "ProcessID": info.process_id,
        "EnclaveCID": info.enclave_cid,
        "NumberOfCPUs": info.number_of_cpus,
        "CPUIDs": list(info.cpu_ids),
        "MemoryMiB": info.memory_mib,
        "State": info.state,
        "Flags": info.flags,
    }
    if info.measurements is not None:
        data["Measurements"] = info.measurements.to_nitro_cli()
    return data


def predicted(spec: EnclaveSpec, plan: EnclavePlan) -> dict[str, Any] | None:
    """What check mode reports as the enclave: the current one, or the one that would run."""
    if plan.action == ACTION_TERMINATE:
        return None
    if plan.action == ACTION_NONE:
        return describe(plan.current) if plan.current is not None else None
    data: dict[str, Any] = {
        "EnclaveName": spec.name,
        "NumberOfCPUs": spec.cpu_count,
        "MemoryMiB": spec.memory_mib,
        "Flags": FLAGS_DEBUG_MODE if spec.debug_mode else "NONE",
    }
    if spec.enclave_cid is not None:
        data["EnclaveCID"] = spec.enclave_cid
    if plan.expected_measurements is not None:
        data["Measurements"] = plan.expected_measurements.to_nitro_cli()
    return data


__all__ = [
    "STATES",
    "EnclaveBootError",
    "EnclaveLifecycleError",
    "EnclavePlan",
    "EnclaveReplacementError",
    "EnclaveResult",
    "EnclaveSpec",
    "apply_plan",
    "describe",
    "differences",
    "ensure_enclave",
    "find_enclave",
    "plan_enclave",
    "predicted",
    "wait_until_running",
]
