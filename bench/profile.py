"""Sampling profiles of the platform's processes while a benchmark drives them (py-spy, from
the dev extra): `start` attaches one `py-spy record` per process for a fixed time, `summary`
reads its collapsed stacks back as the shares of CPU samples per function.

py-spy samples the Python stacks of threads that are running (idle ones are left out), so a
share is of the process's busy Python time; time in a C extension counts for the Python
function that called it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil


def start(
    procs: dict[str, psutil.Process], names: tuple[str, ...], seconds: float, out: Path
) -> list[subprocess.Popen[bytes]]:
    """One `py-spy record` (collapsed stacks, 100 Hz, not pausing the target) per process whose
    role starts with one of `names`, for `seconds`; their files are `out/<role>.txt`."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    argv = [spy, "record", "--rate", "100", "--nonblocking", "--format", "raw"]
    return [
        subprocess.Popen(
            [
                *argv,
                "--pid",
                str(proc.pid),
                "--duration",
                str(int(seconds)),
                "--output",
                str(out / f"{role}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for role, proc in procs.items()
        if role.startswith(names)
    ]


def _frame(frame: str) -> str:
    """`function (path/to/module.py:123)` → `module.py:function` (lines merged)."""
    name, _, where = frame.partition(" (")
    return f"{Path(where.split(':')[0]).name}:{name}" if where else name


def summary(path: Path, top: int = 15) -> dict[str, object]:
    """Samples, and the top functions by inclusive and by self share (%) of one profile."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # the first frame is the thread's name when py-spy writes one; it is not a function
        frames = [_frame(f) for f in stack.split(";") if " (" in f]
        if not frames:
            continue
        total += n
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(top)}

    return {"samples": total, "inclusive_pct": shares(inclusive), "self_pct": shares(own)}
