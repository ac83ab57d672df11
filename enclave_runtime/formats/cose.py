"""COSE_Sign1 (RFC 9052) with ECDSA: the envelope of NSM attestation documents and EIF signatures.

Only what Nitro uses: ES256/ES384/ES512 over P-256/P-384/P-521, signatures as raw ``r || s``.
Decoding keeps the protected header and payload as the exact bytes received, because the
signature covers those bytes, not a re-encoding of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from enclave_runtime.errors import FormatError
from enclave_runtime.formats.cbor_maps import DuplicateKeyError, reject_duplicate_keys

COSE_SIGN1_TAG = 18
HEADER_ALG = 1

# COSE algorithm id -> (curve, hash, bytes per coordinate)
ALGORITHMS: dict[int, tuple[type[ec.EllipticCurve], type[hashes.HashAlgorithm], int]] = {
    -7: (ec.SECP256R1, hashes.SHA256, 32),
    -35: (ec.SECP384R1, hashes.SHA384, 48),
    -36: (ec.SECP521R1, hashes.SHA512, 66),
}
ALGORITHM_NAMES = {-7: "ES256", -35: "ES384", -36: "ES512"}


class CoseError(FormatError):
    """A COSE_Sign1 structure that cannot be decoded or whose signature does not verify."""


@dataclass(frozen=True)
class CoseSign1:
    """A decoded COSE_Sign1 message; ``protected`` and ``payload`` are the bytes as received."""

    protected: bytes
    payload: bytes
    signature: bytes
    unprotected: dict[Any, Any] = field(default_factory=dict)

    @property
    def protected_header(self) -> dict[Any, Any]:
        if not self.protected:
            return {}
        try:
            reject_duplicate_keys(self.protected)
        except DuplicateKeyError as err:
            raise CoseError(f"COSE protected header is refused: {err}") from err
        try:
            header = cbor2.loads(self.protected)
        except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as err:
            raise CoseError(f"COSE protected header is not valid CBOR: {err}") from err
        if not isinstance(header, dict):
            raise CoseError("COSE protected header must be a CBOR map")
        return header

    @property
    def algorithm(self) -> int:
        alg = self.protected_header.get(HEADER_ALG)
        if not isinstance(alg, int) or alg not in ALGORITHMS:
            known = ", ".join(f"{v} ({k})" for k, v in ALGORITHM_NAMES.items())
            raise CoseError(f"COSE algorithm {alg!r} is not supported (supported: {known})")
        return alg

    def to_be_signed(self) -> bytes:
        """The Sig_structure the signature covers (RFC 9052 §4.4), with empty external AAD."""
        return cbor2.dumps(["Signature1", self.protected, b"", self.payload])

    def verify(self, public_key: ec.EllipticCurvePublicKey) -> None:
        """Raise :class:`CoseError` unless ``signature`` is valid for ``public_key``."""
        curve, hash_cls, size = ALGORITHMS[self.algorithm]
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, curve
        ):
            raise CoseError(
                f"{ALGORITHM_NAMES[self.algorithm]} needs a {curve.name} key, "
                f"the signer's key is {_curve_name(public_key)}"
            )
        if len(self.signature) != 2 * size:
            raise CoseError(
                f"COSE signature is {len(self.signature)} bytes, "
                f"{ALGORITHM_NAMES[self.algorithm]} needs {2 * size}"
            )
        r = int.from_bytes(self.signature[:size], "big")
        s = int.from_bytes(self.signature[size:], "big")
        try:
            public_key.verify(encode_dss_signature(r, s), self.to_be_signed(), ec.ECDSA(hash_cls()))
        except InvalidSignature as err:
            raise CoseError("COSE signature does not verify against the signer's key") from err

    def encode(self, *, tagged: bool = False) -> bytes:
        message = [self.protected, self.unprotected, self.payload, self.signature]
        return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, message) if tagged else message)


def _curve_name(key: object) -> str:
    curve = getattr(key, "curve", None)
    return curve.name if curve is not None else "not an EC key"


def algorithm_for_key(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> int:
    for alg, (curve, _hash, _size) in ALGORITHMS.items():
        if isinstance(key.curve, curve):
            return alg
    raise CoseError(
        f"EC curve {key.curve.name} has no COSE algorithm here; use P-256, P-384 or P-521"
    )


def _ecdsa(hash_cls: type[hashes.HashAlgorithm], deterministic: bool) -> ec.ECDSA:
    if deterministic:
        try:
            return ec.ECDSA(hash_cls(), deterministic_signing=True)
        except (TypeError, UnsupportedAlgorithm):
            pass  # cryptography < 44 or OpenSSL < 3.2: a random nonce, still a valid signature
    return ec.ECDSA(hash_cls())


def sign1(
    payload: bytes,
    private_key: ec.EllipticCurvePrivateKey,
    unprotected: dict[Any, Any] | None = None,
    *,
    deterministic: bool = False,
) -> CoseSign1:
    """Sign ``payload``; the algorithm follows the key's curve (P-384 gives ES384).

    ``deterministic`` uses RFC 6979 nonces where the library supports them, so signing the same
    payload twice gives the same bytes: reproducible builds need that, attestation does not.
    """
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise CoseError("COSE_Sign1 signing needs an EC private key (P-256, P-384 or P-521)")
    alg = algorithm_for_key(private_key)
    _curve, hash_cls, size = ALGORITHMS[alg]
    protected = cbor2.dumps({HEADER_ALG: alg})
    unsigned = CoseSign1(protected, payload, b"", dict(unprotected or {}))
    der = private_key.sign(unsigned.to_be_signed(), _ecdsa(hash_cls, deterministic))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return CoseSign1(protected, payload, signature, dict(unprotected or {}))


def decode_sign1(data: bytes) -> CoseSign1:
    """Decode a COSE_Sign1 message, tagged (18) or untagged, as Nitro sends both."""
    try:
        message = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise CoseError(f"not a CBOR document: {err}") from err
    if isinstance(message, cbor2.CBORTag):
        if message.tag != COSE_SIGN1_TAG:
            raise CoseError(f"CBOR tag {message.tag} is not COSE_Sign1 (18)")
        message = message.value
    # cbor2 >= 6 decodes the content of a tag immutably: the tagged form arrives as a tuple.
    if not isinstance(message, (list, tuple)) or len(message) != 4:
        raise CoseError("COSE_Sign1 must be a CBOR array of 4 items")
    protected, unprotected, payload, signature = message
    if not isinstance(protected, bytes):
        raise CoseError("COSE_Sign1 protected header must be a byte string")
    if not isinstance(unprotected, Mapping):
        raise CoseError("COSE_Sign1 unprotected header must be a map")
    if not isinstance(payload, bytes):
        raise CoseError("COSE_Sign1 payload must be a byte string (detached payloads are not used)")
    if not isinstance(signature, bytes):
        raise CoseError("COSE_Sign1 signature must be a byte string")
    return CoseSign1(protected, payload, signature, dict(unprotected))
