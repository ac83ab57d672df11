"""The egress policy (docs/networking.md), including enclaver's own pattern tables.

The tables in ``test_enclavers_domain_patterns`` and ``test_enclavers_ip_patterns`` are the cases
of enclaver's ``enclaver/src/policy/domain_filter.rs`` and ``ip_filter.rs`` unit tests, so our
matcher agrees with upstream wherever upstream is right.
"""

from __future__ import annotations

import pytest

from enclave_runtime.formats.egress_policy import (
    EgressPolicy,
    EgressPolicyError,
    parse_destination,
)
from enclave_runtime.formats.manifest import Egress


@pytest.mark.parametrize(
    ("pattern", "positives", "negatives"),
    [
        (
            "example.com",
            ["example.com", "Example.COM"],
            ["example.net", "foo.com", "abc.example.com"],
        ),
        (
            "*.com",
            ["example.com", "cnn.CoM"],
            ["example.net", "news.ycombinator.com", "beta.client1.saas.com"],
        ),
        ("foo.*.com", ["foo.example.com"], ["example.net", "foo.bar.example.com"]),
        (
            "**.amazonaws.com",
            ["kms.us-east-1.amazonaws.com", "s3.amazonaws.com"],
            ["amazonaws.com", "example.com"],
        ),
    ],
)
def test_enclavers_domain_patterns(
    pattern: str, positives: list[str], negatives: list[str]
) -> None:
    policy = EgressPolicy(allow=[pattern])
    for host in positives:
        assert policy.check_host(host), host
    for host in negatives:
        assert not policy.check_host(host), host


@pytest.mark.parametrize(
    ("pattern", "positives", "negatives"),
    [
        ("66.254.33.22", ["66.254.33.22"], ["66.254.33.21"]),
        ("66.254.33.22/32", ["66.254.33.22"], ["66.254.33.21", "66.254.33.23"]),
        ("0.0.0.0/0", ["66.254.33.22", "1.2.3.4", "255.255.255.255"], []),
        (
            "66.254.33.22/24",  # host bits set: accepted as enclaver's ipnetwork accepts it
            ["66.254.33.1", "66.254.33.22", "66.254.33.255"],
            ["66.254.34.1", "67.254.33.22", "66.254.32.255"],
        ),
        # enclaver also lists "::" here; ours denies it by default (it reaches the local host).
        ("::/0", ["2001:db8::", "fc00::1234", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"], ["::"]),
    ],
)
def test_enclavers_ip_patterns(pattern: str, positives: list[str], negatives: list[str]) -> None:
    policy = EgressPolicy(allow=[pattern])
    for host in positives:
        assert policy.check_host(host), host
    for host in negatives:
        assert not policy.check_host(host), host


def test_nothing_is_allowed_by_default() -> None:
    policy = EgressPolicy()
    assert not policy.check_host("example.com")
    assert not policy.check_host("127.0.0.1")
    assert policy.check_host("example.com").reason == "example.com matches no allow rule"


def test_deny_wins_over_allow() -> None:
    policy = EgressPolicy(
        allow=["**.example.com", "10.0.0.0/8"], deny=["secret.example.com", "10.1.0.0/16"]
    )
    assert policy.check_host("api.example.com")
    assert not policy.check_host("secret.example.com")
    assert policy.check_host("10.2.3.4")
    decision = policy.check_host("10.1.2.3")
    assert not decision
    assert decision.reason == "10.1.2.3 is in the denied network 10.1.0.0/16"


def test_names_and_addresses_are_judged_by_their_own_kind_of_rule() -> None:
    # "**" allows every name, not an IP literal; an IP rule allows that address, not names.
    assert not EgressPolicy(allow=["**"]).check_host("1.2.3.4")
    assert not EgressPolicy(allow=["0.0.0.0/0"]).check_host("example.com")


def test_one_star_is_exactly_one_label_and_two_stars_one_or_more() -> None:
    one = EgressPolicy(allow=["*"])
    assert one.check_host("web")
    assert not one.check_host("host")  # a loopback name: only an exact allow of "host" reaches it
    assert not one.check_host("a.b")
    many = EgressPolicy(allow=["**"])
    assert many.check_host("web")
    assert many.check_host("a.b.c.d")


def test_a_trailing_dot_or_capitals_cannot_slip_past_a_deny() -> None:
    # enclaver reads "evil.com." as labels ["", "com", "evil"], which a deny of evil.com misses.
    policy = EgressPolicy(allow=["**"], deny=["evil.com"])
    assert not policy.check_host("evil.com.")
    assert not policy.check_host("EVIL.com")
    assert policy.check_host("good.com.")


def test_an_ipv4_mapped_ipv6_address_is_judged_as_its_ipv4_address() -> None:
    policy = EgressPolicy(allow=["0.0.0.0/0", "::/0"], deny=["169.254.169.254"])
    assert not policy.check_host("[::ffff:169.254.169.254]")
    assert not policy.check_host("::ffff:a9fe:a9fe")
    assert not policy.check_peer("::ffff:169.254.169.254")
    assert policy.check_host("[2001:db8::1]")


def test_peer_checks_apply_only_the_deny_rules() -> None:
    policy = EgressPolicy(allow=["api.example.com"], deny=["169.254.0.0/16", "*.internal"])
    assert policy.denies_addresses
    assert policy.check_peer("93.184.216.34")  # not in any allow rule, and it need not be
    decision = policy.check_peer("169.254.169.254")
    assert not decision
    assert decision.reason == "it resolved to 169.254.169.254, in the denied network 169.254.0.0/16"
    assert not EgressPolicy(allow=["a.com"], deny=["b.com"]).denies_addresses


@pytest.mark.parametrize(
    "host",
    [
        "",
        "a..b",
        ".a",
        "-a.com",
        "a b.com",
        "ex*mple.com",
        "127.1",  # inet_aton shorthand for 127.0.0.1
        "0x7f.0.0.1",
        "1.2.3.4.5",
        "[1.2.3.4]",
        "[not-v6]",
        "fe80::1%eth0",
        "é.com",
        "a" * 64 + ".com",
    ],
)
def test_hosts_that_are_neither_a_name_nor_an_address_are_errors(host: str) -> None:
    with pytest.raises(EgressPolicyError, match=r"not a valid|only IPv6"):
        EgressPolicy(allow=["**"]).check_host(host)


def test_destinations_are_normalised() -> None:
    assert str(parse_destination("API.Example.COM.")) == "api.example.com"
    assert str(parse_destination("[2001:DB8::1]")) == "2001:db8::1"
    assert parse_destination("10.0.0.1").address is not None


def test_invalid_rules_name_their_place() -> None:
    with pytest.raises(EgressPolicyError, match=r"egress\.deny\[1\]: .*'\*\*'"):
        EgressPolicy(allow=["a.com"], deny=["b.com", "a.**.com"])


def test_the_policy_comes_from_the_manifests_egress_section() -> None:
    policy = EgressPolicy.from_manifest(Egress(allow=("*.example.com",), deny=("x.example.com",)))
    assert policy.check_host("y.example.com")
    assert not policy.check_host("x.example.com")
