"""Ingest throughput with 1, then 2 API processes (`fleetflow up --api-processes N`), in one run:
each a fresh platform driven by bench/ingest.py's senders as fast as they are acknowledged.

    python -m bench.api_processes [--seconds S] [--senders N] [--batch N] [--workers N]

The last line is one JSON object: readings_per_s_1_process / _2_processes (acknowledged by the
API over the sending time), stored_readings_per_s_* (stored, drain included), their ratios, and
the 1-minute load average before each run (the machine is shared: read the ratio with it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from bench.ingest import run
from bench.stack import say


def measure(seconds: float, senders: int, batch: int, workers: int) -> dict[str, Any]:
    """Both runs, one after the other, and their figures side by side."""
    figures: dict[str, Any] = {"cpu_count": os.cpu_count()}
    for processes, suffix in ((1, "1_process"), (2, "2_processes")):
        figures[f"load_avg_1m_before_{suffix}"] = round(os.getloadavg()[0], 2)
        say(f"--- {processes} API process(es) ---")
        result = asyncio.run(run(seconds, senders, batch, workers, 0, 0.0, api_processes=processes))
        figures[f"readings_per_s_{suffix}"] = result["acked_readings_per_s"]
        figures[f"stored_readings_per_s_{suffix}"] = result["readings_per_s"]
        figures[f"ack_p50_ms_{suffix}"] = result["ack_p50_ms"]
        figures[f"refused_batches_{suffix}"] = result["refused_batches"]
        figures[f"acked_readings_{suffix}"] = result["acked_readings"]
        figures[f"stored_readings_{suffix}"] = result["stored_readings"]
    one, two = figures["readings_per_s_1_process"], figures["readings_per_s_2_processes"]
    figures["ratio_2_vs_1"] = round(two / max(1, one), 3)
    figures["stored_ratio_2_vs_1"] = round(
        figures["stored_readings_per_s_2_processes"] / max(1, figures["stored_readings_per_s_1_process"]), 3
    )
    figures["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes per queue")
    args = parser.parse_args()
    figures = measure(args.seconds, args.senders, args.batch, args.workers)
    for name, value in figures.items():
        say(f"  {name:<36} {value}")
    print(json.dumps(figures), flush=True)
    sys.stderr.flush()
    os._exit(0)
