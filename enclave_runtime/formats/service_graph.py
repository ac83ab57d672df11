"""The rules of unit dependencies that the manifest checks and the init's planner share.

Ordering (docs/init.md, "Start order"): X ``Requires`` or ``After`` Y starts Y first
(enclave-init orders by Requires too); X ``Before`` or ``RequiredBy`` Y starts X first. Names
that are not units are ignored here (the callers report them). An ``Environment`` list that sets
a variable twice is reported at the second entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

# The dependency keys, as the unit files and the manifest spell them.
DEPENDENCY_KEYS = ("Requires", "After", "Before", "RequiredBy")

Relations = Mapping[str, Mapping[str, Sequence[str]]]


def ordering_edges(relations: Relations) -> dict[str, set[str]]:
    """``earlier -> {later, ...}`` among the units of ``relations`` (name -> key -> names)."""
    edges: dict[str, set[str]] = {name: set() for name in relations}
    for name, keys in relations.items():
        for earlier in (*keys.get("Requires", ()), *keys.get("After", ())):
            if earlier in edges:
                edges[earlier].add(name)
        for later in (*keys.get("Before", ()), *keys.get("RequiredBy", ())):
            if later in edges:
                edges[name].add(later)
    return edges


def repeated_variables(environment: Iterable[object]) -> Iterator[tuple[int, str, int]]:
    """``(index, variable, first index)`` for each ``NAME=value`` entry that sets NAME again."""
    first: dict[str, int] = {}
    for index, item in enumerate(environment):
        if not isinstance(item, str) or "=" not in item:
            continue
        variable = item.split("=", 1)[0]
        if variable in first:
            yield index, variable, first[variable]
        first.setdefault(variable, index)
