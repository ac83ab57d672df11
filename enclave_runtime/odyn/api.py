"""odyn's HTTP API for the app (127.0.0.1:``api.listen_port``) and the aux API for the world.

The API is enclaver's (``POST /v1/attestation``) plus the endpoints of sparsity-xyz's fork
(encryption, Ethereum, random), with the same paths, field names and JSON shapes, so clients
written for either keep working. The aux API (127.0.0.1:``aux_api.listen_port``, meant to be
published through ingress) exposes only the read-only part: the Ethereum address, the
encryption public key and attestations that always bind the enclave's own encryption key.

Every request is untrusted: bodies are bounded, JSON must be one object with known fields, and
every bad input is a 400 with ``{"error": "..."}`` naming the field; unknown paths are 404,
known paths with another method 405. Keys are created at start and never leave memory
(:mod:`enclave_runtime.odyn.keys`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
from collections.abc import Awaitable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats import strict_json
from enclave_runtime.formats.manifest import Api, AuxApi
from enclave_runtime.formats.nsm_messages import ATTESTATION_FIELD_MAX, ErrorCode
from enclave_runtime.odyn.http import (
    HttpError,
    Limits,
    Request,
    read_request,
    write_error,
    write_response,
)
from enclave_runtime.odyn.keys import EnclaveKeys, KeyInputError, personal_message_hash
from enclave_runtime.transport.nsm import DEFAULT_NSM_PATH, NsmClient, NsmError

LOG = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
# Encryption payloads travel as hex, so 1 MiB of body carries about 512 KiB of ciphertext.
API_LIMITS = Limits(max_body=1024 * 1024)
# The aux API only ever needs a nonce; it faces the network through ingress.
AUX_API_LIMITS = Limits(
    max_line=4096,
    max_head=16 * 1024,
    max_headers=50,
    max_body=16 * 1024,
    head_timeout=15.0,
    body_timeout=15.0,
)
MAX_CONNECTIONS = 128
MAX_PEM_CHARS = 8192
MAX_JSON_NUMBER_CHARS = 64
RANDOM_SIZE = 32
NSM_RANDOM_ATTEMPTS = 16

JSON = "application/json"
CBOR = "application/cbor"
# The fork's aux API answers exactly this when it cannot reach the API.
API_DOWN_MESSAGE = "Internal API service unavailable"
CORS_ALLOW_ORIGIN = ("Access-Control-Allow-Origin", "*")
CORS_PREFLIGHT_HEADERS = (
    CORS_ALLOW_ORIGIN,
    ("Access-Control-Allow-Methods", "POST, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type"),
    ("Access-Control-Max-Age", "86400"),
)

ATTESTATION_FIELDS = ("nonce", "user_data", "public_key")
ENCRYPT_FIELDS = ("plaintext", "client_public_key", "timestamped")
DECRYPT_FIELDS = ("nonce", "client_public_key", "encrypted_data", "timestamp")
SIGN_FIELDS = ("message", "message_hex", "include_attestation")

T = TypeVar("T")


class ApiStartError(EnclaveOpsError):
    """The API or aux API could not start listening."""


# --- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> Response:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return cls(status, body, JSON)

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls.json({"error": message}, status)

    def with_headers(self, *headers: tuple[str, str]) -> Response:
        return Response(self.status, self.body, self.content_type, self.headers + headers)

    def header_items(self) -> list[tuple[str, str]]:
        content_type = [("Content-Type", self.content_type)] if self.content_type else []
        return content_type + list(self.headers)


Handler = Callable[[Request], Awaitable[Response]]
Routes = Mapping[str, Mapping[str, Handler]]


async def respond(handler: Handler, request: Request) -> Response:
    """The handler's response, with every failure turned into a JSON error response."""
    try:
        return await handler(request)
    except HttpError as err:
        return Response.error(err.status, str(err))
    except KeyInputError as err:
        return Response.error(400, str(err))
    except Exception:
        LOG.exception("%s %s failed", request.method, request.path)
        return Response.error(500, "internal error; the enclave's log has the details")


async def dispatch(routes: Routes, request: Request) -> Response:
    methods = routes.get(request.path)
    if methods is None:
        return Response.error(404, f"no endpoint at {request.path}")
    handler = methods.get(request.method)
    if handler is None:
        allowed = ", ".join(methods)
        message = f"{request.path} accepts {allowed}, not {request.method}"
        return Response.error(405, message).with_headers(("Allow", allowed))
    return await respond(handler, request)


# --- request bodies ----------------------------------------------------------------------------


def _short_number(text: str) -> str:
    # Unbounded digit strings cost quadratic time to convert on Python < 3.11.
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise ValueError(f"a number longer than {MAX_JSON_NUMBER_CHARS} characters")
    return text


def _bounded_int(text: str) -> int:
    return int(_short_number(text))


def _bounded_float(text: str) -> float:
    return float(_short_number(text))


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as one JSON object; an empty body is an empty object."""
    if not body.strip():
        return {}
    try:
        text = body.decode("utf-8")
        value = strict_json.loads(text, parse_int=_bounded_int, parse_float=_bounded_float)
    except UnicodeDecodeError:
        raise HttpError(400, "the request body is not UTF-8 JSON") from None
    except (ValueError, RecursionError) as err:
        raise HttpError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return value


def check_fields(fields: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise HttpError(
            400, f"unknown field {unknown[0]!r}; this endpoint accepts {', '.join(allowed)}"
        )


def request_fields(request: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    fields = parse_json_object(request.body)
    check_fields(fields, allowed)
    return fields


def _optional_string(fields: Mapping[str, Any], name: str) -> str | None:
    """A string field; absent and ``null`` are both None, as serde reads an Option."""
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise HttpError(400, f"field {name!r} must be a string, not {_json_type(value)}")
    return value


def _required_string(fields: Mapping[str, Any], name: str) -> str:
    value = _optional_string(fields, name)
    if value is None:
        raise HttpError(400, f"field {name!r} is required")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _utf8(text: str, name: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise HttpError(
            400, f"field {name!r} holds an unpaired surrogate (\\ud800-\\udfff)"
        ) from None


def _hex(fields: Mapping[str, Any], name: str) -> bytes:
    """A required hex field; a ``0x`` prefix is optional, as in the fork."""
    text = _required_string(fields, name)
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    try:
        return binascii.unhexlify(digits)
    except (binascii.Error, ValueError):
        raise HttpError(
            400, f"field {name!r} is not hex (an even number of 0-9a-f digits, 0x optional)"
        ) from None


def _base64(fields: Mapping[str, Any], name: str) -> bytes | None:
    text = _optional_string(fields, name)
    return None if text is None else _base64_bytes(text, name)


def _base64_bytes(text: str, name: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(
            400, f"field {name!r} is not standard base64 (A-Z a-z 0-9 + /, with = padding)"
        ) from None
    return _attestation_sized(data, name)


def _attestation_sized(data: bytes, name: str) -> bytes:
    if len(data) > ATTESTATION_FIELD_MAX:
        raise HttpError(
            400,
            f"field {name!r} is {len(data)} bytes; the NSM attests at most "
            f"{ATTESTATION_FIELD_MAX} bytes per field",
        )
    return data


def _pem_public_key(fields: Mapping[str, Any]) -> bytes | None:
    """The DER SubjectPublicKeyInfo of a PEM ``public_key`` field (any key type)."""
    text = _optional_string(fields, "public_key")
    if text is None:
        return None
    if len(text) > MAX_PEM_CHARS:
        raise HttpError(400, f"field 'public_key' is longer than {MAX_PEM_CHARS} characters")
    try:
        key = serialization.load_pem_public_key(_utf8(text, "public_key"))
    except (ValueError, UnsupportedAlgorithm, TypeError) as err:
        raise HttpError(
            400,
            "field 'public_key' is not a PEM public key "
            f"('-----BEGIN PUBLIC KEY-----' ... SubjectPublicKeyInfo): {err}",
        ) from None
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _attestation_sized(der, "public_key")


def _bool(fields: Mapping[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HttpError(400, f"field {name!r} must be true or false, not {_json_type(value)}")
    return value


def _sign_message(fields: Mapping[str, Any]) -> bytes:
    text = _optional_string(fields, "message")
    if (text is None) == (fields.get("message_hex") is None):
        raise HttpError(400, "give exactly one of 'message' (text) and 'message_hex' (bytes)")
    return _utf8(text, "message") if text is not None else _hex(fields, "message_hex")


# --- the NSM -----------------------------------------------------------------------------------


class NsmAccess:
    """One NSM connection shared by all requests, reopened after its transport breaks.

    The NSM client blocks, so every exchange runs in the default executor.
    """

    def __init__(self, path: str, client: NsmClient) -> None:
        self.path = path
        self._client: NsmClient | None = client

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> NsmAccess:
        text = os.fspath(path)
        client = await asyncio.get_running_loop().run_in_executor(None, NsmClient, text)
        return cls(text, client)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def attestation(
        self, *, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
    ) -> bytes:
        return await self._call(lambda nsm: nsm.attestation(user_data, nonce, public_key))

    async def random(self, size: int) -> bytes:
        collected = b""
        for _ in range(NSM_RANDOM_ATTEMPTS):
            collected += await self._call(lambda nsm: nsm.get_random())
            if len(collected) >= size:
                return collected[:size]
        raise HttpError(500, f"the NSM returned fewer than {size} random bytes")

    async def _call(self, operation: Callable[[NsmClient], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self._exchange, operation)
        except NsmError as err:
            raise _nsm_http_error(err) from None

    def _exchange(self, operation: Callable[[NsmClient], T]) -> T:
        client = self._client
        if client is None:
            client = self._client = NsmClient(self.path)
        try:
            return operation(client)
        except NsmError as err:
            if err.code is None and self._client is client:
                self._client = None
                client.close()
            raise


def _nsm_http_error(err: NsmError) -> HttpError:
    if err.code is None:
        return HttpError(503, f"the NSM is unavailable: {err}")
    if err.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.INPUT_TOO_LARGE):
        return HttpError(400, str(err))
    return HttpError(500, str(err))


# --- the API -----------------------------------------------------------------------------------


class ApiEndpoints:
    """The API's endpoints, independent of the socket they are served on."""

    def __init__(self, keys: EnclaveKeys, nsm: NsmAccess) -> None:
        self.keys = keys
        self.nsm = nsm
        self.routes: Routes = {
            "/v1/attestation": {"POST": self.attestation},
            "/v1/encryption/public_key": {"GET": self.encryption_public_key},
            "/v1/encryption/encrypt": {"POST": self.encrypt},
            "/v1/encryption/decrypt": {"POST": self.decrypt},
            "/v1/eth/address": {"GET": self.eth_address},
            "/v1/eth/sign": {"POST": self.eth_sign},
            "/v1/random": {"GET": self.random},
        }

    async def handle(self, request: Request) -> Response:
        return await dispatch(self.routes, request)

    @property
    def eth_address_user_data(self) -> bytes:
        """What attestations carry as user_data by default: the fork's ``{"eth_addr": ...}``."""
        return _compact_json({"eth_addr": self.keys.ethereum.address})

    async def attestation(self, request: Request) -> Response:
        return await self.attest(parse_json_object(request.body))

    async def attest(self, fields: Mapping[str, Any]) -> Response:
        """An attestation document binding the fields; the enclave's defaults fill the gaps."""
        check_fields(fields, ATTESTATION_FIELDS)
        nonce = _base64(fields, "nonce")
        user_data = self._attestation_user_data(fields.get("user_data"))
        public_key = _pem_public_key(fields)
        document = await self.nsm.attestation(
            user_data=user_data,
            nonce=nonce,
            public_key=self.keys.encryption.public_key_der if public_key is None else public_key,
        )
        return Response(200, document, CBOR)

    def _attestation_user_data(self, value: Any) -> bytes:
        """base64 bytes as given; a JSON object (the fork's newer form) gets ``eth_addr`` set."""
        if value is None:
            return self.eth_address_user_data
        if isinstance(value, dict):
            merged = {**value, "eth_addr": self.keys.ethereum.address}
            return _attestation_sized(_compact_json(merged), "user_data")
        if not isinstance(value, str):
            raise HttpError(
                400,
                f"field 'user_data' must be a base64 string or an object, not {_json_type(value)}",
            )
        return _base64_bytes(value, "user_data")

    async def encryption_public_key(self, _request: Request) -> Response:
        key = self.keys.encryption
        return Response.json(
            {
                "public_key_der": "0x" + key.public_key_der.hex(),
                "public_key_pem": key.public_key_pem,
            }
        )

    async def encrypt(self, request: Request) -> Response:
        fields = request_fields(request, ENCRYPT_FIELDS)
        plaintext = _utf8(_required_string(fields, "plaintext"), "plaintext")
        timestamped = fields.get("timestamped", False)
        if not isinstance(timestamped, bool):
            raise HttpError(
                400, f"field 'timestamped' must be a boolean, not {_json_type(timestamped)}"
            )
        message = self.keys.encryption.encrypt(
            plaintext, _hex(fields, "client_public_key"), timestamped=timestamped
        )
        answer = {
            "encrypted_data": message.ciphertext.hex(),
            "enclave_public_key": message.enclave_public_key_der.hex(),
            "nonce": message.nonce.hex(),
        }
        if message.timestamp_ms is not None:
            answer["timestamp"] = message.timestamp_ms
        return Response.json(answer)

    async def decrypt(self, request: Request) -> Response:
        fields = request_fields(request, DECRYPT_FIELDS)
        nonce = _hex(fields, "nonce")
        client_key = _hex(fields, "client_public_key")
        ciphertext = _hex(fields, "encrypted_data")
        timestamp = fields.get("timestamp")
        if timestamp is not None and (type(timestamp) is not int or timestamp < 0):
            raise HttpError(
                400, "field 'timestamp' must be milliseconds since the epoch (an integer ≥ 0)"
            )
        plaintext = self.keys.encryption.decrypt(ciphertext, client_key, nonce, timestamp)
        try:
            text = plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(
                400, "the decrypted plaintext is not UTF-8 text; this endpoint returns text only"
            ) from None
        return Response.json({"plaintext": text})

    async def eth_address(self, _request: Request) -> Response:
        key = self.keys.ethereum
        return Response.json(
            {"address": key.address, "public_key": "0x" + key.public_key_bytes.hex()}
        )

    async def eth_sign(self, request: Request) -> Response:
        fields = request_fields(request, SIGN_FIELDS)
        message = _sign_message(fields)
        include_attestation = _bool(fields, "include_attestation")
        key = self.keys.ethereum
        # Pure-Python recovery-id arithmetic takes milliseconds: keep it off the event loop.
        loop = asyncio.get_running_loop()
        signature = await loop.run_in_executor(None, key.sign_personal_message, message)
        attestation = None
        if include_attestation:
            document = await self.nsm.attestation(
                user_data=self.eth_address_user_data,
                nonce=personal_message_hash(message),
                public_key=key.public_key_der,
            )
            attestation = base64.b64encode(document).decode("ascii")
        return Response.json(
            {
                "signature": "0x" + signature.hex(),
                "address": key.address,
                "attestation": attestation,
            }
        )

    async def random(self, _request: Request) -> Response:
        return Response.json({"random_bytes": "0x" + (await self.nsm.random(RANDOM_SIZE)).hex()})


def _compact_json(value: Any) -> bytes:
    # serde_json's Map is ordered by key and does not escape non-ASCII; match it byte for byte.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


class AuxEndpoints:
    """The public subset of the API, with the fork's CORS on attestation."""

    def __init__(self, api: ApiEndpoints, api_is_up: Callable[[], bool]) -> None:
        self.api = api
        self.api_is_up = api_is_up
        self.routes: Routes = {
            "/v1/eth/address": {"GET": self._forward(api.eth_address)},
            "/v1/attestation": {"POST": self.attestation, "OPTIONS": self.preflight},
            "/v1/encryption/public_key": {"GET": self._forward(api.encryption_public_key)},
        }

    async def handle(self, request: Request) -> Response:
        return await dispatch(self.routes, request)

    def _forward(self, handler: Handler) -> Handler:
        async def forward(request: Request) -> Response:
            if not self.api_is_up():
                return Response.error(503, API_DOWN_MESSAGE)
            return await handler(request)

        return forward

    async def attestation(self, request: Request) -> Response:
        response = await respond(self._attestation, request)
        return response.with_headers(CORS_ALLOW_ORIGIN)

    async def _attestation(self, request: Request) -> Response:
        """Only the nonce is the caller's: the key and user_data are always the enclave's.

        The fork drops ``public_key`` so the document always binds the enclave's encryption
        key; ``user_data`` is dropped too, since a caller-chosen one could claim another
        Ethereum address inside a genuine document.
        """
        fields = parse_json_object(request.body)
        if not self.api_is_up():
            return Response.error(503, API_DOWN_MESSAGE)
        fields.pop("public_key", None)
        fields.pop("user_data", None)
        return await self.api.attest(fields)

    async def preflight(self, _request: Request) -> Response:
        return Response(204, headers=CORS_PREFLIGHT_HEADERS)


# --- serving -----------------------------------------------------------------------------------


class HttpService:
    """One loopback listener answering requests with a handler; connections are bounded."""

    def __init__(self, name: str, handler: Handler, limits: Limits) -> None:
        self.name = name
        self._handler = handler
        self._limits = limits
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int, setting: str) -> HttpService:
        try:
            self._server = await asyncio.start_server(self._connection, host, port)
        except OSError as err:
            raise ApiStartError(
                f"cannot listen on {host}:{port} for the {self.name} ({setting}): {err}; "
                "choose a free port in enclaver.yaml"
            ) from err
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def is_serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > MAX_CONNECTIONS:
                limit = f"the {self.name} is at its limit of {MAX_CONNECTIONS} connections"
                await write_error(writer, HttpError(503, f"{limit}; retry later"))
                return
            await self._serve(reader, writer)
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to answer
        finally:
            self._connections.discard(task)
            writer.close()
            with suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader, self._limits, writer)
            except HttpError as err:
                await write_error(writer, err)
                return
            if request is None:
                return
            response = await respond(self._handler, request)
            close = not request.keep_alive
            await write_response(
                writer, response.status, response.header_items(), response.body, close=close
            )
            if close:
                return


class ApiServers:
    """The running API and (when configured) aux API; ``close()`` stops both."""

    def __init__(
        self, api: ApiEndpoints, api_service: HttpService, aux_service: HttpService | None
    ) -> None:
        self.api = api
        self.api_service = api_service
        self.aux_service = aux_service

    @property
    def keys(self) -> EnclaveKeys:
        return self.api.keys

    @property
    def api_port(self) -> int:
        return self.api_service.port

    @property
    def aux_port(self) -> int | None:
        return None if self.aux_service is None else self.aux_service.port

    async def close(self) -> None:
        try:
            if self.aux_service is not None:
                await self.aux_service.close()
            await self.api_service.close()
        finally:
            self.api.nsm.close()


async def start_api(
    api: Api | None,
    aux_api: AuxApi | None,
    nsm_path: str | os.PathLike[str] = DEFAULT_NSM_PATH,
    *,
    host: str = LOCALHOST,
) -> ApiServers | None:
    """Create the enclave's keys and serve the API (and aux API); None without ``api``.

    The NSM is opened first, so a missing /dev/nsm stops the enclave before the app starts
    instead of failing its first attestation.
    """
    if api is None:
        return None
    nsm = await NsmAccess.open(nsm_path)
    enclave_api = ApiEndpoints(EnclaveKeys.generate(), nsm)
    try:
        api_service = await HttpService("API", enclave_api.handle, API_LIMITS).start(
            host, api.listen_port, "api.listen_port"
        )
    except BaseException:
        nsm.close()
        raise
    aux_service = None
    if aux_api is not None:
        aux = AuxEndpoints(enclave_api, api_service.is_serving)
        try:
            aux_service = await HttpService("aux API", aux.handle, AUX_API_LIMITS).start(
                host, aux_api.listen_port, "aux_api.listen_port"
            )
        except BaseException:
            await ApiServers(enclave_api, api_service, None).close()
            raise
    servers = ApiServers(enclave_api, api_service, aux_service)
    LOG.info(
        "API on %s:%d%s; Ethereum address %s",
        host,
        servers.api_port,
        "" if aux_service is None else f", aux API on {host}:{servers.aux_port}",
        enclave_api.keys.ethereum.address,
    )
    return servers
