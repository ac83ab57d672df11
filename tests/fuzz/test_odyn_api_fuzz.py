"""The API's request handling on hostile bodies: always an answer, never an internal error.

Bodies come from the app or, through the aux API, from the network. Random bytes, mutations of
valid requests and well-formed JSON of the wrong shapes must all end in a deliberate response
(200, 400, 404, 405 or 503), never a 500 (which :func:`respond` gives an escaping exception).
The NSM is a stub that insists on the real device's size limits, so a field the API forgot to
bound shows up as a 500 too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.nsm_messages import ATTESTATION_FIELD_MAX
from enclave_runtime.odyn.api import ApiEndpoints, AuxEndpoints, Response
from enclave_runtime.odyn.http import Headers, Request
from enclave_runtime.odyn.keys import EnclaveKeys


class StubNsm:
    async def attestation(
        self, *, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
    ) -> bytes:
        for value in (user_data, nonce, public_key):
            assert value is None or len(value) <= ATTESTATION_FIELD_MAX
        return b"\x84document"

    async def random(self, size: int) -> bytes:
        return bytes(size)

    def close(self) -> None:
        pass


KEYS = EnclaveKeys.generate()
API = ApiEndpoints(KEYS, StubNsm())  # type: ignore[arg-type]
AUX = AuxEndpoints(API, lambda: True)
CLIENT = ec.generate_private_key(ec.SECP384R1())
CLIENT_DER = CLIENT.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
CLIENT_PEM = CLIENT.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
POST_PATHS = [
    "/v1/attestation",
    "/v1/encryption/encrypt",
    "/v1/encryption/decrypt",
    "/v1/eth/sign",
]
FIELD_NAMES = sorted(
    {
        "nonce",
        "user_data",
        "public_key",
        "plaintext",
        "client_public_key",
        "encrypted_data",
        "message",
        "message_hex",
        "include_attestation",
    }
)
ACCEPTED = {200, 204, 400, 404, 405, 503}


def _sealed(text: bytes) -> dict[str, str]:
    """A genuine client message, so mutations start from something that decrypts."""
    enclave = KEYS.encryption.public_key
    nonce = os.urandom(12)
    first, second = sorted(
        key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        for key in (CLIENT.public_key(), enclave)
    )
    shared = CLIENT.exchange(ec.ECDH(), enclave)
    aes_key = HKDF(hashes.SHA256(), 32, first + second + nonce, b"enclaver-ecdh-aes256gcm-v1")
    ciphertext = AESGCM(aes_key.derive(shared)).encrypt(nonce, text, None)
    return {
        "nonce": nonce.hex(),
        "client_public_key": CLIENT_DER.hex(),
        "encrypted_data": ciphertext.hex(),
    }


VALID_BODIES = [
    (
        "/v1/attestation",
        {
            "nonce": base64.b64encode(b"n" * 32).decode(),
            "user_data": base64.b64encode(b"data").decode(),
            "public_key": CLIENT_PEM.decode(),
        },
    ),
    ("/v1/attestation", {"user_data": {"app": "x"}}),
    ("/v1/encryption/encrypt", {"plaintext": "hi", "client_public_key": CLIENT_DER.hex()}),
    ("/v1/encryption/decrypt", _sealed(b"hello")),
    ("/v1/eth/sign", {"message": "sign me", "include_attestation": True}),
    ("/v1/eth/sign", {"message_hex": "0x00ff"}),
]


def _post(path: str, body: bytes, aux: bool = False) -> Response:
    request = Request("POST", path, "HTTP/1.1", Headers((("Host", "x"),)), body)
    return asyncio.run((AUX if aux else API).handle(request))


def _check(response: Response) -> None:
    assert response.status in ACCEPTED, response.body


@given(path=st.sampled_from(POST_PATHS), body=st.binary(max_size=512), aux=st.booleans())
def test_random_bodies_get_a_deliberate_answer(path: str, body: bytes, aux: bool) -> None:
    _check(_post(path, body, aux))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    path, fields = draw(st.sampled_from(VALID_BODIES))
    data = bytearray(json.dumps(fields).encode())
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            data[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[position : position + draw(st.integers(1, 8))]
    return path, bytes(data)


@given(case=mutated(), aux=st.booleans())
def test_mutated_valid_requests_get_a_deliberate_answer(case: tuple[str, bytes], aux: bool) -> None:
    path, body = case
    _check(_post(path, body, aux))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["0x", "0x00", "AAAA", "00" * 12, CLIENT_DER.hex(), CLIENT_PEM.decode()]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(
    path=st.sampled_from(POST_PATHS),
    fields=st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=4),
    aux=st.booleans(),
)
def test_json_objects_of_every_shape_get_a_deliberate_answer(
    path: str, fields: dict[str, Any], aux: bool
) -> None:
    _check(_post(path, json.dumps(fields).encode(), aux))


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "OPTIONS", "DELETE", "HEAD"]),
    target=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),
    aux=st.booleans(),
)
def test_any_method_and_path_get_a_deliberate_answer(method: str, target: str, aux: bool) -> None:
    request = Request(method, "/" + target, "HTTP/1.1", Headers((("Host", "x"),)), b"")
    _check(asyncio.run((AUX if aux else API).handle(request)))
