"""What the operator reports (reconcile, rebuild) of every kind print alike, the one
table layout every CLI command prints (``table``), and the phases a creation reports."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import wcwidth

MAX_LISTED = 50


class Phase(enum.StrEnum):
    """A step of creating a campaign, as create-campaign's progress bars name it."""

    SPLIT = "split"
    POSTGRESQL = "PostgreSQL"
    REDIS = "Redis"


# ``progress(phase, done, total)``: how far a phase of a creation has come, in envelopes
# (a red packet) or tiers (a lottery); each phase reports 0 first, ``total`` last.
Progress = Callable[[Phase, int, int], None]


def quiet(phase: Phase, done: int, total: int) -> None:
    """The progress of a creation nobody watches (the API's)."""


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


def closeout_count(in_ledger: int) -> list[str]:
    """What is wrong with a closed-out campaign's ledger holding ``in_ledger`` close-outs
    (exactly one expected, of either kind)."""
    if in_ledger == 0:
        return ["closed out in Redis; the close-out is not in PostgreSQL nor in flight"]
    if in_ledger > 1:
        return [f"{in_ledger} close-outs in the ledger (one expected)"]
    return []


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


def width(text: str) -> int:
    """The terminal columns ``text`` takes: a CJK character two, a combining mark none."""
    return wcwidth.width(text)


def fit(text: str, columns: int) -> str:
    """``text`` cut (ending in "…") and padded to exactly ``columns`` terminal columns."""
    if width(text) > columns:
        while text and width(text) > columns - 1:
            text = text[:-1]
        text += "…"
    return text + " " * (columns - width(text))


def table(rows: Iterable[Sequence[object]], headers: Sequence[str], indent: str = "") -> str:
    """Rows under headers, every column as wide as its widest cell in terminal columns
    (``width``: 红包 takes four), so CJK names line up; two spaces between columns.

    A column of numbers (int, not bool; None prints as "-") is right-aligned, any
    other column left-aligned. Every line has the same width, and each
    starts with ``indent``. Example::

        print(table([("红包雨", 3, "管理员"), ("ops", None, "viewer")], ("name", "n", "role")))
        name    n  role
        红包雨  3  管理员
        ops     -  viewer
    """
    cells = [list(row) for row in rows]
    if any(len(row) != len(headers) for row in cells):
        raise ValueError(f"every row needs {len(headers)} cells, as many as the headers")
    right = [
        any(type(row[i]) is int for row in cells)
        and all(type(row[i]) is int or row[i] is None for row in cells)
        for i in range(len(headers))
    ]
    text = [list(headers), *(["-" if c is None else str(c) for c in row] for row in cells)]
    widths = [max(width(line[i]) for line in text) for i in range(len(headers))]

    def pad(cell: str, i: int) -> str:
        gap = " " * (widths[i] - width(cell))
        return gap + cell if right[i] else cell + gap

    return "\n".join(
        indent + "  ".join(pad(cell, i) for i, cell in enumerate(line)) for line in text
    )


def listed(values: Iterable[int]) -> str:
    """The first ten of some numbers, in order, for a mismatch line."""
    shown = sorted(values)
    return ", ".join(map(str, shown[:10])) + (" ..." if len(shown) > 10 else "")
