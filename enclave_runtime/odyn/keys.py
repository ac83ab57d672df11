"""The enclave's own key material, created at start and held only in memory.

Two keys, as in sparsity-xyz's enclaver fork:

- an **encryption key** (P-384). A client and the enclave agree on a per-message AES-256-GCM
  key: ECDH(P-384) gives the shared secret; HKDF-SHA256 turns it into 32 bytes with
  ``salt = min(A, B) || max(A, B) || nonce`` (A and B the two uncompressed SEC1 public keys,
  97 bytes each, ordered bytewise, so both sides build the same salt) and
  ``info = b"enclaver-ecdh-aes256gcm-v1"``; the 12-byte nonce is also the GCM nonce and the
  ciphertext carries GCM's 16-byte tag at its end. Both directions derive the same key for the
  same (client key, nonce), so a pair must never be used twice: :class:`ReplayCache` refuses a
  pair seen before in either direction (which also stops a response being reflected back as a
  request). A message may carry a ``timestamp`` (milliseconds), bound into GCM's associated
  data; it is accepted only within :data:`REPLAY_WINDOW_SECONDS` of the enclave's clock and its
  pair is remembered until it leaves that window, so such a message can never be replayed,
  however many others pass (docs/api.md, "Replay protection").
- an **Ethereum key** (secp256k1) that signs EIP-191 "personal" messages. Signing is OpenSSL's
  (RFC 6979 deterministic ECDSA where available), normalised to low s; the recovery id that
  Ethereum's ``v`` needs is found by recomputing the signature's point from public values only,
  so no secret ever passes through the pure-Python curve arithmetic below.

Keccak-256 (not SHA3-256: the padding differs) comes from pycryptodome.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from Crypto.Hash import keccak
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave_runtime.errors import FormatError

ENCRYPTION_INFO = b"enclaver-ecdh-aes256gcm-v1"
NONCE_SIZE = 12
AES_KEY_SIZE = 32
GCM_TAG_SIZE = 16
# 65,536 fingerprints of 32 bytes in a set and a queue measure about 7 MiB in CPython.
REPLAY_CACHE_CAPACITY = 65536
# Timestamped messages: AAD = prefix || timestamp as 8 bytes big-endian; accepted within this many
# seconds of the enclave's clock, either way (clock skew).
TIMESTAMP_AAD_PREFIX = b"enclaveops-timestamp-v1:"
REPLAY_WINDOW_SECONDS = 300
# Live timestamped pairs odyn holds; beyond it new timestamped messages are refused until the
# oldest leave the window (fail closed: a pair is never forgotten while it could be replayed).
TIMED_REPLAY_CAPACITY = 262144

ETH_SIGNATURE_SIZE = 65
EIP191_PREFIX = b"\x19Ethereum Signed Message:\n"


class KeyInputError(FormatError):
    """A key, nonce, ciphertext or signature from a client that cannot be used; say which."""


class ReplayError(KeyInputError):
    """A (client key, nonce) pair that was already used."""


# --- the encryption key ------------------------------------------------------------------------


def load_p384_public_key(der: bytes, field: str = "client_public_key") -> ec.EllipticCurvePublicKey:
    """A client's P-384 public key from DER SubjectPublicKeyInfo, or a KeyInputError."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyInputError(
            f"{field} is not a DER SubjectPublicKeyInfo public key ({err}); send the hex of "
            "the DER SPKI of a P-384 (secp384r1) key"
        ) from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise KeyInputError(f"{field} must be a P-384 (secp384r1) key, not {kind}")
    return key


def uncompressed_point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise KeyInputError(f"nonce must be exactly {NONCE_SIZE} bytes, not {len(nonce)}")


class ReplayCache:
    """The last ``capacity`` (client key, nonce) pairs, oldest forgotten first.

    Memory is bounded: each pair is kept as a 32-byte SHA-256 fingerprint of the client's
    uncompressed point and the nonce (so two DER spellings of one key are one key). A pair is
    refused while it is among the last ``capacity`` pairs used.
    """

    def __init__(
        self,
        capacity: int = REPLAY_CACHE_CAPACITY,
        *,
        timed_capacity: int = TIMED_REPLAY_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1 or timed_capacity < 1:
            raise ValueError("the replay cache needs room for at least one pair")
        self.capacity = capacity
        self.timed_capacity = timed_capacity
        self.clock = clock
        self._seen: set[bytes] = set()
        self._order: deque[bytes] = deque()
        # Timestamped pairs: fingerprint -> when it may be forgotten, in claim order. Expiry is
        # not monotonic in claim order, so a pair stays until every older one is purged too.
        self._timed: dict[bytes, float] = {}
        self._timed_order: deque[tuple[float, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._order) + len(self._timed)

    @staticmethod
    def _fingerprint(client_point: bytes, nonce: bytes) -> bytes:
        return hashlib.sha256(client_point + nonce).digest()

    def seen(self, client_point: bytes, nonce: bytes) -> bool:
        fingerprint = self._fingerprint(client_point, nonce)
        return fingerprint in self._seen or fingerprint in self._timed

    def claim(self, client_point: bytes, nonce: bytes, timestamp_ms: int | None = None) -> bool:
        """Record the pair; False (and nothing recorded) if it is already known.

        A timestamped pair is kept until its timestamp leaves the window; raises
        :class:`ReplayError` when the timed store is full of pairs still inside it.
        """
        if self.seen(client_point, nonce):
            return False
        fingerprint = self._fingerprint(client_point, nonce)
        if timestamp_ms is not None:
            self._claim_timed(fingerprint, timestamp_ms / 1000 + REPLAY_WINDOW_SECONDS)
            return True
        self._seen.add(fingerprint)
        self._order.append(fingerprint)
        if len(self._order) > self.capacity:
            self._seen.discard(self._order.popleft())
        return True

    def _claim_timed(self, fingerprint: bytes, forget_at: float) -> None:
        now = self.clock()
        while self._timed_order and self._timed_order[0][0] <= now:
            self._timed.pop(self._timed_order.popleft()[1], None)
        if len(self._timed) >= self.timed_capacity:
            raise ReplayError(
                f"too many timestamped messages: {self.timed_capacity} in the last "
                f"{REPLAY_WINDOW_SECONDS} s are remembered; retry later"
            )
        self._timed[fingerprint] = forget_at
        self._timed_order.append((max(forget_at, now), fingerprint))

    def check_timestamp(self, timestamp_ms: int) -> None:
        """Refuse a timestamp outside the window around the enclave's clock."""
        skew = timestamp_ms / 1000 - self.clock()
        if abs(skew) > REPLAY_WINDOW_SECONDS:
            raise ReplayError(
                f"timestamp {timestamp_ms} is {abs(skew):.0f} s "
                f"{'ahead of' if skew > 0 else 'behind'} the enclave's clock; messages are "
                f"accepted within {REPLAY_WINDOW_SECONDS} s: encrypt a fresh message with the "
                "current time (milliseconds since the epoch)"
            )


@dataclass(frozen=True)
class EncryptedMessage:
    ciphertext: bytes  # GCM ciphertext followed by the 16-byte tag
    nonce: bytes
    enclave_public_key_der: bytes
    timestamp_ms: int | None = None  # bound into the AAD when set


def timestamp_aad(timestamp_ms: int | None) -> bytes | None:
    """GCM's associated data for a timestamped message; None (no AAD) for the fork's form."""
    if timestamp_ms is None:
        return None
    if not 0 <= timestamp_ms < 2**63:
        raise KeyInputError(f"timestamp must be milliseconds since the epoch, not {timestamp_ms}")
    return TIMESTAMP_AAD_PREFIX + timestamp_ms.to_bytes(8, "big")


class EncryptionKey:
    """The enclave's P-384 key and the ECDH/HKDF/AES-256-GCM scheme built on it."""

    def __init__(
        self, private_key: ec.EllipticCurvePrivateKey, replay_cache: ReplayCache | None = None
    ) -> None:
        if not isinstance(private_key.curve, ec.SECP384R1):
            raise ValueError("the encryption key must be a P-384 key")
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.public_key_sec1 = uncompressed_point(self.public_key)
        self.public_key_der = spki_der(self.public_key)
        self.replay_cache = replay_cache if replay_cache is not None else ReplayCache()

    @classmethod
    def generate(cls) -> EncryptionKey:
        return cls(ec.generate_private_key(ec.SECP384R1()))

    @property
    def public_key_pem(self) -> str:
        """PEM without the final newline, as the fork prints it."""
        pem = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode("ascii").rstrip("\n")

    def _message_key(self, client_key: ec.EllipticCurvePublicKey, nonce: bytes) -> bytes:
        shared_secret = self._private_key.exchange(ec.ECDH(), client_key)
        first, second = sorted((self.public_key_sec1, uncompressed_point(client_key)))
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=AES_KEY_SIZE,
            salt=first + second + nonce,
            info=ENCRYPTION_INFO,
        )
        return hkdf.derive(shared_secret)

    def encrypt(
        self, plaintext: bytes, client_public_key_der: bytes, *, timestamped: bool = False
    ) -> EncryptedMessage:
        """Encrypt to a client under a fresh random nonce, recorded as used; ``timestamped``
        binds the enclave's current time into the AAD."""
        client_key = load_p384_public_key(client_public_key_der)
        client_point = uncompressed_point(client_key)
        timestamp_ms = int(self.replay_cache.clock() * 1000) if timestamped else None
        nonce = self._fresh_nonce(client_point, timestamp_ms)
        key = self._message_key(client_key, nonce)
        ciphertext = AESGCM(key).encrypt(nonce, plaintext, timestamp_aad(timestamp_ms))
        return EncryptedMessage(ciphertext, nonce, self.public_key_der, timestamp_ms)

    def _fresh_nonce(self, client_point: bytes, timestamp_ms: int | None) -> bytes:
        while True:
            nonce = os.urandom(NONCE_SIZE)
            if self.replay_cache.claim(client_point, nonce, timestamp_ms):
                return nonce

    def decrypt(
        self,
        ciphertext: bytes,
        client_public_key_der: bytes,
        nonce: bytes,
        timestamp_ms: int | None = None,
    ) -> bytes:
        """Decrypt a client's message; a pair is consumed only once it authenticates.

        Checking the tag first means nobody without the client's key can burn the client's
        nonces with forged messages. A ``timestamp_ms`` must be within the replay window and is
        authenticated as the AAD.
        """
        check_nonce(nonce)
        aad = timestamp_aad(timestamp_ms)
        if timestamp_ms is not None:
            self.replay_cache.check_timestamp(timestamp_ms)
        client_key = load_p384_public_key(client_public_key_der)
        client_point = uncompressed_point(client_key)
        if self.replay_cache.seen(client_point, nonce):
            raise _replayed()
        if len(ciphertext) < GCM_TAG_SIZE:
            raise KeyInputError(
                f"encrypted_data is {len(ciphertext)} bytes, shorter than the "
                f"{GCM_TAG_SIZE}-byte AES-GCM tag it must end with"
            )
        try:
            plaintext = AESGCM(self._message_key(client_key, nonce)).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise KeyInputError(
                "decryption failed: AES-GCM authentication failed; encrypted_data, nonce, "
                "client_public_key (and timestamp, when sent) must be exactly those used to "
                "encrypt, against this enclave's current public key (keys change when the "
                "enclave restarts)"
            ) from None
        if not self.replay_cache.claim(client_point, nonce, timestamp_ms):
            raise _replayed()
        return plaintext


def _replayed() -> ReplayError:
    return ReplayError(
        "replayed nonce: this (client_public_key, nonce) pair was already used; use a fresh "
        "random 12-byte nonce for every message"
    )


# --- Ethereum ----------------------------------------------------------------------------------


def keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


def personal_message_hash(message: bytes) -> bytes:
    """EIP-191 version 0x45: keccak256("\\x19Ethereum Signed Message:\\n" + len + message)."""
    return keccak256(EIP191_PREFIX + str(len(message)).encode("ascii") + message)


def address_of(uncompressed_public_key: bytes) -> str:
    """The lowercase ``0x`` address: the last 20 bytes of keccak256(X || Y)."""
    return "0x" + keccak256(uncompressed_public_key[1:])[12:].hex()


def _ecdsa_sign(private_key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """RFC 6979 signing where cryptography (>= 44) and its OpenSSL offer it.

    Randomised ECDSA is as valid and as secure; only byte-for-byte reproducibility is lost.
    """
    prehashed = Prehashed(hashes.SHA256())
    try:
        return private_key.sign(digest, ec.ECDSA(prehashed, deterministic_signing=True))
    except (TypeError, UnsupportedAlgorithm):
        return private_key.sign(digest, ec.ECDSA(prehashed))


class EthereumKey:
    """A secp256k1 key that signs EIP-191 personal messages as ``r || s || v`` (v = 27 or 28)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256K1):
            raise ValueError("the Ethereum key must be a secp256k1 key")
        self._private_key = private_key
        public_key = private_key.public_key()
        self.public_key_bytes = uncompressed_point(public_key)
        self.public_key_der = spki_der(public_key)
        self.address = address_of(self.public_key_bytes)
        numbers = public_key.public_numbers()
        self._point = (numbers.x, numbers.y)

    @classmethod
    def generate(cls) -> EthereumKey:
        return cls(ec.generate_private_key(ec.SECP256K1()))

    @classmethod
    def from_private_bytes(cls, secret: bytes) -> EthereumKey:
        return cls(ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256K1()))

    def sign_personal_message(self, message: bytes) -> bytes:
        return self.sign_hash(personal_message_hash(message))

    def sign_hash(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest: ``r || s || v`` with low s and v = 27 + recovery id."""
        if len(digest) != 32:
            raise ValueError("an Ethereum signature covers a 32-byte digest")
        r, s = decode_dss_signature(_ecdsa_sign(self._private_key, digest))
        s = min(s, SECP256K1_N - s)
        recovery_id = _recovery_id(digest, r, s, self._point)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([27 + recovery_id])


def recover_address(digest: bytes, signature: bytes) -> str:
    """The address whose key made ``signature`` (r || s || v, v in 0, 1, 27, 28) over ``digest``."""
    if len(signature) != ETH_SIGNATURE_SIZE:
        raise KeyInputError(
            f"an Ethereum signature is {ETH_SIGNATURE_SIZE} bytes (r || s || v), "
            f"not {len(signature)}"
        )
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    recovery_id = v - 27 if v >= 27 else v
    if recovery_id not in (0, 1):
        raise KeyInputError(f"signature v must be 27, 28, 0 or 1, not {v}")
    x, y = _recover_point(digest, r, s, recovery_id)
    return address_of(b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big"))


def recover_personal_signer(message: bytes, signature: bytes) -> str:
    return recover_address(personal_message_hash(message), signature)


# --- secp256k1 arithmetic on public values (recovery ids and signer recovery) -------------------

SECP256K1_P = 2**256 - 2**32 - 977
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_G = (
    0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
    0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8,
)

Point = tuple[int, int]


def _add(a: Point | None, b: Point | None) -> Point | None:
    if a is None:
        return b
    if b is None:
        return a
    p = SECP256K1_P
    if a[0] == b[0]:
        if (a[1] + b[1]) % p == 0:
            return None
        slope = 3 * a[0] * a[0] * pow(2 * a[1], -1, p)
    else:
        slope = (b[1] - a[1]) * pow(b[0] - a[0], -1, p)
    x = (slope * slope - a[0] - b[0]) % p
    return x, (slope * (a[0] - x) - a[1]) % p


def _multiply(k: int, point: Point) -> Point | None:
    result: Point | None = None
    addend: Point | None = point
    while k:
        if k & 1:
            result = _add(result, addend)
        addend = _add(addend, addend)
        k >>= 1
    return result


def _digest_scalar(digest: bytes) -> int:
    return int.from_bytes(digest, "big") % SECP256K1_N


def _recovery_id(digest: bytes, r: int, s: int, public_point: Point) -> int:
    """0 or 1: the parity of the y of R = (e/s)G + (r/s)Q, which ECDSA verification rebuilds."""
    s_inverse = pow(s, -1, SECP256K1_N)
    point = _add(
        _multiply(_digest_scalar(digest) * s_inverse % SECP256K1_N, SECP256K1_G),
        _multiply(r * s_inverse % SECP256K1_N, public_point),
    )
    if point is None or point[0] % SECP256K1_N != r or point[0] >= SECP256K1_N:
        # OpenSSL's signature does not verify, or R.x overflowed n (probability ~2^-128),
        # which Ethereum's v cannot express.
        raise RuntimeError("cannot derive the recovery id of a fresh secp256k1 signature")
    return point[1] & 1


def _recover_point(digest: bytes, r: int, s: int, recovery_id: int) -> Point:
    if not (0 < r < SECP256K1_N and 0 < s < SECP256K1_N):
        raise KeyInputError("signature r and s must lie in 1 .. n-1 of secp256k1")
    p = SECP256K1_P
    y_squared = (pow(r, 3, p) + 7) % p
    y = pow(y_squared, (p + 1) // 4, p)
    if y * y % p != y_squared:
        raise KeyInputError("signature r is not the x of a secp256k1 point")
    if y & 1 != recovery_id:
        y = p - y
    r_inverse = pow(r, -1, SECP256K1_N)
    point = _add(
        _multiply(s * r_inverse % SECP256K1_N, (r, y)),
        _multiply(-_digest_scalar(digest) * r_inverse % SECP256K1_N, SECP256K1_G),
    )
    if point is None:
        raise KeyInputError("the signature recovers the point at infinity, not a public key")
    return point


# --- both keys together ------------------------------------------------------------------------


@dataclass(frozen=True)
class EnclaveKeys:
    encryption: EncryptionKey
    ethereum: EthereumKey

    @classmethod
    def generate(cls) -> EnclaveKeys:
        return cls(EncryptionKey.generate(), EthereumKey.generate())
