"""The Retry-After of `server.max_streams` refusals follows the load (Little's law)."""

from __future__ import annotations

from gateway.shedding import MAX_RETRY_AFTER_S, RetryAfterEstimate


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_second(
    estimate: RetryAfterEstimate, clock: Clock, admitted: int, refused: int
) -> list[int]:
    """One second of traffic, spread evenly; the Retry-After values handed out."""
    answers = []
    events = admitted + refused
    for index in range(events):
        clock.now += 1.0 / events
        if index < admitted:
            estimate.admitted()
        else:
            answers.append(estimate.refused())
    return answers


def test_starts_at_one_second_and_stays_there_under_light_overload() -> None:
    clock = Clock()
    estimate = RetryAfterEstimate(clock)
    for _ in range(10):
        answers = run_second(estimate, clock, admitted=100, refused=20)
    assert answers[-1] == 1


def test_a_sustained_overload_backs_clients_off_to_the_expected_wait() -> None:
    """1,400 clients waiting for 180 slots a second: each should wait about 8 s."""
    clock = Clock()
    estimate = RetryAfterEstimate(clock)
    waiting, admissions = 1_400, 180
    for _ in range(30):
        # Every waiting client retries once per Retry-After it was last given.
        refusals = round(waiting / estimate.retry_after_s)
        run_second(estimate, clock, admitted=admissions, refused=refusals)
    assert 7 <= estimate.retry_after_s <= 9
    assert round(waiting / estimate.retry_after_s) < 250  # down from 1,400 a second


def test_no_admissions_at_all_waits_the_longest_and_recovers_when_load_ends() -> None:
    clock = Clock()
    estimate = RetryAfterEstimate(clock)
    for _ in range(12):
        run_second(estimate, clock, admitted=0, refused=200)
    assert estimate.retry_after_s == MAX_RETRY_AFTER_S
    for _ in range(12):
        run_second(estimate, clock, admitted=100, refused=1)
    assert estimate.retry_after_s == 1
