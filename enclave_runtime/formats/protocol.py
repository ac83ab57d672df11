"""Wire formats spoken across the enclave boundary (docs/odyn.md, docs/vsock.md).

Each section is one protocol; every decoder takes bytes from the other side of the boundary and
raises only its own :class:`~enclave_runtime.errors.FormatError` subclass.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal as _signal
import struct
from dataclasses import dataclass, field
from typing import Any, Union

from enclave_runtime.errors import FormatError
from enclave_runtime.formats import strict_json

IpAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# --- status lines (vsock 17000) ----------------------------------------------------------------
#
# One JSON object per line: {"status":"running"}, {"status":"exited","code":0},
# {"status":"signaled","signal":9,"name":"SIGKILL"}, {"status":"fatal","error":"..."}.
# enclaver's odyn writes "signal" as a name ("SIGTERM") and does not escape "error"; we write
# real JSON with the number and the name, and read enclaver's form too. enclaver's host side
# reads lines of at most 1024 bytes, so no line we write is longer (a long error is shortened).

STATUS_LINE_MAX = 1024
_ELLIPSIS = "…"
# Linux signal numbers run from 1 to 64 (_NSIG - 1).
_MAX_SIGNAL = 64


class StatusLineError(FormatError):
    """A status line that is not one of the four documented JSON objects."""


@dataclass(frozen=True)
class StatusRunning:
    """The application has been started."""


@dataclass(frozen=True)
class StatusExited:
    """The application ended with an exit code (0-255)."""

    code: int


@dataclass(frozen=True)
class StatusSignaled:
    """The application was killed by a signal; ``name`` defaults to the signal's usual name."""

    signal: int
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", signal_name(self.signal))


@dataclass(frozen=True)
class StatusFatal:
    """odyn failed before the application could start; the application never ran."""

    error: str


AppStatus = Union[StatusRunning, StatusExited, StatusSignaled, StatusFatal]


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15, ``SIGRTMIN+3`` for a real-time signal, ``SIG<n>`` otherwise."""
    rtmin, rtmax = int(_signal.SIGRTMIN), int(_signal.SIGRTMAX)
    if rtmin < number < rtmax:
        return f"SIGRTMIN+{number - rtmin}"
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def encode_status_line(status: AppStatus) -> bytes:
    """One status as a JSON line (ASCII, ``\\n``-terminated, at most ``STATUS_LINE_MAX`` bytes)."""
    if isinstance(status, StatusFatal):
        return _encode_fatal(status.error)
    return _json_line(_status_object(status))


def decode_status_line(line: bytes | str) -> AppStatus:
    """Parse one status line, ours or enclaver's; raises :class:`StatusLineError`."""
    raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else bytes(line)
    raw = raw[:-1] if raw.endswith(b"\n") else raw
    raw = raw[:-1] if raw.endswith(b"\r") else raw
    if len(raw) >= STATUS_LINE_MAX:
        raise StatusLineError(
            f"status line is {len(raw)} bytes, more than the {STATUS_LINE_MAX - 1}-byte limit"
        )
    document = _parse_json(raw)
    if not isinstance(document, dict):
        raise StatusLineError(f"status line is JSON {type(document).__name__}, not an object")
    kind = document.get("status")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise StatusLineError(
            f"status line has status {_show(kind)}; expected one of: running, exited, "
            "signaled, fatal"
        )
    return decoder(document)


def _status_object(status: AppStatus) -> dict[str, Any]:
    if isinstance(status, StatusRunning):
        return {"status": "running"}
    if isinstance(status, StatusExited):
        return {"status": "exited", "code": status.code}
    if isinstance(status, StatusSignaled):
        return {"status": "signaled", "signal": status.signal, "name": status.name}
    raise TypeError(f"not a status: {status!r}")


def _json_line(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def _encode_fatal(error: str) -> bytes:
    """The longest prefix of ``error`` (marked with an ellipsis) whose line fits the limit."""
    line = _json_line({"status": "fatal", "error": error})
    if len(line) <= STATUS_LINE_MAX:
        return line
    low, high = 0, len(error)
    while low < high:
        middle = (low + high + 1) // 2
        if len(_json_line({"status": "fatal", "error": error[:middle] + _ELLIPSIS})) <= (
            STATUS_LINE_MAX
        ):
            low = middle
        else:
            high = middle - 1
    return _json_line({"status": "fatal", "error": error[:low] + _ELLIPSIS})


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise StatusLineError(f"status line is not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise StatusLineError(f"status line is not JSON: {err.msg} at column {err.colno}") from None
    except (RecursionError, ValueError) as err:
        raise StatusLineError(f"status line is not usable JSON: {err}") from None


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(document: dict[str, Any], key: str) -> Any:
    if key not in document:
        raise StatusLineError(f'status "{document["status"]}" needs "{key}", which is missing')
    return document[key]


def _integer(document: dict[str, Any], key: str, low: int, high: int) -> int:
    value = _field(document, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StatusLineError(
            f'status "{document["status"]}" needs "{key}" as an integer, got {_show(value)}'
        )
    if not low <= value <= high:
        raise StatusLineError(
            f'status "{document["status"]}" has "{key}" {value}, outside {low}..{high}'
        )
    return value


def _decode_running(_document: dict[str, Any]) -> AppStatus:
    return StatusRunning()


def _decode_exited(document: dict[str, Any]) -> AppStatus:
    return StatusExited(_integer(document, "code", 0, 255))


def _decode_signaled(document: dict[str, Any]) -> AppStatus:
    """The number is authoritative; the name is recomputed from it, never trusted."""
    value = _field(document, "signal")
    if isinstance(value, str):
        # enclaver's odyn writes the name ("SIGTERM") where the number belongs.
        return StatusSignaled(_signal_by_name(value))
    return StatusSignaled(_integer(document, "signal", 1, _MAX_SIGNAL))


def _signal_by_name(name: str) -> int:
    wanted = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    try:
        return int(_signal.Signals[wanted])
    except KeyError:
        pass
    for number in range(1, _MAX_SIGNAL + 1):
        if signal_name(number) == wanted:
            return number
    raise StatusLineError(f'status "signaled" names an unknown signal {_show(name)}')


def _decode_fatal(document: dict[str, Any]) -> AppStatus:
    error = _field(document, "error")
    if not isinstance(error, str):
        raise StatusLineError(f'status "fatal" needs "error" as a string, got {_show(error)}')
    return StatusFatal(error)


_DECODERS = {
    "running": _decode_running,
    "exited": _decode_exited,
    "signaled": _decode_signaled,
    "fatal": _decode_fatal,
}


# --- egress broker framing (vsock 17002) -------------------------------------------------------
#
# enclaver's egress_http.rs: each message is a u16 little-endian length and that many bytes of
# JSON (serde_json). The enclave sends {"host": "...", "port": N}; the host answers "Ok" or
# {"Err": {"os_code": N, "message": "..."}}, and raw bytes flow both ways from then on.
#
# Our extension: an enclave that sends "report_peer": true gets {"Ok": {"peer": "IP:PORT"}} from
# our host side, naming the address the host actually connected to, so the enclave can apply its
# IP deny rules to what a name resolved to. enclaver's broker ignores the unknown key (serde does)
# and answers "Ok"; enclaver's odyn never sends it and so never sees an answer it cannot parse.

EGRESS_FRAME_HEADER = struct.Struct("<H")
EGRESS_FRAME_MAX = 0xFFFF
_MAX_HOST_LENGTH = 255
_I32 = (-(2**31), 2**31 - 1)


class EgressProtocolError(FormatError):
    """A broker message that is not enclaver's framing or not one of its JSON messages."""


@dataclass(frozen=True)
class Peer:
    """The address the host's broker connected to."""

    address: IpAddress
    port: int

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Peer:
        """``1.2.3.4:443`` or ``[::1]:443`` (Rust's SocketAddr notation)."""
        host, colon, port = text.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        try:
            address = ipaddress.ip_address(host[1:-1] if bracketed else host)
        except ValueError:
            address = None
        if (
            not colon
            or address is None
            or bracketed != (address.version == 6)
            or not (port.isascii() and port.isdigit() and 0 < int(port) <= 0xFFFF)
        ):
            raise EgressProtocolError(f"peer {text[:80]!r} is not an IP:PORT socket address")
        return cls(address, int(port))


@dataclass(frozen=True)
class ConnectRequest:
    """Ask the host to open a TCP connection to ``host``:``port`` (a name or an IP literal)."""

    host: str
    port: int
    report_peer: bool = False

    def encode(self) -> bytes:
        """The framed message, ready to send."""
        message: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.report_peer:
            message["report_peer"] = True
        return encode_egress_frame(_egress_json(message))


@dataclass(frozen=True)
class ConnectOk:
    """The host connected; ``peer`` when it reported the address (our extension)."""

    peer: Peer | None = None

    def encode(self) -> bytes:
        message: Any = "Ok" if self.peer is None else {"Ok": {"peer": str(self.peer)}}
        return encode_egress_frame(_egress_json(message))


@dataclass(frozen=True)
class ConnectErr:
    """The host could not connect; ``os_code`` is the errno, 0 when there is none (DNS)."""

    os_code: int
    message: str

    def encode(self) -> bytes:
        message = {"Err": {"os_code": self.os_code, "message": self.message}}
        return encode_egress_frame(_egress_json(message))


ConnectResponse = Union[ConnectOk, ConnectErr]


def encode_egress_frame(payload: bytes) -> bytes:
    if len(payload) > EGRESS_FRAME_MAX:
        raise ValueError(f"an egress message holds at most {EGRESS_FRAME_MAX} bytes")
    return EGRESS_FRAME_HEADER.pack(len(payload)) + payload


def split_egress_frame(buffer: bytes) -> tuple[bytes, int] | None:
    """The first frame's payload and the bytes it used, or None while the frame is incomplete."""
    if len(buffer) < EGRESS_FRAME_HEADER.size:
        return None
    (length,) = EGRESS_FRAME_HEADER.unpack_from(buffer)
    end = EGRESS_FRAME_HEADER.size + length
    if len(buffer) < end:
        return None
    return bytes(buffer[EGRESS_FRAME_HEADER.size : end]), end


async def read_egress_frame(reader: asyncio.StreamReader) -> bytes:
    """Read one frame's payload; raises :class:`EgressProtocolError` if the stream ends first."""
    try:
        header = await reader.readexactly(EGRESS_FRAME_HEADER.size)
        (length,) = EGRESS_FRAME_HEADER.unpack(header)
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as err:
        raise EgressProtocolError(
            f"the egress connection closed inside a message ({len(err.partial)} of "
            f"{err.expected} bytes)"
        ) from None


def decode_connect_request(payload: bytes) -> ConnectRequest:
    """Parse the enclave's request; unknown keys are ignored as enclaver's serde does."""
    message = _egress_document(payload, "connect request")
    if not isinstance(message, dict):
        raise EgressProtocolError("the connect request is not a JSON object")
    host = message.get("host")
    if not isinstance(host, str) or not 0 < len(host) <= _MAX_HOST_LENGTH:
        raise EgressProtocolError(
            f'the connect request needs "host" as a string of 1 to {_MAX_HOST_LENGTH} characters'
        )
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in host):
        raise EgressProtocolError('the connect request\'s "host" holds spaces or control bytes')
    port = message.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise EgressProtocolError('the connect request needs "port" as an integer 1-65535')
    report_peer = message.get("report_peer", False)
    if not isinstance(report_peer, bool):
        raise EgressProtocolError('the connect request\'s "report_peer" must be true or false')
    return ConnectRequest(host, port, report_peer)


def decode_connect_response(payload: bytes) -> ConnectResponse:
    """Parse the host's answer: ``"Ok"``, ``{"Ok": {"peer": ...}}`` or ``{"Err": {...}}``."""
    message = _egress_document(payload, "connect response")
    if message == "Ok":
        return ConnectOk()
    if isinstance(message, dict) and len(message) == 1:
        ((variant, body),) = message.items()
        if variant == "Ok":
            return _decode_connect_ok(body)
        if variant == "Err":
            return _decode_connect_err(body)
    raise EgressProtocolError('the connect response is neither "Ok" nor {"Err": ...}')


def _decode_connect_ok(body: Any) -> ConnectOk:
    if body is None:  # serde_json reads a unit variant from {"Ok": null} too
        return ConnectOk()
    peer = body.get("peer") if isinstance(body, dict) else None
    if not isinstance(peer, str):
        raise EgressProtocolError('the "Ok" response needs "peer" as an "IP:PORT" string')
    return ConnectOk(Peer.parse(peer))


def _decode_connect_err(body: Any) -> ConnectErr:
    if not isinstance(body, dict):
        raise EgressProtocolError('the "Err" response is not an object')
    os_code, message = body.get("os_code"), body.get("message")
    if isinstance(os_code, bool) or not isinstance(os_code, int):
        raise EgressProtocolError('the "Err" response needs "os_code" as an integer')
    if not _I32[0] <= os_code <= _I32[1]:
        raise EgressProtocolError('the "Err" response\'s "os_code" is outside a 32-bit integer')
    if not isinstance(message, str):
        raise EgressProtocolError('the "Err" response needs "message" as a string')
    return ConnectErr(os_code, message)


def _egress_json(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


def _egress_document(payload: bytes, what: str) -> Any:
    try:
        return strict_json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise EgressProtocolError(f"the {what} is not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise EgressProtocolError(f"the {what} is not JSON: {err.msg} at {err.pos}") from None
    except (RecursionError, ValueError) as err:
        raise EgressProtocolError(f"the {what} is not usable JSON: {err}") from None
