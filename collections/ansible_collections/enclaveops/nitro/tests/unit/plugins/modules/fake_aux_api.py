"""An enclave's aux API stand-in: ``POST /v1/attestation`` answered with real signed documents.

Documents are built and signed the way nitro-emu's NSM does (enclave_runtime's emulator CA and
attestation builder), with the caller's nonce, so clients verify them for real. It listens on
loopback TCP (the published port of a sleeve) or on the emulated vsock fabric (an enclave's
ingress port). One request per connection, answered, then closed.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

from enclave_runtime.emulator.ca import EmulatorCA
from enclave_runtime.formats.attestation import build_attestation_document
from enclave_runtime.transport.vsock import EmulatedFabric

MODULE_ID = "i-0000000000000000-enc0000000000000010"
PCRS = {index: bytes([index + 1]) * 48 for index in range(3)}


class FakeAuxApi:
    """Serves attestations signed by the CA under ``ca_dir``; ``root_pem`` pins it."""

    def __init__(self, ca_dir: Path) -> None:
        self.ca = EmulatorCA(ca_dir)
        self.pcrs = dict(PCRS)
        self.replayed_nonce: bytes | None = None  # answer with this nonce instead of the caller's
        self.error: tuple[int, str] | None = None  # answer with this status and error message
        self.requests: list[dict] = []
        self._listeners: list[socket.socket] = []

    @property
    def root_pem(self) -> Path:
        return self.ca.root_pem_path

    def serve_tcp(self) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        self._start(listener, listener.accept)
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    def serve_fabric(self, root: Path, cid: int, port: int) -> None:
        fabric = EmulatedFabric(root, cid)
        listener = fabric.listen(port)
        self._start(listener, lambda: fabric.accept(listener))

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()

    def _start(self, listener, accept) -> None:
        self._listeners.append(listener)
        threading.Thread(target=self._serve, args=(accept,), daemon=True).start()

    def _serve(self, accept) -> None:
        while True:
            try:
                conn = accept()[0]
            except OSError:
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        body = _read_request(conn)
        self.requests.append(json.loads(body or b"{}"))
        if self.error is not None:
            status, message = self.error
            payload = json.dumps({"error": message}).encode()
            conn.sendall(_response(status, "application/json", payload))
            return
        nonce = base64.b64decode(self.requests[-1].get("nonce") or "")
        document = self._document(self.replayed_nonce or nonce or None)
        conn.sendall(_response(200, "application/cbor", document))

    def _document(self, nonce: bytes | None) -> bytes:
        signer = self.ca.signer_for(MODULE_ID)
        return build_attestation_document(
            signing_key=signer.key,
            certificate=signer.certificate,
            cabundle=signer.cabundle,
            module_id=MODULE_ID,
            timestamp_ms=time.time_ns() // 1_000_000,
            pcrs=self.pcrs,
            public_key=b"enclave public key",
            user_data=b'{"eth_addr":"0x00"}',
            nonce=nonce,
        )


def _read_request(conn: socket.socket) -> bytes:
    """The body of one request (its head only gives the length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, separator, value = line.partition(b":")
        if separator and name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return body


def _response(status: int, content_type: str, payload: bytes) -> bytes:
    reasons = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}
    head = (
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload
