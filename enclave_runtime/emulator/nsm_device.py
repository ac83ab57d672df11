"""The emulated Nitro Secure Module of one enclave, served on the Unix socket seen as /dev/nsm.

PCRs follow Nitro: PCR0-2 are the EIF's measurements (all zero in debug mode), PCR4 is the
instance ID extended into a zero register, PCR8 the signing certificate's measurement, and PCRs
0-15 are locked from boot; 16-31 start at zero and are the enclave's to extend and lock.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from enclave_runtime.emulator.ca import EmulatorCA
from enclave_runtime.formats import nsm_messages as nsm
from enclave_runtime.formats.attestation import build_attestation_document
from enclave_runtime.formats.pcr import ZERO_PCR, Measurements, extend
from enclave_runtime.transport.nsm import NsmError, serve_connection

MAX_PCRS = 32
BOOT_LOCKED_PCRS = 16
RANDOM_BYTES = 256
VERSION = (1, 0, 0)


@dataclass
class PcrRegister:
    value: bytes = ZERO_PCR
    locked: bool = False


def instance_pcr(instance_id: str) -> bytes:
    """PCR4 of every enclave on an instance: its ID extended into a zero register."""
    return extend(ZERO_PCR, instance_id.encode())


def boot_pcrs(measurements: Measurements, instance_id: str, debug_mode: bool) -> list[PcrRegister]:
    registers = [PcrRegister() for _ in range(MAX_PCRS)]
    if not debug_mode:
        registers[0].value = measurements.pcr0
        registers[1].value = measurements.pcr1
        registers[2].value = measurements.pcr2
    registers[4].value = instance_pcr(instance_id)
    if measurements.pcr8 is not None:
        registers[8].value = measurements.pcr8
    for register in registers[:BOOT_LOCKED_PCRS]:
        register.locked = True
    return registers


@dataclass
class NsmDevice:
    """The NSM state machine: one request in, one response out (thread-safe)."""

    module_id: str
    registers: list[PcrRegister]
    ca: EmulatorCA
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def handle(self, request: nsm.Request) -> nsm.Response:
        with self._lock:
            return self._dispatch(request)

    def _dispatch(self, request: nsm.Request) -> nsm.Response:
        if isinstance(request, nsm.DescribePCR):
            register = self._register(request.index)
            return nsm.DescribePCRResponse(lock=register.locked, data=register.value)
        if isinstance(request, nsm.ExtendPCR):
            register = self._register(request.index)
            if register.locked:
                raise NsmError(f"PCR{request.index} is locked", nsm.ErrorCode.READ_ONLY_INDEX)
            register.value = extend(register.value, request.data)
            return nsm.ExtendPCRResponse(data=register.value)
        if isinstance(request, nsm.LockPCR):
            if request.index < BOOT_LOCKED_PCRS:
                # AWS's nsm-check (aws-nitro-enclaves-nsm-api) requires an error here (docs/nsm.md).
                raise NsmError(
                    f"PCR{request.index} is locked at boot; lock one of "
                    f"{BOOT_LOCKED_PCRS}..{MAX_PCRS - 1}",
                    nsm.ErrorCode.READ_ONLY_INDEX,
                )
            self._register(request.index).locked = True
            return nsm.LockPCRResponse()
        if isinstance(request, nsm.LockPCRs):
            for register in self.registers[: request.range]:
                register.locked = True
            return nsm.LockPCRsResponse()
        if isinstance(request, nsm.DescribeNSM):
            return self._describe()
        if isinstance(request, nsm.Attestation):
            return nsm.AttestationResponse(document=self._attest(request))
        if isinstance(request, nsm.GetRandom):
            return nsm.GetRandomResponse(random=os.urandom(RANDOM_BYTES))
        raise NsmError(f"unsupported request {request!r}", nsm.ErrorCode.INVALID_OPERATION)

    def _register(self, index: int) -> PcrRegister:
        return self.registers[index]  # the request types already bound index to 0..31

    def _describe(self) -> nsm.DescribeNSMResponse:
        major, minor, patch = VERSION
        return nsm.DescribeNSMResponse(
            version_major=major,
            version_minor=minor,
            version_patch=patch,
            module_id=self.module_id,
            max_pcrs=MAX_PCRS,
            locked_pcrs=tuple(i for i, r in enumerate(self.registers) if r.locked),
            digest=nsm.Digest.SHA384,
        )

    def _attest(self, request: nsm.Attestation) -> bytes:
        signer = self.ca.signer_for(self.module_id)
        return build_attestation_document(
            signing_key=signer.key,
            certificate=signer.certificate,
            cabundle=signer.cabundle,
            module_id=self.module_id,
            timestamp_ms=time.time_ns() // 1_000_000,
            pcrs={i: r.value for i, r in enumerate(self.registers[:BOOT_LOCKED_PCRS])},
            public_key=request.public_key,
            user_data=request.user_data,
            nonce=request.nonce,
        )


class NsmServer:
    """Serves an :class:`NsmDevice` on a Unix socket, one thread per open descriptor."""

    def __init__(self, device: NsmDevice, path: Path) -> None:
        self.device = device
        self.path = Path(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(os.fsencode(self.path))
        self._listener.listen(64)
        self._thread = threading.Thread(target=self._accept_loop, name="nsm", daemon=True)

    def start(self) -> NsmServer:
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                serve_connection(conn, self.device.handle)
            except (NsmError, OSError):
                return

    def close(self) -> None:
        self._listener.close()
        self.path.unlink(missing_ok=True)
