"""Service unit files: enclave-init's TOML units, read strictly, merged with the manifest's units.

A services directory holds ``NAME.service`` (enabled) and ``NAME.service.disabled`` (disabled)
files, as enclave-init's does. Each is a TOML table with enclave-init's PascalCase keys
(``ExecStart``, ``Environment``, ``Restart``, ``RestartSec``, ``WorkingDirectory``,
``ServiceEnable``, ``Before``, ``After``, ``Requires``, ``RequiredBy``) plus the keys EnclaveOps
adds (``User``, ``Group``, ``TimeoutStartSec``, ``KillSignal``, ``TimeoutStopSec``). The keys
and their checks are the manifest's ``services.units`` schema, so a unit means the same thing in
either place. Unlike enclave-init, which silently skips what it cannot parse (or runs a unit
with an empty command), every problem is reported with the file and the key; one bad file does
not keep the others from loading.

Precedence: a unit file replaces a manifest unit of the same name as a whole (no key-by-key
merge), the way a file in ``/etc/systemd/system`` replaces a vendor unit. The services
directory is the layer an operator changes at run time (``enable``/``disable`` rename files
there and ``reload`` re-reads it); the manifest holds the image's defaults. A
``NAME.service.disabled`` file therefore also disables a manifest unit ``NAME``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.init_protocol import SERVICE_NAME_PATTERN
from enclave_runtime.formats.manifest import (
    DEFAULT_KILL_SIGNAL,
    DEFAULT_RESTART,
    DEFAULT_RESTART_SEC,
    DEFAULT_TIMEOUT_STOP_SEC,
    ServiceUnit,
    format_path,
    manifest_schema,
    strict_validator,
)
from enclave_runtime.formats.service_graph import repeated_variables
from enclave_runtime.formats.suggestions import did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

UNIT_SUFFIX = ".service"
DISABLED_SUFFIX = ".service.disabled"
# A unit is a dozen lines; anything this large is not one.
MAX_UNIT_FILE_BYTES = 64 * 1024
MANIFEST_SOURCE = "the manifest"


class ServiceUnitError(FormatError):
    """A unit (file or manifest entry) that cannot be used; one ``SOURCE: problem`` per line."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(f"{source}: {problem}" for problem in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.problems))


@dataclass(frozen=True)
class UnitDefinition:
    """A unit and where it came from.

    ``path`` is the unit file (None for a manifest unit); ``file_enabled`` is False for a
    ``NAME.service.disabled`` file. The service is enabled when its file is not disabled and
    its ``ServiceEnable`` is true.
    """

    unit: ServiceUnit
    path: Path | None = None
    file_enabled: bool = True

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def enabled(self) -> bool:
        return self.file_enabled and self.unit.enable

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else MANIFEST_SOURCE


@dataclass(frozen=True)
class UnitSet:
    """Every unit found: usable ones, broken ones (by service name) and directory-wide notes."""

    units: dict[str, UnitDefinition] = field(default_factory=dict)
    errors: dict[str, ServiceUnitError] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


# --- file names ----------------------------------------------------------------------------------


def unit_file_name(file_name: str) -> tuple[str, bool] | None:
    """``(service name, enabled)`` for a unit file's name; None for any other file.

    Hidden files (an editor's ``.web.service.swp`` and the like) are not units.
    """
    if file_name.startswith("."):
        return None
    for suffix, enabled in ((DISABLED_SUFFIX, False), (UNIT_SUFFIX, True)):
        if file_name.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[: -len(suffix)], enabled
    return None


def unit_file_path(directory: str | os.PathLike[str], name: str, enabled: bool) -> Path:
    """Where the unit file of ``name`` lives in ``directory`` when (not) enabled."""
    return Path(directory) / f"{name}{UNIT_SUFFIX if enabled else DISABLED_SUFFIX}"


def is_valid_service_name(name: str) -> bool:
    return SERVICE_NAME_PATTERN.fullmatch(name) is not None


# --- one unit --------------------------------------------------------------------------------


def parse_unit(text: str | bytes, name: str, source: str = "<unit>") -> ServiceUnit:
    """A unit from TOML text; raises :class:`ServiceUnitError` listing every problem."""
    if len(text) > MAX_UNIT_FILE_BYTES:
        raise ServiceUnitError(
            source, [f"larger than {MAX_UNIT_FILE_BYTES} bytes; a unit file is a small TOML file"]
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ServiceUnitError(
                source, [f"not UTF-8 text (invalid byte at offset {err.start})"]
            ) from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        hint = f"; {_SYSTEMD_HINT}" if _SYSTEMD_SECTION_LINE.search(text) else ""
        raise ServiceUnitError(source, [f"invalid TOML: {err}{hint}"]) from None
    except RecursionError:
        raise ServiceUnitError(source, ["invalid TOML: nested too deeply"]) from None
    return unit_from_table(table, name, source)


def unit_from_table(table: Mapping[str, Any], name: str, source: str = "<unit>") -> ServiceUnit:
    """A unit from already-parsed keys (TOML or the manifest's), checked the same way."""
    problems = list(_name_problems(name))
    problems.extend(_schema_problems(table))
    problems.extend(_environment_problems(table.get("Environment")))
    exec_start = table.get("ExecStart")
    if isinstance(exec_start, str) and exec_start:
        problems.extend(f"ExecStart: {problem}" for problem in _command_problems(exec_start))
    if problems:
        raise ServiceUnitError(source, problems)
    return _build_unit(name, table)


def load_unit_file(path: str | os.PathLike[str]) -> UnitDefinition:
    """Read the unit file at ``path`` (``NAME.service`` or ``NAME.service.disabled``)."""
    file_path = Path(path)
    parsed = unit_file_name(file_path.name)
    if parsed is None:
        raise ServiceUnitError(
            str(file_path),
            [f"not a unit file name; use NAME{UNIT_SUFFIX} or NAME{DISABLED_SUFFIX}"],
        )
    name, enabled = parsed
    try:
        with file_path.open("rb") as stream:
            data = stream.read(MAX_UNIT_FILE_BYTES + 1)
    except OSError as err:
        raise ServiceUnitError(
            str(file_path), [f"cannot read it: {err.strerror or err}; check its permissions"]
        ) from err
    unit = parse_unit(data, name, str(file_path))
    return UnitDefinition(unit, file_path, enabled)


def command_line(unit: ServiceUnit) -> list[str]:
    """``ExecStart`` split into argv the way a POSIX shell splits words (no shell runs it)."""
    problems = list(_command_problems(unit.exec_start))
    if problems:
        raise ServiceUnitError(f"service {unit.name}", [f"ExecStart: {p}" for p in problems])
    return shlex.split(unit.exec_start)


# --- a directory, and the manifest ---------------------------------------------------------------


def load_unit_directory(directory: str | os.PathLike[str]) -> UnitSet:
    """Every unit file in ``directory``; a missing directory holds no units.

    When both ``NAME.service`` and ``NAME.service.disabled`` exist, the enabled file is used
    and the other is named in ``warnings`` (enclave-init would also use the enabled one).
    """
    root = Path(directory)
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return UnitSet()
    except OSError as err:
        reason = err.strerror or str(err)
        return UnitSet(warnings=(f"cannot read the services directory {root}: {reason}",))
    units: dict[str, UnitDefinition] = {}
    errors: dict[str, ServiceUnitError] = {}
    warnings: list[str] = []
    for file_name in entries:
        parsed = unit_file_name(file_name)
        if parsed is None or not (root / file_name).is_file():
            continue
        name, enabled = parsed
        if not enabled and unit_file_path(root, name, True).is_file():
            warnings.append(
                f"{root / file_name} is ignored: {name}{UNIT_SUFFIX} exists too; remove one"
            )
            continue
        try:
            units[name] = load_unit_file(root / file_name)
        except ServiceUnitError as err:
            errors[name] = err
    return UnitSet(units, errors, tuple(warnings))


def manifest_units(units: Iterable[ServiceUnit]) -> UnitSet:
    """The manifest's units as definitions; those whose ExecStart does not split are errors."""
    found: dict[str, UnitDefinition] = {}
    errors: dict[str, ServiceUnitError] = {}
    for unit in units:
        problems = [f"ExecStart: {problem}" for problem in _command_problems(unit.exec_start)]
        source = f"{MANIFEST_SOURCE} (services.units.{unit.name})"
        if problems:
            errors[unit.name] = ServiceUnitError(source, problems)
        else:
            found[unit.name] = UnitDefinition(unit)
    return UnitSet(found, errors)


def merge_units(from_manifest: UnitSet, from_directory: UnitSet) -> UnitSet:
    """The directory's units over the manifest's: a file (even a broken one) replaces a unit."""
    shadowed = set(from_directory.units) | set(from_directory.errors)
    units = {n: d for n, d in from_manifest.units.items() if n not in shadowed}
    errors = {n: e for n, e in from_manifest.errors.items() if n not in shadowed}
    units.update(from_directory.units)
    errors.update(from_directory.errors)
    warnings = (*from_manifest.warnings, *from_directory.warnings)
    return UnitSet(dict(sorted(units.items())), dict(sorted(errors.items())), warnings)


# --- checks ----------------------------------------------------------------------------------


def _name_problems(name: str) -> Iterator[str]:
    if not is_valid_service_name(name):
        yield (
            f"{name!r} is not a valid service name; use 1 to 128 letters, digits, '_', '.', "
            "'@' or '-', starting with a letter, digit, '_' or '@'"
        )


def _command_problems(exec_start: str) -> Iterator[str]:
    try:
        words = shlex.split(exec_start)
    except ValueError as err:
        yield f"cannot split {_show(exec_start)} into words: {err} (check the quotes)"
        return
    if not words:
        yield 'names no program; give the command to run, e.g. "/usr/bin/app --flag"'


def _environment_problems(environment: Any) -> Iterator[str]:
    if not isinstance(environment, list):
        return
    for index, variable, first in repeated_variables(environment):
        yield f"Environment[{index}]: sets {variable} again (first set by Environment[{first}])"


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    """The manifest schema's ``service_unit`` definition (8080.0 is no integer, NaN no number)."""
    return strict_validator({"$defs": manifest_schema()["$defs"], "$ref": "#/$defs/service_unit"})


def _schema_problems(table: Mapping[str, Any]) -> Iterator[str]:
    errors = sorted(_validator().iter_errors(dict(table)), key=lambda e: list(map(str, e.path)))
    for error in errors:
        yield from _describe(error)


_SYSTEMD_SECTIONS = ("Unit", "Service", "Install")
_SYSTEMD_SECTION_LINE = re.compile(r"^\s*\[(?:Unit|Service|Install)\]\s*$", re.MULTILINE)
_SYSTEMD_HINT = (
    "unit files are enclave-init's TOML, not systemd's INI: no sections; put the keys "
    '(ExecStart = "...", Restart = "always", ...) at the top of the file'
)

_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "a boolean (true or false)",
    "object": "a table",
    "array": "a list",
}


def _describe(error: jsonschema.ValidationError) -> Iterator[str]:
    where = format_path(error.absolute_path)
    keyword, schema = error.validator, error.schema
    if keyword == "required":
        for key in error.validator_value:
            if key not in error.instance:
                yield f"{key}: required key is missing"
    elif keyword == "additionalProperties":
        known = list(schema.get("properties", {}))
        for key in error.instance:
            if key in _SYSTEMD_SECTIONS:
                yield f"[{key}]: {_SYSTEMD_HINT}"
            elif key not in known:
                hint = did_you_mean(key, known)
                yield f"unknown key {key!r}{hint}; known keys: {', '.join(known)}"
    elif keyword == "type":
        wanted = (
            error.validator_value
            if isinstance(error.validator_value, list)
            else [error.validator_value]
        )
        names = " or ".join(_TYPE_NAMES[name] for name in wanted if name != "null")
        hint = f" ({schema['x-hint']})" if "x-hint" in schema else ""
        yield f"{where}: expected {names}, got {_show(error.instance)}{hint}"
    elif keyword == "enum":
        choices = [value for value in error.validator_value if value is not None]
        listed = ", ".join(_show(value) for value in choices)
        hint = did_you_mean(error.instance, choices)
        yield f"{where}: must be one of {listed}; got {_show(error.instance)}{hint}"
    elif "x-message" in schema:
        yield f"{where}: {schema['x-message']}, got {_show(error.instance)}"
    elif keyword == "minimum":
        yield f"{where}: must be at least {schema['minimum']}, got {_show(error.instance)}"
    else:
        yield f"{where}: {' '.join(error.message.split())}"


def _show(value: Any) -> str:
    """A value as TOML readers see it in a message: short, one line."""
    if isinstance(value, str):
        text = json.dumps(value[:48])
        return text if len(value) <= 48 else text[:-1] + '..."'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value) if abs(value) < 1e30 else "a very large number"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _build_unit(name: str, table: Mapping[str, Any]) -> ServiceUnit:
    def value(key: str, default: Any) -> Any:
        found = table.get(key)
        return default if found is None else found

    return ServiceUnit(
        name=name,
        exec_start=table["ExecStart"],
        environment=tuple(value("Environment", ())),
        restart=value("Restart", DEFAULT_RESTART),
        restart_sec=value("RestartSec", DEFAULT_RESTART_SEC),
        working_directory=table.get("WorkingDirectory"),
        enable=value("ServiceEnable", True),
        before=tuple(value("Before", ())),
        after=tuple(value("After", ())),
        requires=tuple(value("Requires", ())),
        required_by=tuple(value("RequiredBy", ())),
        user=table.get("User"),
        group=table.get("Group"),
        timeout_start_sec=table.get("TimeoutStartSec"),
        kill_signal=value("KillSignal", DEFAULT_KILL_SIGNAL),
        timeout_stop_sec=value("TimeoutStopSec", DEFAULT_TIMEOUT_STOP_SEC),
    )
