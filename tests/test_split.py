"""The double-mean split: exact sums and counts, bounds, and no favoured position."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.redpacket.split import split_envelopes


@st.composite
def valid_definitions(draw: st.DrawFn) -> tuple[int, int, int, int | None]:
    count = draw(st.integers(min_value=1, max_value=300))
    min_fen = draw(st.integers(min_value=1, max_value=1_000))
    max_fen = draw(st.one_of(st.none(), st.integers(min_value=min_fen, max_value=50_000)))
    high = count * (max_fen if max_fen is not None else 100_000)
    total = draw(st.integers(min_value=count * min_fen, max_value=max(count * min_fen, high)))
    return total, count, min_fen, max_fen


@settings(max_examples=400, deadline=None)
@given(valid_definitions())
def test_split_sum_count_bounds(definition: tuple[int, int, int, int | None]) -> None:
    total, count, min_fen, max_fen = definition
    amounts = split_envelopes(total, count, min_fen, max_fen)
    assert len(amounts) == count
    assert sum(amounts) == total
    assert all(isinstance(a, int) for a in amounts)
    assert min(amounts) >= min_fen
    if max_fen is not None:
        assert max(amounts) <= max_fen


def test_tight_bounds_are_exact() -> None:
    assert split_envelopes(500, 5, 100, 100) == [100] * 5
    assert split_envelopes(7, 7) == [1] * 7
    assert split_envelopes(1, 1) == [1]


@pytest.mark.parametrize(
    ("total", "count", "min_fen", "max_fen"),
    [(9, 10, 1, None), (100, 10, 11, None), (101, 10, 1, 10), (10, 0, 1, None), (10, 2, 0, None)],
)
def test_infeasible_definitions_raise(
    total: int, count: int, min_fen: int, max_fen: int | None
) -> None:
    with pytest.raises(ValueError, match=r"count|min_fen|max_fen"):
        split_envelopes(total, count, min_fen, max_fen)


@pytest.mark.parametrize(("min_fen", "max_fen"), [(1, None), (500, 1_500)])
def test_mean_per_position_is_total_over_count(min_fen: int, max_fen: int | None) -> None:
    total, count, runs = 10_000, 10, 4_000
    sums = [0] * count
    for _ in range(runs):
        for i, amount in enumerate(split_envelopes(total, count, min_fen, max_fen)):
            sums[i] += amount
    mean = total / count
    # Each position's average over 4,000 runs lies within 5% of total/count
    # (the standard error here is about 1%; a positional bias of the unshuffled
    # double-mean method would be far larger for the last positions).
    for position_sum in sums:
        assert abs(position_sum / runs - mean) < 0.05 * mean


def test_large_split_is_exact() -> None:
    amounts = split_envelopes(123_456_789, 1_000_000)
    assert len(amounts) == 1_000_000
    assert sum(amounts) == 123_456_789
    assert min(amounts) >= 1
