"""The egress policy (docs/networking.md, "The policy"): which destinations the enclave may reach.

Deny by default. Each entry of ``allow`` and ``deny`` that parses as an IP address or a CIDR is an
IP rule; every other entry is a domain pattern, matched label by label from the right and without
regard to case, where ``*`` stands for exactly one label and a leftmost ``**`` for one or more.
A destination is allowed when an allow rule of its kind matches and no deny rule does: deny wins.

Like enclaver (``enclaver/src/policy/``), a request for an IP literal is judged by the IP rules and
a request for a name by the domain patterns. Unlike enclaver, the IP deny rules are also applied to
the address a name resolved to (:meth:`EgressPolicy.check_peer`), so a DNS name cannot smuggle
traffic to a denied address such as 169.254.169.254; names are normalised first (one trailing dot,
case), so ``Evil.COM.`` cannot slip past a deny of ``evil.com``; and an IPv4-mapped IPv6 address
is judged as the IPv4 address it carries.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.manifest import Egress, egress_rule_problem

IpAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IpNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_MAX_NAME_LENGTH = 253
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
# A last label of digits, or a hex number, is how inet_aton spells addresses ("127.1",
# "0x7f.1"): a resolver would turn such a "name" into an address the IP rules never saw.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")


class EgressPolicyError(FormatError):
    """An egress rule or a destination host that cannot be understood."""


@dataclass(frozen=True)
class Decision:
    """Whether a destination may be reached, and why (for logs and the 403 body)."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True)
class Destination:
    """A request's host, normalised: exactly one of ``name`` and ``address`` is set."""

    name: str | None = None
    address: IpAddress | None = None

    def __str__(self) -> str:
        if self.address is not None:
            return str(self.address)
        return str(self.name)


@dataclass(frozen=True)
class _DomainPattern:
    text: str
    labels: tuple[str, ...]  # right to left

    def matches(self, labels: tuple[str, ...]) -> bool:
        for index, part in enumerate(self.labels):
            if part == "**":
                return len(labels) > index
            if index >= len(labels) or (part != "*" and part != labels[index]):
                return False
        return len(labels) == len(self.labels)


@dataclass(frozen=True)
class _Rules:
    networks: tuple[IpNetwork, ...]
    domains: tuple[_DomainPattern, ...]

    @classmethod
    def parse(cls, entries: Iterable[str], what: str) -> _Rules:
        networks: list[IpNetwork] = []
        domains: list[_DomainPattern] = []
        for index, entry in enumerate(entries):
            problem = egress_rule_problem(entry)
            if problem:
                raise EgressPolicyError(f"egress.{what}[{index}]: {problem}")
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                labels = tuple(reversed(entry.lower().split(".")))
                domains.append(_DomainPattern(entry, labels))
        return cls(tuple(networks), tuple(domains))

    def network_for(self, address: IpAddress) -> IpNetwork | None:
        for candidate in _address_forms(address):
            for network in self.networks:
                if candidate.version == network.version and candidate in network:
                    return network
        return None

    def pattern_for(self, name: str) -> _DomainPattern | None:
        labels = tuple(reversed(name.split(".")))
        for pattern in self.domains:
            if pattern.matches(labels):
                return pattern
        return None


class EgressPolicy:
    """Allow and deny rules, checked for a requested host and for the address actually reached."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self._allow = _Rules.parse(allow, "allow")
        self._deny = _Rules.parse(deny, "deny")

    @classmethod
    def from_manifest(cls, egress: Egress) -> EgressPolicy:
        return cls(egress.allow, egress.deny)

    @property
    def denies_addresses(self) -> bool:
        """Whether any deny rule is an IP rule, so a name's resolved address must be checked."""
        return bool(self._deny.networks)

    def check_host(self, host: str) -> Decision:
        """Judge a requested host: an IP literal (IPv6 with or without brackets) or a name.

        Raises :class:`EgressPolicyError` for a host that is neither (the proxy answers 400).
        """
        destination = parse_destination(host)
        if destination.address is not None:
            return self.check_address(destination.address)
        name = str(destination.name)
        denied = self._deny.pattern_for(name)
        if denied is not None:
            return Decision(False, f"{name} matches the deny rule {denied.text!r}")
        allowed = self._allow.pattern_for(name)
        if allowed is None:
            return Decision(False, f"{name} matches no allow rule")
        return Decision(True, f"{name} matches the allow rule {allowed.text!r}")

    def check_address(self, address: IpAddress | str) -> Decision:
        """Judge an IP address requested as such: it needs an allow rule and no deny rule."""
        ip = _as_address(address)
        denied = self._deny.network_for(ip)
        if denied is not None:
            return Decision(False, f"{ip} is in the denied network {denied}")
        allowed = self._allow.network_for(ip)
        if allowed is None:
            return Decision(False, f"{ip} is in no allowed network")
        return Decision(True, f"{ip} is in the allowed network {allowed}")

    def check_peer(self, address: IpAddress | str) -> Decision:
        """Judge the address a name resolved to: only the deny rules apply (deny wins)."""
        ip = _as_address(address)
        denied = self._deny.network_for(ip)
        if denied is not None:
            return Decision(False, f"it resolved to {ip}, in the denied network {denied}")
        return Decision(True, f"{ip} is in no denied network")


def parse_destination(host: str) -> Destination:
    """A request's host as an address or a normalised name (lower case, no trailing dot)."""
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    if "%" not in bare:  # zone ids ("fe80::1%eth0") name interfaces the enclave does not have
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            pass
        else:
            if bracketed and address.version != 6:
                raise EgressPolicyError(f"{host!r}: only IPv6 addresses go in brackets")
            return Destination(address=address)
    if bracketed:
        raise EgressPolicyError(f"{host!r} is not a valid IPv6 address")
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    problem = _name_problem(name)
    if problem:
        raise EgressPolicyError(f"{host!r} is not a valid host name: {problem}")
    return Destination(name=name)


def _name_problem(name: str) -> str | None:
    if not name or len(name) > _MAX_NAME_LENGTH:
        return f"it must have 1 to {_MAX_NAME_LENGTH} characters"
    labels = name.split(".")
    if any(not _LABEL.match(label) for label in labels):
        return "labels hold letters, digits, '-' and '_' (at most 63, not starting with '-')"
    if _NUMERIC_LABEL.match(labels[-1]):
        return "it looks like an IP address but is not one in standard notation"
    return None


def _as_address(address: IpAddress | str) -> IpAddress:
    if isinstance(address, str):
        try:
            return ipaddress.ip_address(address)
        except ValueError as err:
            raise EgressPolicyError(f"{address!r} is not an IP address") from err
    return address


def _address_forms(address: IpAddress) -> tuple[IpAddress, ...]:
    """The address, and the IPv4 address an IPv4-mapped IPv6 address carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return (address, address.ipv4_mapped)
    return (address,)


__all__ = [
    "Decision",
    "Destination",
    "EgressPolicy",
    "EgressPolicyError",
    "parse_destination",
]
