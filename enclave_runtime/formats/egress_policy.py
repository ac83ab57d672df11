"""The egress policy (docs/networking.md, "The policy"): which destinations the enclave may reach.

Deny by default. Each entry of ``allow`` and ``deny`` that parses as an IP address or a CIDR is an
IP rule; every other entry is a domain pattern, matched label by label from the right and without
regard to case, where ``*`` stands for exactly one label and a leftmost ``**`` for one or more.
A destination is allowed when an allow rule of its kind matches and no deny rule does: deny wins.

Like enclaver (``enclaver/src/policy/``), a request for an IP literal is judged by the IP rules and
a request for a name by the domain patterns. Unlike enclaver, the IP deny rules are also applied to
the address a name resolved to (:meth:`EgressPolicy.check_peer`), so a DNS name cannot smuggle
traffic to a denied address such as 169.254.169.254; names are normalised first (one trailing dot,
case), so ``Evil.COM.`` cannot slip past a deny of ``evil.com``; and an IPv6 address that embeds
an IPv4 address (IPv4-mapped, IPv4-compatible, SIIT, NAT64, 6to4, Teredo) meets the deny rules
as that IPv4 address too.

Safe defaults (docs/networking.md, "Denied by default"): loopback, link-local (with IMDS,
169.254.169.254) and the EC2 IPv6 services range fd00:ec2::/32 are denied however they are
reached, by literal, by a name that resolved there, or by the loopback names ``localhost`` and
``host``, even under ``allow: ["**"]`` or ``allow: [0.0.0.0/0]``. An explicit IP allow inside such
a range (``169.254.169.254``) lifts the default for it; a loopback name must be allowed by its
exact name (``host``).
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
DEFAULT_DENIED_NETWORKS: tuple[IpNetwork, ...] = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",  # "this network": connecting to 0.0.0.0 reaches the local host
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, with IMDS at 169.254.169.254
        "::/128",
        "::1/128",
        "fe80::/10",
        "fd00:ec2::/32",  # EC2's IPv6 services: IMDS fd00:ec2::254, DNS fd00:ec2::253
    )
)
# Names that reach the parent's own loopback: enclaver's "host" (docs/networking.md) and the
# localhost names of RFC 6761.
LOOPBACK_NAMES = ("host", "localhost")
_NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"),)
_SIIT_PREFIX = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE_PREFIX = ipaddress.ip_network("::/96")


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

    def network_for(self, address: IpAddress, *, embedded: bool = True) -> IpNetwork | None:
        """The first rule network holding ``address`` or, when ``embedded``, an IPv4 address
        it embeds; allow rules pass ``embedded=False`` and see only the IPv4-mapped form."""
        forms = embedded_forms(address) if embedded else _mapped_forms(address)
        for candidate in forms:
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

    def names_exactly(self, name: str) -> bool:
        return any(pattern.labels == tuple(reversed(name.split("."))) for pattern in self.domains)

    def lifts_default(self, address: IpAddress, default: IpNetwork) -> bool:
        """An allow network inside ``default`` that holds ``address``: an explicit opt-in."""
        return any(
            network.version == default.version
            and network.subnet_of(default)  # type: ignore[arg-type]
            and address in network
            for network in self.networks
        )


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
        if _is_loopback_name(name) and not self._allow.names_exactly(name):
            return Decision(
                False,
                f"{name} reaches the parent's loopback, denied by default; "
                f"allow it by its exact name (egress.allow: [{name}])",
            )
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
        default = self._default_denial(ip)
        if default is not None:
            return Decision(False, f"{ip} is {_default_reason(*default)}")
        allowed = self._allow.network_for(ip, embedded=False)
        if allowed is None:
            return Decision(False, f"{ip} is in no allowed network")
        return Decision(True, f"{ip} is in the allowed network {allowed}")

    def check_peer(self, address: IpAddress | str, name: str | None = None) -> Decision:
        """Judge the address a name resolved to: the deny rules and the safe defaults apply.

        ``name`` is the requested name: a loopback name allowed by its exact name may reach
        loopback (that is what allowing ``host`` means).
        """
        ip = _as_address(address)
        denied = self._deny.network_for(ip)
        if denied is not None:
            return Decision(False, f"it resolved to {ip}, in the denied network {denied}")
        default = self._default_denial(ip)
        if default is not None and not self._named_loopback(name, ip):
            return Decision(False, f"it resolved to {ip}, {_default_reason(*default)}")
        return Decision(True, f"{ip} is in no denied network")

    def _default_denial(self, ip: IpAddress) -> tuple[IpAddress, IpNetwork] | None:
        """The (form of ``ip``, default network) that denies it, unless explicitly allowed."""
        for form in embedded_forms(ip):
            for network in DEFAULT_DENIED_NETWORKS:
                if (
                    form.version == network.version
                    and form in network
                    and not self._allow.lifts_default(form, network)
                ):
                    return form, network
        return None

    def _named_loopback(self, name: str | None, ip: IpAddress) -> bool:
        if name is None:
            return False
        normalised = name.lower().rstrip(".")
        return (
            _is_loopback_name(normalised)
            and self._allow.names_exactly(normalised)
            and any(form.is_loopback for form in embedded_forms(ip))
        )


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


def _is_loopback_name(name: str) -> bool:
    return name in LOOPBACK_NAMES or name.endswith(".localhost")


def _default_reason(form: IpAddress, network: IpNetwork) -> str:
    return (
        f"in {network} (loopback, link-local or instance metadata), denied by default; "
        f"allow it explicitly with an IP rule (egress.allow: [{form}])"
    )


def _mapped_forms(address: IpAddress) -> tuple[IpAddress, ...]:
    """The address, and the IPv4 address an IPv4-mapped IPv6 address carries (the one a
    dual-stack socket connects to)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return (address, address.ipv4_mapped)
    return (address,)


def _carries_low32(address: ipaddress.IPv6Address) -> bool:
    if address in _SIIT_PREFIX or any(address in prefix for prefix in _NAT64_PREFIXES):
        return True
    return address in _COMPATIBLE_PREFIX and int(address) > 1  # not :: or ::1 themselves


def embedded_forms(address: IpAddress) -> tuple[IpAddress, ...]:
    """The address and every IPv4 address it embeds: IPv4-mapped (``::ffff:a.b.c.d``),
    IPv4-compatible (``::a.b.c.d``), SIIT (``::ffff:0:a.b.c.d``), NAT64 (``64:ff9b::/96``),
    6to4 (``2002::/16``) and Teredo (server and client)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return (address,)
    forms: list[IpAddress] = [address]
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        forms.append(address.ipv4_mapped)
    elif _carries_low32(address):
        forms.append(low32)
    if address.sixtofour is not None:
        forms.append(address.sixtofour)
    if address.teredo is not None:
        forms.extend(address.teredo)
    return tuple(forms)


__all__ = [
    "DEFAULT_DENIED_NETWORKS",
    "Decision",
    "Destination",
    "EgressPolicy",
    "EgressPolicyError",
    "embedded_forms",
    "parse_destination",
]
