"""``/etc/nitro_enclaves/allocator.yaml``: the memory and CPUs a parent instance sets aside.

The file is read by ``nitro-enclaves-allocator`` (aws/aws-nitro-enclaves-cli,
bootstrap/nitro-enclaves-allocator), a small bash parser, not a YAML library. What it accepts is
narrower than YAML, so this module checks both: the text must be YAML that a tool such as Ansible
reads the same way, and it must survive that parser:

- every line before a line ``---`` is ignored, so a file without ``---`` configures nothing;
- only the keys ``memory_mib``, ``cpu_count`` and ``cpu_pool`` exist; ``memory_mib`` is
  required, and exactly one of ``cpu_count`` and ``cpu_pool`` ("conflict with each other");
- a value is the rest of the line (double quotes stripped), so an inline ``# comment`` becomes
  part of the value;
- ``cpu_pool`` is the kernel's CPU list format ("2,3,6-9"), and the driver refuses CPU 0, which
  stays with the parent instance.

:meth:`AllocatorConfig.render` writes the canonical file (AWS's own layout and comments), so a
configuration always renders to the same bytes and can be compared by text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from enclave_runtime.errors import FormatError

DEFAULT_PATH = Path("/etc/nitro_enclaves/allocator.yaml")
KEYS = ("memory_mib", "cpu_count", "cpu_pool")
# Linux's largest NR_CPUS (x86 MAXSMP); it also keeps "1-999999999" from becoming a huge list.
MAX_CPU_ID = 8191

_DIGITS = re.compile(r"[0-9]+")
# The characters PyYAML ends a line at, so its marks index the same lines as ours.
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
_ACCEPTED_STYLES = (None, '"')  # plain, or double-quoted (the allocator strips double quotes)


class AllocatorConfigError(FormatError):
    """An allocator.yaml that nitro-enclaves-allocator (or nitro-emu) would not accept."""


@dataclass(frozen=True)
class AllocatorConfig:
    """The enclave resource pool: ``memory_mib`` plus ``cpu_count`` or an explicit ``cpu_pool``."""

    memory_mib: int
    cpu_count: int | None = None
    cpu_pool: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_whole_number("memory_mib", self.memory_mib)
        if (self.cpu_count is None) == (self.cpu_pool is None):
            raise AllocatorConfigError(
                "allocator configuration needs exactly one of cpu_count and cpu_pool"
            )
        if self.cpu_count is not None:
            _check_whole_number("cpu_count", self.cpu_count)
        if self.cpu_pool is not None:
            object.__setattr__(self, "cpu_pool", _checked_pool(self.cpu_pool))

    def pool_cpu_ids(self) -> tuple[int, ...]:
        """The CPU ids enclaves draw from.

        With ``cpu_count`` the allocator carves out whole cores, never CPU 0 or its siblings; the
        emulator models a host without SMT, so the pool is CPUs 1..cpu_count.
        """
        if self.cpu_pool is not None:
            return self.cpu_pool
        return tuple(range(1, (self.cpu_count or 0) + 1))

    def render(self) -> str:
        """The canonical allocator.yaml for this configuration (AWS's layout, stable bytes)."""
        lines = [
            "---",
            "# Enclave configuration file.",
            "#",
            "# How much memory to allocate for enclaves (in MiB).",
            f"memory_mib: {self.memory_mib}",
            "#",
        ]
        if self.cpu_pool is not None:
            lines += [
                "# The exact CPUs to reserve for enclaves (conflicts with `cpu_count`).",
                f"cpu_pool: {format_cpu_list(self.cpu_pool)}",
            ]
        else:
            lines += ["# How many CPUs to reserve for enclaves.", f"cpu_count: {self.cpu_count}"]
        return "\n".join(lines) + "\n"


def parse(text: str, source: str = str(DEFAULT_PATH)) -> AllocatorConfig:
    """Parse allocator.yaml text; errors name ``source``, the line and the key."""
    mapping = _compose_mapping(text, source)
    _require_document_start(text, mapping, source)
    values = _scalar_values(text, mapping, source)
    if "memory_mib" not in values:
        raise AllocatorConfigError(
            f"{source}: memory_mib is missing: set the enclave memory pool in MiB"
        )
    if "cpu_count" in values and "cpu_pool" in values:
        raise AllocatorConfigError(
            f"{source}: cpu_count conflicts with cpu_pool: keep exactly one of them"
        )
    if "cpu_count" not in values and "cpu_pool" not in values:
        raise AllocatorConfigError(
            f"{source}: no CPU reservation: set cpu_count (a number of CPUs) or cpu_pool "
            '(a CPU list such as "2,3,6-9")'
        )
    try:
        return AllocatorConfig(
            memory_mib=_whole_number(values, "memory_mib"),
            cpu_count=_whole_number(values, "cpu_count") if "cpu_count" in values else None,
            cpu_pool=parse_cpu_list(values["cpu_pool"][0]) if "cpu_pool" in values else None,
        )
    except AllocatorConfigError as err:
        raise AllocatorConfigError(f"{source}: {err}") from None


def load(path: Path | str) -> AllocatorConfig:
    """Read and parse an allocator.yaml file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AllocatorConfigError(f"{path}: not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise AllocatorConfigError(f"cannot read {path}: {err.strerror or err}") from None
    return parse(text, str(path))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Parse the kernel CPU list format (``"1,3-5"``) into sorted, distinct CPU ids."""
    cpus: set[int] = set()
    for token in text.split(","):
        bounds = token.split("-")
        if len(bounds) > 2 or not all(_DIGITS.fullmatch(bound) for bound in bounds):
            raise AllocatorConfigError(
                f'cpu_pool: "{token}" is not a CPU id or a range such as 6-9 (in "{text}"; '
                "the kernel's CPU list format has no spaces)"
            )
        first, last = int(bounds[0]), int(bounds[-1])
        if first > last:
            raise AllocatorConfigError(f"cpu_pool: range {first}-{last} runs backwards")
        if last > MAX_CPU_ID:
            raise AllocatorConfigError(
                f"cpu_pool: CPU {last} is beyond the largest Linux CPU id ({MAX_CPU_ID})"
            )
        cpus.update(range(first, last + 1))
    return _checked_pool(tuple(cpus))


def format_cpu_list(cpu_ids: tuple[int, ...]) -> str:
    """The shortest kernel CPU list for ``cpu_ids``: ascending, consecutive ids as ranges."""
    ranges: list[str] = []
    ordered = sorted(set(cpu_ids))
    start = 0
    for index, cpu in enumerate(ordered):
        is_last_of_run = index + 1 == len(ordered) or ordered[index + 1] != cpu + 1
        if not is_last_of_run:
            continue
        first = ordered[start]
        ranges.append(str(cpu) if first == cpu else f"{first}-{cpu}")
        start = index + 1
    return ",".join(ranges)


def _checked_pool(cpu_ids: tuple[int, ...]) -> tuple[int, ...]:
    ordered = tuple(sorted(set(cpu_ids)))
    if not ordered:
        raise AllocatorConfigError("cpu_pool is empty: list at least one CPU")
    if any(isinstance(cpu, bool) or not isinstance(cpu, int) for cpu in ordered):
        raise AllocatorConfigError("cpu_pool must hold CPU ids (whole numbers)")
    if ordered[0] == 0:
        raise AllocatorConfigError(
            "cpu_pool includes CPU 0, which must remain available to the parent instance "
            "(the nitro_enclaves driver refuses it)"
        )
    if ordered[0] < 0 or ordered[-1] > MAX_CPU_ID:
        raise AllocatorConfigError(f"cpu_pool CPU ids must be within 1..{MAX_CPU_ID}")
    return ordered


def _check_whole_number(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AllocatorConfigError(f"{key} must be a whole number greater than 0, got {value!r}")


def _compose_mapping(text: str, source: str) -> yaml.MappingNode | None:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise AllocatorConfigError(f"{source}: not valid YAML: {_one_line(err)}") from None
    except RecursionError:
        raise AllocatorConfigError(f"{source}: not valid YAML: nested too deeply") from None
    if node is None:
        return None
    if not isinstance(node, yaml.MappingNode) or node.flow_style:
        raise AllocatorConfigError(
            f"{source}: line {node.start_mark.line + 1}: the document must be one "
            f"'key: value' line per setting ({', '.join(KEYS)})"
        )
    return node


def _require_document_start(text: str, mapping: yaml.MappingNode | None, source: str) -> None:
    lines = _LINE_BREAK.split(text)
    start = next((index for index, line in enumerate(lines) if line.strip() == "---"), None)
    first_key_line = mapping.start_mark.line if mapping is not None else len(lines)
    if start is None or start > first_key_line:
        raise AllocatorConfigError(
            f"{source}: add a line '---' before the settings: nitro-enclaves-allocator ignores "
            "every line before it"
        )


def _scalar_values(
    text: str, mapping: yaml.MappingNode | None, source: str
) -> dict[str, tuple[str, int]]:
    """key -> (raw scalar text, 1-based line), checked the way the bash parser reads them."""
    values: dict[str, tuple[str, int]] = {}
    lines = _LINE_BREAK.split(text)
    for key_node, value_node in mapping.value if mapping is not None else ():
        line = key_node.start_mark.line + 1
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key not in KEYS:
            raise AllocatorConfigError(
                f"{source}: line {line}: unexpected key {key!r}; allowed keys are {', '.join(KEYS)}"
            )
        if key in values:
            raise AllocatorConfigError(f"{source}: line {line}: {key} is set twice")
        if not isinstance(value_node, yaml.ScalarNode) or value_node.style not in _ACCEPTED_STYLES:
            raise AllocatorConfigError(
                f"{source}: line {line}: {key} must be a plain value on the same line "
                "(no lists, mappings, single quotes or block scalars)"
            )
        if value_node.start_mark.line != key_node.start_mark.line or not value_node.value:
            raise AllocatorConfigError(f"{source}: line {line}: {key} has no value")
        _refuse_inline_comment(lines, value_node, key, source)
        values[key] = (value_node.value, line)
    return values


def _refuse_inline_comment(
    lines: list[str], value_node: yaml.ScalarNode, key: str, source: str
) -> None:
    end = value_node.end_mark
    rest = lines[end.line][end.column :] if end.line < len(lines) else ""
    if rest.strip():
        raise AllocatorConfigError(
            f"{source}: line {end.line + 1}: {key} is followed by {rest.strip()!r}; "
            "nitro-enclaves-allocator reads the whole rest of the line as the value, so move "
            "comments to their own line"
        )


def _whole_number(values: dict[str, tuple[str, int]], key: str) -> int:
    raw, line = values[key]
    if not _DIGITS.fullmatch(raw) or int(raw) == 0:
        raise AllocatorConfigError(
            f"line {line}: {key} must be a whole number greater than 0 (decimal digits), "
            f"got {raw!r}"
        )
    return int(raw)


def _one_line(err: yaml.YAMLError) -> str:
    return " ".join(str(err).split())
