"""``enclaveops run``: run a release image as a container in the foreground, like ``docker run``.

The container's stdout (the application's log) and stderr (the sleeve's messages) are relayed as
they come; once the sleeve says its enclave has booted, the enclave's ID and CID are printed on
stderr. SIGINT (Ctrl-C) or SIGTERM stops the container (the sleeve then terminates the enclave),
and the container is removed however the run ends. The exit status is the container's: the
application's code, or the sleeve's own (109 after a stop, see docs/sleeve.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, BinaryIO, TextIO

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.manifest import load_manifest
from enclave_runtime.host.docker_engine import docker_client, docker_module
from enclave_runtime.host.sleeve_container import (
    PortBinding,
    SleeveConfig,
    container_spec,
    create_container,
    default_emulator_allocator,
    default_emulator_root,
    parse_port_binding,
    parse_started_line,
    published_ports,
    remove_container,
    resolve_release_image,
    start_container,
    stop_container,
)

if TYPE_CHECKING:
    from docker.models.containers import Container

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After the container ends, how long its last output may take to arrive.
_RELAY_DRAIN = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subparsers.add_parser(
        "run",
        help="run a release image (its enclave) as a container in the foreground",
        description=(
            "Start a release image as a container: on a Nitro parent with /dev/nitro_enclaves, "
            "or with --emulator on nitro-emu's directory (NITRO_EMU_ROOT). Relays its output, "
            "prints the enclave's ID and CID once it runs, stops and removes it on Ctrl-C, and "
            "exits with its exit status."
        ),
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("-f", "--file", metavar="MANIFEST", help="run the manifest's target image")
    source.add_argument(
        "image",
        nargs="?",
        metavar="IMAGE",
        help="the release image to run: a tag, an image ID, or TAG@sha256:ID as build prints it",
    )
    run.add_argument(
        "-p",
        "--publish",
        type=_port_binding,
        action="append",
        default=[],
        metavar="[IP:]HOST:CONTAINER",
        help="publish the enclave's ingress port CONTAINER on host port HOST (repeatable)",
    )
    run.add_argument("--debug-mode", action="store_true", help="debug mode (PCRs read as zero)")
    run.add_argument(
        "--emulator",
        action="store_true",
        help="run on nitro-emu: share NITRO_EMU_ROOT (default /run/nitro-emu) with the container",
    )
    run.add_argument("--name", help="the container's name (default: one Docker chooses)")
    run.add_argument("--cpu-count", type=_positive, help="CPUs (default: the manifest's)")
    run.add_argument("--memory-mb", type=_positive, help="MiB (default: the manifest's)")
    run.set_defaults(run=run_release)


def _port_binding(text: str) -> PortBinding:
    try:
        return parse_port_binding(text)
    except EnclaveOpsError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def release_image(args: argparse.Namespace) -> str:
    """The image to run: IMAGE, or the ``target`` of the manifest ``-f`` names."""
    if args.file is not None:
        return load_manifest(args.file).target
    return str(args.image)


def sleeve_config(args: argparse.Namespace) -> SleeveConfig:
    emulator_root = default_emulator_root(os.environ) if args.emulator else None
    return SleeveConfig(
        published_ports=tuple(args.publish),
        cpu_count=args.cpu_count,
        memory_mb=args.memory_mb,
        debug_mode=args.debug_mode,
        emulator_root=emulator_root,
        emulator_allocator=default_emulator_allocator(os.environ) if args.emulator else None,
    )


def run_release(args: argparse.Namespace) -> int:
    image = release_image(args)
    config = sleeve_config(args)
    client = docker_client()
    # A missing image is named before anything is created; the container runs the image ID.
    release = resolve_release_image(client, image)
    if release.note:
        print(f"enclaveops: {release.note}", file=sys.stderr, flush=True)
    container = create_container(client, container_spec(release.image_id, args.name, config))
    return Foreground(container, sys.stdout.buffer, sys.stderr).run()


class Foreground:
    """One container run to its end, with its output relayed and Ctrl-C turned into a stop."""

    def __init__(self, container: Container, out: BinaryIO, err: TextIO) -> None:
        self.container = container
        self.out = out
        self.err = err
        self.wake = threading.Event()
        self.exit_code: int | None = None
        self.ports: list[PortBinding] = []

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in _STOP_SIGNALS}
        try:
            return self._run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            remove_container(self.container)

    def _run(self) -> int:
        # Attached before the start, so not one line of output is missed.
        stream = self.container.attach(stdout=True, stderr=True, stream=True, demux=True)
        start_container(self.container)
        self.ports = published_ports(self.container)
        self.say(f"started container {self.container.name} ({self.container.short_id})")
        relay = threading.Thread(target=self._relay, args=(stream,), daemon=True)
        relay.start()
        threading.Thread(target=self._wait, daemon=True).start()
        self.wake.wait()
        if self.exit_code is None:
            self.say(f"stopping container {self.container.name}: the sleeve terminates the enclave")
            stop_container(self.container)
            while self.exit_code is None:  # a second Ctrl-C changes nothing: docker stop kills
                self.wake.clear()
                self.wake.wait(1.0)
        relay.join(_RELAY_DRAIN)
        return self.exit_code

    def say(self, message: str) -> None:
        print(f"enclaveops: {message}", file=self.err, flush=True)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.wake.set()

    def _wait(self) -> None:
        docker = docker_module()
        try:
            self.exit_code = int(self.container.wait()["StatusCode"])
        except (docker.errors.DockerException, OSError, KeyError, ValueError) as err:
            self.say(f"lost track of container {self.container.name}: {err}")
            self.exit_code = 1
        self.wake.set()

    def _relay(self, stream: Iterator[tuple[bytes | None, bytes | None]]) -> None:
        pending = b""
        announced = False
        for stdout, stderr in stream:
            if stdout:
                self.out.write(stdout)
                self.out.flush()
            if stderr:
                self.err.write(stderr.decode("utf-8", "replace"))
                self.err.flush()
                pending += stderr
                *lines, pending = pending.split(b"\n")
                announced = announced or self._announce(lines)

    def _announce(self, lines: list[bytes]) -> bool:
        for line in lines:
            started = parse_started_line(line.decode("utf-8", "replace"))
            if started is not None:
                where = ", ".join(
                    f"{binding.host_ip or '0.0.0.0'}:{binding.host_port}->{binding.container_port}"
                    for binding in self.ports
                )
                self.say(
                    f"enclave running: ID={started.enclave_id} CID={started.enclave_cid} "
                    f"container={self.container.name}" + (f" ports={where}" if where else "")
                )
                return True
        return False
