"""HTTP range requests (RFC 9110 §14) for downloads served from a store, not a file."""

from __future__ import annotations

import re

# at most 18 digits a side: past any image size, and never an int() of a huge string (a header
# of 5,000 digits would raise in int(), a 500)
_RANGE = re.compile(r"^bytes=([0-9]{0,18})-([0-9]{0,18})$", re.IGNORECASE)  # units: any case


class Unsatisfiable(Exception):
    """A range that starts past the end (416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) a `Range` header asks of `size` bytes; None: send it all.

    Several ranges or a malformed header are ignored (the whole image, 200), as RFC 9110 lets
    a server do; a range past the end raises Unsatisfiable.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        suffix = int(last)
        if suffix == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise Unsatisfiable
    return start, end


def if_range_holds(if_range: str | None, etag: str) -> bool:
    """Whether a `Range` applies: no `If-Range`, or one naming the current (strong) ETag."""
    return if_range is None or if_range.strip() == etag


def none_match(if_none_match: str | None, etag: str) -> bool:
    """Whether `If-None-Match` names the current representation (then 304): `*`, or one of
    its tags by weak comparison (RFC 9110 §13.1.2: `W/"x"` matches `"x"`)."""
    if if_none_match is None:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in (t.removeprefix("W/") for t in tags)
