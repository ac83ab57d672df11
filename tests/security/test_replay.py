"""Replay protection of the encryption API (issue 15): a timestamped message replays never,
however many messages pass; outside its window it is refused (docs/api.md)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave_runtime.odyn.keys import (
    ENCRYPTION_INFO,
    REPLAY_WINDOW_SECONDS,
    EncryptionKey,
    KeyInputError,
    ReplayCache,
    ReplayError,
    timestamp_aad,
)

pytestmark = pytest.mark.security


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _client_message(
    enclave: EncryptionKey, client: ec.EllipticCurvePrivateKey, text: bytes, ts: int | None
) -> tuple[bytes, bytes]:
    nonce = os.urandom(12)
    first, second = sorted([_point(client.public_key()), _point(enclave.public_key)])
    shared = client.exchange(ec.ECDH(), enclave.public_key)
    key = HKDF(hashes.SHA256(), 32, first + second + nonce, ENCRYPTION_INFO).derive(shared)
    return AESGCM(key).encrypt(nonce, text, timestamp_aad(ts)), nonce


def _der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_timestamped_message_never_replays_however_many_pass() -> None:
    clock = Clock()
    enclave = EncryptionKey(
        ec.generate_private_key(ec.SECP384R1()), ReplayCache(capacity=8, clock=clock)
    )
    client = ec.generate_private_key(ec.SECP384R1())
    ts = int(clock.now * 1000)
    captured, nonce = _client_message(enclave, client, b"pay 10", ts)
    assert enclave.decrypt(captured, _der(client), nonce, ts) == b"pay 10"
    for _ in range(100):  # far more than the volume cache's 8 entries
        ciphertext, other = _client_message(enclave, client, b"x", ts)
        enclave.decrypt(ciphertext, _der(client), other, ts)
    with pytest.raises(ReplayError, match="replayed nonce"):
        enclave.decrypt(captured, _der(client), nonce, ts)
    clock.now += REPLAY_WINDOW_SECONDS + 1  # forgotten only once its timestamp is too old
    with pytest.raises(ReplayError, match="behind the enclave's clock"):
        enclave.decrypt(captured, _der(client), nonce, ts)


def test_the_timestamp_is_authenticated() -> None:
    clock = Clock()
    enclave = EncryptionKey(ec.generate_private_key(ec.SECP384R1()), ReplayCache(clock=clock))
    client = ec.generate_private_key(ec.SECP384R1())
    ts = int(clock.now * 1000)
    ciphertext, nonce = _client_message(enclave, client, b"hi", ts)
    with pytest.raises(KeyInputError, match="authentication failed"):
        enclave.decrypt(ciphertext, _der(client), nonce, ts + 1)  # a fresher-looking copy
    with pytest.raises(KeyInputError, match="authentication failed"):
        enclave.decrypt(ciphertext, _der(client), nonce)  # stripped to the fork's form


def test_future_timestamps_are_refused() -> None:
    clock = Clock()
    enclave = EncryptionKey(ec.generate_private_key(ec.SECP384R1()), ReplayCache(clock=clock))
    client = ec.generate_private_key(ec.SECP384R1())
    ts = int((clock.now + REPLAY_WINDOW_SECONDS + 5) * 1000)
    ciphertext, nonce = _client_message(enclave, client, b"hi", ts)
    with pytest.raises(ReplayError, match="ahead of the enclave's clock"):
        enclave.decrypt(ciphertext, _der(client), nonce, ts)


def test_a_full_timed_store_refuses_instead_of_forgetting() -> None:
    clock = Clock()
    cache = ReplayCache(timed_capacity=3, clock=clock)
    ts = int(clock.now * 1000)
    for n in range(3):
        assert cache.claim(b"k", bytes([n]) * 12, ts)
    with pytest.raises(ReplayError, match="too many timestamped messages"):
        cache.claim(b"k", b"\x09" * 12, ts)
    assert cache.seen(b"k", b"\x00" * 12)
    clock.now += REPLAY_WINDOW_SECONDS + 1
    assert cache.claim(b"k", b"\x09" * 12, int(clock.now * 1000))


def test_enclave_replies_can_carry_a_timestamp() -> None:
    clock = Clock()
    enclave = EncryptionKey(ec.generate_private_key(ec.SECP384R1()), ReplayCache(clock=clock))
    client = ec.generate_private_key(ec.SECP384R1())
    message = enclave.encrypt(b"reply", _der(client), timestamped=True)
    assert message.timestamp_ms == int(clock.now * 1000)
    first, second = sorted([_point(client.public_key()), _point(enclave.public_key)])
    shared = client.exchange(ec.ECDH(), enclave.public_key)
    key = HKDF(hashes.SHA256(), 32, first + second + message.nonce, ENCRYPTION_INFO).derive(shared)
    aad = timestamp_aad(message.timestamp_ms)
    assert AESGCM(key).decrypt(message.nonce, message.ciphertext, aad) == b"reply"
