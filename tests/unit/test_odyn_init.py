"""odyn with the init: services start before the app, the host controls them over vsock and the
Unix socket, other CIDs are refused, SIGHUP reloads unit files, and services end with odyn."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from enclave_runtime.formats.init_errors import UnknownServiceError
from enclave_runtime.formats.init_protocol import ServiceInfo
from enclave_runtime.transport.init_client import InitClient, InitConnectionError, InitctlConfig
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.unit.odyn_support import (
    ENCLAVE_CID,
    fabric_environment,
    odyn_command,
    odyn_environment,
    write_manifest,
)

SERVICES = """\
services:
  directory: {units}
  log_directory: {logs}
  units:
    worker:
      ExecStart: /bin/sh -c 'echo worker up; exec sleep 60'
      Restart: on-failure
control:
  unix_socket: {socket}
  vsock_port: 9001
  allowed_cids: [3]
"""


@dataclass
class Odyn:
    process: subprocess.Popen[bytes]
    root: Path
    units: Path
    unix: InitClient
    vsock: InitClient

    def service(self, name: str) -> ServiceInfo:
        return self.unix.service_status(name)

    def until(self, name: str, state: str, timeout: float = 20) -> ServiceInfo:
        """Poll the init (another process) until ``name`` exists and is in ``state``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.service(name)
                if info.state.value == state:
                    return info
                seen = info.state.value
            except UnknownServiceError:
                seen = "unknown"
            assert time.monotonic() < deadline, f"{name} stayed {seen}"
            time.sleep(0.05)


@pytest.fixture
def odyn(tmp_path: Path) -> Iterator[Odyn]:
    units = tmp_path / "units"
    units.mkdir()
    with fabric_environment() as (root, env):
        socket_path = root / "init.sock"  # short: a Unix socket path
        config = tmp_path / "config"
        write_manifest(
            config, SERVICES.format(units=units, logs=tmp_path / "logs", socket=socket_path)
        )
        process = subprocess.Popen(
            # --linger 1: no status reader waits for the final line in these tests
            odyn_command(config, "--no-bootstrap", "--linger", "1", "--", "sleep", "60"),
            env=odyn_environment(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        unix = InitClient(InitctlConfig(protocol="unix", unix_socket_path=str(socket_path)))
        parent = EmulatedFabric(root)  # the host, CID 3
        vsock = InitClient(InitctlConfig(protocol="vsock", vsock_cid=ENCLAVE_CID), fabric=parent)
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert process.poll() is None and time.monotonic() < deadline, "odyn never served"
            time.sleep(0.05)
        running = Odyn(process, root, units, unix, vsock)
        yield running
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def test_a_manifest_service_runs_beside_the_app(odyn: Odyn) -> None:
    info = odyn.until("worker", "running")
    assert info.pid is not None
    assert Path(f"/proc/{info.pid}").exists()


def test_the_parent_controls_services_over_vsock(odyn: Odyn) -> None:
    odyn.until("worker", "running")
    odyn.vsock.ping()
    assert [s.name for s in odyn.vsock.list_services()] == ["worker"]
    odyn.vsock.stop("worker")
    assert odyn.service("worker").state.value in ("inactive", "exited")
    odyn.vsock.start("worker")
    assert odyn.until("worker", "running").pid is not None


def test_a_cid_outside_the_allow_list_gets_no_answer(odyn: Odyn) -> None:
    stranger = EmulatedFabric(odyn.root, cid=42)
    client = InitClient(InitctlConfig(protocol="vsock", vsock_cid=ENCLAVE_CID), fabric=stranger)
    with pytest.raises(InitConnectionError):
        client.ping()


def test_sighup_reloads_unit_files(odyn: Odyn) -> None:
    odyn.until("worker", "running")
    (odyn.units / "helper.service").write_text('ExecStart = "/bin/sleep 60"\n')
    odyn.process.send_signal(signal.SIGHUP)
    assert odyn.until("helper", "running").pid is not None
    assert odyn.process.poll() is None  # SIGHUP reloads; it does not reach the app as a stop


def test_services_end_with_odyn(odyn: Odyn) -> None:
    pid = odyn.until("worker", "running").pid
    odyn.process.send_signal(signal.SIGTERM)
    odyn.process.wait(30)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rpartition(")")[2].split()[0] != "Z"


def _malformed_requests(count: int) -> Iterator[bytes]:
    """Random bytes, broken and unknown JSON, wrong shapes and oversized bodies, reproducibly."""
    rng = random.Random(5)
    shapes = [
        lambda: rng.randbytes(rng.randint(0, 300)),
        lambda: b'{"ServiceStatus": {"name": ' + rng.randbytes(8) + b"}}\n",
        lambda: b'{"Nope": {}}\n',
        lambda: b'"ServiceStart"\n',
        lambda: b'{"ServiceLogs": {"name": "worker", "lines": -1}}\n',
        lambda: b'{"ServiceStatus": {"name": "../../etc/passwd"}}\n',
        lambda: b"[" * 1000 + b"\n",
        lambda: b'{"Ping": null, "Ping": 1}\n',
        lambda: b"x" * 20000,
    ]
    for _ in range(count):
        yield rng.choice(shapes)()


def test_ten_thousand_malformed_requests_leave_odyn_serving(odyn: Odyn) -> None:
    path = odyn.unix.config.unix_socket_path
    for payload in _malformed_requests(10_000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(path)
            with contextlib.suppress(OSError):  # the server may close on an oversized request
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(65536)
    odyn.unix.ping()
    assert odyn.until("worker", "running").name == "worker"
    assert odyn.process.poll() is None
