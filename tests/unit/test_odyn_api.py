"""odyn's API and aux API over real loopback HTTP, with an emulated NSM as /dev/nsm.

The client side of the encryption scheme is written here from its specification (ECDH P-384,
HKDF-SHA256 with salt = the two uncompressed SEC1 keys sorted bytewise || nonce and info
``enclaver-ecdh-aes256gcm-v1``, AES-256-GCM), not taken from the code under test. Ethereum
signing is checked byte for byte against eth-account's documented vector.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave_runtime.emulator.ca import EmulatorCA
from enclave_runtime.emulator.nsm_device import NsmDevice, NsmServer, boot_pcrs
from enclave_runtime.formats.attestation import verify_attestation_document
from enclave_runtime.formats.manifest import Api, AuxApi
from enclave_runtime.formats.pcr import Measurements
from enclave_runtime.odyn.api import ApiServers, ApiStartError, NsmAccess, start_api
from enclave_runtime.odyn.keys import (
    SECP256K1_N,
    EthereumKey,
    KeyInputError,
    ReplayCache,
    keccak256,
    personal_message_hash,
    recover_address,
    recover_personal_signer,
)
from enclave_runtime.transport.nsm import NsmError

T = TypeVar("T")
INSTANCE = "i-0123456789abcdef0"
MODULE_ID = f"{INSTANCE}-enc0123456789abcdef"
MEASUREMENTS = Measurements(
    pcr0=hashlib.sha384(b"pcr0").digest(),
    pcr1=hashlib.sha384(b"pcr1").digest(),
    pcr2=hashlib.sha384(b"pcr2").digest(),
)
INFO = b"enclaver-ecdh-aes256gcm-v1"

# eth-account, eth_account/account.py (Account.sign_message docstring) and
# tests/core/test_accounts.py (test_eth_account_recover_message, ..._recover_signature_bytes).
ETH_ACCOUNT_KEY = bytes.fromhex("b25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364")
ETH_ACCOUNT_ADDRESS = "0x5ce9454909639D2D17A3F753ce7d93fa0b9aB12E"
ETH_ACCOUNT_HASH = "1476abb745d423bf09273f1afd887d951181d25adc66c4834a70491911b7f750"
ETH_ACCOUNT_SIGNATURE = (
    "e6ca9bba58c88611fad66a6ce8f996908195593807c4b38bd528d2cff09d4eb3"
    "3e5bfbbf4d3e39b1a2fd816a7680c19ebebaf3a141b239934ad43cb33fcec8ce1c"
)
LEADING_ZEROS_SIGNATURE = (
    b"\0Q[\xc8\xfd2&N!\xec\x08 \xe8\xc5\x12>\xd5\x8c\x11\x95\xc9\xea\x17\xcb\x01\x8b\x1a\xd4"
    b"\x07<\xc5\xa6\0\x80\xf5\xdc\xec9zZ\x8cR0\x82\xbf\xa4\x17qV\x89\x03\xaaUN\xc0k\xa8G\\"
    b"\xa9\x05\x0f\xb7\xd5\x00"
)
LEADING_ZEROS_ADDRESS = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"


# --- the client side of the scheme, from the specification -------------------------------------


def sec1(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Client:
    """A client of the enclave's encryption API."""

    def __init__(self) -> None:
        self.private_key = ec.generate_private_key(ec.SECP384R1())
        self.public_der = der(self.private_key.public_key())

    def message_key(self, enclave_key: ec.EllipticCurvePublicKey, nonce: bytes) -> bytes:
        shared = self.private_key.exchange(ec.ECDH(), enclave_key)
        first, second = sorted([sec1(self.private_key.public_key()), sec1(enclave_key)])
        return HKDF(hashes.SHA256(), 32, first + second + nonce, INFO).derive(shared)

    def seal(self, enclave_key: ec.EllipticCurvePublicKey, text: str) -> dict[str, str]:
        nonce = os.urandom(12)
        ciphertext = AESGCM(self.message_key(enclave_key, nonce)).encrypt(
            nonce, text.encode(), None
        )
        return {
            "nonce": "0x" + nonce.hex(),
            "client_public_key": "0x" + self.public_der.hex(),
            "encrypted_data": ciphertext.hex(),
        }

    def open(self, enclave_key: ec.EllipticCurvePublicKey, nonce: bytes, ciphertext: bytes) -> str:
        return (
            AESGCM(self.message_key(enclave_key, nonce)).decrypt(nonce, ciphertext, None).decode()
        )


# --- fixtures: an emulated NSM and the servers on a background event loop ----------------------


class Nsm:
    """The emulated NSM on a Unix socket; can be stopped and started again on the same path."""

    def __init__(self, ca: EmulatorCA, path: Path) -> None:
        self.ca = ca
        self.path = path
        self.device = NsmDevice(MODULE_ID, boot_pcrs(MEASUREMENTS, INSTANCE, False), ca)
        self.server: NsmServer | None = None

    def start(self) -> None:
        self.server = NsmServer(self.device, self.path).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.close()


class Running:
    """start_api on its own event loop thread; requests come from http.client in the test."""

    def __init__(self, nsm_path: Path, aux: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        servers = self.call(start_api(Api(0), AuxApi(0) if aux else None, nsm_path))
        assert isinstance(servers, ApiServers)
        self.servers = servers

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self.call(self.servers.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        aux: bool = False,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        port = self.servers.aux_port if aux else self.servers.api_port
        assert port is not None
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        response.read_body = response.read()  # type: ignore[attr-defined]
        connection.close()
        return response

    def json(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        response = self.request(method, path, body, **options)
        assert response.status == 200, response.read_body  # type: ignore[attr-defined]
        assert response.getheader("Content-Type") == "application/json"
        return json.loads(response.read_body)  # type: ignore[attr-defined]

    def enclave_key(self) -> ec.EllipticCurvePublicKey:
        answer = self.json("GET", "/v1/encryption/public_key")
        key = serialization.load_der_public_key(bytes.fromhex(answer["public_key_der"][2:]))
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key


def body_of(response: http.client.HTTPResponse) -> bytes:
    return response.read_body  # type: ignore[attr-defined,no-any-return]


def error_of(response: http.client.HTTPResponse) -> str:
    assert response.getheader("Content-Type") == "application/json"
    return str(json.loads(body_of(response))["error"])


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: keep them short.
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="api-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def nsm(socket_dir: Path) -> Iterator[Nsm]:
    emulated = Nsm(EmulatorCA(socket_dir / "ca"), socket_dir / "nsm.sock")
    emulated.start()
    yield emulated
    if emulated.server is not None:
        emulated.stop()


@pytest.fixture
def api(nsm: Nsm) -> Iterator[Running]:
    running = Running(nsm.path)
    yield running
    running.close()


def verify(document: bytes, nsm: Nsm, **expected: Any) -> Any:
    return verify_attestation_document(
        document, root=nsm.ca.root.certificate, expected_pcrs=MEASUREMENTS.as_pcrs(), **expected
    ).document


# --- attestation -------------------------------------------------------------------------------


def test_attestation_binds_the_callers_fields_and_verifies_against_the_emulator_root(
    api: Running, nsm: Nsm
) -> None:
    client_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = client_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    body = {
        "nonce": base64.b64encode(b"fresh nonce").decode(),
        "user_data": base64.b64encode(b"app data").decode(),
        "public_key": pem,
    }
    response = api.request("POST", "/v1/attestation", body)
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/cbor"
    document = verify(
        body_of(response),
        nsm,
        expected_nonce=b"fresh nonce",
        expected_user_data=b"app data",
        expected_public_key=der(client_key),
    )
    assert document.module_id == MODULE_ID


def test_attestation_defaults_bind_the_encryption_key_and_the_eth_address(
    api: Running, nsm: Nsm
) -> None:
    address = api.json("GET", "/v1/eth/address")["address"]
    response = api.request("POST", "/v1/attestation", {})
    document = verify(body_of(response), nsm, expected_public_key=der(api.enclave_key()))
    assert document.nonce is None
    assert json.loads(document.user_data) == {"eth_addr": address}


def test_attestation_accepts_the_forks_user_data_object_and_sets_eth_addr(
    api: Running, nsm: Nsm
) -> None:
    address = api.json("GET", "/v1/eth/address")["address"]
    body = {"user_data": {"session": "abc", "eth_addr": "0xforged"}}
    document = verify(body_of(api.request("POST", "/v1/attestation", body)), nsm)
    assert document.user_data == b'{"eth_addr":"%s","session":"abc"}' % address.encode()


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"nonce": "not base64!"}, "'nonce' is not standard base64"),
        ({"nonce": base64.b64encode(bytes(1025)).decode()}, "'nonce' is 1025 bytes"),
        ({"nonce": 7}, "'nonce' must be a string, not a number"),
        ({"user_data": [1]}, "'user_data' must be a base64 string or an object"),
        ({"public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}, "PEM"),
        ({"nounce": "AAAA"}, "unknown field 'nounce'"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"nonce": "AAAA", "nonce": "BBBB"}', "appears twice"),
        (b'{"nonce": ', "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"nonce": 1' + b"0" * 5000 + b"}", "longer than 64 characters"),
    ],
)
def test_bad_attestation_requests_get_400_naming_the_problem(
    api: Running, body: Any, complaint: str
) -> None:
    response = api.request("POST", "/v1/attestation", body)
    assert response.status == 400
    assert complaint in error_of(response)


# --- encryption --------------------------------------------------------------------------------


def test_the_public_key_comes_as_der_hex_and_pem_of_one_p384_key(api: Running) -> None:
    answer = api.json("GET", "/v1/encryption/public_key")
    from_der = serialization.load_der_public_key(bytes.fromhex(answer["public_key_der"][2:]))
    from_pem = serialization.load_pem_public_key(answer["public_key_pem"].encode())
    assert isinstance(from_der, ec.EllipticCurvePublicKey)
    assert isinstance(from_der.curve, ec.SECP384R1)
    assert from_der == from_pem
    assert answer["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----\n")


def test_a_client_message_decrypts_in_the_enclave(api: Running) -> None:
    client = Client()
    sealed = client.seal(api.enclave_key(), "hello enclave ♥")
    assert api.json("POST", "/v1/encryption/decrypt", sealed) == {"plaintext": "hello enclave ♥"}


def test_an_enclave_message_decrypts_at_the_client(api: Running) -> None:
    client = Client()
    answer = api.json(
        "POST",
        "/v1/encryption/encrypt",
        {"plaintext": "secret ♥ reply", "client_public_key": client.public_der.hex()},
    )
    enclave_key = serialization.load_der_public_key(bytes.fromhex(answer["enclave_public_key"]))
    assert isinstance(enclave_key, ec.EllipticCurvePublicKey)
    nonce = bytes.fromhex(answer["nonce"])
    assert len(nonce) == 12
    opened = client.open(enclave_key, nonce, bytes.fromhex(answer["encrypted_data"]))
    assert opened == "secret ♥ reply"


def test_a_replayed_message_is_refused_whatever_the_key_encoding(api: Running) -> None:
    client = Client()
    sealed = client.seal(api.enclave_key(), "pay 10")
    assert api.request("POST", "/v1/encryption/decrypt", sealed).status == 200
    replayed = api.request("POST", "/v1/encryption/decrypt", sealed)
    assert replayed.status == 400
    assert "replayed nonce" in error_of(replayed)
    # The same key spelled with a compressed point is other bytes but the same client.
    respelled_key = _compressed_spki_hex(client)
    assert respelled_key != client.public_der.hex()
    assert serialization.load_der_public_key(bytes.fromhex(respelled_key)) == (
        client.private_key.public_key()
    )
    respelled = dict(sealed, client_public_key=respelled_key)
    assert api.request("POST", "/v1/encryption/decrypt", respelled).status == 400


def _compressed_spki_hex(client: Client) -> str:
    """The client's key as a DER SPKI holding the compressed point (a different byte string)."""
    point = client.private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    algorithm = bytes.fromhex("301006072a8648ce3d020106052b81040022")
    bit_string = b"\x03" + bytes([len(point) + 1]) + b"\x00" + point
    body = algorithm + bit_string
    return (b"\x30" + bytes([len(body)]) + body).hex()


def test_an_enclave_response_cannot_be_reflected_back_as_a_request(api: Running) -> None:
    client = Client()
    answer = api.json(
        "POST",
        "/v1/encryption/encrypt",
        {"plaintext": "to the client", "client_public_key": client.public_der.hex()},
    )
    reflected = api.request(
        "POST",
        "/v1/encryption/decrypt",
        {
            "nonce": answer["nonce"],
            "client_public_key": client.public_der.hex(),
            "encrypted_data": answer["encrypted_data"],
        },
    )
    assert reflected.status == 400
    assert "replayed nonce" in error_of(reflected)


def test_a_forged_message_does_not_use_up_the_clients_nonce(api: Running) -> None:
    client = Client()
    sealed = client.seal(api.enclave_key(), "genuine")
    forged = dict(sealed, encrypted_data=("00" * 16) + sealed["encrypted_data"][32:])
    refused = api.request("POST", "/v1/encryption/decrypt", forged)
    assert refused.status == 400
    assert "authentication failed" in error_of(refused)
    assert api.json("POST", "/v1/encryption/decrypt", sealed) == {"plaintext": "genuine"}


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"nonce": "00" * 16}, "nonce must be exactly 12 bytes"),
        ({"nonce": "xyz"}, "'nonce' is not hex"),
        ({"client_public_key": "3000"}, "not a DER SubjectPublicKeyInfo"),
        ({"encrypted_data": "00"}, "shorter than the 16-byte AES-GCM tag"),
        ({"encrypted_data": None}, "'encrypted_data' is required"),
    ],
)
def test_bad_decrypt_requests_get_400(api: Running, change: dict[str, Any], complaint: str) -> None:
    body = dict(Client().seal(api.enclave_key(), "x"), **change)
    response = api.request("POST", "/v1/encryption/decrypt", body)
    assert response.status == 400
    assert complaint in error_of(response)


def test_a_key_on_another_curve_is_refused(api: Running) -> None:
    p256 = der(ec.generate_private_key(ec.SECP256R1()).public_key())
    response = api.request(
        "POST", "/v1/encryption/encrypt", {"plaintext": "x", "client_public_key": p256.hex()}
    )
    assert response.status == 400
    assert "must be a P-384 (secp384r1) key, not secp256r1" in error_of(response)


def test_the_replay_cache_forgets_only_its_oldest_pairs() -> None:
    cache = ReplayCache(capacity=3)
    pairs = [(b"k", bytes([index]) * 12) for index in range(4)]
    assert all(cache.claim(*pair) for pair in pairs[:3])
    assert not cache.claim(*pairs[0])
    assert cache.claim(*pairs[3])
    assert len(cache) == 3
    assert not cache.seen(*pairs[0]) and cache.seen(*pairs[1]) and cache.seen(*pairs[3])


# --- Ethereum ----------------------------------------------------------------------------------


def test_personal_sign_matches_eth_accounts_documented_vector() -> None:
    key = EthereumKey.from_private_bytes(ETH_ACCOUNT_KEY)
    assert key.address == ETH_ACCOUNT_ADDRESS.lower()
    assert personal_message_hash("I♥SF".encode()).hex() == ETH_ACCOUNT_HASH
    assert key.sign_personal_message("I♥SF".encode()).hex() == ETH_ACCOUNT_SIGNATURE


def test_signing_without_rfc6979_still_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older cryptography has no deterministic_signing: randomised ECDSA must still work."""
    original = ec.ECDSA

    def randomised_only(algorithm: Any, **options: Any) -> ec.ECDSA:
        if options:
            raise TypeError("unexpected keyword argument 'deterministic_signing'")
        return original(algorithm)

    monkeypatch.setattr(ec, "ECDSA", randomised_only)
    key = EthereumKey.generate()
    signatures = {key.sign_personal_message(b"m") for _ in range(4)}
    assert len(signatures) > 1  # randomised indeed
    for signature in signatures:
        assert int.from_bytes(signature[32:64], "big") <= SECP256K1_N // 2
        assert recover_personal_signer(b"m", signature) == key.address


def test_keccak_is_not_sha3() -> None:
    assert keccak256(b"").hex() == (
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )


@pytest.mark.parametrize("v", [0, 27])
def test_recovery_matches_eth_accounts_vector_with_leading_zero_bytes(v: int) -> None:
    signature = LEADING_ZEROS_SIGNATURE[:64] + bytes([v])
    assert recover_personal_signer(b"10284", signature) == LEADING_ZEROS_ADDRESS.lower()


def test_recovery_rejects_malformed_signatures() -> None:
    digest = bytes(32)
    with pytest.raises(KeyInputError, match="65 bytes"):
        recover_address(digest, bytes(64))
    with pytest.raises(KeyInputError, match="v must be"):
        recover_address(digest, bytes.fromhex(ETH_ACCOUNT_SIGNATURE)[:64] + b"\x05")
    with pytest.raises(KeyInputError, match=r"1 \.\. n-1"):
        recover_address(digest, bytes(64) + b"\x1b")


def test_the_enclaves_signature_recovers_its_address(api: Running, nsm: Nsm) -> None:
    identity = api.json("GET", "/v1/eth/address")
    assert len(identity["address"]) == 42 and len(identity["public_key"]) == 132
    answer = api.json("POST", "/v1/eth/sign", {"message": "log in to example.org"})
    signature = bytes.fromhex(answer["signature"][2:])
    assert len(signature) == 65 and signature[64] in (27, 28)
    assert answer["address"] == identity["address"]
    assert answer["attestation"] is None
    assert recover_personal_signer(b"log in to example.org", signature) == identity["address"]

    empty = api.json("POST", "/v1/eth/sign", {"message": ""})
    assert (
        recover_personal_signer(b"", bytes.fromhex(empty["signature"][2:])) == (identity["address"])
    )
    binary = api.json("POST", "/v1/eth/sign", {"message_hex": "0x00ff10"})
    assert (
        recover_personal_signer(b"\x00\xff\x10", bytes.fromhex(binary["signature"][2:]))
        == (identity["address"])
    )


def test_a_signature_can_come_with_an_attestation_of_the_signing_key(
    api: Running, nsm: Nsm
) -> None:
    identity = api.json("GET", "/v1/eth/address")
    answer = api.json("POST", "/v1/eth/sign", {"message": "hi", "include_attestation": True})
    document = verify(
        base64.b64decode(answer["attestation"]),
        nsm,
        expected_nonce=personal_message_hash(b"hi"),
        expected_user_data=b'{"eth_addr":"%s"}' % identity["address"].encode(),
    )
    signing_key = serialization.load_der_public_key(document.public_key)
    assert isinstance(signing_key, ec.EllipticCurvePublicKey)
    assert sec1(signing_key).hex() == identity["public_key"][2:]


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({}, "exactly one of 'message'"),
        ({"message": "a", "message_hex": "00"}, "exactly one of 'message'"),
        ({"message": "a", "include_attestation": "yes"}, "must be true or false"),
        ({"message_hash": "0x" + "12" * 32}, "unknown field 'message_hash'"),
        ({"message": "\ud800"}, "unpaired surrogate"),
    ],
)
def test_bad_sign_requests_get_400(api: Running, body: Any, complaint: str) -> None:
    response = api.request("POST", "/v1/eth/sign", body)
    assert response.status == 400
    assert complaint in error_of(response)


# --- random, routing, the aux API --------------------------------------------------------------


def test_random_gives_32_fresh_bytes_from_the_nsm(api: Running) -> None:
    first = api.json("GET", "/v1/random")["random_bytes"]
    second = api.json("GET", "/v1/random")["random_bytes"]
    assert first.startswith("0x") and len(bytes.fromhex(first[2:])) == 32
    assert first != second


def test_unknown_paths_are_404_and_other_methods_405(api: Running) -> None:
    missing = api.request("GET", "/v1/nothing")
    assert missing.status == 404
    assert "no endpoint at /v1/nothing" in error_of(missing)
    wrong = api.request("GET", "/v1/attestation")
    assert wrong.status == 405
    assert wrong.getheader("Allow") == "POST"
    assert "accepts POST, not GET" in error_of(wrong)


def test_one_connection_serves_several_requests(api: Running) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", api.servers.api_port, timeout=10)
    for _ in range(3):
        connection.request("GET", "/v1/eth/address")
        response = connection.getresponse()
        assert response.status == 200
        response.read()
    connection.close()


def test_the_aux_api_offers_only_the_public_endpoints(api: Running) -> None:
    main = api.json("GET", "/v1/eth/address")
    assert api.json("GET", "/v1/eth/address", aux=True) == main
    assert api.json("GET", "/v1/encryption/public_key", aux=True) == api.json(
        "GET", "/v1/encryption/public_key"
    )
    for method, path in [
        ("POST", "/v1/eth/sign"),
        ("POST", "/v1/encryption/decrypt"),
        ("POST", "/v1/encryption/encrypt"),
        ("GET", "/v1/random"),
    ]:
        assert api.request(method, path, {}, aux=True).status == 404


def test_aux_attestation_always_binds_the_enclaves_key_and_address(api: Running, nsm: Nsm) -> None:
    address = api.json("GET", "/v1/eth/address")["address"]
    intruder = ec.generate_private_key(ec.SECP384R1()).public_key()
    body = {
        "nonce": base64.b64encode(b"remote nonce").decode(),
        "public_key": intruder.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        "user_data": base64.b64encode(b'{"eth_addr":"0xattacker"}').decode(),
    }
    response = api.request("POST", "/v1/attestation", body, aux=True)
    assert response.status == 200
    assert response.getheader("Access-Control-Allow-Origin") == "*"
    verify(
        body_of(response),
        nsm,
        expected_nonce=b"remote nonce",
        expected_public_key=der(api.enclave_key()),
        expected_user_data=b'{"eth_addr":"%s"}' % address.encode(),
    )
    empty = api.request("POST", "/v1/attestation", b"", aux=True)
    assert empty.status == 200


def test_aux_attestation_has_the_forks_cors(api: Running) -> None:
    preflight = api.request("OPTIONS", "/v1/attestation", aux=True)
    assert preflight.status == 204
    assert {
        name: preflight.getheader(name)
        for name in (
            "Access-Control-Allow-Origin",
            "Access-Control-Allow-Methods",
            "Access-Control-Allow-Headers",
            "Access-Control-Max-Age",
        )
    } == {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type",
        "Access-Control-Max-Age": "86400",
    }
    bad = api.request("POST", "/v1/attestation", b"{nope", aux=True)
    assert bad.status == 400
    assert bad.getheader("Access-Control-Allow-Origin") == "*"


def test_the_aux_api_answers_503_json_when_the_api_is_down(api: Running) -> None:
    api.call(api.servers.api_service.close())
    for method, path in [
        ("GET", "/v1/eth/address"),
        ("POST", "/v1/attestation"),
        ("GET", "/v1/encryption/public_key"),
    ]:
        response = api.request(method, path, b"{}" if method == "POST" else None, aux=True)
        assert response.status == 503
        assert error_of(response) == "Internal API service unavailable"


class DroppedConnection:
    """An NSM client whose connection broke, as when the emulator restarts."""

    def get_random(self) -> bytes:
        raise NsmError("the emulated NSM closed the connection")

    def close(self) -> None:
        pass


def test_an_nsm_outage_is_503_and_the_api_reconnects_when_it_returns(
    api: Running, nsm: Nsm
) -> None:
    api.servers.api.nsm.close()
    api.servers.api.nsm = NsmAccess(str(nsm.path), DroppedConnection())  # type: ignore[arg-type]
    nsm.stop()
    for _ in range(2):  # the broken connection, then no NSM to reconnect to
        down = api.request("GET", "/v1/random")
        assert down.status == 503
        assert "the NSM is unavailable" in error_of(down)
    nsm.start()
    assert api.request("GET", "/v1/random").status == 200


# --- robustness and start-up -------------------------------------------------------------------


MALFORMED = [
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET /v1/random HTTP/1.1\r\n\r\n",  # no Host
    b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
    b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}",  # then EOF
    b"POST /v1/attestation HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    b"GET /v1/random HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    b"GET /v1/random HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /v1/eth/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n\xff\xff\xff\xff\xff",
]


@pytest.mark.parametrize("aux", [False, True])
def test_malformed_requests_never_kill_the_server(api: Running, aux: bool) -> None:
    port = api.servers.aux_port if aux else api.servers.api_port
    for raw in MALFORMED:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        if answer:
            assert answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 5"), raw
    assert api.json("GET", "/v1/eth/address", aux=aux)["address"].startswith("0x")


def test_no_api_section_means_no_servers(nsm: Nsm) -> None:
    assert asyncio.run(start_api(None, None, nsm.path)) is None


def test_a_missing_nsm_stops_the_start(socket_dir: Path) -> None:
    with pytest.raises(NsmError, match="does not exist"):
        asyncio.run(start_api(Api(0), None, socket_dir / "no-nsm"))


def test_a_taken_port_is_a_clear_error(api: Running, nsm: Nsm) -> None:
    taken = api.servers.api_port
    with pytest.raises(ApiStartError, match=r"aux_api\.listen_port.*choose a free port"):
        asyncio.run(start_api(Api(0), AuxApi(taken), nsm.path))


def test_connections_beyond_the_limit_get_503_and_the_server_goes_on(
    api: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("enclave_runtime.odyn.api.MAX_CONNECTIONS", 1)
    with socket.create_connection(("127.0.0.1", api.servers.api_port), timeout=10) as idle:
        idle.sendall(b"GET /v1/random HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(12) == b"HTTP/1.1 200"  # the idle connection is being served
        refused = api.request("GET", "/v1/eth/address")
        assert refused.status == 503
        assert "at its limit of 1 connections" in error_of(refused)
    monkeypatch.setattr("enclave_runtime.odyn.api.MAX_CONNECTIONS", 128)
    assert api.request("GET", "/v1/eth/address").status == 200
