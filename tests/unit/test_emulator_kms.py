"""The emulated KMS and IMDS: SigV4, key policies, attested recipients, and the shapes of
botocore's KMS model; the plain operations side by side with moto's KMS."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.exceptions import ClientError
from botocore.validate import ParamValidator
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclave_runtime.emulator.aws_endpoints import (
    AwsEndpoints,
    check_signature,
    new_credentials,
    start_aws_endpoints,
)
from enclave_runtime.emulator.aws_kms import KmsFault, KmsService
from enclave_runtime.emulator.ca import EmulatorCA
from enclave_runtime.emulator.kms_policy import PolicyError, check_policy, is_allowed
from enclave_runtime.formats.kms_envelope import open_envelope
from tests.kms_support import PCR0, REGION, emulated_attest, pcrs_for, tls_pair
from tests.unit.odyn_support import run_async

ATTESTED = {"kms:RecipientAttestation:ImageSha384": PCR0.hex()}
KMS_MODEL = botocore.session.get_session().get_service_model("kms")


def _policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


PINNED = {
    "Effect": "Allow",
    "Action": "kms:Decrypt",
    "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0.hex()}},
}


def test_pinned_statement_matches_only_the_attested_image_ignoring_case() -> None:
    policy = _policy(PINNED)
    assert is_allowed(policy, "Decrypt", ATTESTED)
    upper = {"kms:RecipientAttestation:ImageSha384": PCR0.hex().upper()}
    assert is_allowed(policy, "Decrypt", upper)
    assert not is_allowed(policy, "Decrypt", {})
    assert not is_allowed(policy, "Decrypt", {"kms:RecipientAttestation:ImageSha384": "00" * 48})
    assert not is_allowed(policy, "Encrypt", ATTESTED)


def test_deny_on_null_attestation_key_denies_non_attested_use() -> None:
    policy = _policy(
        {"Effect": "Allow", "Action": "kms:*"},
        {
            "Effect": "Deny",
            "Action": "kms:Decrypt",
            "Condition": {"Null": {"kms:RecipientAttestation:ImageSha384": "true"}},
        },
    )
    assert not is_allowed(policy, "Decrypt", {})
    assert is_allowed(policy, "Decrypt", ATTESTED)
    assert is_allowed(policy, "Encrypt", {})


def test_unknown_condition_operators_are_refused_not_ignored() -> None:
    statement = {"Effect": "Allow", "Action": "kms:*", "Condition": {"Bool": {"aws:x": "true"}}}
    with pytest.raises(PolicyError, match="Bool is not supported"):
        check_policy(_policy(statement))


def test_if_exists_holds_for_absent_keys() -> None:
    statement = {
        "Effect": "Allow",
        "Action": "kms:Decrypt",
        "Condition": {"StringEqualsIfExists": {"kms:RecipientAttestation:PCR3": "aa"}},
    }
    assert is_allowed(_policy(statement), "Decrypt", {})
    assert not is_allowed(_policy(statement), "Decrypt", {"kms:RecipientAttestation:PCR3": "bb"})


# --- the service -----------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[KmsService, EmulatorCA]]:
    ca = EmulatorCA(tmp_path / "ca")
    yield KmsService(ca.root.certificate, REGION), ca


def _recipient(ca: EmulatorCA, pcr0: bytes) -> tuple[rsa.RSAPrivateKey, dict[str, str]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    document = run_async(emulated_attest(ca, pcrs_for(pcr0))(spki))
    return key, {
        "AttestationDocument": base64.b64encode(document).decode(),
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
    }


def test_recipient_gets_a_cms_envelope_and_no_plaintext(service: Any) -> None:
    kms, ca = service
    key_id = kms.handle("CreateKey", {"Policy": json.dumps(_policy(PINNED))})["KeyMetadata"]
    plaintext = base64.b64encode(b"secret").decode()
    kms.keys[key_id["KeyId"]].policy = _policy({"Effect": "Allow", "Action": "kms:*"})
    blob = kms.handle("Encrypt", {"KeyId": key_id["KeyId"], "Plaintext": plaintext})
    kms.keys[key_id["KeyId"]].policy = _policy(PINNED)
    private, recipient = _recipient(ca, PCR0)
    answer = kms.handle(
        "Decrypt", {"CiphertextBlob": blob["CiphertextBlob"], "Recipient": recipient}
    )
    assert "Plaintext" not in answer
    sealed = base64.b64decode(answer["CiphertextForRecipient"])
    assert open_envelope(sealed, private) == b"secret"
    with pytest.raises(KmsFault) as denied:
        kms.handle("Decrypt", {"CiphertextBlob": blob["CiphertextBlob"]})
    assert denied.value.kind == "AccessDeniedException"


def test_a_document_from_another_root_is_refused(service: Any, tmp_path: Path) -> None:
    kms, _ = service
    _, recipient = _recipient(EmulatorCA(tmp_path / "other"), PCR0)
    with pytest.raises(KmsFault, match="AttestationDocument is not valid"):
        kms.handle("GenerateRandom", {"NumberOfBytes": 8, "Recipient": recipient})


def test_derive_shared_secret_with_an_attested_recipient(service: Any) -> None:
    kms, ca = service
    created = kms.handle("CreateKey", {"KeySpec": "ECC_NIST_P256", "KeyUsage": "KEY_AGREEMENT"})
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private, recipient = _recipient(ca, PCR0)
    answer = kms.handle(
        "DeriveSharedSecret",
        {
            "KeyId": created["KeyMetadata"]["KeyId"],
            "KeyAgreementAlgorithm": "ECDH",
            "PublicKey": base64.b64encode(peer_der).decode(),
            "Recipient": recipient,
        },
    )
    secret = open_envelope(base64.b64decode(answer["CiphertextForRecipient"]), private)
    kms_public = kms.keys[created["KeyMetadata"]["KeyId"]].private_key.public_key()
    assert secret == peer.exchange(ec.ECDH(), kms_public)


# --- over HTTPS, with botocore ------------------------------------------------------------------


@pytest.fixture
def endpoints(tmp_path: Path) -> Iterator[tuple[AwsEndpoints, str]]:
    ca = EmulatorCA(tmp_path / "ca")
    server_tls, _ = tls_pair(tmp_path)
    running = start_aws_endpoints(KmsService(ca.root.certificate, REGION), server_tls)
    yield running, str(tmp_path / "ca.pem")
    running.close()


def _client(endpoints: AwsEndpoints, cafile: str, **override: str) -> Any:
    creds = endpoints.imds.credentials
    session = botocore.session.get_session()
    return session.create_client(
        "kms",
        region_name=endpoints.kms.region,
        endpoint_url=f"https://127.0.0.1:{endpoints.kms_port}",
        verify=cafile,
        aws_access_key_id=override.get("access_key", creds.access_key),
        aws_secret_access_key=override.get("secret_key", creds.secret_key),
        aws_session_token=creds.token,
    )


def _plain_operations(client: Any) -> dict[str, Any]:
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    encrypted = client.encrypt(KeyId=key_id, Plaintext=b"plain", EncryptionContext={"a": "b"})
    return {
        "DescribeKey": client.describe_key(KeyId=key_id),
        "Encrypt": encrypted,
        "Decrypt": client.decrypt(
            CiphertextBlob=encrypted["CiphertextBlob"], EncryptionContext={"a": "b"}
        ),
        "GenerateDataKey": client.generate_data_key(KeyId=key_id, KeySpec="AES_256"),
        "GenerateRandom": client.generate_random(NumberOfBytes=16),
    }


def _check_output_shape(operation: str, answer: dict[str, Any]) -> None:
    shape = KMS_MODEL.operation_model(operation).output_shape
    body = {k: v for k, v in answer.items() if k != "ResponseMetadata"}
    report = ParamValidator().validate(body, shape)
    assert not report.has_errors(), report.generate_report()


def test_answers_follow_botocores_model(endpoints: Any) -> None:
    running, cafile = endpoints
    answers = _plain_operations(_client(running, cafile))
    for operation, answer in answers.items():
        _check_output_shape(operation, answer)
    assert answers["Decrypt"]["Plaintext"] == b"plain"


def test_plain_operations_answer_with_the_same_fields_as_moto(endpoints: Any) -> None:
    import boto3
    from moto import mock_aws

    running, cafile = endpoints
    ours = _plain_operations(_client(running, cafile))
    with mock_aws():
        moto = _plain_operations(
            boto3.client(
                "kms", region_name=REGION, aws_access_key_id="a", aws_secret_access_key="b"
            )
        )
    for operation in ours:
        assert set(moto[operation]) <= set(ours[operation]), operation
    assert ours["Decrypt"]["Plaintext"] == moto["Decrypt"]["Plaintext"] == b"plain"
    assert len(ours["GenerateDataKey"]["Plaintext"]) == len(moto["GenerateDataKey"]["Plaintext"])


def test_a_wrong_secret_key_is_an_invalid_signature(endpoints: Any) -> None:
    running, cafile = endpoints
    with pytest.raises(ClientError) as raised:
        _client(running, cafile, secret_key="wrong").generate_random(NumberOfBytes=4)
    assert raised.value.response["Error"]["Code"] == "InvalidSignatureException"


def test_unknown_credentials_are_unrecognized(endpoints: Any) -> None:
    running, cafile = endpoints
    with pytest.raises(ClientError) as raised:
        _client(running, cafile, access_key="ASIAOTHER").generate_random(NumberOfBytes=4)
    assert raised.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_a_stale_signature_is_refused() -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    creds = new_credentials()
    request = AWSRequest(
        method="POST", url="https://kms.test/", data=b"{}", headers={"Host": "kms.test"}
    )
    SigV4Auth(Credentials(creds.access_key, creds.secret_key, creds.token), "kms", REGION).add_auth(
        request
    )
    headers = dict(request.headers.items())
    assert check_signature("POST", "https://kms.test/", headers, b"{}", credentials=creds) == REGION
    later = datetime.now(timezone.utc) + timedelta(minutes=6)
    with pytest.raises(KmsFault, match="expired"):
        check_signature("POST", "https://kms.test/", headers, b"{}", credentials=creds, now=later)
    with pytest.raises(KmsFault, match="does not match"):
        check_signature("POST", "https://kms.test/", headers, b"{ }", credentials=creds)


def test_imds_requires_a_v2_token(endpoints: Any) -> None:
    running, _ = endpoints
    base = f"http://127.0.0.1:{running.imds_port}"
    path = "/latest/meta-data/iam/security-credentials/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + path, timeout=5)
    assert refused.value.code == 401
    put = urllib.request.Request(
        base + "/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    token = urllib.request.urlopen(put, timeout=5).read().decode()
    listed = urllib.request.Request(base + path, headers={"X-aws-ec2-metadata-token": token})
    role = urllib.request.urlopen(listed, timeout=5).read().decode()
    document = urllib.request.Request(
        base + path + role, headers={"X-aws-ec2-metadata-token": token}
    )
    creds = json.loads(urllib.request.urlopen(document, timeout=5).read())
    assert creds["AccessKeyId"] == running.imds.credentials.access_key
    expires = datetime.strptime(creds["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    assert expires.replace(tzinfo=timezone.utc).timestamp() > time.time() + 3600


def test_aws_services_publish_the_routes_a_sleeve_uses(tmp_path: Path) -> None:
    from enclave_runtime.emulator.aws_services import emulated_routes, start_emulated_aws

    assert emulated_routes(tmp_path) == {}
    running = start_emulated_aws(tmp_path, "eu-west-1")
    try:
        assert emulated_routes(tmp_path) == running.routes()
        assert ("kms.eu-west-1.amazonaws.com", 443) in running.routes()
        client = _client(running, str(tmp_path / "aws" / "ca.pem"))
        assert len(client.generate_random(NumberOfBytes=5)["Plaintext"]) == 5
    finally:
        running.close()
