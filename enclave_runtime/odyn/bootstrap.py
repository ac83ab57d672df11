"""Enclave bootstrap: what an enclave lacks at boot and every application expects.

An enclave starts with its loopback interface down (so nothing could listen on 127.0.0.1) and
with a kernel entropy pool that has seen little. As enclaver's odyn does, bootstrap brings ``lo``
up and mixes random bytes from the NSM, the enclave's hardware RNG, into ``/dev/random``.
"""

from __future__ import annotations

import logging
import os

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.linux import bring_interface_up
from enclave_runtime.transport.nsm import DEFAULT_NSM_PATH, NsmClient, NsmError

LOG = logging.getLogger("odyn")

DEV_RANDOM = "/dev/random"
LOOPBACK = "lo"


class BootstrapError(EnclaveOpsError):
    """The enclave could not be prepared; the application is not started."""


def bootstrap(
    nsm_path: str = DEFAULT_NSM_PATH, random_path: str = DEV_RANDOM, interface: str = LOOPBACK
) -> None:
    """Bring the loopback interface up, then seed the kernel RNG from the NSM."""
    bring_loopback_up(interface)
    seeded = seed_kernel_rng(nsm_path, random_path)
    LOG.info(
        "enclave bootstrapped: %s up, %d bytes from the NSM mixed into %s",
        interface,
        seeded,
        random_path,
    )


def bring_loopback_up(interface: str = LOOPBACK) -> None:
    try:
        bring_interface_up(interface)
    except OSError as err:
        raise BootstrapError(
            f"cannot bring the {interface} interface up: {err.strerror or err}; odyn needs "
            "CAP_NET_ADMIN (run it as root, as the enclave's init does), or pass --no-bootstrap "
            "where the network is already set up"
        ) from err


def seed_kernel_rng(nsm_path: str = DEFAULT_NSM_PATH, random_path: str = DEV_RANDOM) -> int:
    """Write one NSM GetRandom answer into ``random_path``; returns how many bytes."""
    try:
        with NsmClient(nsm_path) as nsm:
            seed = nsm.get_random()
    except NsmError as err:
        raise BootstrapError(f"cannot seed the kernel RNG: {err}") from err
    if not seed:
        raise BootstrapError(f"cannot seed the kernel RNG: the NSM at {nsm_path} gave no bytes")
    try:
        fd = os.open(random_path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, seed)
        finally:
            os.close(fd)
    except OSError as err:
        raise BootstrapError(
            f"cannot seed the kernel RNG: writing to {random_path} failed: {err.strerror or err}"
        ) from err
    return len(seed)
