"""Unit files as enclave-init writes them, the checks an operator relies on, and the merge rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclave_runtime.formats.init_protocol import SERVICE_NAME_PATTERN
from enclave_runtime.formats.manifest import ServiceUnit, manifest_schema, parse_manifest
from enclave_runtime.formats.service_unit import (
    MANIFEST_SOURCE,
    MAX_UNIT_FILE_BYTES,
    ServiceUnitError,
    UnitDefinition,
    command_line,
    is_valid_service_name,
    load_unit_directory,
    load_unit_file,
    manifest_units,
    merge_units,
    parse_unit,
    unit_file_name,
)

# enclave-init's own example units (Sentient-Enclaves-Framework, enclave-init/rootfs/service/).
ENCLAVE_INIT_WEBAPP = """\
ExecStart = "/usr/bin/python3 /app/server.py"
Environment = [
    "PORT=8080",
    "DATABASE_URL=postgresql://localhost/myapp"
]
Restart = "always"
RestartSec = 5
WorkingDirectory = "/app"
ServiceEnable = true

# Start after database is ready
After = ["database"]

# Required dependencies
Requires = ["database"]
"""

ENCLAVE_INIT_DATABASE = """\
ExecStart = "/usr/bin/postgres -D /var/lib/postgresql/data"
Environment = [
    "POSTGRES_PASSWORD=secret"
]
Restart = "always"
RestartSec = 10
WorkingDirectory = "/var/lib/postgresql"
ServiceEnable = true

# Start before webapp
Before = ["webapp"]
"""


def _problems(text: str, name: str = "web") -> str:
    with pytest.raises(ServiceUnitError) as caught:
        parse_unit(text, name, "/etc/enclaver/services/web.service")
    return str(caught.value)


def test_enclave_init_example_units_read_with_every_key() -> None:
    unit = parse_unit(ENCLAVE_INIT_WEBAPP, "webapp")
    assert unit == ServiceUnit(
        name="webapp",
        exec_start="/usr/bin/python3 /app/server.py",
        environment=("PORT=8080", "DATABASE_URL=postgresql://localhost/myapp"),
        restart="always",
        restart_sec=5,
        working_directory="/app",
        enable=True,
        after=("database",),
        requires=("database",),
    )
    assert parse_unit(ENCLAVE_INIT_DATABASE, "database").before == ("webapp",)


def test_defaults_are_enclave_inits_plus_a_bounded_stop() -> None:
    unit = parse_unit('ExecStart = "/bin/app"', "app")
    assert (unit.restart, unit.restart_sec, unit.enable) == ("no", 5, True)
    assert (unit.kill_signal, unit.timeout_stop_sec, unit.timeout_start_sec) == (
        "SIGTERM",
        10,
        None,
    )
    assert (unit.user, unit.group, unit.working_directory) == (None, None, None)


def test_enclaveops_keys_are_read() -> None:
    unit = parse_unit(
        'ExecStart = "/bin/app"\nUser = "nobody"\nGroup = 65534\nTimeoutStartSec = 2.5\n'
        'KillSignal = "SIGINT"\nTimeoutStopSec = 3\n',
        "app",
    )
    assert (unit.user, unit.group, unit.timeout_start_sec) == ("nobody", 65534, 2.5)
    assert (unit.kill_signal, unit.timeout_stop_sec) == ("SIGINT", 3)


def test_a_unit_means_the_same_in_a_file_and_in_the_manifest() -> None:
    manifest = parse_manifest(
        "version: v1\nname: n\ntarget: t\nsources: {app: a}\nservices:\n  units:\n"
        "    webapp:\n      ExecStart: /usr/bin/python3 /app/server.py\n"
        "      Environment: [PORT=8080, DATABASE_URL=postgresql://localhost/myapp]\n"
        "      Restart: always\n      RestartSec: 5\n      WorkingDirectory: /app\n"
        "      ServiceEnable: true\n      After: [database]\n      Requires: [database]\n"
        "    database:\n      ExecStart: /bin/db\n"
    )
    assert manifest.services.unit("webapp") == parse_unit(ENCLAVE_INIT_WEBAPP, "webapp")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Restart = "always"', "ExecStart: required key is missing"),
        (
            'ExecStart = "/bin/app"\nRestart = "sometimes"',
            'Restart: must be one of "no", "always", "on-failure", "on-success"; got "sometimes"',
        ),
        (
            'ExecStart = "/bin/app"\nExecstart = "x"',
            "unknown key 'Execstart' (did you mean 'ExecStart'?)",
        ),
        ('ExecStart = "/bin/app"\nRestartSec = -1', "RestartSec: must be at least 0, got -1"),
        ('ExecStart = "/bin/app"\nRestartSec = nan', "RestartSec: expected an integer, got nan"),
        ('ExecStart = "/bin/app"\nServiceEnable = "yes"', "ServiceEnable: expected a boolean"),
        (
            'ExecStart = "/bin/app"\nWorkingDirectory = "app"',
            "WorkingDirectory: must be an absolute path",
        ),
        (
            'ExecStart = "/bin/app"\nEnvironment = ["PORT"]',
            "Environment[0]: must look like NAME=value",
        ),
        (
            'ExecStart = "/bin/app"\nEnvironment = ["A=1", "A=2"]',
            "Environment[1]: sets A again (first set by Environment[0])",
        ),
        ('ExecStart = "/bin/app"\nRequires = "db"', 'Requires: expected a list, got "db"'),
        ('ExecStart = "/bin/app"\nKillSignal = "SIGTEM"', "(did you mean 'SIGTERM'?)"),
        ('ExecStart = "/bin/app"\nUser = true', "User: expected a string or an integer, got true"),
        ('ExecStart = "/bin/app \'unclosed"', "ExecStart: cannot split"),
        ('ExecStart = "   "', "ExecStart: names no program"),
        (
            'ExecStart = "/bin/app"\nRestart = \nUser = "x"',
            "invalid TOML: Invalid value (at line 2, column 11)",
        ),
        ('ExecStart = "/bin/app"\nExecStart = "/bin/b"', "invalid TOML: Cannot overwrite a value"),
        ("[Service]\nExecStart=/bin/app\n", "not systemd's INI: no sections"),
        ('[Service]\nExecStart = "/bin/app"\n', "[Service]: unit files are enclave-init's TOML"),
    ],
)
def test_problems_name_the_file_and_the_key(text: str, expected: str) -> None:
    message = _problems(text)
    assert message.startswith("/etc/enclaver/services/web.service: ")
    assert expected in message


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    message = _problems('Restart = "sometimes"\nRestartSec = -1\nUser = true')
    assert len(message.splitlines()) == 4


def test_non_utf8_and_oversized_files_are_refused() -> None:
    assert "not UTF-8 text (invalid byte at offset 13)" in _problems_bytes(b'ExecStart = "\xff"')
    big = b"# " + b"x" * MAX_UNIT_FILE_BYTES + b'\nExecStart = "/bin/a"'
    assert f"larger than {MAX_UNIT_FILE_BYTES} bytes" in _problems_bytes(big)


def _problems_bytes(data: bytes) -> str:
    with pytest.raises(ServiceUnitError) as caught:
        parse_unit(data, "web")
    return str(caught.value)


def test_exec_start_splits_like_a_shell_without_running_one() -> None:
    unit = parse_unit(
        r"""ExecStart = '''/bin/sh -c "echo $HOME; exit 3" 'two words' a\ b ; rm -rf /'''""", "x"
    )
    assert command_line(unit) == [
        "/bin/sh",
        "-c",
        "echo $HOME; exit 3",
        "two words",
        "a b",
        ";",
        "rm",
        "-rf",
        "/",
    ]


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("web.service", ("web", True)),
        ("web.service.disabled", ("web", False)),
        ("a.b@1.service", ("a.b@1", True)),
        (".web.service", None),
        ("web.service~", None),
        ("web.service.bak", None),
        (".service", None),
        ("README", None),
    ],
)
def test_file_names_say_the_service_and_whether_it_is_enabled(
    file_name: str, expected: tuple[str, bool] | None
) -> None:
    assert unit_file_name(file_name) == expected


def test_a_directory_loads_enabled_disabled_and_reports_broken_files(tmp_path: Path) -> None:
    (tmp_path / "webapp.service").write_text(ENCLAVE_INIT_WEBAPP)
    (tmp_path / "database.service.disabled").write_text(ENCLAVE_INIT_DATABASE)
    (tmp_path / "broken.service").write_text('ExecStart = "/bin/x"\nRestart = "sometimes"\n')
    (tmp_path / "notes.txt").write_text("not a unit")
    (tmp_path / "dir.service").mkdir()
    found = load_unit_directory(tmp_path)
    assert sorted(found.units) == ["database", "webapp"]
    assert found.units["webapp"].enabled
    assert not found.units["database"].enabled
    assert found.units["database"].path == tmp_path / "database.service.disabled"
    assert list(found.errors) == ["broken"]
    assert str(tmp_path / "broken.service") in str(found.errors["broken"])


def test_service_enable_false_disables_an_enabled_file(tmp_path: Path) -> None:
    (tmp_path / "job.service").write_text('ExecStart = "/bin/job"\nServiceEnable = false\n')
    definition = load_unit_directory(tmp_path).units["job"]
    assert definition.file_enabled and not definition.enabled


def test_the_enabled_file_wins_over_a_disabled_twin(tmp_path: Path) -> None:
    (tmp_path / "web.service").write_text('ExecStart = "/bin/new"')
    (tmp_path / "web.service.disabled").write_text('ExecStart = "/bin/old"')
    found = load_unit_directory(tmp_path)
    assert found.units["web"].unit.exec_start == "/bin/new"
    assert any("web.service.disabled is ignored" in warning for warning in found.warnings)


def test_a_missing_directory_holds_no_units(tmp_path: Path) -> None:
    found = load_unit_directory(tmp_path / "absent")
    assert (found.units, found.errors, found.warnings) == ({}, {}, ())


def test_an_unreadable_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "web.service").mkdir()
    with pytest.raises(ServiceUnitError, match=r"web.service: cannot read it: Is a directory"):
        load_unit_file(tmp_path / "web.service")


def test_a_unit_file_replaces_the_manifest_unit_of_the_same_name(tmp_path: Path) -> None:
    from_manifest = manifest_units(
        [ServiceUnit("web", "/bin/web --from-manifest"), ServiceUnit("cache", "/bin/cache")]
    )
    (tmp_path / "web.service.disabled").write_text('ExecStart = "/bin/web --from-file"')
    merged = merge_units(from_manifest, load_unit_directory(tmp_path))
    assert merged.units["web"].unit.exec_start == "/bin/web --from-file"
    assert not merged.units["web"].enabled
    assert merged.units["cache"] == UnitDefinition(ServiceUnit("cache", "/bin/cache"))
    assert merged.units["cache"].source == MANIFEST_SOURCE


def test_a_broken_unit_file_also_shadows_the_manifest_unit(tmp_path: Path) -> None:
    from_manifest = manifest_units([ServiceUnit("web", "/bin/web")])
    (tmp_path / "web.service").write_text("ExecStart = 1")
    merged = merge_units(from_manifest, load_unit_directory(tmp_path))
    assert "web" not in merged.units
    assert "ExecStart: expected a string, got 1" in str(merged.errors["web"])


def test_a_manifest_unit_whose_command_does_not_split_is_an_error() -> None:
    found = manifest_units([ServiceUnit("web", "/bin/web 'unclosed")])
    assert "services.units.web" in str(found.errors["web"])
    assert "No closing quotation" in str(found.errors["web"])


def test_the_manifest_schema_and_the_protocol_share_one_service_name_rule() -> None:
    units = manifest_schema()["properties"]["services"]["properties"]["units"]
    assert units["propertyNames"]["pattern"] == f"^{SERVICE_NAME_PATTERN.pattern}$"
    assert not is_valid_service_name("-x") and not is_valid_service_name("..")
    assert is_valid_service_name("web@1.service-helper")
