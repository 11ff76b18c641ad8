"""Alert rules on window aggregates: raise, clear and the hysteresis between them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fleetflow import rules
from fleetflow.contracts.telemetry import Rule

T = datetime(2026, 1, 1, tzinfo=UTC)


def window(values: list[float], start_s: float = 0, step_s: float = 1) -> rules.WindowStats:
    n = len(values)
    mean = sum(values) / n
    return rules.WindowStats(
        n=n,
        mean=mean,
        var=sum((v - mean) ** 2 for v in values) / n,
        min_value=min(values),
        max_value=max(values),
        first_ts=T + timedelta(seconds=start_s),
        first_value=values[0],
        last_ts=T + timedelta(seconds=start_s + step_s * (n - 1)),
        last_value=values[-1],
    )


def rule(kind: str, **params: float) -> Rule:
    return Rule(rule_id="r", device_type="sensor", metric="m", kind=kind, params=params)


def test_threshold_hysteresis() -> None:
    hot = rule("threshold", above=30, clear_above=28)
    assert rules.evaluate(hot, window([20, 31, 25]), None).decision == "raise"
    assert rules.evaluate(hot, window([29, 29.5]), None).decision == "hold"
    assert rules.evaluate(hot, window([29, 27]), None).decision == "clear"
    cold = rule("threshold", below=0, clear_below=2)
    assert rules.evaluate(cold, window([5, -1, 5]), None).decision == "raise"
    assert rules.evaluate(cold, window([1]), None).decision == "hold"


def test_rate_of_change_across_and_within_windows() -> None:
    fast = rule("rate", max_per_s=2, clear_per_s=0.5)
    prior = rules.SeriesState(n=10, mean=20, var=1, last_ts=T - timedelta(seconds=1), last_value=20)
    assert rules.evaluate(fast, window([25]), prior).decision == "raise"  # 5/s since the last window
    assert rules.evaluate(fast, window([20, 20.1, 20.2]), prior).decision == "clear"
    assert rules.evaluate(fast, window([20, 21, 22]), prior).decision == "hold"  # 1/s


def test_zscore_needs_history_then_flags_outliers() -> None:
    z = rule("zscore", z=4, clear_z=2, min_samples=30)
    assert rules.evaluate(z, window([100]), None).decision == "hold"
    calm = rules.SeriesState(n=100, mean=20, var=1, last_ts=T, last_value=20)
    assert rules.evaluate(z, window([20, 26, 20]), calm).decision == "raise"
    assert rules.evaluate(z, window([21, 20.5]), calm).decision == "clear"
    assert rules.evaluate(z, window([23]), calm).decision == "hold"


def test_series_state_follows_the_data() -> None:
    state = rules.update(None, window([10, 12]))
    assert state.mean == 11 and state.n == 2
    for i in range(50):
        state = rules.update(state, window([50.0] * 10, start_s=10 + 10 * i))
    assert abs(state.mean - 50) < 0.5 and state.last_value == 50
    older = rules.update(state, window([0.0], start_s=-100))
    assert older.last_value == 50  # a late window does not move the last value back
