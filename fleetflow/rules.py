"""Alert rules evaluated on a window's per-series aggregates (pure functions, unit-tested).

A rule says `raise`, `clear` or `hold` for a series; the analytics service turns that
into at most one open alert per device and rule. Raise and clear conditions differ
(hysteresis), so a value flapping around one limit does not raise an alert storm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from fleetflow.contracts.telemetry import Rule

Decision = Literal["raise", "clear", "hold"]
EWMA_ALPHA = 0.05
MIN_STD = 1e-9


@dataclass(frozen=True)
class WindowStats:
    """One series' aggregates over one window."""

    n: int
    mean: float
    var: float
    min_value: float
    max_value: float
    first_ts: datetime
    first_value: float
    last_ts: datetime
    last_value: float


@dataclass(frozen=True)
class SeriesState:
    """What the analytics service remembers of a series between windows."""

    n: int
    mean: float
    var: float
    last_ts: datetime
    last_value: float


@dataclass(frozen=True)
class Verdict:
    """A rule's decision for a series, the value that decided it, and why."""

    decision: Decision
    value: float
    detail: str


def evaluate(rule: Rule, w: WindowStats, prior: SeriesState | None) -> Verdict:
    """Apply rule to a window of a series, given what was known before it."""
    if rule.kind == "threshold":
        return _threshold(rule.params, w)
    if rule.kind == "rate":
        return _rate(rule.params, w, prior)
    return _zscore(rule.params, w, prior)


def _threshold(p: dict[str, float], w: WindowStats) -> Verdict:
    if "above" in p and w.max_value > p["above"]:
        return Verdict("raise", w.max_value, f"{w.max_value:g} above {p['above']:g}")
    if "below" in p and w.min_value < p["below"]:
        return Verdict("raise", w.min_value, f"{w.min_value:g} below {p['below']:g}")
    clear_above = p.get("clear_above", p.get("above", math.inf))
    clear_below = p.get("clear_below", p.get("below", -math.inf))
    if clear_below <= w.last_value <= clear_above:
        return Verdict("clear", w.last_value, f"back to {w.last_value:g}")
    return Verdict("hold", w.last_value, "between the raise and clear limits")


def _rate(p: dict[str, float], w: WindowStats, prior: SeriesState | None) -> Verdict:
    rates = []
    if prior is not None and w.first_ts > prior.last_ts:
        rates.append(abs(w.first_value - prior.last_value) / (w.first_ts - prior.last_ts).total_seconds())
    span = (w.last_ts - w.first_ts).total_seconds()
    if span > 0:
        rates.append(abs(w.last_value - w.first_value) / span)
        rates.append((w.max_value - w.min_value) / span)
    rate = max(rates, default=0.0)
    if rate > p["max_per_s"]:
        return Verdict("raise", rate, f"changing {rate:g}/s, over {p['max_per_s']:g}/s")
    if rate <= p.get("clear_per_s", p["max_per_s"] / 2):
        return Verdict("clear", rate, f"changing {rate:g}/s")
    return Verdict("hold", rate, "rate between the raise and clear limits")


def _zscore(p: dict[str, float], w: WindowStats, prior: SeriesState | None) -> Verdict:
    if prior is None or prior.n < p.get("min_samples", 30):
        return Verdict("hold", w.last_value, "not enough history yet")
    std = max(math.sqrt(prior.var), MIN_STD)
    extreme = w.max_value if abs(w.max_value - prior.mean) >= abs(w.min_value - prior.mean) else w.min_value
    z = abs(extreme - prior.mean) / std
    if z > p["z"]:
        return Verdict("raise", extreme, f"z-score {z:.1f} over {p['z']:g} (mean {prior.mean:g})")
    if abs(w.last_value - prior.mean) / std < p.get("clear_z", p["z"] / 2):
        return Verdict("clear", w.last_value, f"back within {p.get('clear_z', p['z'] / 2):g} sigma")
    return Verdict("hold", w.last_value, "z-score between the raise and clear limits")


def update(prior: SeriesState | None, w: WindowStats, alpha: float = EWMA_ALPHA) -> SeriesState:
    """The series' rolling mean and variance (EWMA over readings) after the window."""
    if prior is None:
        return SeriesState(n=w.n, mean=w.mean, var=w.var, last_ts=w.last_ts, last_value=w.last_value)
    return SeriesState(
        *updated(
            (prior.n, prior.mean, prior.var, prior.last_ts, prior.last_value),
            (w.n, w.mean, w.var, w.last_ts, w.last_value),
            alpha,
        )
    )


StateTuple = tuple[int, float, float, datetime, float]  # (n, mean, var, last_ts, last_value)


def updated(prior: StateTuple, w: StateTuple, alpha: float = EWMA_ALPHA) -> StateTuple:
    """`update` on plain tuples, prior state and window's (n, mean, var, last_ts, last_value):
    what the analytics service runs for each series no rule watches, without an object each."""
    p_n, p_mean, p_var, p_last_ts, p_last_value = prior
    n, w_mean, w_var, last_ts, last_value = w
    a = 1 - (1 - alpha) ** n
    mean = (1 - a) * p_mean + a * w_mean
    var = (1 - a) * (p_var + a * (w_mean - p_mean) ** 2) + a * w_var
    newer = last_ts >= p_last_ts
    return (
        p_n + n,
        mean,
        var,
        last_ts if newer else p_last_ts,
        last_value if newer else p_last_value,
    )
