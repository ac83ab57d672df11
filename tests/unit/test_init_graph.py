"""The start plan: dependencies first, the same order every time, cycles and gaps refused."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.manifest import ServiceUnit
from enclave_runtime.init.graph import plan_start


def _units(**relations: dict[str, tuple[str, ...]]) -> dict[str, ServiceUnit]:
    return {name: ServiceUnit(name, f"/bin/{name}", **keys) for name, keys in relations.items()}


def _before(order: tuple[str, ...], first: str, second: str) -> bool:
    return order.index(first) < order.index(second)


def test_enclave_init_example_starts_the_database_first() -> None:
    # enclave-init's rootfs/service examples: webapp After+Requires database; database Before
    # webapp.
    plan = plan_start(
        _units(
            webapp={"after": ("database",), "requires": ("database",)},
            database={"before": ("webapp",)},
            worker={},
            myapp={},
        )
    )
    assert plan.order == ("database", "myapp", "webapp", "worker")
    assert plan.blocked == {}
    assert plan.requires["webapp"] == ("database",)
    assert plan.starts_after["webapp"] == ("database",)


def test_every_key_orders_in_its_direction() -> None:
    plan = plan_start(
        _units(
            a={"requires": ("b",)},
            b={"after": ("c",)},
            c={"before": ("d",)},
            d={"required_by": ("e",)},
            e={},
        )
    )
    order = plan.order
    assert _before(order, "b", "a")
    assert _before(order, "c", "b")
    assert _before(order, "c", "d")
    assert _before(order, "d", "e")
    assert plan.requires["e"] == ("d",)  # RequiredBy is a requirement read backwards


def test_the_order_is_the_same_whatever_order_the_units_come_in() -> None:
    relations = {
        "web": {"requires": ("db", "cache")},
        "db": {},
        "cache": {"after": ("db",)},
        "metrics": {},
        "proxy": {"before": ("web",)},
    }
    orders = {
        plan_start(_units(**dict(permutation))).order
        for permutation in itertools.permutations(relations.items())
    }
    assert orders == {("db", "cache", "metrics", "proxy", "web")}


def test_a_cycle_is_reported_by_name_and_none_of_it_starts() -> None:
    plan = plan_start(
        _units(
            a={"requires": ("b",)},
            b={"after": ("c",)},
            c={"after": ("a",)},
            free={},
        )
    )
    assert plan.order == ("free",)
    assert set(plan.blocked) == {"a", "b", "c"}
    assert plan.blocked["a"] == "is in the dependency cycle a -> c -> b -> a"
    (problem,) = plan.problems
    assert "dependency cycle a -> c -> b -> a" in problem
    assert "not started: a, b, c" in problem


def test_a_service_that_requires_itself_is_a_cycle() -> None:
    plan = plan_start(_units(loop={"requires": ("loop",)}))
    assert plan.blocked == {"loop": "is in the dependency cycle loop -> loop"}


def test_every_member_of_a_tangle_is_blocked_not_only_one_cycle() -> None:
    # a <-> b and b <-> c: c is on a cycle too, even if the first one found is a -> b -> a.
    plan = plan_start(
        _units(
            a={"after": ("b",)},
            b={"after": ("a", "c")},
            c={"after": ("b",)},
        )
    )
    assert set(plan.blocked) == {"a", "b", "c"}
    assert plan.order == ()


def test_a_missing_requirement_blocks_the_service_and_those_that_need_it() -> None:
    plan = plan_start(
        _units(
            web={"requires": ("db",)},
            frontend={"requires": ("web",)},
            worker={"after": ("web",)},
        )
    )
    assert plan.blocked == {
        "web": "requires db, which is not defined",
        "frontend": "requires web, which cannot start: web requires db, which is not defined",
    }
    assert plan.order == ("worker",)  # After only orders; it does not require
    assert plan.problems == ("web requires db, which is not defined; web is not started",)


def test_a_disabled_or_broken_requirement_says_so() -> None:
    plan = plan_start(
        _units(web={"requires": ("db",)}, api={"requires": ("auth",)}),
        unavailable={"db": "is disabled", "auth": "has an invalid unit (see its status)"},
    )
    assert plan.blocked == {
        "api": "requires auth, which has an invalid unit (see its status)",
        "web": "requires db, which is disabled",
    }


def test_ordering_against_an_unknown_service_is_noted_and_ignored() -> None:
    plan = plan_start(_units(web={"after": ("ghost",), "before": ("phantom",)}))
    assert plan.order == ("web",)
    assert plan.warnings == (
        "web: After names ghost, which is not defined; ignored",
        "web: Before names phantom, which is not defined; ignored",
    )


def test_something_required_by_an_unknown_service_still_starts() -> None:
    plan = plan_start(_units(db={"required_by": ("ghost",)}))
    assert plan.order == ("db",)


def test_the_stop_order_is_the_reverse() -> None:
    plan = plan_start(_units(web={"requires": ("db",)}, db={}))
    assert plan.stop_order() == ("web", "db")


def test_a_long_chain_plans_without_recursion_limits() -> None:
    count = 5000
    units = _units(
        **{f"s{i:05d}": {"after": (f"s{i - 1:05d}",)} if i else {} for i in range(count)}
    )
    assert plan_start(units).order == tuple(f"s{i:05d}" for i in range(count))


NAMES = [f"s{i}" for i in range(8)]
_edges = st.lists(st.sampled_from(NAMES), max_size=3, unique=True).map(tuple)


@given(
    st.dictionaries(
        st.sampled_from(NAMES),
        st.fixed_dictionaries({"requires": _edges, "after": _edges, "before": _edges}),
        min_size=1,
    )
)
def test_any_graph_plans_every_service_exactly_once_in_a_valid_order(
    relations: dict[str, dict[str, tuple[str, ...]]],
) -> None:
    units = _units(**relations)
    plan = plan_start(units)
    assert sorted([*plan.order, *plan.blocked]) == sorted(units)
    position = {name: index for index, name in enumerate(plan.order)}
    for name in plan.order:
        unit = units[name]
        for earlier in (*unit.requires, *unit.after):
            if earlier in position:
                assert position[earlier] < position[name]
        for later in unit.before:
            if later in position:
                assert position[name] < position[later]
        for required in unit.requires:
            assert required in position  # a startable service's requirements all start
