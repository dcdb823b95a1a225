"""Which sub-pools of a sharded red packet a player's grab visits, in which order.

Every player has a home sub-pool, from a stable hash of the openid (the same on every
worker, in every process: not Python's ``hash``), so players spread evenly and each
player's grabs meet in one place. When the home sub-pool is empty the grab falls
through to the others in an order fixed per player (home, home + s, home + 2s, ... mod
K, for a stride s coprime to K also taken from the hash), so the campaign sells out
completely and players whose home ran dry spread over the rest.

Why a player wins at most once across sub-pools, whatever the concurrency: each visit
is one grab_envelope call, which checks the sub-pool's winners before popping, and a
grab moves on only from a sub-pool that was empty and did not have the player as a
winner. Pools never refill while live. So if one grab of a player won in sub-pool i, any
other grab of the same player visiting i later finds the player there (already won);
one that passed i earlier found i empty then, so no envelope was left there to win
later: two wins would need i both empty and not empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from hashlib import blake2b


def order(pools: tuple[str, ...], openid: str) -> Iterator[str]:
    """The sub-pools ``openid``'s grab visits, home first; each once."""
    shards = len(pools)
    h = int.from_bytes(blake2b(openid.encode(), digest_size=8).digest(), "big")
    home = h % shards
    yield pools[home]
    if shards == 1:
        return
    stride = 1 + (h >> 32) % (shards - 1)
    while math.gcd(stride, shards) != 1:
        stride = stride % (shards - 1) + 1
    for i in range(1, shards):
        yield pools[(home + i * stride) % shards]
