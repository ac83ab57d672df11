"""The init's control latency and restart latency, against a bare Unix-socket round trip.

A real odyn (with one service) runs as enclave CID 16 on a temporary emulated fabric. Measured in
the same run:

- baseline: connect, send a line, read the echo, close, to a threaded Unix-socket echo server
  (the control protocol is also one request per connection);
- ``ServiceStatus`` over the init's Unix socket, p50 and p99;
- restart latency: SIGKILL the service (Restart=always, RestartSec 0), time until a new process
  runs; repeated kills within the stable period show the crash-loop back-off (0.1 s doubling).

    .venv/bin/python bench/init.py [--requests 2000] [--restarts 5] [--quick]

``--quick`` (CI's smoke run) is ``--requests 100 --restarts 2``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from enclave_runtime.transport.init_client import InitClient, InitctlConfig  # noqa: E402

MANIFEST = """\
version: v1
name: bench
target: bench:latest
sources:
  app: app
services:
  directory: {units}
  log_directory: {logs}
  units:
    crasher:
      ExecStart: /bin/sleep 600
      Restart: always
      RestartSec: 0
control:
  unix_socket: {socket}
"""


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def echo_server(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(conn.recv(4096))

    threading.Thread(target=serve, daemon=True).start()
    return listener


def echo_round_trip(path: Path) -> float:
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        conn.sendall(b'{"ServiceStatus":{"name":"crasher"}}\n')
        conn.recv(4096)
    return time.perf_counter() - start


def timed(call: object) -> float:
    start = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - start


def restart_latency(client: InitClient, timeout: float = 120.0) -> float:
    pid = client.service_status("crasher").pid
    assert pid is not None
    start = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        info = client.service_status("crasher")
        if info.pid not in (None, pid) and info.state.value == "running":
            return time.perf_counter() - start
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not come back")
        time.sleep(0.001)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 requests, 2 restarts")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.restarts = 100, 2
    work = Path(tempfile.mkdtemp(prefix="binit", dir="/tmp"))
    sock = work / "init.sock"
    config = work / "config"
    config.mkdir()
    units = work / "units"
    units.mkdir()
    (config / "enclaver.yaml").write_text(
        MANIFEST.format(units=units, logs=work / "logs", socket=sock)
    )
    env = dict(os.environ, NITRO_EMU_ROOT=str(work), NITRO_EMU_CID="16")
    odyn = subprocess.Popen(
        [
            *(sys.executable, "-m", "enclave_runtime.odyn.cli", "--config-dir", str(config)),
            *("--no-bootstrap", "--linger", "0", "--", "sleep", "600"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    echo_path = work / "echo.sock"
    listener = echo_server(echo_path)
    try:
        client = InitClient(InitctlConfig(protocol="unix", unix_socket_path=str(sock)))
        deadline = time.monotonic() + 30
        while not sock.exists():
            if odyn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("odyn did not start its init")
            time.sleep(0.05)
        while client.service_status("crasher").state.value != "running":
            time.sleep(0.01)
        baseline = [echo_round_trip(echo_path) for _ in range(args.requests)]
        control = [timed(lambda: client.service_status("crasher")) for _ in range(args.requests)]
        restarts = [restart_latency(client) for _ in range(args.restarts)]
    finally:
        listener.close()
        odyn.send_signal(signal.SIGTERM)
        odyn.wait(30)
    base50, base99 = percentile(baseline, 0.5), percentile(baseline, 0.99)
    ctl50, ctl99 = percentile(control, 0.5), percentile(control, 0.99)
    first = restarts[0]
    print(f"Unix-socket echo (baseline):  p50 {base50 * 1e6:8.0f} us   p99 {base99 * 1e6:8.0f} us")
    print(
        f"ServiceStatus request:        p50 {ctl50 * 1e6:8.0f} us   p99 {ctl99 * 1e6:8.0f} us"
        f"   ratio p50 {ctl50 / base50:5.1f}x  p99 {ctl99 / base99:5.1f}x"
    )
    print(
        f"restart after SIGKILL:        {first * 1e3:8.1f} ms"
        f"   ratio {first / base50:7.0f}x the echo p50 (RestartSec 0: back-off floor 0.1 s)"
    )
    crash_loop = ", ".join(f"{seconds * 1e3:.0f}" for seconds in restarts)
    print(f"crash loop, successive restarts (ms): {crash_loop}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
