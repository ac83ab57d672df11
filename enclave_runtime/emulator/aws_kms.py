"""The emulated AWS KMS: JSON 1.1 operations on symmetric keys, with attested recipients.

The shapes follow botocore's KMS service model (tests/unit/test_emulator_kms.py validates every
request and answer against it). Operations: CreateKey, DescribeKey, ListKeys, GetKeyPolicy,
PutKeyPolicy, Encrypt, Decrypt, GenerateDataKey, GenerateDataKeyPair, GenerateRandom,
DeriveSharedSecret. With a ``Recipient`` the attestation document is verified against the
emulator's root, its PCRs become the ``kms:RecipientAttestation:*`` condition keys, and the
plaintext is answered only as ``CiphertextForRecipient`` (docs/kms.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_runtime.emulator.kms_policy import PolicyError, check_policy, is_allowed
from enclave_runtime.formats.attestation import AttestationError, verify_attestation_document
from enclave_runtime.formats.kms_envelope import seal_envelope

ACCOUNT = "111122223333"
BLOB_PREFIX = b"EMUKMS1"
NONCE_BYTES = 12
KEY_ID_BYTES = 36
DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}
ATTESTATION_PREFIX = "kms:RecipientAttestation:"


class KmsFault(Exception):
    """An answer KMS gives as an error: ``kind`` is its ``__type``."""

    def __init__(self, kind: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


def default_policy() -> dict[str, Any]:
    """KMS's default key policy: the account may do everything."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }


@dataclass
class Key:
    key_id: str
    region: str
    policy: dict[str, Any]
    spec: str = "SYMMETRIC_DEFAULT"
    usage: str = "ENCRYPT_DECRYPT"
    material: bytes = b""
    private_key: ec.EllipticCurvePrivateKey | None = None
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=lambda: datetime.now(timezone.utc).timestamp())

    @property
    def arn(self) -> str:
        return f"arn:aws:kms:{self.region}:{ACCOUNT}:key/{self.key_id}"

    def metadata(self) -> dict[str, Any]:
        return {
            "AWSAccountId": ACCOUNT,
            "KeyId": self.key_id,
            "Arn": self.arn,
            "CreationDate": self.created,
            "Enabled": True,
            "KeyUsage": self.usage,
            "KeyState": "Enabled",
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": self.spec,
            "KeySpec": self.spec,
            "Description": self.description,
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(fields: dict[str, Any], name: str) -> bytes:
    try:
        return base64.b64decode(fields[name], validate=True)
    except KeyError as err:
        raise KmsFault("ValidationException", f"{name} is required") from err
    except (binascii.Error, TypeError) as err:
        raise KmsFault("ValidationException", f"{name} is not base64") from err


@dataclass
class Recipient:
    public_key: rsa.RSAPublicKey
    context: dict[str, str]


class KmsService:
    """The keys of one emulated KMS and the operations on them."""

    def __init__(self, root: x509.Certificate, region: str = "us-east-1") -> None:
        self.root = root
        self.region = region
        self.keys: dict[str, Key] = {}
        self.aliases: dict[str, str] = {}  # alias/name -> key id
        self._operations: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "CreateKey": self._create_key,
            "DescribeKey": lambda f: {"KeyMetadata": self.key_for(f).metadata()},
            "ListKeys": self._list_keys,
            "GetKeyPolicy": self._get_key_policy,
            "PutKeyPolicy": self._put_key_policy,
            "Encrypt": self._encrypt,
            "Decrypt": self._decrypt,
            "GenerateDataKey": self._generate_data_key,
            "GenerateDataKeyPair": self._generate_data_key_pair,
            "GenerateRandom": self._generate_random,
            "DeriveSharedSecret": self._derive_shared_secret,
        }
        self._operations.update(KeyManagement(self).operations())

    def handle(self, operation: str, fields: dict[str, Any]) -> dict[str, Any]:
        """The answer to one operation; raises KmsFault for KMS's error answers."""
        handler = self._operations.get(operation)
        if handler is None:
            raise KmsFault("UnknownOperationException", f"{operation} is not emulated")
        return handler(fields)

    # --- keys -----------------------------------------------------------------------------

    def _create_key(self, fields: dict[str, Any]) -> dict[str, Any]:
        policy = self._parsed_policy(fields.get("Policy"))
        spec = fields.get("KeySpec") or fields.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
        usage = fields.get("KeyUsage", "ENCRYPT_DECRYPT")
        key = Key(str(uuid.uuid4()), self.region, policy, spec, usage)
        key.description = str(fields.get("Description") or "")
        key.tags = {t["TagKey"]: t["TagValue"] for t in fields.get("Tags") or ()}
        if spec == "SYMMETRIC_DEFAULT" and usage == "ENCRYPT_DECRYPT":
            key.material = AESGCM.generate_key(bit_length=256)
        elif spec == "ECC_NIST_P256" and usage == "KEY_AGREEMENT":
            key.private_key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise KmsFault(
                "UnsupportedOperationException",
                f"KeySpec {spec} with KeyUsage {usage} is not emulated",
            )
        self.keys[key.key_id] = key
        return {"KeyMetadata": key.metadata()}

    def _parsed_policy(self, text: Any) -> dict[str, Any]:
        if text is None:
            return default_policy()
        try:
            policy = json.loads(text)
            check_policy(policy)
        except (ValueError, TypeError, PolicyError) as err:
            raise KmsFault("MalformedPolicyDocumentException", str(err)) from err
        return policy

    def key_for(self, fields: dict[str, Any], name: str = "KeyId") -> Key:
        wanted = fields.get(name)
        if not isinstance(wanted, str) or not wanted:
            raise KmsFault("ValidationException", f"{name} is required")
        key_id = wanted.rsplit("/", 1)[-1] if wanted.startswith("arn:") else wanted
        if "alias/" in wanted:
            key_id = self.aliases.get("alias/" + wanted.split("alias/", 1)[1], "")
        key = self.keys.get(key_id)
        if key is None:
            raise KmsFault("NotFoundException", f"Key '{wanted}' does not exist")
        return key

    def _list_keys(self, fields: dict[str, Any]) -> dict[str, Any]:
        keys = [{"KeyId": k.key_id, "KeyArn": k.arn} for k in self.keys.values()]
        return {"Keys": keys, "Truncated": False}

    def _get_key_policy(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = self.key_for(fields)
        return {"Policy": json.dumps(key.policy), "PolicyName": "default"}

    def _put_key_policy(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = self.key_for(fields)
        key.policy = self._parsed_policy(fields.get("Policy"))
        return {}

    # --- authorisation ----------------------------------------------------------------------

    def _recipient(self, fields: dict[str, Any]) -> Recipient | None:
        recipient = fields.get("Recipient")
        if recipient is None:
            return None
        if not isinstance(recipient, dict):
            raise KmsFault("ValidationException", "Recipient must be an object")
        algorithm = recipient.get("KeyEncryptionAlgorithm")
        if algorithm != "RSAES_OAEP_SHA_256":
            raise KmsFault(
                "ValidationException", "Recipient.KeyEncryptionAlgorithm must be RSAES_OAEP_SHA_256"
            )
        document = _unb64(recipient, "AttestationDocument")
        try:
            verified = verify_attestation_document(document, root=self.root)
            public_key = serialization.load_der_public_key(verified.document.public_key or b"")
        except (AttestationError, ValueError) as err:
            raise KmsFault(
                "ValidationException", f"Recipient.AttestationDocument is not valid: {err}"
            ) from err
        if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size != 2048:
            raise KmsFault(
                "ValidationException", "the attestation document's public_key must be RSA-2048"
            )
        pcrs = verified.document.pcrs
        context = {f"{ATTESTATION_PREFIX}PCR{i}": value.hex() for i, value in pcrs.items()}
        if 0 in pcrs:
            context[f"{ATTESTATION_PREFIX}ImageSha384"] = pcrs[0].hex()
        return Recipient(public_key, context)

    def _authorise(self, key: Key, operation: str, recipient: Recipient | None) -> None:
        context = recipient.context if recipient is not None else {}
        if not is_allowed(key.policy, operation, context):
            raise KmsFault(
                "AccessDeniedException",
                f"User: arn:aws:sts::{ACCOUNT}:assumed-role/emulated is not authorized to "
                f"perform: kms:{operation} on resource: {key.arn} because no resource-based "
                "policy allows the kms:" + operation + " action",
            )

    def _sealed(
        self, answer: dict[str, Any], field: str, plaintext: bytes, recipient: Recipient | None
    ) -> dict[str, Any]:
        if recipient is None:
            answer[field] = _b64(plaintext)
        else:
            answer["CiphertextForRecipient"] = _b64(seal_envelope(plaintext, recipient.public_key))
        return answer

    # --- cryptography ---------------------------------------------------------------------

    def _symmetric(self, fields: dict[str, Any]) -> Key:
        key = self.key_for(fields)
        if not key.material:
            raise KmsFault("InvalidKeyUsageException", f"{key.arn} is not a symmetric key")
        return key

    @staticmethod
    def _aad(fields: dict[str, Any]) -> bytes:
        context = fields.get("EncryptionContext") or {}
        return json.dumps(context, sort_keys=True).encode()

    def _seal_blob(self, key: Key, plaintext: bytes, fields: dict[str, Any]) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(key.material).encrypt(nonce, plaintext, self._aad(fields))
        return BLOB_PREFIX + key.key_id.encode() + nonce + sealed

    def _encrypt(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = self._symmetric(fields)
        self._authorise(key, "Encrypt", None)
        plaintext = _unb64(fields, "Plaintext")
        if not 1 <= len(plaintext) <= 4096:
            raise KmsFault("ValidationException", "Plaintext must be 1 to 4096 bytes")
        blob = self._seal_blob(key, plaintext, fields)
        return {
            "CiphertextBlob": _b64(blob),
            "KeyId": key.arn,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def _decrypt(self, fields: dict[str, Any]) -> dict[str, Any]:
        blob = _unb64(fields, "CiphertextBlob")
        start = len(BLOB_PREFIX)
        if not blob.startswith(BLOB_PREFIX) or len(blob) < start + KEY_ID_BYTES + NONCE_BYTES:
            raise KmsFault("InvalidCiphertextException", "the ciphertext is not from this KMS")
        key_id = blob[start : start + KEY_ID_BYTES].decode("ascii", "replace")
        key = self.key_for({"KeyId": key_id})
        if fields.get("KeyId") and self.key_for(fields).key_id != key.key_id:
            raise KmsFault(
                "IncorrectKeyException", "the ciphertext was encrypted under another key"
            )
        recipient = self._recipient(fields)
        self._authorise(key, "Decrypt", recipient)
        nonce = blob[start + KEY_ID_BYTES : start + KEY_ID_BYTES + NONCE_BYTES]
        try:
            plaintext = AESGCM(key.material).decrypt(
                nonce, blob[start + KEY_ID_BYTES + NONCE_BYTES :], self._aad(fields)
            )
        except Exception as err:  # cryptography's InvalidTag
            raise KmsFault("InvalidCiphertextException", "the ciphertext does not decrypt") from err
        answer = {"KeyId": key.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        return self._sealed(answer, "Plaintext", plaintext, recipient)

    def _generate_data_key(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = self._symmetric(fields)
        recipient = self._recipient(fields)
        self._authorise(key, "GenerateDataKey", recipient)
        size = fields.get("NumberOfBytes") or DATA_KEY_SPECS.get(fields.get("KeySpec", ""))
        if not isinstance(size, int) or not 1 <= size <= 1024:
            raise KmsFault(
                "ValidationException", "KeySpec or NumberOfBytes (1 to 1024) is required"
            )
        plaintext = os.urandom(size)
        answer = {"CiphertextBlob": _b64(self._seal_blob(key, plaintext, fields)), "KeyId": key.arn}
        return self._sealed(answer, "Plaintext", plaintext, recipient)

    def _generate_data_key_pair(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = self._symmetric(fields)
        recipient = self._recipient(fields)
        self._authorise(key, "GenerateDataKeyPair", recipient)
        spec = fields.get("KeyPairSpec")
        pair = _key_pair(spec)
        private_der = pair.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_der = pair.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        answer = {
            "PrivateKeyCiphertextBlob": _b64(self._seal_blob(key, private_der, fields)),
            "PublicKey": _b64(public_der),
            "KeyId": key.arn,
            "KeyPairSpec": spec,
        }
        return self._sealed(answer, "PrivateKeyPlaintext", private_der, recipient)

    def _generate_random(self, fields: dict[str, Any]) -> dict[str, Any]:
        size = fields.get("NumberOfBytes")
        if not isinstance(size, int) or not 1 <= size <= 1024:
            raise KmsFault("ValidationException", "NumberOfBytes must be 1 to 1024")
        recipient = self._recipient(fields)
        return self._sealed({}, "Plaintext", os.urandom(size), recipient)

    def _derive_shared_secret(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = self.key_for(fields)
        if key.private_key is None:
            raise KmsFault("InvalidKeyUsageException", f"{key.arn} is not a KEY_AGREEMENT key")
        if fields.get("KeyAgreementAlgorithm") != "ECDH":
            raise KmsFault("ValidationException", "KeyAgreementAlgorithm must be ECDH")
        recipient = self._recipient(fields)
        self._authorise(key, "DeriveSharedSecret", recipient)
        try:
            peer = serialization.load_der_public_key(_unb64(fields, "PublicKey"))
            assert isinstance(peer, ec.EllipticCurvePublicKey)
            secret = key.private_key.exchange(ec.ECDH(), peer)
        except (ValueError, AssertionError) as err:
            raise KmsFault("ValidationException", "PublicKey is not a P-256 public key") from err
        answer = {"KeyId": key.arn, "KeyAgreementAlgorithm": "ECDH", "KeyOrigin": "AWS_KMS"}
        return self._sealed(answer, "SharedSecret", secret, recipient)


def _key_pair(spec: Any) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if spec in ("RSA_2048", "RSA_3072", "RSA_4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(spec[4:]))
    curves = {"ECC_NIST_P256": ec.SECP256R1, "ECC_NIST_P384": ec.SECP384R1}
    if spec in curves:
        return ec.generate_private_key(curves[spec]())
    raise KmsFault("ValidationException", f"KeyPairSpec {spec!r} is not emulated")


class KeyManagement:
    """The key-management calls amazon.aws.kms_key makes, so a playbook can create keys here."""

    def __init__(self, service: KmsService) -> None:
        self.service = service

    def operations(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {
            "CreateAlias": self._create_alias,
            "ListAliases": self._list_aliases,
            "ListGrants": lambda f: {"Grants": [], "Truncated": False},
            "ListKeyPolicies": lambda f: {"PolicyNames": ["default"], "Truncated": False},
            "GetKeyRotationStatus": lambda f: {"KeyRotationEnabled": False},
            "ListResourceTags": self._list_tags,
            "TagResource": self._tag,
            "UntagResource": self._untag,
            "EnableKey": lambda f: self._known(f, {}),
            "UpdateKeyDescription": self._update_description,
        }

    def _known(self, fields: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        self.service.key_for(fields)
        return answer

    def _create_alias(self, fields: dict[str, Any]) -> dict[str, Any]:
        name = fields.get("AliasName")
        if not isinstance(name, str) or not name.startswith("alias/"):
            raise KmsFault("ValidationException", "AliasName must start with alias/")
        if name in self.service.aliases:
            raise KmsFault(
                "AlreadyExistsException", f"An alias with the name {name} already exists"
            )
        key = self.service.key_for(fields, "TargetKeyId")
        self.service.aliases[name] = key.key_id
        return {}

    def _list_aliases(self, fields: dict[str, Any]) -> dict[str, Any]:
        region = self.service.region
        aliases = [
            {
                "AliasName": name,
                "AliasArn": f"arn:aws:kms:{region}:{ACCOUNT}:{name}",
                "TargetKeyId": key_id,
            }
            for name, key_id in sorted(self.service.aliases.items())
            if not fields.get("KeyId") or key_id == self.service.key_for(fields).key_id
        ]
        return {"Aliases": aliases, "Truncated": False}

    def _list_tags(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = self.service.key_for(fields)
        tags = [{"TagKey": k, "TagValue": v} for k, v in sorted(key.tags.items())]
        return {"Tags": tags, "Truncated": False}

    def _tag(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = self.service.key_for(fields)
        key.tags.update({t["TagKey"]: t["TagValue"] for t in fields.get("Tags") or ()})
        return {}

    def _untag(self, fields: dict[str, Any]) -> dict[str, Any]:
        key = self.service.key_for(fields)
        for name in fields.get("TagKeys") or ():
            key.tags.pop(name, None)
        return {}

    def _update_description(self, fields: dict[str, Any]) -> dict[str, Any]:
        self.service.key_for(fields).description = str(fields.get("Description") or "")
        return {}
