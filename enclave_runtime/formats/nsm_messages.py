"""NSM requests and responses: the CBOR messages spoken over ``/dev/nsm``.

The wire format is whatever AWS's ``aws-nitro-enclaves-nsm-api`` crate produces with
``serde_cbor::to_vec`` (src/api/mod.rs, src/driver/mod.rs): serde enums, externally tagged.
A variant without fields is a CBOR text string (``"DescribeNSM"``); a struct variant is a
one-entry map from the variant name to a map of its fields, in declaration order
(``{"DescribePCR": {"index": 3}}``); the error response is the newtype variant
``{"Error": "InvalidIndex"}``. Byte fields are ``serde_bytes`` (CBOR byte strings), absent
``Option`` fields are ``null``, integers and lengths use the shortest CBOR form. Encoding here
is byte-identical to that; decoding is as tolerant as serde is of field order and of missing
optional fields, and strict about everything else, because the emulator decodes requests from
enclave code and clients decode responses from a device.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Union

import cbor2

from enclave_runtime.errors import FormatError

# Limits of the Linux driver (include/uapi/linux/nsm.h): longer requests fail with EMSGSIZE,
# longer responses are truncated.
REQUEST_MAX_SIZE = 0x1000
RESPONSE_MAX_SIZE = 0x3000

# Nitro exposes 32 PCRs; the attestation document spec bounds indexes to 0..31.
MAX_PCRS = 32
PCR_LENGTHS = (32, 48, 64)
# The attestation document spec (AWS "verify-root" page, nsm-api docs) allows up to 1024
# bytes each for public_key, user_data and nonce.
ATTESTATION_FIELD_MAX = 1024
U16_MAX = 0xFFFF


class ErrorCode(Enum):
    """``nsm_api::api::ErrorCode``; the value is the variant name sent on the wire."""

    SUCCESS = "Success"
    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_INDEX = "InvalidIndex"
    INVALID_RESPONSE = "InvalidResponse"
    READ_ONLY_INDEX = "ReadOnlyIndex"
    INVALID_OPERATION = "InvalidOperation"
    BUFFER_TOO_SMALL = "BufferTooSmall"
    INPUT_TOO_LARGE = "InputTooLarge"
    INTERNAL_ERROR = "InternalError"


class Digest(Enum):
    """``nsm_api::api::Digest``: the hash of the PCR bank (Nitro uses SHA384)."""

    SHA256 = "SHA256"
    SHA384 = "SHA384"
    SHA512 = "SHA512"


class NsmMessageError(FormatError):
    """An NSM message that is not valid; ``field`` names the culprit, ``code`` is what an NSM
    would answer to such a request (the emulator replies ``{"Error": code}``)."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: ErrorCode = ErrorCode.INVALID_ARGUMENT,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


def _fail(
    owner: str, name: str, problem: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT
) -> NsmMessageError:
    return NsmMessageError(f"NSM {owner}.{name}: {problem}", field=f"{owner}.{name}", code=code)


def _u16(owner: str, name: str, value: Any, *, limit: int = U16_MAX) -> int:
    # bool is an int subclass in Python but a distinct CBOR type; serde refuses it for u16.
    if type(value) is not int:
        raise _fail(owner, name, f"must be an unsigned integer, got {type(value).__name__}")
    if not 0 <= value <= U16_MAX:
        raise _fail(owner, name, f"{value} does not fit in 16 bits (0..{U16_MAX})")
    if value > limit:
        raise _fail(
            owner,
            name,
            f"{value} is out of range 0..{limit}; Nitro has {MAX_PCRS} PCRs, 0..{MAX_PCRS - 1}",
            ErrorCode.INVALID_INDEX,
        )
    return value


def _pcr_index(owner: str, value: Any) -> int:
    return _u16(owner, "index", value, limit=MAX_PCRS - 1)


def _bytes(owner: str, name: str, value: Any, *, max_len: int | None = None) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise _fail(owner, name, f"must be a byte string, got {type(value).__name__}")
    if max_len is not None and len(value) > max_len:
        raise _fail(
            owner,
            name,
            f"is {len(value)} bytes, at most {max_len} are allowed",
            ErrorCode.INPUT_TOO_LARGE,
        )
    return bytes(value)


def _optional_bytes(owner: str, name: str, value: Any) -> bytes | None:
    if value is None:
        return None
    return _bytes(owner, name, value, max_len=ATTESTATION_FIELD_MAX)


def _pcr_value(owner: str, value: Any) -> bytes:
    data = _bytes(owner, "data", value)
    if len(data) not in PCR_LENGTHS:
        raise _fail(owner, "data", f"a PCR value is 32, 48 or 64 bytes, got {len(data)}")
    return data


def _non_empty_bytes(owner: str, name: str, value: Any) -> bytes:
    data = _bytes(owner, name, value)
    if not data:
        raise _fail(owner, name, "must not be empty")
    return data


def _enum(owner: str, name: str, value: Any, enum: type[Enum]) -> Any:
    if isinstance(value, enum):
        return value
    choices = ", ".join(member.value for member in enum)
    if not isinstance(value, str):
        raise _fail(owner, name, f"must be a text string ({choices}), got {type(value).__name__}")
    try:
        return enum(value)
    except ValueError:
        raise _fail(owner, name, f"{value!r} is not one of {choices}") from None


def _pcr_set(owner: str, name: str, value: Any) -> tuple[int, ...]:
    # BTreeSet<u16> on the wire: an array, sorted and without duplicates when serde writes it.
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise _fail(owner, name, f"must be an array of PCR indexes, got {type(value).__name__}")
    indexes = {_u16(owner, name, index, limit=MAX_PCRS - 1) for index in value}
    return tuple(sorted(indexes))


def _set(message: object, name: str, value: Any) -> None:
    # The dataclasses are frozen; validation normalises fields once, in __post_init__.
    object.__setattr__(message, name, value)


# ---- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DescribePCR:
    """Read PCR ``index`` and whether it is locked."""

    variant: ClassVar[str] = "DescribePCR"
    index: int

    def __post_init__(self) -> None:
        _set(self, "index", _pcr_index(self.variant, self.index))


@dataclass(frozen=True)
class ExtendPCR:
    """PCR[index] = H(PCR[index] || data); fails on a locked PCR (0-15 are locked at boot)."""

    variant: ClassVar[str] = "ExtendPCR"
    index: int
    data: bytes

    def __post_init__(self) -> None:
        _set(self, "index", _pcr_index(self.variant, self.index))
        _set(self, "data", _bytes(self.variant, "data", self.data))


@dataclass(frozen=True)
class LockPCR:
    """Make PCR ``index`` read-only until the enclave terminates."""

    variant: ClassVar[str] = "LockPCR"
    index: int

    def __post_init__(self) -> None:
        _set(self, "index", _pcr_index(self.variant, self.index))


@dataclass(frozen=True)
class LockPCRs:
    """Lock PCRs ``[0, range)``; the name is the wire name."""

    variant: ClassVar[str] = "LockPCRs"
    range: int

    def __post_init__(self) -> None:
        _set(self, "range", _u16(self.variant, "range", self.range, limit=MAX_PCRS))


@dataclass(frozen=True)
class DescribeNSM:
    """Version, module id, PCR count and locked PCRs of the NSM."""

    variant: ClassVar[str] = "DescribeNSM"


@dataclass(frozen=True)
class Attestation:
    """Ask for a signed attestation document binding these optional fields."""

    variant: ClassVar[str] = "Attestation"
    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("user_data", "nonce", "public_key"):
            _set(self, name, _optional_bytes(self.variant, name, getattr(self, name)))


@dataclass(frozen=True)
class GetRandom:
    """Ask for entropy from the NSM's hardware RNG."""

    variant: ClassVar[str] = "GetRandom"


Request = Union[DescribePCR, ExtendPCR, LockPCR, LockPCRs, DescribeNSM, Attestation, GetRandom]
REQUEST_TYPES: dict[str, type[Request]] = {
    cls.variant: cls
    for cls in (DescribePCR, ExtendPCR, LockPCR, LockPCRs, DescribeNSM, Attestation, GetRandom)
}


# ---- responses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DescribePCRResponse:
    variant: ClassVar[str] = "DescribePCR"
    lock: bool
    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.lock, bool):
            raise _fail(self.variant, "lock", f"must be a boolean, got {type(self.lock).__name__}")
        _set(self, "data", _pcr_value(self.variant, self.data))


@dataclass(frozen=True)
class ExtendPCRResponse:
    """The PCR's value after the extension."""

    variant: ClassVar[str] = "ExtendPCR"
    data: bytes

    def __post_init__(self) -> None:
        _set(self, "data", _pcr_value(self.variant, self.data))


@dataclass(frozen=True)
class LockPCRResponse:
    variant: ClassVar[str] = "LockPCR"


@dataclass(frozen=True)
class LockPCRsResponse:
    variant: ClassVar[str] = "LockPCRs"


@dataclass(frozen=True)
class DescribeNSMResponse:
    """``locked_pcrs`` is kept sorted and unique, as the crate's ``BTreeSet<u16>`` is."""

    variant: ClassVar[str] = "DescribeNSM"
    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: Digest

    def __post_init__(self) -> None:
        for name in ("version_major", "version_minor", "version_patch", "max_pcrs"):
            _set(self, name, _u16(self.variant, name, getattr(self, name)))
        if not isinstance(self.module_id, str):
            raise _fail(
                self.variant,
                "module_id",
                f"must be a text string, got {type(self.module_id).__name__}",
            )
        _set(self, "locked_pcrs", _pcr_set(self.variant, "locked_pcrs", self.locked_pcrs))
        _set(self, "digest", _enum(self.variant, "digest", self.digest, Digest))


@dataclass(frozen=True)
class AttestationResponse:
    """``document`` is the COSE_Sign1 attestation document, as signed by the NSM."""

    variant: ClassVar[str] = "Attestation"
    document: bytes

    def __post_init__(self) -> None:
        _set(self, "document", _non_empty_bytes(self.variant, "document", self.document))


@dataclass(frozen=True)
class GetRandomResponse:
    variant: ClassVar[str] = "GetRandom"
    random: bytes

    def __post_init__(self) -> None:
        _set(self, "random", _non_empty_bytes(self.variant, "random", self.random))


@dataclass(frozen=True)
class ErrorResponse:
    """The NSM refused the request; on the wire ``{"Error": "<ErrorCode>"}``."""

    variant: ClassVar[str] = "Error"
    code: ErrorCode

    def __post_init__(self) -> None:
        _set(self, "code", _enum(self.variant, "code", self.code, ErrorCode))


Response = Union[
    DescribePCRResponse,
    ExtendPCRResponse,
    LockPCRResponse,
    LockPCRsResponse,
    DescribeNSMResponse,
    AttestationResponse,
    GetRandomResponse,
    ErrorResponse,
]
RESPONSE_TYPES: dict[str, type[Response]] = {
    cls.variant: cls
    for cls in (
        DescribePCRResponse,
        ExtendPCRResponse,
        LockPCRResponse,
        LockPCRsResponse,
        DescribeNSMResponse,
        AttestationResponse,
        GetRandomResponse,
        ErrorResponse,
    )
}

# What a successful answer to each request is (anything else but an ErrorResponse is a
# protocol violation by the NSM).
RESPONSE_FOR_REQUEST: dict[type[Request], type[Response]] = {
    DescribePCR: DescribePCRResponse,
    ExtendPCR: ExtendPCRResponse,
    LockPCR: LockPCRResponse,
    LockPCRs: LockPCRsResponse,
    DescribeNSM: DescribeNSMResponse,
    Attestation: AttestationResponse,
    GetRandom: GetRandomResponse,
}


# ---- encoding -------------------------------------------------------------------------------


def _wire_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def _to_wire(message: Request | Response) -> Any:
    if isinstance(message, ErrorResponse):
        return {message.variant: message.code.value}
    fields = dataclasses.fields(message)
    if not fields:
        return message.variant
    # Dataclass fields are declared in the crate's order, which serde_cbor keeps.
    body = {field.name: _wire_value(getattr(message, field.name)) for field in fields}
    return {message.variant: body}


def _encode(message: Any, types: dict[str, type], kind: str, max_size: int) -> bytes:
    if type(message) not in types.values():
        names = ", ".join(cls.__name__ for cls in types.values())
        raise NsmMessageError(f"cannot encode {type(message).__name__} as an NSM {kind}: {names}")
    data = cbor2.dumps(_to_wire(message))
    if len(data) > max_size:
        raise NsmMessageError(
            f"NSM {kind} {message.variant} encodes to {len(data)} bytes, "
            f"more than the {max_size} bytes the NSM driver accepts; send less data",
            field=message.variant,
            code=ErrorCode.INPUT_TOO_LARGE,
        )
    return data


def encode_request(request: Request) -> bytes:
    """The bytes ``serde_cbor`` would produce; refuses requests over ``REQUEST_MAX_SIZE``."""
    return _encode(request, REQUEST_TYPES, "request", REQUEST_MAX_SIZE)


def encode_response(response: Response) -> bytes:
    """The bytes ``serde_cbor`` would produce; refuses responses over ``RESPONSE_MAX_SIZE``."""
    return _encode(response, RESPONSE_TYPES, "response", RESPONSE_MAX_SIZE)


# ---- decoding -------------------------------------------------------------------------------


def _load_cbor(data: bytes, kind: str, max_size: int) -> Any:
    if not isinstance(data, (bytes, bytearray)):
        raise NsmMessageError(f"NSM {kind} must be bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise NsmMessageError(
            f"NSM {kind} is {len(data)} bytes, more than the {max_size}-byte limit",
            code=ErrorCode.INPUT_TOO_LARGE,
        )
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise NsmMessageError(f"NSM {kind} is not valid CBOR: {err}") from err
    if stream.tell() != len(data):
        raise NsmMessageError(
            f"NSM {kind} has {len(data) - stream.tell()} bytes after its CBOR item "
            f"(offset {stream.tell()}); a message is exactly one CBOR item"
        )
    return value


def _split_variant(value: Any, kind: str) -> tuple[str, Any, bool]:
    """(variant name, body, whether a body was present) of an externally tagged enum."""
    if isinstance(value, str):
        return value, None, False
    if isinstance(value, dict) and len(value) == 1:
        ((variant, body),) = value.items()
        if isinstance(variant, str):
            return variant, body, True
    raise NsmMessageError(
        f"NSM {kind} must be a variant name (text) or a one-entry map from a variant name to "
        f"its fields, got {_describe(value)}"
    )


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return f"a map of {len(value)} entries"
    return type(value).__name__


def _from_wire(value: Any, types: dict[str, type], kind: str) -> Any:
    variant, body, has_body = _split_variant(value, kind)
    cls = types.get(variant)
    if cls is None:
        known = ", ".join(types)
        raise NsmMessageError(f"unknown NSM {kind} {variant!r}; known: {known}", field=variant)
    if cls is ErrorResponse:
        if not has_body:
            raise NsmMessageError('NSM Error response must be {"Error": code}', field="Error")
        return ErrorResponse(body)
    fields = dataclasses.fields(cls)
    if not fields:
        if has_body:
            raise NsmMessageError(
                f"NSM {kind} {variant} has no fields and is sent as the text {variant!r}, "
                "not as a map",
                field=variant,
            )
        return cls()
    if not has_body:
        names = ", ".join(field.name for field in fields)
        raise NsmMessageError(
            f"NSM {kind} {variant} needs a map of its fields ({names})", field=variant
        )
    return cls(**_field_arguments(variant, body, fields))


def _field_arguments(variant: str, body: Any, fields: tuple[dataclasses.Field, ...]) -> dict:
    if not isinstance(body, dict):
        raise NsmMessageError(
            f"NSM {variant} fields must be a map, got {_describe(body)}", field=variant
        )
    names = {field.name for field in fields}
    unknown = [key for key in body if key not in names]
    if unknown:
        raise NsmMessageError(
            f"NSM {variant} has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"expected {', '.join(sorted(names))}",
            field=variant,
        )
    # serde treats a missing Option field as None; every other field is required.
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in body]
    if required:
        raise NsmMessageError(
            f"NSM {variant} is missing field(s) {', '.join(required)}",
            field=f"{variant}.{required[0]}",
        )
    return dict(body)


def decode_request(data: bytes) -> Request:
    """Parse untrusted request bytes (the emulator's side); raises :class:`NsmMessageError`."""
    return _from_wire(_load_cbor(data, "request", REQUEST_MAX_SIZE), REQUEST_TYPES, "request")


def decode_response(data: bytes) -> Response:
    """Parse untrusted response bytes (the client's side); raises :class:`NsmMessageError`."""
    return _from_wire(_load_cbor(data, "response", RESPONSE_MAX_SIZE), RESPONSE_TYPES, "response")
