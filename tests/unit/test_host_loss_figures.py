"""bench.hosts' recovery figure: from the loss until throughput is back for good."""

from __future__ import annotations

from bench.hosts import _recovery


def _samples(rates: list[tuple[float, float, float]]) -> list[tuple[float, int]]:
    """Samples every 0.5 s: (from, to, readings/s) spans."""
    samples, count, at = [], 0.0, 0.0
    for start, end, rate in rates:
        at = start
        while at < end:
            samples.append((at, int(count)))
            count += rate * 0.5
            at += 0.5
    return samples


def test_recovery_is_when_throughput_stays_back_not_its_first_good_window() -> None:
    """100/s before the loss at 10 s; C stores on for 2 s, then the lost host's stalled work
    holds the rate at 20/s until its timeouts at 25 s: recovered at 25 s, not at once."""
    samples = _samples([(0, 10, 100), (10, 12.5, 100), (12.5, 25, 20), (25, 60, 100)])
    recovery = _recovery(samples, lost_at=10.0, before=100.0, until=60.0)
    assert recovery is not None and 14.0 <= recovery <= 15.0


def test_no_loss_of_throughput_is_no_recovery_time() -> None:
    samples = _samples([(0, 60, 100)])
    assert _recovery(samples, lost_at=10.0, before=100.0, until=60.0) == 0.0


def test_throughput_never_back_is_none() -> None:
    samples = _samples([(0, 10, 100), (10, 60, 20)])
    assert _recovery(samples, lost_at=10.0, before=100.0, until=60.0) is None
