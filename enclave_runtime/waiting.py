"""One wait: poll a check until it gives a result or the time is up (an injectable clock).

Every wait of the runtime (an enclave reaching RUNNING, a sleeve's enclave starting, an
attestation document becoming available) goes through :func:`poll`, so the deadline, the delay
between attempts and the error at the end behave the same everywhere, and tests pass a fake
clock instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll(
    check: Callable[[], T | None],
    timeout: float,
    delay: float,
    timed_out: Callable[[], Exception],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``check()`` until it returns something other than None, at least once.

    ``check`` raises to stop the wait early (a failure that waiting cannot fix); once ``timeout``
    seconds have passed after a None, ``timed_out()`` is raised.
    """
    deadline = clock() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if clock() >= deadline:
            raise timed_out()
        sleep(delay)
