"""What the operator reports (reconcile, rebuild) of every kind print alike."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

MAX_LISTED = 50


@dataclass(frozen=True, slots=True)
class Totals:
    """A count of envelopes (or prizes) and their sum in fen."""

    count: int = 0
    fen: int = 0

    @classmethod
    def of(cls, amounts: Iterable[int]) -> Totals:
        """Totals of some amounts."""
        values = list(amounts)
        return cls(len(values), sum(values))

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.count + other.count, self.fen + other.fen)


def conclusion(mismatches: list[str]) -> list[str]:
    """The last lines of a report: the mismatches (the first MAX_LISTED) and the result."""
    lines = []
    if mismatches:
        lines.append(f"mismatches ({len(mismatches)}):")
        lines.extend(f"  {m}" for m in mismatches[:MAX_LISTED])
        if len(mismatches) > MAX_LISTED:
            lines.append(f"  ... and {len(mismatches) - MAX_LISTED} more")
    lines.append("result: MISMATCH" if mismatches else "result: OK")
    return lines


def fit(text: str, width: int) -> str:
    """``text`` cut and padded to ``width`` terminal columns (CJK characters take two)."""

    def cols(part: str) -> int:
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in part)

    while cols(text) > width:
        text = text[:-2] + "…"
    return text + " " * (width - cols(text))


def listed(values: Iterable[int]) -> str:
    """The first ten of some numbers, in order, for a mismatch line."""
    shown = sorted(values)
    return ", ".join(map(str, shown[:10])) + (" ..." if len(shown) > 10 else "")
