"""Egress findings of issue 15: the safe default denies and every embedded IPv4 form
(docs/networking.md, "Denied by default")."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.egress_policy import EgressPolicy, embedded_forms

pytestmark = pytest.mark.security

EVERYTHING = ("**", "0.0.0.0/0", "::/0")


def v6_spellings(v4: ipaddress.IPv4Address) -> list[str]:
    """Every IPv6 form that embeds ``v4``: mapped, compatible, SIIT, NAT64, 6to4, Teredo."""
    n = int(v4)
    return [
        f"::ffff:{v4}",
        str(ipaddress.IPv6Address(n)),  # IPv4-compatible ::a.b.c.d
        str(ipaddress.IPv6Address((0xFFFF << 32) | n)),  # SIIT ::ffff:0:a.b.c.d
        str(ipaddress.IPv6Address((0x64FF9B << 96) | n)),  # NAT64
        str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1)),  # 6to4
        str(ipaddress.IPv6Address((0x20010000 << 96) | (n << 64) | (~n & 0xFFFFFFFF))),  # Teredo
    ]


defaults_v4 = st.one_of(
    st.ip_addresses(network="127.0.0.0/8"),
    st.ip_addresses(network="169.254.0.0/16"),
    st.ip_addresses(network="0.0.0.0/8").filter(lambda a: int(a) > 1),
)


@given(defaults_v4)
def test_loopback_and_link_local_are_denied_in_every_spelling(v4: ipaddress.IPv4Address) -> None:
    policy = EgressPolicy(allow=EVERYTHING)
    for host in (str(v4), *v6_spellings(v4)):
        assert not policy.check_host(host), host
        assert not policy.check_peer(host, "allowed.example"), host


@given(st.ip_addresses(network="fd00:ec2::/32"))
def test_the_ec2_ipv6_services_range_is_denied(address: ipaddress.IPv6Address) -> None:
    policy = EgressPolicy(allow=EVERYTHING)
    assert not policy.check_host(str(address))
    assert not policy.check_peer(address, "allowed.example")


@given(st.ip_addresses(v=4).filter(lambda a: a.is_global))
def test_a_deny_rule_meets_every_embedded_form(v4: ipaddress.IPv4Address) -> None:
    policy = EgressPolicy(allow=EVERYTHING, deny=[str(v4)])
    assert policy.check_host("public.example")
    for host in (str(v4), *v6_spellings(v4)):
        assert not policy.check_peer(host), host
        assert v4 in embedded_forms(ipaddress.ip_address(host)), host


@given(st.ip_addresses(v=4).filter(lambda a: a.is_global))
def test_public_addresses_stay_reachable_under_a_wildcard(v4: ipaddress.IPv4Address) -> None:
    policy = EgressPolicy(allow=EVERYTHING)
    assert policy.check_host(str(v4))
    assert policy.check_peer(v4, "public.example")


@given(st.ip_addresses(v=6))
def test_embedded_forms_never_fail(address: ipaddress.IPv6Address) -> None:
    forms = embedded_forms(address)
    assert forms[0] == address


@pytest.mark.parametrize("name", ["localhost", "host", "LocalHost.", "db.localhost"])
def test_loopback_names_need_an_exact_allow(name: str) -> None:
    assert not EgressPolicy(allow=["**", "*"]).check_host(name)
    assert not EgressPolicy(allow=["**"]).check_peer("127.0.0.1", name)
    exact = name.lower().rstrip(".")
    allowed = EgressPolicy(allow=[exact])
    assert allowed.check_host(name)
    assert allowed.check_peer("127.0.0.1", name)
    assert not allowed.check_peer("169.254.169.254", name)  # only loopback is lifted
    assert not EgressPolicy(allow=[exact], deny=["127.0.0.1"]).check_peer("127.0.0.1", name)


def test_an_explicit_imds_allow_is_the_way_to_reach_it() -> None:
    policy = EgressPolicy(allow=["169.254.169.254", "kms.*.amazonaws.com"])
    assert policy.check_host("169.254.169.254")
    assert policy.check_peer("169.254.169.254", "imds.example")
    assert not policy.check_host("169.254.170.2")  # the rest of link-local stays denied
    assert not EgressPolicy(allow=["169.254.0.0/16"], deny=["169.254.169.254"]).check_host(
        "169.254.169.254"
    )
    assert not EgressPolicy(allow=["0.0.0.0/0"]).check_host("169.254.169.254")


def test_imds_over_ipv6_is_denied_by_name_and_literal() -> None:
    policy = EgressPolicy(allow=["**", "::/0"], deny=["169.254.169.254"])
    assert not policy.check_host("fd00:ec2::254")
    assert not policy.check_peer("fd00:ec2::254", "metadata.example")
    assert EgressPolicy(allow=["fd00:ec2::254"]).check_host("fd00:ec2::254")
