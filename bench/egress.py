"""Egress through the emulated fabric, against direct loopback TCP and socat, in the same run.

Topology (each side in its own process, as in an enclave and on its parent):

    client -> odyn egress proxy (CONNECT) -> vsock(3, 17002) on the fabric -> broker -> app

Baselines: the client straight to the app (direct loopback TCP), and the same two hops built
from socat (``TCP-LISTEN -> UNIX-CONNECT``, ``UNIX-LISTEN -> TCP``; with its defaults, and tuned
as our relays are), which need no CONNECT. The figures and goals are those of
``bench/ingress.py``, whose harness this reuses; new connections per second include the CONNECT
exchange and the broker's connect, which socat does not do.
Run: ``.venv/bin/python bench/egress.py [--quick]``; it starts and stops everything it needs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from ingress import (
    ENCLAVE_CID,
    FULL,
    QUICK,
    Scale,
    Service,
    Topology,
    arguments,
    connect_to,
    free_port,
    measure,
    report,
    socat_topologies,
    start_role,
    stop,
)


def run_broker() -> None:
    from enclave_runtime.formats.vsock_ports import EGRESS_BROKER_PORT
    from enclave_runtime.host.egress_broker import start_egress_broker

    async def serve() -> None:
        await start_egress_broker()
        print(f"ready {EGRESS_BROKER_PORT}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


def run_enclave_egress(proxy_port: int) -> None:
    from enclave_runtime.formats.manifest import Egress
    from enclave_runtime.odyn.egress import start_egress_proxy

    async def serve() -> None:
        proxy = await start_egress_proxy(Egress(allow=("127.0.0.1",), proxy_port=proxy_port))
        assert proxy is not None
        print(f"ready {proxy.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


def main(scale: Scale) -> int:
    services: list[Service] = []
    with tempfile.TemporaryDirectory(prefix="eb", dir="/tmp") as workdir:
        emu = {"NITRO_EMU_ROOT": workdir}
        try:
            app = start_role("app", str(free_port()))
            services.append(app)
            broker = start_role("broker", env=emu, script=__file__)
            proxy = start_role(
                "enclave-egress",
                str(free_port()),
                env={**emu, "NITRO_EMU_CID": str(ENCLAVE_CID)},
                script=__file__,
            )
            services += [broker, proxy]
            connect = f"CONNECT 127.0.0.1:{app.port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            topologies = [
                Topology("direct", lambda: connect_to(app.port), []),
                *socat_topologies(Path(workdir), app.port, services),
                Topology("ours", lambda: connect_to(proxy.port, connect.encode()), [proxy, broker]),
            ]
            figures = measure(topologies, scale)
        finally:
            stop(services)
    report(figures, scale)
    return 0


if __name__ == "__main__":
    options = arguments(("broker", "enclave-egress"))
    if options.role == "broker":
        run_broker()
    elif options.role == "enclave-egress":
        run_enclave_egress(int(options.args[0]))
    else:
        sys.exit(main(QUICK if options.quick else FULL))
