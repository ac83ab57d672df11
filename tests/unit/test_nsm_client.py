"""The NSM client over both backends, without a real NSM.

The ioctl backend is driven through /dev/null (a character device that is certainly not an NSM)
with a fake ioctl that plays the Linux driver: it reads the request and writes the response at
the addresses the client put in ``struct nsm_raw``, using ctypes, and stores the response length
back, so the framing is checked against real memory. The socket backend talks to a small server
thread on a temporary Unix socket.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import socket
import stat
import struct
import tempfile
import threading
from pathlib import Path

import cbor2
import pytest

from enclave_runtime.formats.nsm_messages import (
    REQUEST_MAX_SIZE,
    RESPONSE_MAX_SIZE,
    AttestationResponse,
    DescribeNSM,
    DescribeNSMResponse,
    DescribePCR,
    DescribePCRResponse,
    Digest,
    ErrorCode,
    ErrorResponse,
    ExtendPCR,
    ExtendPCRResponse,
    GetRandom,
    GetRandomResponse,
    LockPCR,
    LockPCRResponse,
    LockPCRs,
    LockPCRsResponse,
    NsmMessageError,
    encode_request,
    encode_response,
)
from enclave_runtime.transport.nsm import (
    NSM_IOCTL_RAW,
    IoctlTransport,
    NsmClient,
    NsmError,
    read_frame,
    serve_connection,
    write_frame,
)

DESCRIBE = DescribeNSMResponse(1, 0, 0, "i-0123-enc0123", 32, tuple(range(16)), Digest.SHA384)


def test_ioctl_number_is_iowr_0x0a_0_of_a_32_byte_struct():
    # _IOWR(type, nr, size) = (read|write = 3) << 30 | size << 16 | type << 8 | nr
    assert (3 << 30) | (32 << 16) | (0x0A << 8) | 0 == NSM_IOCTL_RAW == 0xC0200A00


class FakeDriver:
    """Plays drivers/misc/nsm.c: copy the request in, the response out, store its length."""

    def __init__(self, respond, *, reported_length=None, fill_after=b"", error=None):
        self.respond = respond
        self.reported_length = reported_length
        self.fill_after = fill_after
        self.error = error
        self.calls = []

    def __call__(self, fd: int, request: int, message: bytearray) -> int:
        assert len(message) == 32
        request_addr, request_len, response_addr, response_len = struct.unpack("=QQQQ", message)
        request_bytes = ctypes.string_at(request_addr, request_len)
        is_device = stat.S_ISCHR(os.fstat(fd).st_mode)
        self.calls.append((is_device, request, request_bytes, response_len))
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        response = self.respond(request_bytes)
        length = min(response_len, len(response))  # the driver truncates what does not fit
        written = response[:length] + self.fill_after
        ctypes.memmove(response_addr, written, min(len(written), response_len))
        reported = length if self.reported_length is None else self.reported_length
        message[:] = struct.pack("=QQQQ", request_addr, request_len, response_addr, reported)
        return 0


def answer(response):
    return lambda _request: encode_response(response)


def device_client(driver: FakeDriver) -> NsmClient:
    return NsmClient("/dev/null", ioctl=driver)


def test_ioctl_backend_frames_the_request_and_reads_the_response():
    driver = FakeDriver(answer(DESCRIBE))
    with device_client(driver) as client:
        assert client.describe_nsm() == DESCRIBE
    ((fd_is_device, request, request_bytes, response_len),) = driver.calls
    assert fd_is_device  # the ioctl went to the opened character device
    assert request == 0xC0200A00
    assert request_bytes == encode_request(DescribeNSM()) == b"\x6bDescribeNSM"
    assert response_len == RESPONSE_MAX_SIZE


def test_ioctl_backend_keeps_only_the_reported_response_length():
    # Bytes after the reported length must be ignored (a trailing byte would fail decoding).
    driver = FakeDriver(answer(GetRandomResponse(b"\x42" * 256)), fill_after=b"\xff" * 64)
    with device_client(driver) as client:
        assert client.get_random() == b"\x42" * 256


def test_ioctl_backend_passes_every_request_byte_for_byte():
    document = b"\x84" + bytes(300)
    driver = FakeDriver(answer(AttestationResponse(document)))
    with device_client(driver) as client:
        got = client.attestation(user_data=b"hello", nonce=bytes(range(32)), public_key=None)
    assert got == document
    sent = cbor2.loads(driver.calls[0][2])
    assert sent == {
        "Attestation": {"user_data": b"hello", "nonce": bytes(range(32)), "public_key": None}
    }


def test_too_large_requests_never_reach_the_ioctl():
    driver = FakeDriver(answer(ExtendPCRResponse(bytes(48))))
    with device_client(driver) as client:
        with pytest.raises(NsmMessageError, match="more than the 4096 bytes") as caught:
            client.extend_pcr(16, bytes(REQUEST_MAX_SIZE))
        assert caught.value.code is ErrorCode.INPUT_TOO_LARGE
    assert driver.calls == []


def test_ioctl_transport_refuses_raw_oversized_requests_too():
    driver = FakeDriver(answer(LockPCRResponse()))
    transport = IoctlTransport(os.open("/dev/null", os.O_RDONLY), "/dev/nsm", driver)
    try:
        with pytest.raises(NsmError, match="at most 4096") as caught:
            transport.exchange(bytes(REQUEST_MAX_SIZE + 1))
        assert caught.value.code is ErrorCode.INPUT_TOO_LARGE
        assert transport.exchange(bytes(REQUEST_MAX_SIZE))  # exactly the limit is allowed
    finally:
        transport.close()
    assert len(driver.calls) == 1
    assert len(driver.calls[0][2]) == REQUEST_MAX_SIZE


def test_a_driver_reporting_more_than_the_buffer_is_refused():
    driver = FakeDriver(answer(LockPCRResponse()), reported_length=RESPONSE_MAX_SIZE + 1)
    with device_client(driver) as client, pytest.raises(NsmError, match="misbehaving"):
        client.lock_pcr(17)


def test_a_truncated_response_is_an_invalid_response():
    driver = FakeDriver(answer(GetRandomResponse(bytes(32))), reported_length=10)
    with device_client(driver) as client, pytest.raises(NsmError) as caught:
        client.get_random()
    assert caught.value.code is ErrorCode.INVALID_RESPONSE
    assert "invalid message" in str(caught.value)


def test_emsgsize_from_the_driver_is_input_too_large():
    driver = FakeDriver(answer(LockPCRResponse()), error=errno.EMSGSIZE)
    with device_client(driver) as client, pytest.raises(NsmError, match="too large") as caught:
        client.lock_pcr(20)
    assert caught.value.code is ErrorCode.INPUT_TOO_LARGE


def test_a_character_device_that_is_not_the_nsm_is_named():
    # The real ioctl on /dev/null: the kernel answers ENOTTY without touching our buffers.
    with NsmClient("/dev/null") as client, pytest.raises(NsmError, match="not the Nitro NSM"):
        client.describe_nsm()


def test_nsm_error_responses_raise_with_their_code_and_advice():
    driver = FakeDriver(answer(ErrorResponse(ErrorCode.READ_ONLY_INDEX)))
    with device_client(driver) as client, pytest.raises(NsmError) as caught:
        client.extend_pcr(0, b"data")
    assert caught.value.code is ErrorCode.READ_ONLY_INDEX
    assert "refused ExtendPCR: ReadOnlyIndex" in str(caught.value)
    assert "16-31" in str(caught.value)


def test_a_response_of_the_wrong_kind_is_refused():
    driver = FakeDriver(answer(LockPCRsResponse()))
    with device_client(driver) as client, pytest.raises(NsmError) as caught:
        client.get_random()
    assert caught.value.code is ErrorCode.INVALID_RESPONSE
    assert "answered GetRandom with a LockPCRs response" in str(caught.value)


# ---- what sits at the path -----------------------------------------------------------------


def test_a_missing_device_says_this_is_not_a_nitro_enclave(tmp_path: Path):
    with pytest.raises(NsmError) as caught:
        NsmClient(tmp_path / "nsm")
    message = str(caught.value)
    assert "does not exist: this is not a Nitro enclave" in message
    assert "nitro-emu" in message


@pytest.mark.parametrize(("make", "kind"), [("file", "regular file"), ("dir", "directory")])
def test_other_files_at_the_path_are_refused(tmp_path: Path, make: str, kind: str):
    target = tmp_path / "nsm"
    if make == "file":
        target.write_bytes(b"")
    else:
        target.mkdir()
    with pytest.raises(NsmError, match=f"is a {kind}, neither the Nitro NSM"):
        NsmClient(target)


# ---- the emulated NSM socket ----------------------------------------------------------------


@pytest.fixture
def socket_dir():
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="nsm-", dir="/tmp") as directory:
        yield Path(directory)


class TinyNsm:
    """A PCR bank behind serve_connection, enough to exercise every request."""

    def __init__(self):
        self.pcrs = {index: bytes(48) for index in range(32)}
        self.locked = set(range(16))

    def handle(self, request):
        if isinstance(request, DescribeNSM):
            return DescribeNSMResponse(1, 0, 0, "i-emu", 32, tuple(self.locked), Digest.SHA384)
        if isinstance(request, DescribePCR):
            return DescribePCRResponse(request.index in self.locked, self.pcrs[request.index])
        if isinstance(request, ExtendPCR):
            if request.index in self.locked:
                raise NsmError("locked", ErrorCode.READ_ONLY_INDEX)
            value = hashlib.sha384(self.pcrs[request.index] + request.data).digest()
            self.pcrs[request.index] = value
            return ExtendPCRResponse(value)
        if isinstance(request, LockPCR):
            self.locked.add(request.index)
            return LockPCRResponse()
        if isinstance(request, LockPCRs):
            self.locked.update(range(request.range))
            return LockPCRsResponse()
        if isinstance(request, GetRandom):
            return GetRandomResponse(os.urandom(256))
        return AttestationResponse(cbor2.dumps([request.user_data, request.nonce]))


def start_server(path: Path, serve) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def run():
        with listener:
            conn, _ = listener.accept()
            with conn:
                serve(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_socket_backend_serves_every_request_on_one_connection(socket_dir: Path):
    nsm = TinyNsm()
    path = socket_dir / "nsm"
    server = start_server(path, lambda conn: serve_connection(conn, nsm.handle))
    with NsmClient(path) as client:
        assert client.describe_nsm().locked_pcrs == tuple(range(16))
        expected = hashlib.sha384(bytes(48) + b"app").digest()
        assert client.extend_pcr(16, b"app") == expected
        assert client.describe_pcr(16) == DescribePCRResponse(False, expected)
        client.lock_pcr(16)
        with pytest.raises(NsmError) as caught:
            client.extend_pcr(16, b"more")
        assert caught.value.code is ErrorCode.READ_ONLY_INDEX
        client.lock_pcrs(20)
        assert client.describe_pcr(19).lock is True
        assert len(client.get_random()) == 256
        assert cbor2.loads(client.attestation(user_data=b"u", nonce=b"n")) == [b"u", b"n"]
    server.join(timeout=5)
    assert not server.is_alive()  # the server saw the client close and returned


def test_server_answers_undecodable_requests_with_the_nsm_error_code(socket_dir: Path):
    path = socket_dir / "nsm"
    start_server(path, lambda conn: serve_connection(conn, TinyNsm().handle))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        for request, code in [
            (b"\xff\xff", ErrorCode.INVALID_ARGUMENT),
            (cbor2.dumps({"DescribePCR": {"index": 40}}), ErrorCode.INVALID_INDEX),
            (cbor2.dumps({"Attestation": {"nonce": bytes(1025)}}), ErrorCode.INPUT_TOO_LARGE),
        ]:
            write_frame(sock, request)
            assert read_frame(sock, RESPONSE_MAX_SIZE) == encode_response(ErrorResponse(code))
        # The connection survives bad requests.
        write_frame(sock, encode_request(LockPCR(30)))
        assert read_frame(sock, RESPONSE_MAX_SIZE) == encode_response(LockPCRResponse())


def test_server_refuses_an_oversized_frame_and_closes(socket_dir: Path):
    path = socket_dir / "nsm"
    start_server(path, lambda conn: serve_connection(conn, TinyNsm().handle))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(struct.pack(">I", REQUEST_MAX_SIZE + 1))
        assert read_frame(sock, RESPONSE_MAX_SIZE) == encode_response(
            ErrorResponse(ErrorCode.INPUT_TOO_LARGE)
        )
        assert read_frame(sock, RESPONSE_MAX_SIZE) is None


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (struct.pack(">I", RESPONSE_MAX_SIZE + 1), "more than the 12288-byte limit"),
        (struct.pack(">I", 10) + b"abc", "closed inside a frame (3 of 10 bytes"),
        (b"\x00\x00", "inside a frame header (2 of 4 bytes)"),
        (b"", "closed the connection"),
    ],
)
def test_client_refuses_broken_frames_from_the_server(socket_dir: Path, reply: bytes, words):
    path = socket_dir / "nsm"

    def misbehave(conn):
        assert read_frame(conn, REQUEST_MAX_SIZE) == encode_request(GetRandom())
        conn.sendall(reply)

    start_server(path, misbehave)
    with NsmClient(path) as client, pytest.raises(NsmError, match=re.escape(words)):
        client.get_random()


def test_a_silent_server_times_out(socket_dir: Path):
    path = socket_dir / "nsm"
    done = threading.Event()
    start_server(path, lambda conn: done.wait(5))
    try:
        with NsmClient(path, timeout=0.2) as client, pytest.raises(NsmError, match="in time"):
            client.describe_nsm()
    finally:
        done.set()


def test_a_socket_nobody_listens_on_is_reported(socket_dir: Path):
    path = socket_dir / "nsm"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(NsmError, match="cannot connect to the emulated NSM"):
        NsmClient(path)


def test_frames_round_trip_including_empty_ones():
    left, right = socket.socketpair()
    with left, right:
        write_frame(left, b"")
        write_frame(left, b"payload")
        left.shutdown(socket.SHUT_WR)
        assert read_frame(right, 16) == b""
        assert read_frame(right, 16) == b"payload"
        assert read_frame(right, 16) is None
