"""What the runtime costs every enclave: its bytes in the EIF, odyn's memory, the enclave's minimum.

In one run:

- odyn's resident memory (VmRSS), a real odyn with one ingress port and no API, egress or init,
  on a temporary emulated fabric: idle, the peak under bench/ingress.py's load (bulk transfer and
  new connections through the host's ingress proxy), and after many relayed connections against
  after the warm-up (goal: flat, within 5 %);
- the EIF of examples/hello and of a busybox app (/bin/busybox alone, FROM scratch), each amended
  with the project's runtime as ``enclaveops build`` amends it: the bytes of each part
  (``enclaveops eif describe --sizes``: kernel, bootstrap, runtime, app) and the least enclave
  memory nitro-cli accepts for it (4 x the EIF, rounded up to MiB).

Goals (docs/images.md): the runtime under 35 MB in the EIF, odyn under 25 MiB RSS idle. Needs
root and Docker (the images), and /bin/busybox (scripts/bench-setup.sh installs it).

    .venv/bin/python bench/footprint.py [--quick]

``--quick`` (CI's smoke run) relays 200 connections instead of 100,000 and little bulk traffic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ingress import (
    CHUNK,
    ENCLAVE_CID,
    READY_TIMEOUT,
    Service,
    bulk_round,
    connect_to,
    connection_rate,
    free_port,
    start_role,
    stop,
)

from enclave_runtime.build.pipeline import amend, amended_reference
from enclave_runtime.build.project_images import ensure_project_images
from enclave_runtime.formats.eif_sizes import ComponentSizes, component_sizes
from enclave_runtime.formats.nitro_cli_rules import minimum_memory_mib
from enclave_runtime.host.docker_engine import docker_client, get_image

REPO = Path(__file__).resolve().parent.parent
NITRO_EMU = str(Path(sys.executable).parent / "nitro-emu")
BASE_IMAGE = "enclaveops/debian-base:bookworm"
HELLO_APP = "enclaveops-bench/footprint-hello:latest"
BUSYBOX_APP = "enclaveops-bench/footprint-busybox:latest"
LABEL = "org.enclaveops.bench=footprint"
BUSYBOX = Path("/bin/busybox")
MB, MIB = 1_000_000, 1 << 20
RUNTIME_GOAL_MB, RSS_GOAL_MIB, FLAT_GOAL = 35, 25, 0.05
ODYN_MANIFEST = """\
version: v1
name: footprint
target: enclaveops-bench/footprint-release:latest
sources:
  app: enclaveops-bench/footprint-app:latest
ingress:
  - listen_port: {port}
"""
BUSYBOX_MANIFEST = """\
version: v1
name: busybox
target: enclaveops-bench/footprint-busybox-release:latest
sources:
  app: enclaveops-bench/footprint-busybox:latest
"""
BUSYBOX_DOCKERFILE = f"""\
FROM scratch
COPY busybox /bin/busybox
LABEL {LABEL}
CMD ["/bin/busybox", "sleep", "3600"]
"""


@dataclass(frozen=True)
class Scale:
    warm_up: int  # connections relayed before the reference reading
    connections: int  # relayed in all, the warm-up included
    bulk_bytes: int


FULL = Scale(warm_up=2_000, connections=100_000, bulk_bytes=512 * CHUNK)
QUICK = Scale(warm_up=100, connections=200, bulk_bytes=8 * CHUNK)


# --- odyn's memory ----------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` (VmRSS of /proc/PID/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextmanager
def peak_rss(pid: int, peak: list[float]) -> Iterator[None]:
    """Sample ``pid``'s RSS every 10 ms while the block runs; ``peak[0]`` gets the highest."""
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_mib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()


def start_odyn(work: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    config = work / "config"
    config.mkdir()
    (config / "enclaver.yaml").write_text(ODYN_MANIFEST.format(port=port))
    command = [
        *(sys.executable, "-m", "enclave_runtime.odyn.cli", "--config-dir", str(config)),
        *("--no-bootstrap", "--linger", "0", "--", "sleep", "3600"),
    ]
    return subprocess.Popen(
        command,
        env={**env, "NITRO_EMU_CID": str(ENCLAVE_CID)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_relaying(opener: Callable[[], object], odyn: subprocess.Popen[bytes]) -> None:
    """Until a connection through both proxies reaches the app (odyn's ingress is up)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            connection_rate(opener, 1)  # type: ignore[arg-type]
            return
        except OSError:
            if odyn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("odyn's ingress did not start relaying") from None
            time.sleep(0.05)


@dataclass
class Memory:
    idle: float
    peak: float
    warm: float
    after: float


def measure_odyn(scale: Scale) -> Memory:
    services: list[Service] = []
    with tempfile.TemporaryDirectory(prefix="fp", dir="/tmp") as workdir:
        env = {**os.environ, "NITRO_EMU_ROOT": workdir}
        odyn = None
        try:
            app = start_role("app", str(free_port()), script=str(REPO / "bench" / "ingress.py"))
            services.append(app)
            odyn = start_odyn(Path(workdir), app.port, env)
            host = start_role(
                "host-ingress",
                str(app.port),
                env={"NITRO_EMU_ROOT": workdir},
                script=str(REPO / "bench" / "ingress.py"),
            )
            services.append(host)

            def opener():  # type: ignore[no-untyped-def]
                return connect_to(host.port)

            wait_relaying(opener, odyn)
            time.sleep(0.5)
            idle = rss_mib(odyn.pid)
            peak = [idle]
            with peak_rss(odyn.pid, peak):
                bulk_round(opener, os.urandom(CHUNK), scale.bulk_bytes)
                connection_rate(opener, scale.warm_up)
            warm = rss_mib(odyn.pid)
            with peak_rss(odyn.pid, peak):
                connection_rate(opener, scale.connections - scale.warm_up)
            return Memory(idle, peak[0], warm, rss_mib(odyn.pid))
        finally:
            if odyn is not None:
                odyn.terminate()
                odyn.wait(30)
            stop(services)


# --- bytes in the EIF -------------------------------------------------------------------------


def docker_build(context: Path, tag: str, *args: str) -> None:
    result = subprocess.run(
        ["docker", "build", "-q", "--label", LABEL, "-t", tag, *args, str(context)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"docker build of {tag} failed:\n{result.stderr}")


def eif_of(client, runtime: str, app: str, manifest: bytes, work: Path) -> ComponentSizes:  # type: ignore[no-untyped-def]
    """The EIF of ``app`` amended with ``runtime``, as ``enclaveops build`` makes it."""
    sources = {"app": (app, get_image(client, app)), "odyn": (runtime, get_image(client, runtime))}
    amended = amend(client, sources, manifest, amended_reference(app), work, target=app)
    eif = work / "footprint.eif"
    subprocess.run(
        [NITRO_EMU, "build-enclave", "--docker-uri", amended.reference, "--output-file", str(eif)],
        env={**os.environ, "NITRO_EMU_ROOT": str(work / "emu")},
        check=True,
        capture_output=True,
    )
    sizes = component_sizes(eif)
    eif.unlink()
    return sizes


def measure_eifs(work: Path) -> dict[str, ComponentSizes]:
    runtime = ensure_project_images(base_image=BASE_IMAGE).runtime
    docker_build(REPO / "examples" / "hello", HELLO_APP, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}")
    context = work / "busybox"
    context.mkdir()
    shutil.copy2(BUSYBOX, context / "busybox")
    (context / "Dockerfile").write_text(BUSYBOX_DOCKERFILE)
    docker_build(context, BUSYBOX_APP)
    client = docker_client()
    hello_manifest = (REPO / "examples" / "hello" / "enclaver.yaml").read_bytes()
    return {
        "examples/hello": eif_of(client, runtime, HELLO_APP, hello_manifest, work),
        "busybox app": eif_of(client, runtime, BUSYBOX_APP, BUSYBOX_MANIFEST.encode(), work),
    }


# --- report -----------------------------------------------------------------------------------


def report(memory: Memory, eifs: dict[str, ComponentSizes], scale: Scale) -> None:
    growth = (memory.after - memory.warm) / memory.warm
    print(f"odyn RSS idle:           {memory.idle:6.1f} MiB  (goal < {RSS_GOAL_MIB})")
    print(f"odyn RSS peak under load:{memory.peak:6.1f} MiB  (bench/ingress.py's traffic)")
    print(
        f"odyn RSS after {scale.connections} connections: {memory.after:.1f} MiB, after the "
        f"{scale.warm_up} of the warm-up {memory.warm:.1f} MiB: {growth:+.1%} "
        f"(goal within {FLAT_GOAL:.0%})"
    )
    runtime = next(iter(eifs.values())).runtime
    print(
        f"runtime in the EIF:      {runtime / MB:6.1f} MB  (goal < {RUNTIME_GOAL_MB}; "
        f"4 x its MiB = {minimum_memory_mib(runtime)} MiB of enclave memory)"
    )
    for name, sizes in eifs.items():
        parts = ", ".join(
            f"{part} {getattr(sizes, part) / MB:.2f}"
            for part in ("kernel", "bootstrap", "runtime", "app", "other")
        )
        share = sizes.app / sizes.runtime
        print(f"{name} EIF: {sizes.total / MB:.1f} MB ({parts} MB); app/runtime {share:.2f}")
    for name, sizes in eifs.items():
        print(f"minimum enclave memory ({name}): {minimum_memory_mib(sizes.total)} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 connections, little traffic")
    scale = QUICK if parser.parse_args().quick else FULL
    if os.geteuid() != 0 or not BUSYBOX.is_file():
        print("bench/footprint.py needs root, Docker and /bin/busybox", file=sys.stderr)
        return 1
    memory = measure_odyn(scale)
    made = [HELLO_APP, BUSYBOX_APP, amended_reference(HELLO_APP), amended_reference(BUSYBOX_APP)]
    try:
        with tempfile.TemporaryDirectory(prefix="footprint-", dir="/var/tmp") as work:
            eifs = measure_eifs(Path(work))
    finally:
        subprocess.run(["docker", "rmi", "-f", *made], capture_output=True, check=False)
    report(memory, eifs, scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
