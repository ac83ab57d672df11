"""A small, strict HTTP/1.1 request reader and response writer for odyn's local servers.

Every byte these functions parse comes from a process odyn does not trust (the app, or a client
on the other side of ingress), so the reader is deliberately narrow: it accepts what RFC 9112
requires a server to accept and refuses the ambiguous rest (obs-fold, whitespace before a colon,
a Transfer-Encoding other than ``chunked``, Transfer-Encoding together with Content-Length,
conflicting Content-Length values, control characters) with an :class:`HttpError` that carries
the status to answer with. Every read is bounded in size and in time.

Used by the API servers (whole requests: :func:`read_request`) and the egress proxy (the head
only: :func:`read_request_head`, then :func:`copy_body` streams the body upstream unchanged).
"""

from __future__ import annotations

import asyncio
import http
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

from enclave_runtime.errors import FormatError

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\Z")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\Z")
_SUPPORTED_VERSIONS = ("HTTP/1.1", "HTTP/1.0")
# RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line.
_MAX_LEADING_EMPTY_LINES = 4
_COPY_CHUNK = 64 * 1024

HeaderItems = Union[Mapping[str, str], Iterable[tuple[str, str]]]


class HttpError(FormatError):
    """A request that cannot be served; ``status`` is the response code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.status, str(self)))


@dataclass(frozen=True)
class Limits:
    """Bounds on one request; the defaults suit small JSON APIs and a forward proxy."""

    max_line: int = 8 * 1024  # the request line and each header line
    max_head: int = 64 * 1024  # request line and all headers together
    max_headers: int = 100
    max_body: int = 1024 * 1024  # whole bodies read by read_request
    head_timeout: float | None = 30.0  # from the call until the blank line ending the head
    body_timeout: float | None = 30.0  # for reading a whole body


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Headers:
    """Header fields in the order received, names as sent; lookups ignore case."""

    items: tuple[tuple[str, str], ...] = ()

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``."""
        wanted = name.lower()
        for key, value in self.items:
            if key.lower() == wanted:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.items if key.lower() == wanted]

    def tokens(self, name: str) -> list[str]:
        """The comma-separated, lower-cased tokens of every ``name`` field (Connection, Expect)."""
        return [
            token.strip().lower()
            for value in self.get_all(name)
            for token in value.split(",")
            if token.strip()
        ]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Request:
    """One request. ``body`` is empty when only the head was read (:func:`read_request_head`).

    ``content_length`` is the declared body length, ``None`` when the body is chunked
    (``chunked``) or absent.
    """

    method: str
    target: str
    version: str
    headers: Headers
    body: bytes = b""
    content_length: int | None = None
    chunked: bool = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def path(self) -> str:
        """The target without its query (origin-form targets)."""
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def keep_alive(self) -> bool:
        """Whether the client expects the connection to stay open after the response."""
        connection = self.headers.tokens("Connection")
        if self.version == "HTTP/1.1":
            return "close" not in connection
        return "keep-alive" in connection

    @property
    def expects_continue(self) -> bool:
        return "100-continue" in self.headers.tokens("Expect")


async def _read_line(
    reader: asyncio.StreamReader, max_line: int, too_long_status: int, what: str
) -> tuple[bytes, int] | None:
    """The next line without its terminator and its size on the wire; None at a clean EOF."""
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise HttpError(400, f"the connection closed in the middle of the {what}") from err
    except asyncio.LimitOverrunError as err:
        raise HttpError(too_long_status, f"the {what} is too long") from err
    if len(raw) > max_line:
        raise HttpError(too_long_status, f"the {what} is longer than {max_line} bytes")
    line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if b"\r" in line:
        raise HttpError(400, f"the {what} contains a bare CR")
    return line, len(raw)


async def read_request_head(
    reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS
) -> Request | None:
    """Read and check one request head (request line and headers), not its body.

    Returns None when the peer closed the connection cleanly before sending anything (the end of
    a keep-alive connection). Raises :class:`HttpError` for anything else that is not a valid
    head, including a timeout (408).
    """
    try:
        return await asyncio.wait_for(_read_head(reader, limits), limits.head_timeout)
    except asyncio.TimeoutError as err:
        raise HttpError(408, "the request head did not arrive in time") from err


async def read_request(
    reader: asyncio.StreamReader,
    limits: Limits = DEFAULT_LIMITS,
    writer: asyncio.StreamWriter | None = None,
) -> Request | None:
    """Read one whole request (head and body, at most ``limits.max_body`` bytes of body).

    With ``writer``, a client that sent ``Expect: 100-continue`` is told to go on (curl waits a
    second for that before sending a large body). Returns None on a clean EOF before the request.
    """
    head = await read_request_head(reader, limits)
    if head is None:
        return None
    if head.content_length is not None and head.content_length > limits.max_body:
        raise HttpError(413, f"the request body is larger than {limits.max_body} bytes")
    if writer is not None and head.expects_continue and head.has_body:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    try:
        body = await asyncio.wait_for(_read_body(reader, head, limits), limits.body_timeout)
    except asyncio.TimeoutError as err:
        raise HttpError(408, "the request body did not arrive in time") from err
    return Request(
        head.method,
        head.target,
        head.version,
        head.headers,
        body,
        head.content_length,
        head.chunked,
    )


@dataclass(frozen=True)
class ResponseHead:
    """A response's status line and headers, as an upstream server sent them."""

    version: str
    status: int
    reason: str
    headers: Headers


async def read_response_head(
    reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS
) -> ResponseHead:
    """Read an upstream server's status line and headers (the egress proxy rewrites them).

    Errors carry status 502: a malformed or missing response is the upstream's failure.
    """
    try:
        return await asyncio.wait_for(_read_response_head(reader, limits), limits.head_timeout)
    except asyncio.TimeoutError as err:
        raise HttpError(504, "the upstream server did not answer in time") from err
    except HttpError as err:
        raise HttpError(502, f"the upstream server sent an invalid response: {err}") from err


async def copy_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: Request,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Stream the body of ``head`` from ``reader`` to ``writer`` unchanged, as framed.

    Chunked bodies are checked chunk by chunk while they pass, so exactly one request's body is
    forwarded and nothing the client sends after it. No size limit: the proxy never holds a body.
    """
    if head.chunked:
        await _copy_chunked(reader, writer, limits)
    elif head.content_length:
        await _copy_exactly(reader, writer, head.content_length)


def encode_response_head(
    status: int,
    headers: HeaderItems = (),
    *,
    content_length: int | None = None,
    reason: str | None = None,
) -> bytes:
    """``HTTP/1.1 <status> <reason>`` and the header lines, ending with the blank line."""
    if reason is not None and any(ch in reason for ch in "\r\n\0"):
        raise ValueError(f"invalid reason phrase {reason!r}")
    lines = [f"HTTP/1.1 {status} {_reason(status) if reason is None else reason}"]
    for name, value in _header_pairs(headers):
        _check_response_header(name, value)
        lines.append(f"{name}: {value}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def write_response(
    writer: asyncio.StreamWriter,
    status: int,
    headers: HeaderItems = (),
    body: bytes = b"",
    *,
    close: bool = False,
) -> None:
    """Write a whole response and wait for it to drain.

    Content-Length is added from ``body`` unless ``headers`` has one or the status forbids a body
    (1xx, 204, 304). ``close`` adds ``Connection: close``; the caller then closes the connection.
    """
    pairs = list(_header_pairs(headers))
    names = {name.lower() for name, _ in pairs}
    if close and "connection" not in names:
        pairs.append(("Connection", "close"))
    bodiless = status < 200 or status in (204, 304)
    if bodiless and body:
        raise ValueError(f"a {status} response cannot have a body")
    length = None if bodiless or "content-length" in names else len(body)
    writer.write(encode_response_head(status, pairs, content_length=length) + body)
    await writer.drain()


async def write_json(
    writer: asyncio.StreamWriter,
    status: int,
    payload: Any,
    headers: HeaderItems = (),
    *,
    close: bool = False,
) -> None:
    """Write ``payload`` as an ``application/json`` response."""
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    pairs = [("Content-Type", "application/json"), *_header_pairs(headers)]
    await write_response(writer, status, pairs, body, close=close)


async def write_error(writer: asyncio.StreamWriter, error: HttpError) -> None:
    """Answer ``error`` as ``{"error": "..."}`` and ask the client to close."""
    await write_json(writer, error.status, {"error": str(error)}, close=True)


# --- the head ----------------------------------------------------------------------------------


async def _read_head(reader: asyncio.StreamReader, limits: Limits) -> Request | None:
    request_line = await _request_line(reader, limits)
    if request_line is None:
        return None
    line, consumed = request_line
    method, target, version = _parse_request_line(line)
    headers = await _header_fields(reader, limits, consumed, too_many_status=431)
    _check_host(headers, version)
    content_length, chunked = _body_framing(headers, version)
    _check_expect(headers)
    return Request(method, target, version, headers, b"", content_length, chunked)


async def _request_line(reader: asyncio.StreamReader, limits: Limits) -> tuple[bytes, int] | None:
    """The request line and the head's size so far, skipping a few empty lines before it."""
    consumed = 0
    for _ in range(_MAX_LEADING_EMPTY_LINES + 1):
        read = await _read_line(reader, limits.max_line, 414, "request line")
        if read is None:
            if consumed:
                raise HttpError(400, "the connection closed before the request line")
            return None
        line, size = read
        consumed += size
        if line:
            return line, consumed
    raise HttpError(400, "the request starts with too many empty lines")


async def _header_line(
    reader: asyncio.StreamReader, limits: Limits, consumed: int
) -> tuple[bytes, int]:
    read = await _read_line(reader, limits.max_line, 431, "header line")
    if read is None:
        raise HttpError(400, "the connection closed in the middle of the request head")
    line, size = read
    consumed += size
    if consumed > limits.max_head:
        raise HttpError(431, f"the request head is longer than {limits.max_head} bytes")
    return line, consumed


async def _read_response_head(reader: asyncio.StreamReader, limits: Limits) -> ResponseHead:
    read = await _read_line(reader, limits.max_line, 502, "status line")
    if read is None:
        raise HttpError(502, "the connection closed before the status line")
    line, consumed = read
    match = _STATUS_LINE.match(line)
    if not match:
        raise HttpError(502, "the status line is not 'HTTP/1.x NNN reason'")
    headers = await _header_fields(reader, limits, consumed, too_many_status=502)
    version, status, reason = match.groups()
    return ResponseHead(
        version.decode("ascii"), int(status), (reason or b"").decode("latin-1"), headers
    )


async def _header_fields(
    reader: asyncio.StreamReader, limits: Limits, consumed: int, too_many_status: int
) -> Headers:
    """The header fields up to the empty line; a client's excess is 431, an upstream's 502."""
    fields: list[tuple[str, str]] = []
    while True:
        line, consumed = await _header_line(reader, limits, consumed)
        if not line:
            return Headers(tuple(fields))
        if len(fields) == limits.max_headers:
            raise HttpError(too_many_status, f"more than {limits.max_headers} header fields")
        fields.append(_parse_header_line(line))


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "the request line must be 'METHOD target HTTP/1.1' with single spaces")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HttpError(400, "the request method is not a valid token")
    if not _TARGET.match(target):
        raise HttpError(400, "the request target is empty or holds non-printable characters")
    if not _HTTP_VERSION.match(version):
        raise HttpError(400, "the request line does not end with an HTTP version")
    text_version = version.decode("ascii")
    if text_version not in _SUPPORTED_VERSIONS:
        raise HttpError(505, f"{text_version} is not supported; use HTTP/1.1")
    return method.decode("ascii"), target.decode("ascii"), text_version


def _parse_header_line(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HttpError(400, "folded header lines (starting with whitespace) are not accepted")
    name, colon, value = line.partition(b":")
    if not colon:
        raise HttpError(400, "a header line has no colon")
    if not _TOKEN.match(name):
        raise HttpError(400, "a header name is empty or not a token (no spaces before the colon)")
    value = value.strip(b" \t")
    if not _FIELD_VALUE.match(value):
        raise HttpError(400, f"the value of header {name.decode('ascii')} holds control characters")
    return name.decode("ascii"), value.decode("latin-1")


def _check_host(headers: Headers, version: str) -> None:
    hosts = headers.get_all("Host")
    if len(hosts) > 1:
        raise HttpError(400, "the request has more than one Host header")
    if version == "HTTP/1.1" and not hosts:
        raise HttpError(400, "an HTTP/1.1 request must have a Host header")


def _body_framing(headers: Headers, version: str) -> tuple[int | None, bool]:
    """(content length, chunked), refusing every combination that two parsers might read apart."""
    encodings = headers.tokens("Transfer-Encoding")
    lengths = headers.get_all("Content-Length")
    if "Transfer-Encoding" in headers:
        if version != "HTTP/1.1":
            raise HttpError(400, f"Transfer-Encoding is not allowed in an {version} request")
        if lengths:
            raise HttpError(400, "a request cannot have both Transfer-Encoding and Content-Length")
        if encodings != ["chunked"]:
            raise HttpError(501, "only 'Transfer-Encoding: chunked' is supported")
        return None, True
    if not lengths:
        return None, False
    values = {value.strip(" \t") for raw in lengths for value in raw.split(",")}
    if len(values) != 1:
        raise HttpError(400, "the request has conflicting Content-Length values")
    (value,) = values
    if not value.isdigit() or not value.isascii() or len(value) > 18:
        raise HttpError(400, f"Content-Length {value!r} is not a decimal byte count")
    return int(value), False


def _check_expect(headers: Headers) -> None:
    expectations = headers.tokens("Expect")
    if any(token != "100-continue" for token in expectations):
        raise HttpError(417, "only 'Expect: 100-continue' is supported")


# --- bodies ------------------------------------------------------------------------------------


async def _read_body(reader: asyncio.StreamReader, head: Request, limits: Limits) -> bytes:
    if head.chunked:
        sink = _Collector(limits.max_body)
        await _copy_chunked(reader, sink, limits, decode=True)
        return bytes(sink.data)
    if not head.content_length:
        return b""
    try:
        return await reader.readexactly(head.content_length)
    except asyncio.IncompleteReadError as err:
        raise HttpError(400, "the connection closed before the whole body arrived") from err


class _Collector:
    """A writer-like sink that keeps a decoded chunked body, refusing more than ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        if len(self.data) + len(data) > self.limit:
            raise HttpError(413, f"the request body is larger than {self.limit} bytes")
        self.data += data

    async def drain(self) -> None:
        return None


async def _copy_exactly(reader: asyncio.StreamReader, writer: Any, size: int) -> None:
    remaining = size
    while remaining:
        chunk = await reader.read(min(remaining, _COPY_CHUNK))
        if not chunk:
            raise HttpError(400, "the connection closed before the whole body arrived")
        writer.write(chunk)
        await writer.drain()
        remaining -= len(chunk)


async def _copy_chunked(
    reader: asyncio.StreamReader, writer: Any, limits: Limits, decode: bool = False
) -> None:
    """Pass a chunked body through (or, with ``decode``, only its data), checking its framing."""
    while True:
        size_line = await _body_line(reader, limits, "chunk size line")
        match = _CHUNK_SIZE.match(size_line)
        if not match:
            raise HttpError(400, "a chunk size is not a hexadecimal number")
        size = int(match.group(1), 16)
        if not decode:
            writer.write(size_line + b"\r\n")
        if size == 0:
            break
        await _copy_exactly(reader, writer, size)
        if await _body_line(reader, limits, "chunk end") != b"":
            raise HttpError(400, "a chunk is longer than its declared size")
        if not decode:
            writer.write(b"\r\n")
    for _ in range(limits.max_headers + 1):
        trailer = await _body_line(reader, limits, "trailer line")
        if trailer:
            _parse_header_line(trailer)
        if not decode:
            writer.write(trailer + b"\r\n")
        if not trailer:
            await writer.drain()
            return
    raise HttpError(431, f"the chunked body has more than {limits.max_headers} trailer fields")


async def _body_line(reader: asyncio.StreamReader, limits: Limits, what: str) -> bytes:
    read = await _read_line(reader, limits.max_line, 400, what)
    if read is None:
        raise HttpError(400, "the connection closed in the middle of a chunked body")
    return read[0]


# --- responses ---------------------------------------------------------------------------------


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Status"


def _header_pairs(headers: HeaderItems) -> Iterator[tuple[str, str]]:
    if isinstance(headers, Mapping):
        yield from headers.items()
    else:
        yield from headers


def _check_response_header(name: str, value: str) -> None:
    if not _TOKEN.match(name.encode("latin-1", "replace")) or any(ch in value for ch in "\r\n\0"):
        raise ValueError(f"invalid response header {name!r}: {value!r}")


__all__ = [
    "DEFAULT_LIMITS",
    "Headers",
    "HttpError",
    "Limits",
    "Request",
    "ResponseHead",
    "copy_body",
    "encode_response_head",
    "read_request",
    "read_request_head",
    "read_response_head",
    "write_error",
    "write_json",
    "write_response",
]
