"""KMS's ``CiphertextForRecipient``: a CMS EnvelopedData for one RSA key (docs/kms.md).

KMS answers an attesting request (one that carries a ``Recipient``) with the plaintext sealed to
the public key of the attestation document: a BER ContentInfo (indefinite lengths, the content
possibly chunked) holding an EnvelopedData v2 with exactly one KeyTransRecipientInfo v2 whose
recipient identifier is the subjectKeyIdentifier SHA-256(SubjectPublicKeyInfo DER), the content
key wrapped with RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label) and the content encrypted with
AES-256-CBC (IV in the algorithm parameters, PKCS#7 padding).

:func:`open_envelope` accepts exactly that shape and nothing else: every version, algorithm and
parameter is checked, the identifier must be our key's, no byte may follow the structure.
:func:`seal_envelope` builds the same shape (the emulated KMS answers with it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclave_runtime.errors import FormatError

CONTENT_KEY_BYTES = 32
AES_BLOCK_BYTES = 16
# A KMS plaintext is at most 4096 bytes (GenerateDataKeyPair's private keys are the largest);
# the bound keeps a hostile envelope from making us decrypt megabytes.
MAX_ENVELOPE_BYTES = 64 * 1024
ENVELOPED_DATA = "enveloped_data"
DATA = "data"
OAEP_NAME = "rsaes_oaep"
AES256_CBC = "aes256_cbc"
SHA256 = "sha256"
MGF1_NAME = "mgf1"
EMPTY_LABEL = "p_specified"
SEQUENCE = b"\x30"
NULL_PARAMETERS = b"\x05\x00"
CONTEXT_0_CONSTRUCTED = b"\xa0"


class EnvelopeError(FormatError):
    """A CiphertextForRecipient that is not the CMS envelope KMS sends to this enclave's key."""


@dataclass(frozen=True)
class Envelope:
    """The parts of a checked envelope that decryption needs."""

    recipient_key_id: bytes
    encrypted_key: bytes
    iv: bytes
    encrypted_content: bytes


def subject_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """The recipient identifier KMS uses: SHA-256 of the key's SubjectPublicKeyInfo DER."""
    spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def parse_envelope(data: bytes) -> Envelope:
    """Checks ``data`` is KMS's envelope shape and returns its parts; raises EnvelopeError."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(
            f"CiphertextForRecipient is {len(data)} bytes, more than {MAX_ENVELOPE_BYTES}"
        )
    try:
        info = cms.ContentInfo.load(data, strict=True)
        return _checked_envelope(info)
    except EnvelopeError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise EnvelopeError(f"CiphertextForRecipient is not valid BER CMS: {err}") from err


def _checked_envelope(info: cms.ContentInfo) -> Envelope:
    _expect("ContentInfo.contentType", info["content_type"].native, ENVELOPED_DATA)
    enveloped = info["content"]
    _expect("EnvelopedData.version", enveloped["version"].native, "v2")
    _expect("EnvelopedData.originatorInfo", _present(enveloped["originator_info"]), False)
    _expect("EnvelopedData.unprotectedAttrs", _present(enveloped["unprotected_attrs"]), False)
    recipients = enveloped["recipient_infos"]
    _expect("EnvelopedData.recipientInfos count", len(recipients), 1)
    _expect("RecipientInfo choice", recipients[0].name, "ktri")
    ktri = recipients[0].chosen
    _expect("KeyTransRecipientInfo.version", ktri["version"].native, "v2")
    _expect("KeyTransRecipientInfo.rid", ktri["rid"].name, "subject_key_identifier")
    _check_oaep(ktri["key_encryption_algorithm"])
    content_info = enveloped["encrypted_content_info"]
    _expect("EncryptedContentInfo.contentType", content_info["content_type"].native, DATA)
    algorithm = content_info["content_encryption_algorithm"]
    _expect("contentEncryptionAlgorithm", algorithm["algorithm"].native, AES256_CBC)
    iv = algorithm["parameters"]
    if not isinstance(iv, core.OctetString) or len(iv.native) != AES_BLOCK_BYTES:
        raise EnvelopeError("contentEncryptionAlgorithm parameters must be a 16-byte AES-CBC IV")
    content = content_info["encrypted_content"]
    if not _present(content):
        raise EnvelopeError("EncryptedContentInfo.encryptedContent is missing")
    return Envelope(
        recipient_key_id=bytes(ktri["rid"].chosen.native),
        encrypted_key=bytes(ktri["encrypted_key"].native),
        iv=bytes(iv.native),
        encrypted_content=bytes(content.native),
    )


def _check_oaep(algorithm: cms.KeyEncryptionAlgorithm) -> None:
    _expect("keyEncryptionAlgorithm", algorithm["algorithm"].native, OAEP_NAME)
    params = algorithm["parameters"]
    if not isinstance(params, algos.RSAESOAEPParams):
        raise EnvelopeError("keyEncryptionAlgorithm has no RSAES-OAEP parameters")
    # DEFAULT values (SHA-1) would be absent fields; asn1crypto fills them in, so a missing
    # hashFunc reads as sha1 and is refused here like any other hash.
    _check_sha256("RSAES-OAEP hashFunc", params["hash_algorithm"])
    mgf = params["mask_gen_algorithm"]
    _expect("RSAES-OAEP maskGenFunc", mgf["algorithm"].native, MGF1_NAME)
    _check_sha256("RSAES-OAEP MGF1 hash", mgf["parameters"])
    source = params["p_source_algorithm"]
    _expect("RSAES-OAEP pSourceFunc", source["algorithm"].native, EMPTY_LABEL)
    _expect("RSAES-OAEP label", source["parameters"].native, b"")


def _check_sha256(field: str, algorithm: algos.DigestAlgorithm) -> None:
    _expect(field, algorithm["algorithm"].native, SHA256)
    # KMS sends NULL parameters; absent ones (allowed by RFC 5754 §2) or any other are refused.
    _expect(f"{field} parameters", algorithm["parameters"].dump(), NULL_PARAMETERS)


def _present(value: core.Asn1Value) -> bool:
    return not isinstance(value, core.Void)


def _expect(field: str, found: object, wanted: object) -> None:
    if found != wanted:
        raise EnvelopeError(f"CiphertextForRecipient {field} is {found!r}, expected {wanted!r}")


def open_envelope(data: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Decrypts KMS's envelope for ``private_key``; raises EnvelopeError on any deviation."""
    envelope = parse_envelope(data)
    ours = subject_key_identifier(private_key.public_key())
    if not hmac.compare_digest(envelope.recipient_key_id, ours):
        raise EnvelopeError(
            "CiphertextForRecipient is for another key (recipient identifier "
            f"{envelope.recipient_key_id.hex()}, this enclave's key is {ours.hex()})"
        )
    try:
        content_key = private_key.decrypt(envelope.encrypted_key, _oaep())
    except ValueError as err:
        raise EnvelopeError("CiphertextForRecipient's content key does not decrypt") from err
    if len(content_key) != CONTENT_KEY_BYTES:
        raise EnvelopeError(
            f"CiphertextForRecipient's content key is {len(content_key)} bytes, expected 32"
        )
    return _aes_cbc_decrypt(content_key, envelope.iv, envelope.encrypted_content)


def _oaep() -> OAEP:
    return OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _aes_cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    if not ciphertext or len(ciphertext) % AES_BLOCK_BYTES:
        raise EnvelopeError(
            f"CiphertextForRecipient's content is {len(ciphertext)} bytes, "
            "not a non-empty multiple of the AES block"
        )
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(AES_BLOCK_BYTES * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as err:
        raise EnvelopeError("CiphertextForRecipient's content has invalid padding") from err


def seal_envelope(plaintext: bytes, public_key: rsa.RSAPublicKey) -> bytes:
    """Seals ``plaintext`` to ``public_key`` in KMS's envelope shape.

    The layout follows what KMS sends (enclaver's captured vector, tests/unit/data/kms/):
    ContentInfo, its [0], EnvelopedData, EncryptedContentInfo and the constructed
    encryptedContent have indefinite lengths; the recipient set and algorithms are definite.
    """
    content_key = os.urandom(CONTENT_KEY_BYTES)
    iv = os.urandom(AES_BLOCK_BYTES)
    padder = padding.PKCS7(AES_BLOCK_BYTES * 8).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padded) + encryptor.finalize()
    algorithm = cms.EncryptionAlgorithm(
        {"algorithm": AES256_CBC, "parameters": core.OctetString(iv)}
    )
    encrypted_content_info = _indefinite(
        SEQUENCE,
        cms.ContentType(DATA).dump(),
        algorithm.dump(),
        _indefinite(CONTEXT_0_CONSTRUCTED, core.OctetString(encrypted).dump()),
    )
    enveloped = _indefinite(
        SEQUENCE,
        cms.CMSVersion("v2").dump(),
        cms.RecipientInfos([_recipient(content_key, public_key)]).dump(),
        encrypted_content_info,
    )
    return _indefinite(
        SEQUENCE,
        cms.ContentType(ENVELOPED_DATA).dump(),
        _indefinite(CONTEXT_0_CONSTRUCTED, enveloped),
    )


def _indefinite(identifier: bytes, *elements: bytes) -> bytes:
    """A constructed BER element with an indefinite length (X.690 §8.1.3.6)."""
    return identifier + b"\x80" + b"".join(elements) + b"\x00\x00"


def _recipient(content_key: bytes, public_key: rsa.RSAPublicKey) -> cms.RecipientInfo:
    sha256 = {"algorithm": SHA256}
    return cms.RecipientInfo(
        name="ktri",
        value={
            "version": "v2",
            "rid": cms.RecipientIdentifier(
                name="subject_key_identifier", value=subject_key_identifier(public_key)
            ),
            "key_encryption_algorithm": {
                "algorithm": OAEP_NAME,
                "parameters": {
                    "hash_algorithm": sha256,
                    "mask_gen_algorithm": {"algorithm": MGF1_NAME, "parameters": sha256},
                },
            },
            "encrypted_key": public_key.encrypt(content_key, _oaep()),
        },
    )
