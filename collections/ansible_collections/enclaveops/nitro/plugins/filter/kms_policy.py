# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Filters enclaveops.nitro.kms_attestation_statement and enclaveops.nitro.kms_deny_unattested.

They turn a build's measurements (what the eif, eif_info and image modules return) into KMS key
policy statements pinned to the enclave, as docs/kms.md describes.
"""

from __future__ import annotations

import hashlib
import re

from ansible.errors import AnsibleFilterError

DEFAULT_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom")
IMAGE_PCRS = ("PCR0", "PCR1", "PCR2", "PCR8")
PREFIX = "kms:RecipientAttestation:"
_HEX384 = re.compile(r"[0-9a-fA-F]{96}\Z")


def _pcr_of(value):
    """PCR3/PCR4 as Nitro computes them: the UTF-8 value extended into a zero register."""
    return hashlib.sha384(bytes(48) + value.encode("utf-8")).hexdigest()


def _measurement(measurements, name):
    value = measurements.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _HEX384.match(value):
        raise AnsibleFilterError(
            f"measurements.{name} must be 96 hex digits (a SHA-384 PCR), got {value!r}"
        )
    if set(value) == {"0"}:
        raise AnsibleFilterError(
            f"measurements.{name} is all zeros (a debug-mode value); pin the build's measurements"
        )
    return value.lower()


def _conditions(measurements, parent_role_arn, instance_id):
    if not isinstance(measurements, dict):
        raise AnsibleFilterError("the input must be the build's measurements (a mapping with PCR0)")
    pcr0 = _measurement(measurements, "PCR0")
    if pcr0 is None:
        raise AnsibleFilterError("measurements.PCR0 is required: pass the build's measurements")
    conditions = {PREFIX + "ImageSha384": pcr0}
    for name in IMAGE_PCRS:
        value = _measurement(measurements, name)
        if value is not None:
            conditions[PREFIX + name] = value
    if parent_role_arn:
        conditions[PREFIX + "PCR3"] = _pcr_of(parent_role_arn)
    if instance_id:
        conditions[PREFIX + "PCR4"] = _pcr_of(instance_id)
    return conditions


def kms_attestation_statement(
    measurements,
    principal,
    actions=DEFAULT_ACTIONS,
    *,
    parent_role_arn=None,
    instance_id=None,
    sid="AllowOnlyTheAttestedEnclave",
):
    """An Allow statement for ``principal`` that holds only for an enclave with these PCRs."""
    return {
        "Sid": sid,
        "Effect": "Allow",
        "Principal": {"AWS": principal},
        "Action": list(actions),
        "Resource": "*",
        "Condition": {
            "StringEqualsIgnoreCase": _conditions(measurements, parent_role_arn, instance_id)
        },
    }


def kms_deny_unattested(principal, actions=DEFAULT_ACTIONS, sid="DenyWithoutAttestation"):
    """A Deny for requests without a valid attestation document.

    ``Null`` is evaluated on ``kms:RecipientAttestation:ImageSha384``, a real condition key that
    is present only when KMS verified the request's Recipient (``kms:RecipientAttestation``
    alone is not a key, so a Null on it would always be true and deny everything).
    """
    return {
        "Sid": sid,
        "Effect": "Deny",
        "Principal": {"AWS": principal},
        "Action": list(actions),
        "Resource": "*",
        "Condition": {"Null": {PREFIX + "ImageSha384": "true"}},
    }


class FilterModule:
    def filters(self):
        return {
            "kms_attestation_statement": kms_attestation_statement,
            "kms_deny_unattested": kms_deny_unattested,
        }
