"""allocator.yaml: what nitro-enclaves-allocator accepts, and the canonical file we write."""

from __future__ import annotations

import contextlib
import re

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.allocator_config import (
    AllocatorConfig,
    AllocatorConfigError,
    format_cpu_list,
    load,
    parse,
    parse_cpu_list,
)

# bootstrap/allocator.yaml of aws/aws-nitro-enclaves-cli, as installed on every Nitro parent.
AWS_DEFAULT_FILE = """\
---
# Enclave configuration file.
#
# How much memory to allocate for enclaves (in MiB).
memory_mib: 512
#
# How many CPUs to reserve for enclaves.
cpu_count: 2
#
# Alternatively, the exact CPUs to be reserved for the enclave can be explicitly
# configured by using `cpu_pool` (like below), instead of `cpu_count`.
# Note: cpu_count and cpu_pool conflict with each other. Only use exactly one of them.
# Example of reserving CPUs 2, 3, and 6 through 9:
# cpu_pool: 2,3,6-9
"""


def test_aws_default_file_is_512_mib_and_two_cpus() -> None:
    config = parse(AWS_DEFAULT_FILE)

    assert config == AllocatorConfig(memory_mib=512, cpu_count=2)
    assert config.pool_cpu_ids() == (1, 2)  # CPU 0 stays with the parent instance


def test_cpu_pool_example_from_the_aws_file() -> None:
    config = parse("---\nmemory_mib: 4096\ncpu_pool: 2,3,6-9\n")

    assert config.cpu_pool == (2, 3, 6, 7, 8, 9)
    assert config.pool_cpu_ids() == (2, 3, 6, 7, 8, 9)
    assert config.cpu_count is None


def test_values_may_be_double_quoted_as_the_allocator_strips_them() -> None:
    config = parse('---\nmemory_mib: "1024"\ncpu_pool: "1,3"\n')

    assert config == AllocatorConfig(memory_mib=1024, cpu_pool=(1, 3))


def test_a_single_cpu_pool_reads_as_a_yaml_integer_and_still_counts() -> None:
    assert parse("---\nmemory_mib: 64\ncpu_pool: 5\n").cpu_pool == (5,)


def test_load_reads_a_file_and_names_it_in_errors(tmp_path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text("---\nmemory_mib: 512\n", encoding="utf-8")

    with pytest.raises(AllocatorConfigError, match=f"{re.escape(str(path))}: no CPU reservation"):
        load(path)
    with pytest.raises(AllocatorConfigError, match=r"cannot read .*missing\.yaml"):
        load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memory_mib: 512\ncpu_count: 2\n", "add a line '---'"),
        ("memory_mib: 512\n---\ncpu_count: 2\n", "not valid YAML"),
        ("---\ncpu_count: 2\n", "memory_mib is missing"),
        ("---\nmemory_mib: 512\n", "no CPU reservation: set cpu_count"),
        ("---\nmemory_mib: 512\ncpu_count: 2\ncpu_pool: 1-2\n", "cpu_count conflicts with"),
        ("---\nmemory_mib: 512 # MiB\ncpu_count: 2\n", "line 2: memory_mib is followed by '# MiB'"),
        ("---\nmemory_mib: 0\ncpu_count: 2\n", "line 2: memory_mib must be a whole number"),
        ("---\nmemory_mib: 0x200\ncpu_count: 2\n", "memory_mib must be .*'0x200'"),
        ("---\nmemory_mib: yes\ncpu_count: 2\n", "memory_mib must be .*'yes'"),
        ("---\nmemory_mib: 512\ncpu_count: -1\n", "line 3: cpu_count must be a whole number"),
        ("---\nmemory_mib: 512\ncpu_count: 2.5\n", "cpu_count must be .*'2.5'"),
        ("---\nmemory_mib: 512\ncpu_pool: 0-3\n", "includes CPU 0, which must remain"),
        ("---\nmemory_mib: 512\ncpu_pool: 3-1\n", "range 3-1 runs backwards"),
        ("---\nmemory_mib: 512\ncpu_pool: 1, 3\n", 'cpu_pool: " 3" is not a CPU id'),
        ("---\nmemory_mib: 512\ncpu_pool: 1-2-3\n", 'cpu_pool: "1-2-3" is not a CPU id'),
        ("---\nmemory_mib: 512\ncpu_pool: 1-99999\n", "beyond the largest Linux CPU id"),
        ("---\nmemory_mib: 512\ncpu_pool: ''\n", "line 3: cpu_pool must be a plain value"),
        ("---\nmemory_mib: 512\ncpu_pool: [1, 2]\n", "cpu_pool must be a plain value"),
        ("---\nmemory_mib:\n  512\ncpu_count: 1\n", "line 2: memory_mib has no value"),
        ("---\nmemory_mib: 512\nmemory_mib: 256\ncpu_count: 1\n", "line 3: memory_mib is set"),
        ("---\nmemory_mib: 512\ncpu_count: 2\nhugepages: 1\n", "line 4: unexpected key 'hug"),
        ("---\n{memory_mib: 512, cpu_count: 2}\n", "one 'key: value' line per setting"),
        ("---\n- memory_mib\n", "one 'key: value' line per setting"),
        ("---\nmemory_mib: [\n", "not valid YAML"),
    ],
)
def test_files_the_allocator_would_reject_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(AllocatorConfigError, match=message):
        parse(text, "allocator.yaml")


def test_error_names_the_source_file() -> None:
    with pytest.raises(AllocatorConfigError, match=r"^/etc/x\.yaml: line 2: memory_mib"):
        parse("---\nmemory_mib: lots\ncpu_count: 1\n", "/etc/x.yaml")


def test_render_of_a_cpu_count_config_is_the_aws_layout() -> None:
    assert AllocatorConfig(memory_mib=512, cpu_count=2).render() == (
        "---\n"
        "# Enclave configuration file.\n"
        "#\n"
        "# How much memory to allocate for enclaves (in MiB).\n"
        "memory_mib: 512\n"
        "#\n"
        "# How many CPUs to reserve for enclaves.\n"
        "cpu_count: 2\n"
    )


def test_render_of_a_cpu_pool_uses_the_shortest_cpu_list() -> None:
    text = AllocatorConfig(memory_mib=2048, cpu_pool=(9, 1, 2, 3, 5, 8)).render()

    assert text.splitlines()[-1] == "cpu_pool: 1-3,5,8-9"
    assert text.startswith("---\n")


def test_render_is_what_yaml_tools_read_back() -> None:
    """Ansible and friends see the same values the allocator does."""
    text = AllocatorConfig(memory_mib=1024, cpu_pool=(1, 2, 3, 7)).render()

    assert yaml.safe_load(text) == {"memory_mib": 1024, "cpu_pool": "1-3,7"}


def test_dataclass_checks_what_it_is_given() -> None:
    with pytest.raises(AllocatorConfigError, match="exactly one of cpu_count and cpu_pool"):
        AllocatorConfig(memory_mib=512)
    with pytest.raises(AllocatorConfigError, match="memory_mib must be a whole number"):
        AllocatorConfig(memory_mib=0, cpu_count=1)
    with pytest.raises(AllocatorConfigError, match="CPU 0"):
        AllocatorConfig(memory_mib=512, cpu_pool=(0, 1))
    assert AllocatorConfig(memory_mib=512, cpu_pool=(3, 1, 3)).cpu_pool == (1, 3)


def test_cpu_list_round_trip_examples() -> None:
    assert parse_cpu_list("2,3,6-9") == (2, 3, 6, 7, 8, 9)
    assert parse_cpu_list("6-9,2-3,7") == (2, 3, 6, 7, 8, 9)
    assert format_cpu_list((2, 3, 6, 7, 8, 9)) == "2-3,6-9"
    assert format_cpu_list((4,)) == "4"


configs = st.builds(
    AllocatorConfig,
    memory_mib=st.integers(min_value=1, max_value=1 << 40),
    cpu_count=st.integers(min_value=1, max_value=512),
) | st.builds(
    lambda memory, pool: AllocatorConfig(memory_mib=memory, cpu_pool=tuple(pool)),
    st.integers(min_value=1, max_value=1 << 40),
    st.sets(st.integers(min_value=1, max_value=8191), min_size=1, max_size=64),
)


@given(configs)
def test_render_then_parse_gives_the_same_config(config: AllocatorConfig) -> None:
    assert parse(config.render()) == config


@given(configs)
def test_render_is_deterministic_and_canonical(config: AllocatorConfig) -> None:
    rendered = config.render()

    assert parse(rendered).render() == rendered


@given(st.text(max_size=300))
def test_any_text_gives_a_config_or_an_allocator_config_error(text: str) -> None:
    with contextlib.suppress(AllocatorConfigError):
        parse(text)


@given(st.data())
def test_edits_of_a_valid_file_give_a_config_or_an_allocator_config_error(data) -> None:
    valid = AWS_DEFAULT_FILE.replace("cpu_count: 2", "cpu_pool: 2,3,6-9")
    position = data.draw(st.integers(min_value=0, max_value=len(valid)))
    cut = data.draw(st.integers(min_value=0, max_value=8))
    insert = data.draw(st.text(alphabet="-,:#'\"[]{}\n 0123456789abcxyz_", max_size=8))
    with contextlib.suppress(AllocatorConfigError):
        parse(valid[:position] + insert + valid[position + cut :])
