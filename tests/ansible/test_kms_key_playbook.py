"""playbooks/kms-key.yml against the emulated KMS: the filter's policy, applied by
amazon.aws.kms_key, lets only the attested enclave decrypt (docs/kms.md)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.emulator.aws_endpoints import AwsEndpoints
from enclave_runtime.emulator.aws_kms import KmsFault
from enclave_runtime.emulator.aws_services import start_emulated_aws
from enclave_runtime.emulator.ca import EmulatorCA
from tests.ansible.playbook_runner import run_playbook
from tests.kms_support import PCR0, REGION, boto_client, emulated_attest, imds_credentials, pcrs_for
from tests.unit.odyn_support import run_async

pytestmark = [pytest.mark.slow]

PRINCIPAL = "arn:aws:iam::111122223333:role/parent"
MEASUREMENTS = {"PCR0": PCR0.hex(), "PCR1": "11" * 48, "PCR2": "22" * 48}


@pytest.fixture
def emulated(tmp_path: Path) -> Iterator[AwsEndpoints]:
    running = start_emulated_aws(tmp_path, REGION)
    yield running
    running.close()


def _apply(emulated: AwsEndpoints, tmp_path: Path) -> Any:
    measurements = tmp_path / "measurements.json"
    measurements.write_text(json.dumps(MEASUREMENTS))
    creds = {f"kms_{k}": v for k, v in imds_credentials(emulated.imds_port).items()}
    extra = {
        "kms_measurements_file": str(measurements),
        "kms_principal": PRINCIPAL,
        "kms_admin": "arn:aws:iam::111122223333:root",
        "kms_endpoint_url": f"https://127.0.0.1:{emulated.kms_port}",
        "kms_ca_bundle": str(tmp_path / "aws" / "ca.pem"),
        **creds,
    }
    return run_playbook("kms-key.yml", "-e", json.dumps(extra), timeout=300)


def _recipient(tmp_path: Path, pcr0: bytes) -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    document = run_async(emulated_attest(EmulatorCA(tmp_path / "ca"), pcrs_for(pcr0))(spki))
    return {
        "AttestationDocument": base64.b64encode(document).decode(),
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
    }


def test_the_applied_policy_admits_only_the_attested_enclave(
    emulated: AwsEndpoints, tmp_path: Path
) -> None:
    first = _apply(emulated, tmp_path)
    assert first.returncode == 0, first.output[-3000:]
    assert first.changed == 1
    again = _apply(emulated, tmp_path)
    assert again.returncode == 0 and again.changed == 0, again.output[-3000:]

    kms = emulated.kms
    (key_id,) = kms.keys
    blob = kms.handle("Encrypt", {"KeyId": key_id, "Plaintext": base64.b64encode(b"s").decode()})
    decrypt = {"CiphertextBlob": blob["CiphertextBlob"]}
    answer = kms.handle("Decrypt", {**decrypt, "Recipient": _recipient(tmp_path, PCR0)})
    assert "CiphertextForRecipient" in answer
    for recipient in ({}, {"Recipient": _recipient(tmp_path, bytes(48))}):
        with pytest.raises(KmsFault) as denied:
            kms.handle("Decrypt", {**decrypt, **recipient})
        assert denied.value.kind == "AccessDeniedException"


def test_boto3_sees_the_alias_and_the_pinned_policy(emulated: AwsEndpoints, tmp_path: Path) -> None:
    assert _apply(emulated, tmp_path).returncode == 0
    creds = imds_credentials(emulated.imds_port)
    client = boto_client(
        f"https://127.0.0.1:{emulated.kms_port}",
        verify=str(tmp_path / "aws" / "ca.pem"),
        credentials={
            "aws_access_key_id": creds["access_key"],
            "aws_secret_access_key": creds["secret_key"],
            "aws_session_token": creds["session_token"],
        },
    )
    policy = json.loads(client.get_key_policy(KeyId="alias/enclave-secrets")["Policy"])
    allow, deny = policy["Statement"][1:]
    assert (
        allow["Condition"]["StringEqualsIgnoreCase"]["kms:RecipientAttestation:ImageSha384"]
        == PCR0.hex()
    )
    assert deny["Condition"] == {"Null": {"kms:RecipientAttestation:ImageSha384": "true"}}
