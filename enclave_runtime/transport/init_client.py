"""The init control protocol's client: what the host, the modules and ``initctl`` share.

:class:`InitClient` sends one request per connection to the init, over a Unix socket or vsock
(docs/init.md, "The control protocol"); it talks to enclave-init's own init too. It lives in
the transport layer so that the parent's code reaches the enclave's init without importing the
in-enclave side.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.init_errors import ERROR_KINDS, InitError, UnknownServiceError
from enclave_runtime.formats.init_protocol import (
    MAX_RESPONSE_SIZE,
    ErrorResponse,
    PongResponse,
    ReloadChanges,
    Request,
    RequestKind,
    Response,
    ServiceInfo,
    ServiceListResponse,
    ServiceLogsResponse,
    ServiceStatusResponse,
    SuccessResponse,
    SystemStatus,
    SystemStatusResponse,
    decode_response,
    encode_request,
)
from enclave_runtime.formats.vsock_ports import INIT_CONTROL_PORT, PARENT_CID
from enclave_runtime.transport import vsock

DEFAULT_CONFIG_PATH = "/etc/initctl.yaml"
CONFIG_ENV = "INITCTL_CONFIG"
SOCKET_ENV = "INIT_SOCKET"
DEFAULT_SOCKET_PATH = "/run/init.sock"
# Longer than a service's default stop grace period (10 s) plus its start: a stop or restart
# answers only once it is done.
DEFAULT_TIMEOUT = 60.0
DEFAULT_LOG_LINES = 50
_READ_CHUNK = 65536


class InitConnectionError(EnclaveOpsError):
    """The init could not be reached, or did not answer."""


@dataclass(frozen=True)
class InitctlConfig:
    """Where the init listens; enclave-init's initctl.yaml keys, plus ``timeout`` (seconds)."""

    protocol: str = "unix"
    unix_socket_path: str = DEFAULT_SOCKET_PATH
    vsock_cid: int = PARENT_CID
    vsock_port: int = INIT_CONTROL_PORT
    timeout: float = DEFAULT_TIMEOUT


class InitClient:
    """One request per connection to the init, over a Unix socket or vsock.

    ``fabric`` chooses the vsock backend (default: the one this process's environment calls
    for, see :mod:`enclave_runtime.transport.vsock`).
    """

    def __init__(
        self, config: InitctlConfig | None = None, fabric: vsock.Backend | None = None
    ) -> None:
        self.config = config or InitctlConfig()
        self._fabric = fabric
        self._unprivileged_source = False

    def request(self, request: Request) -> Response:
        """Send ``request`` and return the init's response, ``Error`` included."""
        raw = self._exchange(encode_request(request))
        try:
            return decode_response(raw)
        except EnclaveOpsError as err:
            raise InitConnectionError(
                f"the init at {self._address()} answered something that is not a control "
                f"response: {err}"
            ) from None

    def call(self, request: Request) -> Response:
        """Like :meth:`request`, but an ``Error`` response raises the matching InitError."""
        response = self.request(request)
        if isinstance(response, ErrorResponse):
            raise error_from_response(response, request)
        return response

    def ping(self) -> None:
        self._expect(Request(RequestKind.PING), PongResponse)

    def list_services(self) -> list[ServiceInfo]:
        return list(self._expect(Request(RequestKind.LIST_SERVICES), ServiceListResponse).services)

    def service_status(self, name: str) -> ServiceInfo:
        request = Request(RequestKind.SERVICE_STATUS, name=name)
        return self._expect(request, ServiceStatusResponse).status

    def start(self, name: str) -> SuccessResponse:
        return self._expect(Request(RequestKind.SERVICE_START, name=name), SuccessResponse)

    def stop(self, name: str) -> SuccessResponse:
        return self._expect(Request(RequestKind.SERVICE_STOP, name=name), SuccessResponse)

    def restart(self, name: str) -> SuccessResponse:
        return self._expect(Request(RequestKind.SERVICE_RESTART, name=name), SuccessResponse)

    def enable(self, name: str, now: bool = False) -> SuccessResponse:
        """Enable (persistently); with ``now`` also start.

        enclave-init's own init ignores ``now`` (and returns no ``service``); it then gets a
        separate ServiceStart, as its initctl sends.
        """
        request = Request(RequestKind.SERVICE_ENABLE, name=name, now=now)
        response = self._expect(request, SuccessResponse)
        if now and response.service is None:
            return self.start(name)
        return response

    def disable(self, name: str) -> SuccessResponse:
        return self._expect(Request(RequestKind.SERVICE_DISABLE, name=name), SuccessResponse)

    def logs(self, name: str, lines: int = DEFAULT_LOG_LINES) -> list[str]:
        request = Request(RequestKind.SERVICE_LOGS, name=name, lines=lines)
        return list(self._expect(request, ServiceLogsResponse).logs)

    def clear_logs(self, name: str) -> None:
        self._expect(Request(RequestKind.SERVICE_LOGS_CLEAR, name=name), SuccessResponse)

    def system_status(self) -> SystemStatus:
        return self._expect(Request(RequestKind.SYSTEM_STATUS), SystemStatusResponse).status

    def reload(self) -> ReloadChanges | None:
        """What changed; None from enclave-init's init, which reloads in the background."""
        return self._expect(Request(RequestKind.SYSTEM_RELOAD), SuccessResponse).changes

    def shutdown(self) -> None:
        self._expect(Request(RequestKind.SYSTEM_SHUTDOWN), SuccessResponse)

    def _expect(self, request: Request, expected: type[Any]) -> Any:
        response = self.call(request)
        if not isinstance(response, expected):
            raise InitConnectionError(
                f"the init at {self._address()} answered {request.kind.value} with "
                f"{type(response).__name__}; is it an init control server?"
            )
        return response

    def _address(self) -> str:
        if self.config.protocol == "vsock":
            return f"vsock({self.config.vsock_cid}:{self.config.vsock_port})"
        return self.config.unix_socket_path

    def _exchange(self, data: bytes) -> bytes:
        conn = self._connect()
        try:
            conn.settimeout(self.config.timeout)
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            return self._read_response(conn)
        except (BrokenPipeError, ConnectionResetError):
            # The peer closed before reading the request: a refusal, seen as EPIPE or ECONNRESET
            # depending on whether the close arrived before or after the request went out.
            raise self._closed_without_answer() from None
        except socket.timeout:
            raise InitConnectionError(
                f"the init at {self._address()} did not answer within "
                f"{self.config.timeout:g} s; raise --timeout for slow stops"
            ) from None
        except OSError as err:
            raise InitConnectionError(
                f"the connection to the init at {self._address()} failed: {err}"
            ) from err
        finally:
            conn.close()

    def _connect(self) -> socket.socket:
        try:
            if self.config.protocol == "vsock":
                return self._connect_vsock(self._fabric or vsock.backend())
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.settimeout(self.config.timeout)
                conn.connect(os.fsencode(self.config.unix_socket_path))
            except OSError:
                conn.close()
                raise
            return conn
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise InitConnectionError(
                f"cannot reach the init at {self._address()}: {err.strerror or err}; is odyn "
                "running, and is this the right address (--socket, --vsock-cid, --vsock-port, "
                f"or {DEFAULT_CONFIG_PATH})?"
            ) from None
        except PermissionError:
            raise InitConnectionError(
                f"no permission to connect to {self._address()}: the control socket is "
                "root's only (mode 0600); run initctl as root"
            ) from None
        except socket.timeout:
            raise InitConnectionError(
                f"connecting to the init at {self._address()} timed out"
            ) from None
        except OSError as err:
            raise InitConnectionError(f"cannot reach the init at {self._address()}: {err}") from err

    def _read_response(self, conn: socket.socket) -> bytes:
        """One response: up to a newline, or (enclave-init's form) up to the close."""
        buffer = bytearray()
        while True:
            chunk = conn.recv(_READ_CHUNK)
            if not chunk:
                break
            newline = chunk.find(b"\n")
            if newline >= 0:
                buffer += chunk[:newline]
                break
            buffer += chunk
            if len(buffer) > MAX_RESPONSE_SIZE:
                raise InitConnectionError(
                    f"the init at {self._address()} sent more than {MAX_RESPONSE_SIZE} bytes; "
                    "ask for fewer log lines"
                )
        if not buffer:
            raise self._closed_without_answer()
        return bytes(buffer)

    def _connect_vsock(self, fabric: vsock.Backend) -> socket.socket:
        """From a privileged source port when this process may bind one (the init requires it
        by default, docs/init.md); otherwise from an ephemeral port, for inits that do not."""
        cid, port, timeout = self.config.vsock_cid, self.config.vsock_port, self.config.timeout
        try:
            conn = vsock.connect_privileged(fabric, cid, port, timeout)
        except PermissionError:
            self._unprivileged_source = True
            return fabric.connect(cid, port, timeout)
        self._unprivileged_source = False
        return conn

    def _closed_without_answer(self) -> InitConnectionError:
        hint = (
            "; this process could not bind a privileged source port (below 1024), which the "
            "init requires unless control.require_privileged_port is false: run as root"
            if self._unprivileged_source
            else ""
        )
        return InitConnectionError(
            f"the init at {self._address()} closed the connection without answering; over "
            f"vsock this means this CID is not in the enclave's control.allowed_cids{hint}"
        )


def error_from_response(response: ErrorResponse, request: Request) -> InitError:
    """The InitError an ``Error`` response stands for (plain InitError for enclave-init's)."""
    cls = ERROR_KINDS.get(response.kind or "", InitError)
    if cls is UnknownServiceError:
        return UnknownServiceError(request.name or "", response.message)
    return cls(response.message)
