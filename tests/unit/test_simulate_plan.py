"""How `fleetflow simulate` plans its batches, and what it says when the rate cannot be reached."""

from __future__ import annotations

from cli.simulate_plan import REQUESTS_PER_S, plan, slots
from fleetflow.contracts.limits import MAX_BATCH_READINGS
from fleetflow.contracts.tenants import TenantLimits


def test_twenty_thousand_readings_from_500_devices_fit_the_limits() -> None:
    p = plan(500, 20_000, TenantLimits())
    assert p.reachable == 20_000 and p.reasons == ()
    assert p.batch <= MAX_BATCH_READINGS and p.batch * p.requests_per_s == 20_000
    assert p.requests_per_s <= REQUESTS_PER_S
    # the default tenant's own limits: requests and readings a device and in all
    limits = TenantLimits()
    assert p.requests_per_s <= limits.requests_per_s / 2
    assert p.batch / p.period_s <= limits.device_readings_per_s
    assert 1 / p.period_s <= limits.device_requests_per_s
    assert "can reach" not in p.describe()


def test_a_higher_rate_means_larger_batches_not_more_requests() -> None:
    low, high = plan(500, 3_000), plan(500, 20_000)
    assert low.requests_per_s == high.requests_per_s
    assert high.batch > low.batch


def test_the_requests_are_spread_over_the_period() -> None:
    p = plan(500, 3_000)
    assert slots(p) > 1 and p.period_s / slots(p) <= 0.5


def test_a_rate_past_the_tenants_readings_quota_is_named_at_start() -> None:
    p = plan(500, 20_000, TenantLimits(readings_per_s=5_000))
    assert p.reachable == 5_000
    text = p.describe()
    assert "can reach at most 5,000 of 20,000 readings/s" in text and "readings_per_s quota is 5,000" in text


def test_a_rate_past_what_the_devices_may_send_is_named_at_start() -> None:
    p = plan(2, 20_000, TenantLimits(device_readings_per_s=1_000))
    assert p.reachable == 2_000 and "device_readings_per_s is 1,000" in p.describe()


def test_a_small_request_quota_makes_batches_larger() -> None:
    p = plan(500, 3_000, TenantLimits(requests_per_s=20))
    assert p.requests_per_s <= 10 and p.reachable == 3_000


def test_a_rate_past_the_largest_batches_says_so() -> None:
    p = plan(10, 100_000, TenantLimits(requests_per_s=2))
    assert p.reachable == MAX_BATCH_READINGS * 1 and "at most 10,000 readings" in p.describe()
