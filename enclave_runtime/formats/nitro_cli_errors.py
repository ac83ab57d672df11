"""nitro-cli's ``[ Exx ]`` errors, worded, laid out and exited with exactly as nitro-cli does.

Facts from aws/aws-nitro-enclaves-cli (src/common/mod.rs, src/common/document_errors.rs,
src/enclave_proc_comm.rs):

- Each error is a ``NitroCliErrorEnum`` variant whose code is ``E<n>`` and whose process exit
  status is the variant's number ``n`` (``std::process::exit(err.error_code as i32)``).
- The text on stderr is ``[ Exx ] <fixed sentence with the failure's values>``, a blank line,
  ``For more details, please visit https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#Exx``,
  then (``BACKTRACE=1`` only) ``Backtrace:`` and the action trail, then, when the backtrace could be
  written to a log file, ``If you open a support ticket, please provide the error log found at
  "<path>"``.
- ``run-enclave`` does its work in a separate "enclave process". An error there (E20-E22, E26,
  E27, E29, E35, E36, ...) is relayed to the CLI, which then prints ``Failed connections: 1`` and
  fails itself with E39, so the command exits with status 39, the relayed error's block first.

nitro-emu adds one line, ``Reason: ...``, after the sentence when it knows the root cause (nitro-cli
keeps that only in its log file), so a bad EIF or a busy CPU says what is wrong.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from pathlib import Path

from enclave_runtime import __version__
from enclave_runtime.errors import EnclaveOpsError

HELP_LINK = "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#{code}"
RELAYED_EXIT_STATUS = 39
ALLOCATOR_FILE = "/etc/nitro_enclaves/allocator.yaml"

# The sentences of document_errors.rs::get_detailed_info, for the errors nitro-emu can raise.
_SENTENCES: dict[int, str] = {
    1: "Missing mandatory argument. User did not provide the `{0}` argument.",
    2: "Conflicting arguments. User provided both `{0}` and `{1}`.",
    3: "Invalid argument provided. The parameter `{0}` is not a valid integer (`{1}`)",
    5: (
        "Process spawn failure. Such error appears when the main Nitro CLI process fails to spawn "
        "the enclave process, in order to complete a `run-enclave` command."
    ),
    11: (
        "Socket error. This is used as an error for catching any other socket operation errors "
        "not covered by previous custom errors."
    ),
    17: (
        "Serde error. Such error appears when serializing / deserializing a command or response "
        "fails."
    ),
    19: (
        "File operation failure. Such error appears when the system fails to perform the "
        "requested file operations, such as opening the EIF file when launching an enclave, or "
        "seeking to a specific offset in the EIF file, or writing to the log file."
    ),
    20: (
        "Invalid CPU configuration. User provided `{0}` contains same CPU(s) (CPU(s) {1}) "
        "multiple times."
    ),
    21: (
        "No such CPU available in the pool. User provided `{0}` contains CPU {1}, which is not "
        "available in the pool.\nYou can add a specific CPU to the CPU pool by editing the "
        f"`cpu_pool` value from '{ALLOCATOR_FILE}' and then enable the "
        "nitro-enclaves-allocator.service."
    ),
    22: (
        "Insufficient CPUs available in the pool. User provided `{0}` is {1}, which is more than "
        "the configured CPU pool size.\nYou can increase the CPU pool size by editing the "
        f"`cpu_count` value from '{ALLOCATOR_FILE}' and then enable the "
        "nitro-enclaves-allocator.service."
    ),
    26: (
        "Insufficient memory requested. User provided `{0}` is {1} MB, but based on the EIF file "
        "size, the minimum memory should be {2} MB"
    ),
    27: (
        "Insufficient memory available. User provided `{0}` is {1} MB, which is more than the "
        "available hugepage memory.\nYou can increase the available memory by editing the "
        f"`memory_mib` value from '{ALLOCATOR_FILE}' and then restart the "
        "nitro-enclaves-allocator.service."
    ),
    29: (
        "Ioctl failure. Such error is used as a general ioctl error and appears whenever an ioctl "
        "fails. In this case, the error backtrace provides detailed information on what "
        "specifically failed during the ioctl."
    ),
    35: (
        "EIF file parsing error. Such errors appear when attempting to fill a memory region with a "
        "section of the EIF file, but reading the entire section fails. This might indicate that "
        "the required hugepages are not available."
    ),
    36: (
        "Enclave boot failure. Such error appears when attempting to receive the `ready` signal "
        "from a freshly booted enclave. It arises in several contexts, for instance, when the "
        "enclave is booted from an invalid EIF file and the enclave process immediately exits, "
        "failing to submit the `ready` signal. In this case, the error backtrace provides detailed "
        "information on what specifically failed during the enclave boot process."
    ),
    39: (
        "Enclave process connection failure. Such error appears when the enclave manager fails to "
        "connect to at least one enclave process for retrieving the description information."
    ),
    44: (
        "Enclave console connection failure. Such error appears when the Nitro CLI process fails "
        "to establish a connection to a running enclave's console."
    ),
    48: (
        "EIF building error. Such error appears when trying to build an EIF file. In this case, "
        "the error backtrace provides detailed information on the failure reason."
    ),
    50: (
        "Docker image pull error. Such error appears when trying to build an EIF file, but "
        "pulling the corresponding docker image fails. In this case, the error backtrace provides "
        "detailed informatino on the failure reason."
    ),
    57: (
        "Hasher error. Such error appears when trying to initialize a hasher or write bytes to it, "
        "resulting in a IO error."
    ),
    58: (
        "Naming error. Such error appears when trying to perform an enclave operation using the "
        "enclave name and the name is invalid."
    ),
    59: (
        "EIF signature checker error. Such error appears when validation of the signing "
        "certificate fails."
    ),
}
# E26 when the EIF is empty, so no minimum can be derived from its size.
_E26_NO_MINIMUM = (
    "Insufficient memory requested. User provided `{0}` is {1} MB, and memory should be greater "
    "than 0 MB."
)


@dataclasses.dataclass(frozen=True)
class _Failure:
    number: int
    message: str
    reason: str | None
    action: str


class NitroCliError(EnclaveOpsError):
    """One nitro-cli failure: its code (``E26``), sentence, root cause and exit status."""

    def __init__(
        self,
        number: int,
        message: str,
        *,
        reason: str | None = None,
        action: str = "",
        relayed: bool = False,
    ) -> None:
        self._failure = _Failure(number, message, reason, action)
        self.relayed = relayed
        super().__init__(self._headline())

    @property
    def number(self) -> int:
        return self._failure.number

    @property
    def code(self) -> str:
        return f"E{self._failure.number:02d}"

    @property
    def message(self) -> str:
        """The sentence after ``[ Exx ]``, as nitro-cli words it."""
        return self._failure.message

    @property
    def reason(self) -> str | None:
        """nitro-emu's account of the root cause (nitro-cli keeps it in its log file only)."""
        return self._failure.reason

    @property
    def action(self) -> str:
        return self._failure.action

    @property
    def exit_status(self) -> int:
        return RELAYED_EXIT_STATUS if self.relayed else self._failure.number

    def relayed_by_enclave_process(self, action: str = "Run Enclave") -> NitroCliError:
        """This error as the CLI reports it when the enclave process hit it (exit status 39)."""
        return NitroCliError(
            self.number,
            self.message,
            reason=self.reason,
            action=self.action or action,
            relayed=True,
        )

    def render(self, log_dir: Path | None = None, show_backtrace: bool = False) -> str:
        """nitro-cli's stderr text for this error (without the final newline).

        With ``log_dir``, the backtrace is written to ``err<RFC 3339 time>.log`` there and the
        "support ticket" line names it, as nitro-cli does with /var/log/nitro_enclaves; when the
        file cannot be written the line is left out, also as nitro-cli does.
        """
        text = _render_block(self._failure, log_dir, show_backtrace)
        if not self.relayed:
            return text
        connection = _Failure(
            RELAYED_EXIT_STATUS, _SENTENCES[RELAYED_EXIT_STATUS], None, self.action
        )
        return "\n".join(
            (text, "Failed connections: 1", _render_block(connection, log_dir, show_backtrace))
        )

    def _headline(self) -> str:
        headline = f"[ {self.code} ] {self.message}"
        return headline if self.reason is None else f"{headline}\nReason: {self.reason}"


def _render_block(failure: _Failure, log_dir: Path | None, show_backtrace: bool) -> str:
    code = f"E{failure.number:02d}"
    info = f"[ {code} ] {failure.message}"
    if failure.reason is not None:
        info += f"\nReason: {failure.reason}"
    parts = [info, f"For more details, please visit {HELP_LINK.format(code=code)}"]
    backtrace = _backtrace(failure)
    if show_backtrace:
        parts.append(f"Backtrace:\n{backtrace}")
    log_path = _write_error_log(log_dir, backtrace) if log_dir is not None else None
    if log_path is not None:
        parts.append(
            f'If you open a support ticket, please provide the error log found at "{log_path}"'
        )
    return "\n\n".join(parts)


def _backtrace(failure: _Failure) -> str:
    root_cause = failure.reason or failure.message
    return (
        f"  Action: {failure.action}\n  Subactions:\n    {root_cause}\n"
        f"  Version: nitro-emu {__version__}"
    )


def _write_error_log(log_dir: Path, backtrace: str) -> Path | None:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    path = log_dir / f"err{stamp}.log"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(backtrace, encoding="utf-8")
    except OSError:
        return None
    return path


def _error(number: int, *info: object, reason: str | None = None) -> NitroCliError:
    return NitroCliError(number, _SENTENCES[number].format(*info), reason=reason)


def missing_argument(argument: str) -> NitroCliError:
    """E01: a mandatory argument (e.g. in a ``--config`` file) is absent."""
    return _error(1, argument)


def conflicting_arguments(first: str, second: str) -> NitroCliError:
    """E02: two arguments that exclude each other were both given."""
    return _error(2, first, second)


def invalid_argument(argument: str, value: str, reason: str | None = None) -> NitroCliError:
    """E03: nitro-cli's wording for any unusable value ("not a valid integer")."""
    return _error(3, argument, value, reason=reason)


def socket_error(reason: str) -> NitroCliError:
    """E11: what nitro-cli reports for an enclave ID that no enclave process answers to."""
    return _error(11, reason=reason)


def serde_error(reason: str) -> NitroCliError:
    """E17: a ``--config`` file that is not the JSON nitro-cli expects."""
    return _error(17, reason=reason)


def file_operation_failure(
    path: str | None = None, operation: str | None = None, reason: str | None = None
) -> NitroCliError:
    """E19, naming the file and the failing operation as nitro-cli does when it knows them."""
    message = _SENTENCES[19]
    if path is not None and operation is not None:
        message += f"\nFile: '{path}', failing operation: '{operation}'."
    return NitroCliError(19, message, reason=reason)


def duplicate_cpu_ids(duplicates: Sequence[int]) -> NitroCliError:
    """E20: ``--cpu-ids`` names a CPU more than once."""
    return _error(20, "cpu-ids", ", ".join(str(cpu) for cpu in duplicates))


def cpu_not_in_pool(cpu_id: int) -> NitroCliError:
    """E21: ``--cpu-ids`` names a CPU outside the allocator's pool."""
    return _error(21, "cpu-ids", cpu_id)


def insufficient_cpus(cpu_count: int, pool_size: int) -> NitroCliError:
    """E22: ``--cpu-count`` exceeds the size of the allocator's CPU pool."""
    return _error(
        22,
        "cpu-count",
        cpu_count,
        reason=f"Insufficient CPUs available (requested {cpu_count}, but maximum is {pool_size})",
    )


def insufficient_memory_requested(memory_mib: int, minimum_mib: int | None) -> NitroCliError:
    """E26: less memory than 4 × the EIF size (or none at all)."""
    if minimum_mib is None:
        return NitroCliError(26, _E26_NO_MINIMUM.format("memory", memory_mib))
    return _error(
        26,
        "memory",
        memory_mib,
        minimum_mib,
        reason=(
            f"At least {minimum_mib} MB must be allocated (which is 4 times the EIF file size)"
        ),
    )


def insufficient_memory_available(memory_mib: int, free_mib: int) -> NitroCliError:
    """E27: more memory than the allocator pool has free."""
    return _error(
        27,
        "memory",
        memory_mib,
        reason=f"the enclave memory pool has {free_mib} MiB free",
    )


def ioctl_failure(reason: str) -> NitroCliError:
    """E29: what the Nitro Enclaves driver refuses (CPU or CID already used, invalid CID...)."""
    return _error(29, reason=reason)


def eif_parsing_error(reason: str) -> NitroCliError:
    """E35: the EIF cannot be read (bad magic, CRC, sections...)."""
    return _error(35, reason=reason)


def enclave_boot_failure(reason: str) -> NitroCliError:
    """E36: the enclave did not send its boot heartbeat in time, or exited before it."""
    return _error(36, reason=reason)


def console_connection_failure(reason: str) -> NitroCliError:
    """E44: the console of this enclave cannot be reached (e.g. it is not in debug mode)."""
    return _error(44, reason=reason)


def eif_building_error(reason: str) -> NitroCliError:
    """E48: build-enclave failed."""
    return _error(48, reason=reason)


def docker_image_pull_error(reason: str) -> NitroCliError:
    """E50: build-enclave could not obtain the Docker image."""
    return _error(50, reason=reason)


def hasher_error(reason: str) -> NitroCliError:
    """E57: ``pcr --signing-certificate`` got something that is not a PEM certificate."""
    return _error(57, reason=reason)


def eif_signature_checker_error(reason: str) -> NitroCliError:
    """E59: a signed EIF whose signature or signing certificate does not verify."""
    return _error(59, reason=reason)


def enclave_naming_error(reason: str) -> NitroCliError:
    """E58: no enclave (or more than one) has the given ``--enclave-name``."""
    return _error(58, reason=reason)
