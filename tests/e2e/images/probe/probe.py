"""A tiny service for the emulator's e2e tests: it runs inside an enclave and answers over vsock.

One request per connection, a line: ``hello``, ``ifaces``, ``attest NONCE_HEX``, ``exit CODE``.
"""

import json
import os
import socket
import sys

from enclave_runtime.transport import vsock
from enclave_runtime.transport.nsm import NsmClient

PORT = 5000


def answer(command: str, peer: vsock.VsockAddress) -> bytes:
    name, _, argument = command.partition(" ")
    if name == "hello":
        identity = {"peer_cid": peer.cid, "cid": vsock.local_cid(), "pid": os.getpid()}
        return json.dumps(identity).encode()
    if name == "ifaces":
        return json.dumps([iface for _index, iface in socket.if_nameindex()]).encode()
    if name == "attest":
        with NsmClient() as nsm:
            return nsm.attestation(nonce=bytes.fromhex(argument), user_data=b"probe")
    return b"unknown command"


def main() -> int:
    print("probe: listening on vsock port", PORT, flush=True)
    listener = vsock.listen(PORT)
    while True:
        conn, peer = vsock.accept(listener)
        with conn:
            command = conn.makefile("rb").readline().decode().strip()
            if command.startswith("exit "):
                conn.sendall(b"bye")
                return int(command.split()[1])
            conn.sendall(answer(command, peer))


if __name__ == "__main__":
    sys.exit(main())
