"""The NSM client: one API over the real ``/dev/nsm`` and the emulator's NSM socket.

What sits at the path decides the backend:

- a **character device** (inside a Nitro enclave): the Linux driver's raw ioctl
  ``NSM_IOCTL_RAW = _IOWR(0x0A, 0, struct nsm_raw) = 0xC0200A00``. ``struct nsm_raw`` is two
  ``{u64 addr; u64 len}`` iovecs, request then response; the driver copies at most 0x1000
  request bytes (more fails with ``EMSGSIZE``), writes the response into our 0x3000-byte buffer
  and stores its length in ``response.len``. Buffer addresses come from :mod:`array`, not
  :mod:`ctypes`, which Debian's python3-minimal lacks.
- a **Unix stream socket** (inside a nitro-emu enclave, docs/emulator.md): the emulated protocol
  below.

Emulated protocol, for the emulator's server and anyone writing another client: every message,
in both directions, is a frame ``u32 big-endian length || CBOR`` carrying exactly the bytes the
ioctl would carry (:mod:`enclave_runtime.formats.nsm_messages`). The client sends one request
frame and reads one response frame; a connection carries any number of such exchanges, in order,
until the client closes it. Request frames are at most ``REQUEST_MAX_SIZE`` (0x1000) bytes and
response frames at most ``RESPONSE_MAX_SIZE`` (0x3000), as with the device. A request that does
not decode gets ``{"Error": code}`` with the code a real NSM would give, and the connection
stays open; a request frame announcing more than 0x1000 bytes gets ``{"Error":"InputTooLarge"}``
and the server closes the connection, since the stream cannot be resynchronised.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import stat
import struct
import threading
from typing import Callable, Protocol, cast

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.nsm_messages import (
    REQUEST_MAX_SIZE,
    RESPONSE_FOR_REQUEST,
    RESPONSE_MAX_SIZE,
    Attestation,
    AttestationResponse,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    DescribePCRResponse,
    ErrorCode,
    ErrorResponse,
    ExtendPCR,
    ExtendPCRResponse,
    GetRandom,
    GetRandomResponse,
    LockPCR,
    LockPCRs,
    NsmMessageError,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

DEFAULT_NSM_PATH = "/dev/nsm"
NSM_IOCTL_RAW = 0xC0200A00
# struct nsm_raw: request {addr, len}, response {addr, len}, native 64-bit fields.
NSM_RAW = struct.Struct("=QQQQ")
FRAME_HEADER = struct.Struct(">I")
DEFAULT_TIMEOUT = 30.0

# fcntl.ioctl's calling convention: the mutable buffer is passed by address and updated in place.
IoctlFunction = Callable[[int, int, bytearray], int]

ERROR_HINTS = {
    ErrorCode.INVALID_ARGUMENT: "an argument of the request is invalid",
    ErrorCode.INVALID_INDEX: "the PCR index is out of range; Nitro has PCRs 0..31",
    ErrorCode.INVALID_RESPONSE: "the NSM's answer did not match the request; retry",
    ErrorCode.READ_ONLY_INDEX: (
        "the PCR is locked; PCRs 0-15 are locked at boot and LockPCR(s) locks others until the "
        "enclave ends; extend an unlocked PCR (16-31)"
    ),
    ErrorCode.INVALID_OPERATION: "this NSM does not support the operation",
    ErrorCode.BUFFER_TOO_SMALL: "the answer did not fit the response buffer",
    ErrorCode.INPUT_TOO_LARGE: (
        "the request is too large; user_data, nonce and public_key are at most 1024 bytes each "
        "and a request at most 4096 bytes"
    ),
    ErrorCode.INTERNAL_ERROR: "the NSM failed internally; retry, and check the enclave console",
    ErrorCode.SUCCESS: "the NSM answered with an error that says Success, a protocol violation",
}


class NsmError(EnclaveOpsError):
    """The NSM is unreachable, refused a request (``code`` is its ErrorCode) or misbehaved."""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


# ---- framing of the emulated protocol -------------------------------------------------------


def write_frame(sock: socket.socket, payload: bytes) -> None:
    """Send one ``u32 BE length || payload`` frame."""
    try:
        sock.sendall(FRAME_HEADER.pack(len(payload)) + payload)
    except OSError as err:
        raise NsmError(f"cannot send to the NSM socket: {err}") from err


def read_frame(sock: socket.socket, max_size: int) -> bytes | None:
    """One frame's payload, or None if the peer closed the connection between frames.

    A frame longer than ``max_size`` is refused from its header alone, so a hostile peer
    cannot make us buffer more than ``max_size`` bytes.
    """
    header = _receive_up_to(sock, FRAME_HEADER.size)
    if not header:
        return None
    if len(header) < FRAME_HEADER.size:
        raise NsmError(f"the NSM socket closed inside a frame header ({len(header)} of 4 bytes)")
    (length,) = FRAME_HEADER.unpack(header)
    if length > max_size:
        raise NsmError(
            f"NSM frame announces {length} bytes, more than the {max_size}-byte limit; "
            "the peer does not speak the NSM socket protocol",
            ErrorCode.INPUT_TOO_LARGE,
        )
    payload = _receive_up_to(sock, length)
    if len(payload) < length:
        raise NsmError(
            f"the NSM socket closed inside a frame ({len(payload)} of {length} bytes received)"
        )
    return payload


def _receive_up_to(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer if the peer closes the connection first."""
    received = bytearray()
    while len(received) < size:
        try:
            chunk = sock.recv(size - len(received))
        except socket.timeout as err:
            raise NsmError("the NSM socket did not answer in time") from err
        except OSError as err:
            raise NsmError(f"cannot read from the NSM socket: {err}") from err
        if not chunk:
            break
        received += chunk
    return bytes(received)


def serve_connection(conn: socket.socket, handle: Callable[[Request], Response]) -> None:
    """Answer request frames on ``conn`` with ``handle`` until the client closes it.

    ``handle`` may raise :class:`NsmError` with a ``code`` to answer ``{"Error": code}``.
    A broken connection ends the loop quietly, except a failed send, which raises NsmError.
    """
    while True:
        try:
            frame = read_frame(conn, REQUEST_MAX_SIZE)
        except NsmError as err:
            if err.code is ErrorCode.INPUT_TOO_LARGE:
                write_frame(conn, encode_response(ErrorResponse(ErrorCode.INPUT_TOO_LARGE)))
            return
        if frame is None:
            return
        write_frame(conn, encode_response(_answer(frame, handle)))


def _answer(frame: bytes, handle: Callable[[Request], Response]) -> Response:
    try:
        return handle(decode_request(frame))
    except NsmMessageError as err:
        return ErrorResponse(err.code)
    except NsmError as err:
        return ErrorResponse(err.code or ErrorCode.INTERNAL_ERROR)


# ---- backends -------------------------------------------------------------------------------


class Transport(Protocol):
    def exchange(self, request: bytes) -> bytes: ...

    def close(self) -> None: ...


def _default_ioctl(fd: int, request: int, buffer: bytearray) -> int:
    return fcntl.ioctl(fd, request, buffer, True)


class IoctlTransport:
    """``/dev/nsm`` as the Linux driver offers it: one raw ioctl per exchange."""

    def __init__(self, fd: int, path: str, ioctl: IoctlFunction | None = None) -> None:
        self._fd = fd
        self._path = path
        self._ioctl = ioctl or _default_ioctl

    def exchange(self, request: bytes) -> bytes:
        if len(request) > REQUEST_MAX_SIZE:
            raise NsmError(
                f"NSM request is {len(request)} bytes, the driver accepts at most "
                f"{REQUEST_MAX_SIZE}",
                ErrorCode.INPUT_TOO_LARGE,
            )
        # The arrays own the memory the kernel reads and writes; they stay alive (and are never
        # resized) until the ioctl has returned.
        request_buffer = array.array("B", request)
        response_buffer = array.array("B", bytes(RESPONSE_MAX_SIZE))
        request_address, _ = request_buffer.buffer_info()
        response_address, _ = response_buffer.buffer_info()
        message = bytearray(
            NSM_RAW.pack(request_address, len(request), response_address, RESPONSE_MAX_SIZE)
        )
        try:
            self._ioctl(self._fd, NSM_IOCTL_RAW, message)
        except OSError as err:
            raise _ioctl_error(self._path, err) from err
        response_length = NSM_RAW.unpack(message)[3]
        if response_length > RESPONSE_MAX_SIZE:
            raise NsmError(
                f"{self._path} reported a {response_length}-byte response for a "
                f"{RESPONSE_MAX_SIZE}-byte buffer; the NSM driver is misbehaving"
            )
        return response_buffer[:response_length].tobytes()

    def close(self) -> None:
        os.close(self._fd)


def _ioctl_error(path: str, err: OSError) -> NsmError:
    if err.errno == errno.EMSGSIZE:
        return NsmError(f"{path} refused the request as too large", ErrorCode.INPUT_TOO_LARGE)
    if err.errno in (errno.ENOTTY, errno.EINVAL):
        return NsmError(f"{path} is a character device but not the Nitro NSM device ({err})")
    if err.errno in (errno.EACCES, errno.EPERM):
        return NsmError(f"not allowed to use {path} ({err}); run as root inside the enclave")
    return NsmError(f"NSM ioctl on {path} failed: {err}")


class SocketTransport:
    """The emulator's NSM: a Unix stream socket speaking length-prefixed frames."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._path = path

    def exchange(self, request: bytes) -> bytes:
        write_frame(self._sock, request)
        response = read_frame(self._sock, RESPONSE_MAX_SIZE)
        if response is None:
            raise NsmError(f"the emulated NSM at {self._path} closed the connection")
        return response

    def close(self) -> None:
        self._sock.close()


def open_transport(
    path: str = DEFAULT_NSM_PATH,
    *,
    ioctl: IoctlFunction | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Transport:
    """The backend that fits what ``path`` is; anything else is a clear :class:`NsmError`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NsmError(
            f"{path} does not exist: this is not a Nitro enclave (only enclaves have the NSM "
            "device). On a machine without Nitro, run the code inside a nitro-emu enclave, "
            "where /dev/nsm is the emulator's NSM socket, or pass the path of that socket"
        ) from None
    except OSError as err:
        raise NsmError(f"cannot inspect {path}: {err}") from err
    if stat.S_ISCHR(mode):
        return IoctlTransport(_open_device(path), path, ioctl)
    if stat.S_ISSOCK(mode):
        return SocketTransport(_connect_socket(path, timeout), path)
    raise NsmError(
        f"{path} is a {_file_kind(mode)}, neither the Nitro NSM character device nor an "
        "emulated NSM socket: this is not a Nitro enclave. Run inside a nitro-emu enclave or "
        "pass the path of the emulator's NSM socket"
    )


def _file_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"


def _open_device(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise NsmError(f"cannot open the NSM device {path}: {err}; run as root") from err


def _connect_socket(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        raise NsmError(
            f"cannot connect to the emulated NSM at {path}: {err}; is the enclave running?"
        ) from err
    return sock


# ---- the client -----------------------------------------------------------------------------


class NsmClient:
    """Requests to the NSM; every method raises :class:`NsmError` when the NSM refuses."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_NSM_PATH,
        *,
        ioctl: IoctlFunction | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.path = str(path)
        self._transport = open_transport(self.path, ioctl=ioctl, timeout=timeout)
        # One exchange at a time: socket frames must not interleave (the driver locks too).
        self._lock = threading.Lock()

    def __enter__(self) -> NsmClient:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    def request(self, request: Request) -> Response:
        """Send ``request``; the successful response of the matching kind, or NsmError."""
        data = encode_request(request)
        with self._lock:
            raw = self._transport.exchange(data)
        try:
            response = decode_response(raw)
        except NsmMessageError as err:
            raise NsmError(
                f"the NSM at {self.path} answered {request.variant} with an invalid message: {err}",
                ErrorCode.INVALID_RESPONSE,
            ) from err
        if isinstance(response, ErrorResponse):
            raise NsmError(
                f"the NSM refused {request.variant}: {response.code.value} "
                f"({ERROR_HINTS[response.code]})",
                response.code,
            )
        expected = RESPONSE_FOR_REQUEST[type(request)]
        if not isinstance(response, expected):
            raise NsmError(
                f"the NSM answered {request.variant} with a {response.variant} response",
                ErrorCode.INVALID_RESPONSE,
            )
        return response

    def describe_nsm(self) -> DescribeNSMResponse:
        return cast(DescribeNSMResponse, self.request(DescribeNSM()))

    def describe_pcr(self, index: int) -> DescribePCRResponse:
        return cast(DescribePCRResponse, self.request(DescribePCR(index)))

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; returns the PCR's new value."""
        return cast(ExtendPCRResponse, self.request(ExtendPCR(index, data))).data

    def lock_pcr(self, index: int) -> None:
        self.request(LockPCR(index))

    def lock_pcrs(self, range: int) -> None:
        """Lock PCRs ``0 .. range-1``."""
        self.request(LockPCRs(range))

    def get_random(self) -> bytes:
        return cast(GetRandomResponse, self.request(GetRandom())).random

    def attestation(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A COSE_Sign1 attestation document binding the given fields (each ≤ 1024 bytes)."""
        request = Attestation(user_data, nonce, public_key)
        return cast(AttestationResponse, self.request(request)).document
