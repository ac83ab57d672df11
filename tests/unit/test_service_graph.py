"""The shared dependency rules: ordering edges and repeated Environment variables."""

from __future__ import annotations

from enclave_runtime.formats.service_graph import ordering_edges, repeated_variables


def test_requires_and_after_start_the_named_unit_first_before_and_required_by_after() -> None:
    edges = ordering_edges(
        {
            "web": {"Requires": ["db"], "After": ["cache"]},
            "db": {"Before": ["migrate"]},
            "cache": {},
            "migrate": {"RequiredBy": ["web"]},
        }
    )
    assert edges == {"db": {"web", "migrate"}, "cache": {"web"}, "migrate": {"web"}, "web": set()}


def test_names_that_are_not_units_are_ignored() -> None:
    assert ordering_edges({"web": {"After": ["ghost"], "Before": ["ghost"]}}) == {"web": set()}


def test_a_variable_set_again_is_reported_at_its_second_entry() -> None:
    entries = ["A=1", "B=2", "not-an-assignment", 7, "A=3", "B=", "A=4"]
    assert list(repeated_variables(entries)) == [(4, "A", 0), (5, "B", 1), (6, "A", 0)]
