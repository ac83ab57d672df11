"""The order services start in, and which ones may not start at all.

Edges come from the unit keys as in enclave-init and the manifest: X ``Requires`` or ``After``
Y starts Y first; X ``Before`` or ``RequiredBy`` Y starts X first. ``Requires`` is also a hard
requirement (X starts only if Y can), and so is ``RequiredBy`` read backwards (X ``RequiredBy`` Y
means Y requires X), as systemd reads it; enclave-init ignores ``RequiredBy`` altogether.

Where enclave-init logs a cycle or a missing requirement and then starts everything in hash-map
order, this plan refuses: every service on a cycle, every service whose ``Requires`` names a
service that is not there (or is disabled, or has a broken unit), and every service that
requires one of those is *blocked*, with the reason in words. The others start in a
deterministic topological order (ties broken by name). ``After``/``Before``/``RequiredBy``
naming an unknown service only order against nothing, as in enclave-init, and are noted.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from enclave_runtime.formats.service_graph import ordering_edges


class Dependencies(Protocol):
    """The dependency keys of a unit (``ServiceUnit`` has them)."""

    @property
    def requires(self) -> tuple[str, ...]: ...

    @property
    def after(self) -> tuple[str, ...]: ...

    @property
    def before(self) -> tuple[str, ...]: ...

    @property
    def required_by(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class StartPlan:
    """Which services start and in what order, and why the others do not.

    ``order``: the startable services, each after everything it must follow. ``blocked``: the
    services that must not start, with the reason. ``starts_after`` and ``requires``: for each
    startable service, the startable services it waits for and the ones it needs running.
    ``problems``: each cycle and missing requirement once (for logs and the system status);
    ``warnings``: ordering keys that name unknown services.
    """

    order: tuple[str, ...] = ()
    blocked: Mapping[str, str] = field(default_factory=dict)
    starts_after: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    requires: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def stop_order(self) -> tuple[str, ...]:
        """The startable services, each before everything it follows (the reverse order)."""
        return tuple(reversed(self.order))


def plan_start(
    units: Mapping[str, Dependencies], unavailable: Mapping[str, str] | None = None
) -> StartPlan:
    """Plan the start of ``units`` (name -> dependency keys).

    ``unavailable`` maps names that exist but will not run (disabled, broken unit file) to why,
    e.g. ``{"db": "is disabled"}``; a service that requires one of them is blocked with that.
    """
    unavailable = unavailable or {}
    names = set(units)
    requirements = _requirements(units)
    edges = _ordering_edges(units)
    warnings = _unknown_ordering_targets(units, names, unavailable)
    blocked: dict[str, str] = {}
    problems: list[str] = []
    for name in sorted(names):
        for required in sorted(requirements[name] - names):
            reason = unavailable.get(required, "is not defined")
            blocked.setdefault(name, f"requires {required}, which {reason}")
            problems.append(f"{name} requires {required}, which {reason}; {name} is not started")
    for component in _cycles(edges):
        description = _describe_cycle(component, edges)
        members = ", ".join(sorted(component))
        problems.append(
            f"dependency cycle {description} (each must start before the next); not started: "
            f"{members}; remove one of the Requires/After/Before/RequiredBy entries forming it"
        )
        for member in component:
            blocked.setdefault(member, f"is in the dependency cycle {description}")
    _block_dependents(requirements, blocked)
    startable = sorted(names - set(blocked))
    order = _topological_order(startable, edges)
    return StartPlan(
        order=order,
        blocked=dict(sorted(blocked.items())),
        starts_after=_predecessors(startable, edges),
        requires={name: tuple(sorted(requirements[name])) for name in startable},
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def _requirements(units: Mapping[str, Dependencies]) -> dict[str, set[str]]:
    """Hard requirements: a unit's own ``Requires``, plus every unit ``RequiredBy`` it."""
    needs: dict[str, set[str]] = {name: set(unit.requires) for name, unit in units.items()}
    for name, unit in units.items():
        for dependent in unit.required_by:
            if dependent in needs:
                needs[dependent].add(name)
    return needs


def _ordering_edges(units: Mapping[str, Dependencies]) -> dict[str, set[str]]:
    """``earlier -> {later, ...}`` among the planned units only (the shared ordering rule)."""
    relations = {
        name: {
            "Requires": unit.requires,
            "After": unit.after,
            "Before": unit.before,
            "RequiredBy": unit.required_by,
        }
        for name, unit in units.items()
    }
    return ordering_edges(relations)


def _unknown_ordering_targets(
    units: Mapping[str, Dependencies], names: set[str], unavailable: Mapping[str, str]
) -> list[str]:
    warnings = []
    for name in sorted(units):
        unit = units[name]
        for key, targets in (
            ("After", unit.after),
            ("Before", unit.before),
            ("RequiredBy", unit.required_by),
        ):
            for target in targets:
                if target not in names and target not in unavailable:
                    warnings.append(f"{name}: {key} names {target}, which is not defined; ignored")
    return warnings


def _block_dependents(requirements: Mapping[str, set[str]], blocked: dict[str, str]) -> None:
    """Block, transitively, every service that requires a blocked one, naming the root cause."""
    dependents: dict[str, set[str]] = {}
    for name, needs in requirements.items():
        for required in needs:
            dependents.setdefault(required, set()).add(name)
    cause = {name: f"{name} {reason}" for name, reason in blocked.items()}
    pending = deque(sorted(blocked))
    while pending:
        failed = pending.popleft()
        for dependent in sorted(dependents.get(failed, ())):
            if dependent not in blocked:
                blocked[dependent] = f"requires {failed}, which cannot start: {cause[failed]}"
                cause[dependent] = cause[failed]
                pending.append(dependent)


def _topological_order(names: Iterable[str], edges: Mapping[str, set[str]]) -> tuple[str, ...]:
    """Kahn's algorithm over ``names``, smallest name first among the ready ones."""
    members = set(names)
    waiting = {name: 0 for name in members}
    for name in members:
        for later in edges[name] & members:
            waiting[later] += 1
    ready = [name for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for later in edges[name] & members:
            waiting[later] -= 1
            if waiting[later] == 0:
                heapq.heappush(ready, later)
    return tuple(order)


def _predecessors(
    names: Iterable[str], edges: Mapping[str, set[str]]
) -> dict[str, tuple[str, ...]]:
    members = set(names)
    earlier: dict[str, set[str]] = {name: set() for name in members}
    for name in members:
        for later in edges[name] & members:
            earlier[later].add(name)
    return {name: tuple(sorted(found)) for name, found in sorted(earlier.items())}


def _cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components that contain a cycle (Tarjan's, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)

    for root in sorted(edges):
        if root in index:
            continue
        visit(root)
        work = [(root, iter(sorted(edges[root])))]
        while work:
            node, successors = work[-1]
            child = next((s for s in successors if s not in index or s in on_stack), None)
            if child is not None and child not in index:
                visit(child)
                work.append((child, iter(sorted(edges[child]))))
                continue
            if child is not None:
                low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = _pop_component(node, stack, on_stack)
                if len(component) > 1 or node in edges[node]:
                    components.append(sorted(component))
    return sorted(components)


def _pop_component(root: str, stack: list[str], on_stack: set[str]) -> list[str]:
    component = []
    while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == root:
            return component


def _describe_cycle(component: list[str], edges: Mapping[str, set[str]]) -> str:
    """One concrete cycle through the component's first name: ``a -> b -> a``."""
    start = component[0]
    members = set(component)
    came_from: dict[str, str] = {}
    pending = deque([start])
    while pending:
        node = pending.popleft()
        for later in sorted(edges[node] & members):
            if later == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return " -> ".join([*reversed(path), start])
            if later not in came_from:
                came_from[later] = node
                pending.append(later)
    return " -> ".join([*component, start])
