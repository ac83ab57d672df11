"""Unit files are read by odyn at boot and on every reload: whatever a file holds, reading it may
only fail with ServiceUnitError (naming the file), never crash the init or hang it."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.service_unit import (
    ServiceUnitError,
    command_line,
    parse_unit,
    unit_from_table,
)

VALID = (
    b'ExecStart = "/usr/bin/python3 /app/server.py --port \\"8080\\""\n'
    b'Environment = ["PORT=8080", "DATABASE_URL=postgresql://localhost/myapp"]\n'
    b'Restart = "on-failure"\nRestartSec = 5\nWorkingDirectory = "/app"\nServiceEnable = true\n'
    b'After = ["database"]\nRequires = ["database"]\nBefore = []\nRequiredBy = ["edge"]\n'
    b'User = "app"\nGroup = 1000\nTimeoutStartSec = 2.5\nKillSignal = "SIGINT"\n'
    b"TimeoutStopSec = 10\n"
)
SOURCE = "/etc/enclaver/services/web.service"


def _read(data: bytes) -> None:
    try:
        unit = parse_unit(data, "web", SOURCE)
    except ServiceUnitError as err:
        assert str(err).startswith(SOURCE + ": ")
        return
    assert command_line(unit)  # a unit that parses always has a program to run


def test_the_seed_is_valid() -> None:
    assert parse_unit(VALID, "web").requires == ("database",)


@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_service_unit_error(data: bytes) -> None:
    _read(data)


@given(
    st.text(alphabet=st.sampled_from(list("[]{}=\"'\\#.,-+:0123456789 \naetrsfln")), max_size=300)
)
def test_toml_like_noise_only_raises_service_unit_error(text: str) -> None:
    _read(text.encode())


@given(st.data())
def test_mutated_units_only_raise_service_unit_error(data: st.DataObject) -> None:
    mutated = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        action = data.draw(st.sampled_from(("flip", "delete", "insert")))
        if action == "flip":
            mutated[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "delete":
            del mutated[position : position + data.draw(st.integers(1, 16))]
        else:
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        if not mutated:
            break
    _read(bytes(mutated))


@given(
    st.dictionaries(
        st.sampled_from(["ExecStart", "Environment", "Restart", "RestartSec", "User", "Requires"]),
        st.recursive(
            st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
            max_leaves=6,
        ),
    )
)
def test_any_typed_values_only_raise_service_unit_error(table: dict[str, object]) -> None:
    with contextlib.suppress(ServiceUnitError):
        unit_from_table(table, "web", SOURCE)
