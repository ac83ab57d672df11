"""Ingress through the emulated fabric, against direct loopback TCP and socat, in the same run.

Topology (each proxy in its own process, as on a real parent and enclave):

    client -> host ingress proxy (TCP) -> vsock(16, P) on the fabric -> odyn ingress -> app:P

Baselines: the client straight to the app (direct loopback TCP), and the same two hops built
from socat (``TCP-LISTEN -> UNIX-CONNECT``, ``UNIX-LISTEN -> TCP``), once with its defaults and
once tuned as our relays are (1 MiB reads, 1 MiB send buffers on the Unix sockets). Figures: bulk
throughput on one connection (the median of rounds that alternate between the topologies, so
that a change of load on the machine hits them all alike), p50 round trip of 64-byte messages
(added latency per hop), new connections per second (connect, one echo, close), and 1000
concurrent connections held (errors, and the proxies' open file descriptors before and after).
Goals: >= 0.5 of direct, >= 1.0 of socat, <= 60 us per hop. Run:
``.venv/bin/python bench/ingress.py [--quick]``; it starts and stops everything it needs.
``--quick`` (CI's smoke run) sends little traffic: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CHUNK = 1024 * 1024
ENCLAVE_CID = 16
HOPS = 2
SOCAT_TUNED_BUFFER = 1024 * 1024  # our relays' largest read and fabric send buffer
MODE_SINK = b"S"
MODE_ECHO = b"E"
READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Scale:
    """How much traffic each figure is measured on."""

    bulk_bytes: int  # per bulk round, a multiple of CHUNK
    bulk_rounds: int
    pings: int
    new_connections: int
    concurrent: int


FULL = Scale(512 * CHUNK, bulk_rounds=5, pings=3000, new_connections=500, concurrent=1000)
# CI's smoke run (``--quick``): every code path and every line of the report, no timing worth it.
QUICK = Scale(8 * CHUNK, bulk_rounds=1, pings=100, new_connections=20, concurrent=20)


# --- the app: a sink (counts bytes until EOF) and an echo, one thread per connection ------------


def _serve_app(connection: socket.socket) -> None:
    with connection:
        mode = connection.recv(1)
        if mode == MODE_SINK:
            buffer = bytearray(CHUNK)
            total = 0
            while received := connection.recv_into(buffer):
                total += received
            connection.sendall(struct.pack("<Q", total))
        elif mode == MODE_ECHO:
            while data := connection.recv(65536):
                connection.sendall(data)


def run_app(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=2048)
    print(f"ready {listener.getsockname()[1]}", flush=True)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=_serve_app, args=(connection,), daemon=True).start()


# --- our proxies, each run in its own process -----------------------------------------------


def run_enclave_ingress(port: int, config_dir: str) -> None:
    from enclave_runtime.formats.manifest import Ingress
    from enclave_runtime.odyn.ingress import start_ingress

    async def serve() -> None:
        await start_ingress([Ingress(port)], config_dir)
        print(f"ready {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


def run_host_ingress(port: int) -> None:
    from enclave_runtime.host.ingress_proxy import start_ingress_proxy

    async def serve() -> None:
        proxy = await start_ingress_proxy(
            ENCLAVE_CID, [port], bind_host="127.0.0.1", host_ports={port: 0}
        )
        print(f"ready {proxy.bound[port]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


# --- processes -------------------------------------------------------------------------------


@dataclass
class Service:
    process: subprocess.Popen[str]
    port: int

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


def start_role(
    role: str, *args: str, env: dict[str, str] | None = None, script: str = __file__
) -> Service:
    """Run ``script`` (this file) as ``role`` and wait for its ``ready <port>`` line."""
    command = [sys.executable, script, "--role", role, *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    return Service(process, _ready_port(process, role))


def start_command(command: list[str], wait_for: tuple[str, int] | str) -> Service:
    """Run an outside command (socat) and wait until it accepts connections."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), _probe(wait_for):
            return Service(process, wait_for[1] if isinstance(wait_for, tuple) else 0)
        time.sleep(0.02)
    process.kill()
    raise RuntimeError(f"{command[0]} did not start listening")


@contextlib.contextmanager
def _probe(address: tuple[str, int] | str) -> Iterator[None]:
    family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.connect(address)
        yield


def _ready_port(process: subprocess.Popen[str], role: str) -> int:
    assert process.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(READY_TIMEOUT)
    if not result or not result[0].startswith("ready "):
        process.kill()
        raise RuntimeError(f"{role} did not start: {result[:1]}")
    return int(result[0].split()[1])


def stop(services: list[Service]) -> None:
    for service in services:
        service.process.terminate()
    for service in services:
        try:
            service.process.wait(5)
        except subprocess.TimeoutExpired:
            service.process.kill()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- measurements ----------------------------------------------------------------------------

Opener = Callable[[], socket.socket]


@dataclass
class Figures:
    throughput: float  # bytes per second
    p50_rtt: float  # seconds
    connections_per_second: float
    concurrent_errors: int
    fds_before: list[int]
    fds_after: list[int]


def connect_to(port: int, preface: bytes = b"") -> socket.socket:
    """A TCP connection to ``port``; ``preface`` (an HTTP CONNECT) is answered before use."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if preface:
        conn.sendall(preface)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            chunk = conn.recv(1)
            if not chunk:
                raise ConnectionError("the proxy closed the connection")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200 "):
            raise ConnectionError(head.decode(errors="replace"))
    return conn


def bulk_round(open_connection: Opener, payload: bytes, size: int) -> float:
    """Bytes per second for ``size`` bytes sent on one connection and counted by the app."""
    with open_connection() as conn:
        started = time.perf_counter()
        conn.sendall(MODE_SINK)
        for _ in range(size // CHUNK):
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        counted = struct.unpack("<Q", _recv_exactly(conn, 8))[0]
        elapsed = time.perf_counter() - started
    if counted != size:
        raise RuntimeError(f"the sink counted {counted} bytes, not {size}")
    return size / elapsed


def interleaved_throughput(topologies: list[Topology], scale: Scale) -> dict[str, float]:
    """Median bulk throughput of each topology over the scale's rounds, one round of each in
    turn: measured the same way, at the same times."""
    payload = os.urandom(CHUNK)
    rounds: dict[str, list[float]] = {topology.name: [] for topology in topologies}
    for _ in range(scale.bulk_rounds):
        for topology in topologies:
            rate = bulk_round(topology.open_connection, payload, scale.bulk_bytes)
            rounds[topology.name].append(rate)
    return {name: statistics.median(values) for name, values in rounds.items()}


def p50_round_trip(open_connection: Opener, pings: int) -> float:
    message = b"m" * 64
    samples = []
    with open_connection() as conn:
        conn.sendall(MODE_ECHO)
        for _ in range(pings):
            started = time.perf_counter()
            conn.sendall(message)
            _recv_exactly(conn, len(message))
            samples.append(time.perf_counter() - started)
    return statistics.median(samples[pings // 10 :])  # without the warm-up


def connection_rate(open_connection: Opener, count: int) -> float:
    """New connections per second: connect, one echo, close, ``count`` times in a row."""
    started = time.perf_counter()
    for _ in range(count):
        with open_connection() as conn:
            conn.sendall(MODE_ECHO + b"x")
            _recv_exactly(conn, 1)
    return count / (time.perf_counter() - started)


def hold_concurrent(open_connection: Opener, count: int) -> int:
    """Open ``count`` echo connections, check each, hold them all, close; count errors."""
    errors = 0
    held = []
    for index in range(count):
        try:
            conn = open_connection()
            message = b"%d;" % index
            conn.sendall(MODE_ECHO + message)
            if _recv_exactly(conn, len(message)) != message:
                errors += 1
            held.append(conn)
        except OSError:
            errors += 1
    for conn in held:
        conn.close()
    return errors


def settled_fds(proxies: list[Service], expected: list[int]) -> list[int]:
    """The proxies' descriptor counts once they have closed what the clients closed (<= 10 s)."""
    deadline = time.monotonic() + 10
    counts = [proxy.open_fds() for proxy in proxies]
    while counts != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        counts = [proxy.open_fds() for proxy in proxies]
    return counts


@dataclass
class Topology:
    """A way from the client to the app; ``proxies`` are ours, whose descriptors are counted.
    ``concurrent=False`` skips holding many concurrent connections (socat forks two processes per
    connection: 2000 processes prove nothing about socat)."""

    name: str
    open_connection: Opener
    proxies: list[Service]
    concurrent: bool = True


def measure(topologies: list[Topology], scale: Scale) -> dict[str, Figures]:
    """Every figure for every topology, by name."""
    before = {t.name: [proxy.open_fds() for proxy in t.proxies] for t in topologies}  # idle
    throughput = interleaved_throughput(topologies, scale)
    figures = {}
    for topology in topologies:
        opener = topology.open_connection
        rtt = p50_round_trip(opener, scale.pings)
        rate = connection_rate(opener, scale.new_connections)
        errors = hold_concurrent(opener, scale.concurrent) if topology.concurrent else -1
        after = settled_fds(topology.proxies, before[topology.name])
        figures[topology.name] = Figures(
            throughput[topology.name], rtt, rate, errors, before[topology.name], after
        )
    return figures


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


# --- report ----------------------------------------------------------------------------------


def report(figures: dict[str, Figures], scale: Scale) -> None:
    """The table, then each goal; ``figures`` has ``direct`` and ``ours``, and the socat runs
    when socat is installed."""
    mb = 1024 * 1024
    print("".join([f"{'':24}", *(f"{name:>12}" for name in figures)]))
    rows = [
        ("throughput (MB/s)", lambda f: f"{f.throughput / mb:.0f}"),
        ("p50 round trip (us)", lambda f: f"{f.p50_rtt * 1e6:.1f}"),
        ("new connections/s", lambda f: f"{f.connections_per_second:.0f}"),
        (f"{scale.concurrent} held: errors", lambda f: f"{f.concurrent_errors}".replace("-1", "-")),
    ]
    for label, show in rows:
        print("".join([f"{label:24}", *(f"{show(f):>12}" for f in figures.values())]))
    direct, ours = figures["direct"], figures["ours"]
    print(f"throughput vs direct:   {ours.throughput / direct.throughput:6.2f}  (goal >= 0.5)")
    socat, tuned = figures.get("socat"), figures.get("socat 1M")
    if socat is not None and tuned is not None:
        print(f"throughput vs socat:    {ours.throughput / socat.throughput:6.2f}  (goal >= 1.0)")
        print(f"throughput vs socat 1M: {ours.throughput / tuned.throughput:6.2f}")
        print(
            "connections/s vs socat: "
            f"{ours.connections_per_second / socat.connections_per_second:6.2f}"
        )
    else:
        print("socat baselines skipped: socat is not installed (apt-get install socat)")
    added = (ours.p50_rtt - direct.p50_rtt) / HOPS * 1e6
    print(f"added p50 per hop (us): {added:6.1f}  (goal <= 60; {HOPS} hops, round trip / 2)")
    leaked = [after - before for before, after in zip(ours.fds_before, ours.fds_after)]
    print(
        f"{scale.concurrent} concurrent: {ours.concurrent_errors} errors; proxy descriptors before "
        f"{ours.fds_before}, after {ours.fds_after} (leaked: {sum(leaked)})"
    )


def socat_relay(
    workdir: Path, target_port: int, buffer: int | None = None
) -> tuple[list[Service], Opener]:
    """The same two hops as ours, built from socat: TCP -> Unix socket -> TCP. ``buffer`` sets
    socat's read size and the Unix sockets' send buffers, as our relays set theirs."""
    socat = shutil.which("socat")
    assert socat is not None
    tuning = [] if buffer is None else ["-b", str(buffer)]
    unix_options = "" if buffer is None else f",sndbuf={buffer}"
    path = str(workdir / f"socat{buffer or ''}.sock")
    inner = start_command(
        [socat, *tuning, f"UNIX-LISTEN:{path},fork{unix_options}", f"TCP:127.0.0.1:{target_port}"],
        path,
    )
    listen_port = free_port()
    outer = start_command(
        [
            socat,
            *tuning,
            f"TCP-LISTEN:{listen_port},bind=127.0.0.1,fork,reuseaddr,backlog=2048",
            f"UNIX-CONNECT:{path}{unix_options}",
        ],
        ("127.0.0.1", listen_port),
    )
    return [outer, inner], lambda: connect_to(listen_port)


def socat_topologies(workdir: Path, target_port: int, services: list[Service]) -> list[Topology]:
    """socat with its defaults and tuned like ours; none when socat is not installed."""
    if not shutil.which("socat"):
        return []
    topologies = []
    for name, buffer in (("socat", None), ("socat 1M", SOCAT_TUNED_BUFFER)):
        relay, opener = socat_relay(workdir, target_port, buffer)
        services += relay
        topologies.append(Topology(name, opener, [], concurrent=False))
    return topologies


def main(scale: Scale) -> int:
    services: list[Service] = []
    with tempfile.TemporaryDirectory(prefix="ib", dir="/tmp") as workdir:
        emu = {"NITRO_EMU_ROOT": workdir}
        try:
            app = start_role("app", str(free_port()))
            services.append(app)
            enclave = start_role(
                "enclave-ingress",
                str(app.port),
                workdir,
                env={**emu, "NITRO_EMU_CID": str(ENCLAVE_CID)},
            )
            host = start_role("host-ingress", str(app.port), env=emu)
            services += [enclave, host]
            topologies = [
                Topology("direct", lambda: connect_to(app.port), []),
                *socat_topologies(Path(workdir), app.port, services),
                Topology("ours", lambda: connect_to(host.port), [host, enclave]),
            ]
            figures = measure(topologies, scale)
        finally:
            stop(services)
    report(figures, scale)
    return 0


def arguments(roles: tuple[str, ...]) -> argparse.Namespace:
    """``--quick`` for a run, ``--role`` (one of ``roles``) with its arguments for a process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI's smoke run: little traffic")
    parser.add_argument("--role", choices=roles)
    parser.add_argument("args", nargs="*")
    return parser.parse_args()


if __name__ == "__main__":
    options = arguments(("app", "enclave-ingress", "host-ingress"))
    if options.role == "app":
        run_app(int(options.args[0]))
    elif options.role == "enclave-ingress":
        run_enclave_ingress(int(options.args[0]), options.args[1])
    elif options.role == "host-ingress":
        run_host_ingress(int(options.args[0]))
    else:
        sys.exit(main(QUICK if options.quick else FULL))
