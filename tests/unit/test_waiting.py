"""enclave_runtime.waiting.poll: one wait with an injectable clock."""

from __future__ import annotations

import pytest

from enclave_runtime.waiting import poll


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_first_result_ends_the_wait() -> None:
    clock = FakeClock()
    answers = iter([None, None, "ready"])
    result = poll(lambda: next(answers), 10, 2, RuntimeError, clock=clock.time, sleep=clock.sleep)
    assert result == "ready"
    assert clock.sleeps == [2, 2]


def test_the_time_up_raises_the_error_after_a_last_check() -> None:
    clock = FakeClock()
    checks: list[float] = []

    def check() -> None:
        checks.append(clock.now)

    with pytest.raises(TimeoutError, match="late"):
        poll(check, 5, 2, lambda: TimeoutError("late"), clock=clock.time, sleep=clock.sleep)
    assert checks == [0, 2, 4, 6]


def test_an_error_of_the_check_stops_at_once() -> None:
    clock = FakeClock()

    def check() -> None:
        raise ValueError("gone")

    with pytest.raises(ValueError, match="gone"):
        poll(check, 5, 1, RuntimeError, clock=clock.time, sleep=clock.sleep)
    assert clock.sleeps == []


def test_a_zero_timeout_still_checks_once() -> None:
    clock = FakeClock()
    assert poll(lambda: 1, 0, 1, RuntimeError, clock=clock.time, sleep=clock.sleep) == 1
