"""The rolling state of a series (analytics.series) after a window, whether a rule watches the
series or not: the analytics service rolls unwatched series on plain tuples, watched ones with
the rules' objects, and both must store the same state."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx

from activities import analytics
from fleetflow import rules
from fleetflow.contracts.telemetry import WindowRef
from fleetflow.db import Pool
from tests.integration.flows import AUTH, active_device

TENANT = "acme"  # the tenant of AUTH


async def _window(pool: Pool, devices: list[str], metric: str, n: int, mean: float, last: datetime) -> str:
    window_id = f"test-{uuid.uuid4().hex[:8]}/s/0"
    for device_id in devices:
        await pool.execute(
            "INSERT INTO data.window_stats VALUES ($1, $2, $3, $4, $5, $6, 2.5, $6, $6, $7, $6, $7, $6)",
            window_id,
            TENANT,
            device_id,
            metric,
            n,
            mean,
            last,
        )
    return window_id


async def test_a_series_no_rule_watches_rolls_its_state_as_a_watched_one_does(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    metric = f"m{uuid.uuid4().hex[:6]}"
    rule = {
        "rule_id": f"watch-{metric}",
        "device_type": "sensor",
        "metric": metric,
        "kind": "threshold",
        "params": {"above": 1e9},
    }
    assert (await api.put(f"/v1/rules/watch-{metric}", json=rule, headers=AUTH)).status_code == 200
    watched, _ = await active_device(api, device_type="sensor")
    unwatched, _ = await active_device(api)  # a thermostat
    service = analytics.AnalyticsService(pool)
    now = datetime.now(UTC).replace(microsecond=0)
    # a new series, one rolled on, then a window older than the state (last_ts/value are kept)
    steps = [(3, 20.25, now - timedelta(seconds=10)), (7, 21.5, now), (2, 19.0, now - timedelta(seconds=5))]
    want: tuple[int, float, float, datetime, float] | None = None
    for n, mean, last in steps:
        window_id = await _window(pool, [watched, unwatched], metric, n, mean, last)
        evaluated = await service.evaluate(WindowRef(window_id=window_id, counts_only=True))
        assert (evaluated.raised, evaluated.failed) == (0, 0)
        if want is None:
            want = (n, mean, 2.5, last, mean)
        else:  # the EWMA of fleetflow.rules, written out
            p_n, p_mean, p_var, p_last, p_value = want
            a = 1 - (1 - rules.EWMA_ALPHA) ** n
            var = (1 - a) * (p_var + a * (mean - p_mean) ** 2) + a * 2.5
            newer = last >= p_last
            want = (
                p_n + n,
                (1 - a) * p_mean + a * mean,
                var,
                last if newer else p_last,
                mean if newer else p_value,
            )
        rows = await pool.fetch(
            """SELECT device_id, n, mean, var, last_ts, last_value FROM analytics.series
               WHERE tenant = $1 AND metric = $2""",
            TENANT,
            metric,
        )
        states = {
            r["device_id"]: tuple(r[k] for k in ("n", "mean", "var", "last_ts", "last_value")) for r in rows
        }
        assert states == {watched: want, unwatched: want}
