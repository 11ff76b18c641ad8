"""Runnable processes: a worker per task queue, the `fleetflow` CLI and the dev stack."""
