"""Range headers of firmware downloads (RFC 9110 §14)."""

from __future__ import annotations

import pytest

from api.byte_ranges import Unsatisfiable, byte_range, if_range_holds, none_match


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 10)),
        ("Bytes=0-9", (0, 10)),  # a range unit is case-insensitive (RFC 9110 §14.1)
        ("bytes=5-", (5, 100)),
        ("bytes=-10", (90, 100)),
        ("bytes=-1000", (0, 100)),
        ("bytes=90-1000", (90, 100)),  # past the end: clipped
        ("bytes=9-5", None),  # invalid: ignored, the whole image
        ("bytes=0-1,5-9", None),  # several ranges: the whole image
        ("items=0-9", None),
        ("bytes=-", None),
        ("bytes=" + "9" * 5000 + "-", None),  # absurd: ignored, never a 500
    ],
)
def test_a_range_header_asks_these_bytes(header: str | None, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=999999999999999999-"])
def test_a_range_past_the_end_is_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        byte_range(header, 100)


def test_if_range_compares_strongly() -> None:
    assert if_range_holds(None, '"abc"')
    assert if_range_holds('"abc"', '"abc"')
    assert not if_range_holds('W/"abc"', '"abc"')
    assert not if_range_holds("Sat, 01 Jan 2000 00:00:00 GMT", '"abc"')  # a date: the whole image


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        (None, False),
        ('"abc"', True),
        ('"other", "abc"', True),
        ('W/"abc"', True),  # If-None-Match compares weakly
        ("*", True),  # any current image
        ('"other"', False),
        ('"abcd"', False),
    ],
)
def test_if_none_match_compares_weakly_and_star_matches(header: str | None, matches: bool) -> None:
    assert none_match(header, '"abc"') is matches
