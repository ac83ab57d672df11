"""Build-time checks of a manifest's ``kms_proxy`` against its egress policy (docs/kms.md).

The KMS proxy reaches IMDS (169.254.169.254) and the KMS endpoint only through egress, so a
policy that blocks either would make every KMS call fail at run time; the manifest is refused
instead, naming the entry to add.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

IMDS_ADDRESS = "169.254.169.254"
# When kms_proxy.endpoints names no region, the proxy uses kms.<region>.amazonaws.com for the
# region the application signs for; the policy must allow that name for at least one region.
COMMON_REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "eu-west-1", "eu-west-2", "eu-west-3",
    "eu-central-1", "eu-north-1", "ap-south-1", "ap-southeast-1", "ap-southeast-2",
    "ap-northeast-1", "ap-northeast-2", "ca-central-1", "sa-east-1",
)  # fmt: skip

Finding = tuple[tuple[str, ...], str]


def kms_egress_findings(doc: dict[str, Any]) -> Iterator[Finding]:
    """What in ``egress`` keeps the configured KMS proxy from IMDS or KMS; nothing if fine.

    Malformed entries are left to the schema and egress checks, which name them.
    """
    kms = doc.get("kms_proxy")
    egress = doc.get("egress")
    if not isinstance(kms, dict) or not isinstance(egress, dict) or not egress.get("allow"):
        return  # no proxy, or no egress at all (the manifest's own check reports that)
    # egress_policy imports the manifest module, which imports this one: import when called.
    from enclave_runtime.formats.egress_policy import EgressPolicy  # noqa: PLC0415

    try:
        policy = EgressPolicy(egress.get("allow") or (), egress.get("deny") or ())
    except (ValueError, TypeError, AttributeError):
        return
    imds = _blocked(policy, IMDS_ADDRESS)
    if imds:
        yield (
            ("egress", "allow"),
            f"blocks IMDS, which kms_proxy needs for the parent's credentials ({imds}); "
            f"add {IMDS_ADDRESS} to egress.allow",
        )
    endpoints = kms.get("endpoints")
    if isinstance(endpoints, dict) and endpoints:
        for region, endpoint in sorted(endpoints.items(), key=lambda item: str(item[0])):
            host = str(endpoint).rsplit(":", 1)[0]
            reason = _blocked(policy, host)
            if reason:
                yield (
                    ("kms_proxy", "endpoints", str(region)),
                    f"{host} is blocked by egress ({reason}); add it to egress.allow",
                )
    elif all(_blocked(policy, f"kms.{region}.amazonaws.com") for region in COMMON_REGIONS):
        yield (
            ("egress", "allow"),
            "blocks every KMS endpoint, which kms_proxy forwards to; add kms.*.amazonaws.com "
            "(or kms.<region>.amazonaws.com) to egress.allow",
        )


def _blocked(policy: Any, host: str) -> str | None:
    """Why ``policy`` refuses ``host``; None when it is allowed or not a host at all."""
    try:
        decision = policy.check_host(host)
    except ValueError:
        return None
    return None if decision.allowed else decision.reason
