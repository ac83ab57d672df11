"""odyn's KMS proxy end to end in one process: boto3 -> proxy -> egress -> emulated IMDS/KMS."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_runtime.formats.kms_envelope import seal_envelope
from enclave_runtime.odyn.http import HttpError
from enclave_runtime.odyn.kms_proxy import (
    CredentialCache,
    KmsProxyError,
    UpstreamResponse,
    credential_scope,
    revealed,
    start_kms_proxy,
    with_recipient,
)
from tests.kms_support import PCR0, boto_client, kms_path, pcrs_for
from tests.unit.odyn_support import in_executor, run_async


def pinned_policy(pcr0: bytes) -> str:
    """Encrypt for anyone in the account; Decrypt only for an enclave whose PCR0 matches."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["kms:Encrypt", "kms:DescribeKey"]},
                {
                    "Effect": "Allow",
                    "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                    "Condition": {
                        "StringEqualsIgnoreCase": {
                            "kms:RecipientAttestation:ImageSha384": pcr0.hex()
                        }
                    },
                },
            ],
        }
    )


def _scenario(fabric_root: Path, tmp_path: Path, pcrs: dict[int, bytes], work: Any) -> Any:
    async def run() -> Any:
        async with kms_path(fabric_root, tmp_path, pcrs) as path:
            key = path.endpoints.kms.handle("CreateKey", {"Policy": pinned_policy(PCR0)})
            client = boto_client(path.proxy_url)
            return await in_executor(work, client, key["KeyMetadata"]["KeyId"])

    return run_async(run(), timeout=60)


def test_boto3_decrypts_through_the_proxy_when_pcr0_matches(
    fabric_root: Path, tmp_path: Path
) -> None:
    def work(client: Any, key_id: str) -> Any:
        blob = client.encrypt(KeyId=key_id, Plaintext=b"the secret")["CiphertextBlob"]
        return client.decrypt(CiphertextBlob=blob)

    answer = _scenario(fabric_root, tmp_path, pcrs_for(PCR0), work)
    assert answer["Plaintext"] == b"the secret"
    assert "CiphertextForRecipient" not in answer


def test_another_pcr0_gets_access_denied(fabric_root: Path, tmp_path: Path) -> None:
    def work(client: Any, key_id: str) -> Any:
        blob = client.encrypt(KeyId=key_id, Plaintext=b"the secret")["CiphertextBlob"]
        with pytest.raises(ClientError) as raised:
            client.decrypt(CiphertextBlob=blob)
        return raised.value.response["Error"]["Code"]

    changed = bytes.fromhex("ac" + "ab" * 47)
    assert _scenario(fabric_root, tmp_path, pcrs_for(changed), work) == "AccessDeniedException"


def test_debug_mode_zero_pcrs_get_access_denied(fabric_root: Path, tmp_path: Path) -> None:
    def work(client: Any, key_id: str) -> Any:
        with pytest.raises(ClientError) as raised:
            client.generate_data_key(KeyId=key_id, KeySpec="AES_256")
        return raised.value.response["Error"]["Code"]

    zeros = {index: bytes(48) for index in range(16)}
    assert _scenario(fabric_root, tmp_path, zeros, work) == "AccessDeniedException"


def test_generate_data_key_and_random_work_through_the_proxy(
    fabric_root: Path, tmp_path: Path
) -> None:
    def work(client: Any, key_id: str) -> Any:
        data_key = client.generate_data_key(KeyId=key_id, KeySpec="AES_256")
        again = client.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"]
        return data_key, again, client.generate_random(NumberOfBytes=24)

    data_key, again, random = _scenario(fabric_root, tmp_path, pcrs_for(PCR0), work)
    assert len(data_key["Plaintext"]) == 32
    assert again == data_key["Plaintext"]
    assert len(random["Plaintext"]) == 24


def test_non_200_answers_pass_through(fabric_root: Path, tmp_path: Path) -> None:
    def work(client: Any, key_id: str) -> Any:
        with pytest.raises(ClientError) as raised:
            client.describe_key(KeyId="1234abcd-12ab-34cd-56ef-1234567890ab")
        return raised.value.response

    response = _scenario(fabric_root, tmp_path, pcrs_for(PCR0), work)
    assert response["Error"]["Code"] == "NotFoundException"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_credentials_come_from_imds_and_are_cached(fabric_root: Path, tmp_path: Path) -> None:
    async def run() -> Any:
        async with kms_path(fabric_root, tmp_path, pcrs_for(PCR0)) as path:
            cache = path.proxy.credentials
            first = await in_executor(cache.get)
            second = await in_executor(cache.get)
            return first, second, path.endpoints.imds.credentials

    first, second, issued = run_async(run())
    assert first is second
    assert first.access_key == issued.access_key and first.token == issued.token


class _Imds:
    def __init__(self, expirations: list[str]) -> None:
        self.expirations = expirations
        self.fetches = 0

    def imds(self, method: str, path: str, headers: dict[str, str]) -> UpstreamResponse:
        if path.endswith("/api/token"):
            return UpstreamResponse(200, (), b"token")
        if path.endswith("/security-credentials/"):
            return UpstreamResponse(200, (), b"role")
        self.fetches += 1
        doc = {
            "AccessKeyId": f"AK{self.fetches}",
            "SecretAccessKey": "s",
            "Token": "t",
            "Expiration": self.expirations[self.fetches - 1],
        }
        return UpstreamResponse(200, (), json.dumps(doc).encode())

    def kms(self, authority: str, headers: dict[str, str], body: bytes) -> UpstreamResponse:
        raise AssertionError("not used")


def test_credentials_are_refetched_before_they_expire() -> None:
    now = [1_700_000_000.0]  # 2023-11-14T22:13:20Z
    imds = _Imds(["2023-11-14T23:13:20Z", "2023-11-15T05:13:20Z"])
    cache = CredentialCache(imds, clock=lambda: now[0])
    assert cache.get().access_key == "AK1"
    now[0] += 3600 - 301
    assert cache.get().access_key == "AK1"
    now[0] += 2  # within the margin before expiry
    assert cache.get().access_key == "AK2"


def test_imds_refusal_names_the_fix() -> None:
    class Refusing(_Imds):
        def imds(self, method: str, path: str, headers: dict[str, str]) -> UpstreamResponse:
            return UpstreamResponse(403, (), b"")

    with pytest.raises(KmsProxyError, match=r"allow 169\.254\.169\.254 in egress\.allow"):
        CredentialCache(Refusing([])).get()


def test_credential_scope_gives_region_and_refuses_other_services() -> None:
    header = (
        "AWS4-HMAC-SHA256 Credential=AKID/20250101/eu-west-2/kms/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64
    )
    assert credential_scope(header) == ("eu-west-2", "kms")
    with pytest.raises(HttpError, match="service s3"):
        credential_scope(header.replace("/kms/", "/s3/"))
    with pytest.raises(HttpError, match="not SigV4-signed"):
        credential_scope(None)


def test_recipient_replaces_the_applications_own() -> None:
    body = json.dumps({"KeyId": "k", "Recipient": {"AttestationDocument": "b3RoZXI="}}).encode()
    fields = json.loads(with_recipient(body, b"doc"))
    assert fields["Recipient"] == {
        "AttestationDocument": base64.b64encode(b"doc").decode(),
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
    }
    assert fields["KeyId"] == "k"


@pytest.mark.parametrize(
    ("operation", "field"),
    [
        ("Decrypt", "Plaintext"),
        ("GenerateDataKeyPair", "PrivateKeyPlaintext"),
        ("DeriveSharedSecret", "SharedSecret"),
    ],
)
def test_revealed_puts_plaintext_where_kms_would(operation: str, field: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sealed = base64.b64encode(seal_envelope(b"plain", key.public_key())).decode()
    answer = json.loads(revealed(operation, json.dumps({"CiphertextForRecipient": sealed}), key))
    assert base64.b64decode(answer[field]) == b"plain"
    assert "CiphertextForRecipient" not in answer


def test_ciphertext_for_another_key_is_never_returned() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    ours = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sealed = base64.b64encode(seal_envelope(b"plain", other.public_key())).decode()
    with pytest.raises(KmsProxyError, match="for another key"):
        revealed("Decrypt", json.dumps({"CiphertextForRecipient": sealed}).encode(), ours)
    with pytest.raises(KmsProxyError, match="without a CiphertextForRecipient"):
        revealed("Decrypt", json.dumps({"Plaintext": "cGxhaW4="}).encode(), ours)


def test_proxy_without_egress_is_refused_with_the_fix() -> None:
    from enclave_runtime.formats.manifest import KmsProxy

    async def attest(public_key: bytes) -> bytes:
        return b""

    with pytest.raises(KmsProxyError, match=r"egress\.allow"):
        run_async(start_kms_proxy(KmsProxy(listen_port=0), None, attest))


def test_env_points_both_variables_at_the_proxy(fabric_root: Path, tmp_path: Path) -> None:
    async def run() -> Any:
        async with kms_path(fabric_root, tmp_path, pcrs_for(PCR0)) as path:
            return path.proxy.env(), path.proxy.port

    env, port = run_async(run())
    assert env == {
        "AWS_KMS_ENDPOINT": f"http://127.0.0.1:{port}",
        "AWS_ENDPOINT_URL_KMS": f"http://127.0.0.1:{port}",
    }


@functools.lru_cache(maxsize=1)
def _proxy_key() -> Any:
    """One RSA key for every example."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(lambda v: json.dumps(v).encode(), JSON_VALUES),
        st.builds(
            lambda v: json.dumps({"CiphertextForRecipient": v}).encode(),
            st.text(max_size=40) | st.builds(lambda b: base64.b64encode(b).decode(), st.binary()),
        ),
    )
)
def test_any_kms_answer_is_opened_or_refused_with_a_proxy_error(body: bytes) -> None:
    with contextlib.suppress(KmsProxyError):
        revealed("Decrypt", body, _proxy_key())
        raise AssertionError("a forged answer was opened")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_authorization_header_gives_a_scope_or_a_400(header: str) -> None:
    try:
        region, service = credential_scope(header)
    except HttpError as err:
        assert err.status == 400
    else:
        assert service == "kms" and region


def test_generate_data_key_pair_returns_the_private_key_in_plaintext(
    fabric_root: Path, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    def work(client: Any, key_id: str) -> Any:
        return client.generate_data_key_pair(KeyId=key_id, KeyPairSpec="ECC_NIST_P256")

    answer = _scenario(fabric_root, tmp_path, pcrs_for(PCR0), work)
    private = load_der_private_key(answer["PrivateKeyPlaintext"], None)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == answer["PublicKey"]
    )
