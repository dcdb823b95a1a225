"""The red-packet split, in integer fen: random (拼手气, the double-mean method 二倍均值,
the default) or fixed (普通红包: every envelope ``total_fen / count``).


Each envelope, in turn, draws uniformly from ``[min, 2 * remaining / left - min]``
(so its expected value is the current mean), clamped to what keeps the rest
feasible under ``min_fen``/``max_fen``; the last takes exactly what remains.
The sequence is then shuffled, so no position is favoured by the clamping.
Randomness comes from ``os.urandom`` in bulk: 64-bit draws reduced modulo a
span below 2**40 carry a bias under 2**-24, far below anything observable.
"""

from __future__ import annotations

import enum
import os
from array import array

# Bounds on what one campaign may ask for (validated at the API as well).
MAX_COUNT = 10_000_000
MAX_TOTAL_FEN = 100_000_000_000  # 10 亿元


class Split(enum.StrEnum):
    """How a red packet's budget is split into envelopes."""

    RANDOM = "random"
    FIXED = "fixed"


def _secure_u64(n: int) -> array[int]:
    """``n`` uniform 64-bit integers from the OS CSPRNG."""
    return array("Q", os.urandom(8 * n))


def split_envelopes(
    total_fen: int, count: int, min_fen: int = 1, max_fen: int | None = None
) -> list[int]:
    """Split ``total_fen`` into ``count`` amounts within ``[min_fen, max_fen]``."""
    if count < 1 or min_fen < 1:
        raise ValueError("count and min_fen must be positive")
    if total_fen < count * min_fen:
        raise ValueError("total_fen is below count * min_fen")
    cap = total_fen if max_fen is None else max_fen
    if cap < min_fen or total_fen > count * cap:
        raise ValueError("total_fen is above count * max_fen")

    draws = _secure_u64(count)
    amounts = [0] * count
    remaining = total_fen
    for i in range(count - 1):
        left = count - i
        # Feasibility: what the others can still absorb at their min and max.
        lo = remaining - (left - 1) * cap
        if lo < min_fen:
            lo = min_fen
        hi = remaining - (left - 1) * min_fen
        if hi > cap:
            hi = cap
        upper = 2 * remaining // left - min_fen
        if upper > hi:
            upper = hi
        amount = lo + draws[i] % (upper - lo + 1) if upper > lo else lo
        amounts[i] = amount
        remaining -= amount
    amounts[-1] = remaining

    # Fisher-Yates with the same secure source.
    swaps = _secure_u64(count)
    for i in range(count - 1, 0, -1):
        j = swaps[i] % (i + 1)
        amounts[i], amounts[j] = amounts[j], amounts[i]
    return amounts


def fixed_envelopes(
    total_fen: int, count: int, min_fen: int = 1, max_fen: int | None = None
) -> list[int]:
    """``count`` equal envelopes of ``total_fen / count``, within ``[min_fen, max_fen]``."""
    if count < 1 or min_fen < 1:
        raise ValueError("count and min_fen must be positive")
    amount, rest = divmod(total_fen, count)
    if rest:
        raise ValueError("total_fen is not a multiple of count")
    if amount < min_fen or (max_fen is not None and amount > max_fen):
        raise ValueError("total_fen / count is outside [min_fen, max_fen]")
    return [amount] * count


def envelopes(
    split: Split, total_fen: int, count: int, min_fen: int = 1, max_fen: int | None = None
) -> list[int]:
    """The envelopes of a red packet, split as ``split`` says."""
    if split is Split.FIXED:
        return fixed_envelopes(total_fen, count, min_fen, max_fen)
    return split_envelopes(total_fen, count, min_fen, max_fen)
