# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The KMS policy filters: statements from a build's measurements (docs/kms.md)."""

from __future__ import annotations

import hashlib

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.enclaveops.nitro.plugins.filter.kms_policy import (
    FilterModule,
    kms_attestation_statement,
    kms_deny_unattested,
)

ROLE = "arn:aws:iam::111122223333:role/parent"
MEASUREMENTS = {
    "HashAlgorithm": "Sha384 { ... }",
    "PCR0": "AB" * 48,
    "PCR1": "11" * 48,
    "PCR2": "22" * 48,
}
PREFIX = "kms:RecipientAttestation:"


def test_statement_pins_image_pcrs_in_lower_case() -> None:
    statement = kms_attestation_statement(MEASUREMENTS, ROLE)
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"AWS": ROLE}
    assert statement["Action"] == ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom"]
    assert statement["Condition"] == {
        "StringEqualsIgnoreCase": {
            PREFIX + "ImageSha384": "ab" * 48,
            PREFIX + "PCR0": "ab" * 48,
            PREFIX + "PCR1": "11" * 48,
            PREFIX + "PCR2": "22" * 48,
        }
    }


def test_pcr8_pcr3_and_pcr4_when_given() -> None:
    signed = dict(MEASUREMENTS, PCR8="88" * 48)
    conditions = kms_attestation_statement(
        signed, ROLE, parent_role_arn=ROLE, instance_id="i-0123456789abcdef0"
    )["Condition"]["StringEqualsIgnoreCase"]
    assert conditions[PREFIX + "PCR8"] == "88" * 48
    assert conditions[PREFIX + "PCR3"] == hashlib.sha384(bytes(48) + ROLE.encode()).hexdigest()
    assert conditions[PREFIX + "PCR4"] == (
        hashlib.sha384(bytes(48) + b"i-0123456789abcdef0").hexdigest()
    )


@pytest.mark.parametrize(
    ("measurements", "message"),
    [
        ({"PCR1": "11" * 48}, "PCR0 is required"),
        (dict(MEASUREMENTS, PCR0="00" * 48), "all zeros"),
        (dict(MEASUREMENTS, PCR1="xyz"), "measurements.PCR1 must be 96 hex digits"),
        ("ab" * 48, "must be the build's measurements"),
    ],
)
def test_bad_measurements_are_refused_naming_the_field(measurements, message) -> None:
    with pytest.raises(AnsibleFilterError, match=message):
        kms_attestation_statement(measurements, ROLE)


def test_deny_uses_null_on_a_real_condition_key() -> None:
    statement = kms_deny_unattested(ROLE)
    assert statement["Effect"] == "Deny"
    assert statement["Condition"] == {"Null": {PREFIX + "ImageSha384": "true"}}


def test_filters_are_registered() -> None:
    assert set(FilterModule().filters()) == {"kms_attestation_statement", "kms_deny_unattested"}
