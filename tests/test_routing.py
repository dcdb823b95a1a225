"""Sharded red packets' placement and routing: where sub-pools live, which a grab visits."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from app.redpacket.routing import order
from app.store.scripts import SPREAD_WINDOW, CampaignKeys, pool_owner, spread_pools

CID = "0123456789abcdef"


@pytest.mark.parametrize("shards", [2, 3, 5, 16, 256])
def test_sub_pools_sit_at_the_centres_of_equal_slot_ranges_and_name_their_owner(
    shards: int,
) -> None:
    pools = spread_pools(CID, shards)
    assert len(set(pools)) == shards
    for k, pool in enumerate(pools):
        keys = CampaignKeys.of(pool)
        slots = {
            key_slot(key.encode()) for key in (keys.meta, keys.pool, keys.winners, keys.ledger)
        }
        assert len(slots) == 1, "a sub-pool's keys share one slot"
        (slot,) = slots
        centre = (2 * k + 1) * REDIS_CLUSTER_HASH_SLOTS // (2 * shards)
        assert abs(slot - centre) <= SPREAD_WINDOW
        assert pool_owner(pool) == (CID, k)
        assert not set("{}") & set(pool), "no brace: the tag is the whole id"
    assert pool_owner(CID) == (CID, 0)


# redis-cli --cluster create's split of the slots over 3 masters.
THREE_MASTERS = [(0, 5460), (5461, 10922), (10923, 16383)]


@pytest.mark.parametrize("shards", [3, 4, 5, 7, 8])
def test_sub_pools_spread_over_three_masters_as_evenly_as_k_allows(shards: int) -> None:
    """K / 3 to a master, within one, for every campaign id: a slot range straddling a
    master's edge must not put its sub-pool on either side."""
    for cid in (f"{i:016x}" for i in range(40)):
        per_master = [0, 0, 0]
        for pool in spread_pools(cid, shards):
            slot = key_slot(CampaignKeys.of(pool).meta.encode())
            per_master[next(m for m, (lo, hi) in enumerate(THREE_MASTERS) if lo <= slot <= hi)] += 1
        assert max(per_master) - min(per_master) <= 1, (cid, per_master)


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 6, 7, 12])
def test_every_player_visits_every_sub_pool_once_home_first(shards: int) -> None:
    pools = tuple(f"p{k}" for k in range(shards))
    homes: collections.Counter[str] = collections.Counter()
    orders = set()
    for i in range(6_000):
        visits = list(order(pools, f"player-{i}"))
        assert sorted(visits) == sorted(pools)
        homes[visits[0]] += 1
        orders.add(tuple(visits))
    # Homes spread evenly (a binomial: within 15 % of the mean at these counts).
    mean = 6_000 / shards
    assert all(abs(n - mean) < 0.15 * mean for n in homes.values()), homes
    if shards > 3:
        # Orders differ per player: those whose home ran dry do not all go to one neighbour.
        seconds = collections.Counter(o[1] for o in orders if o[0] == "p0")
        assert len(seconds) > 1


def test_the_order_is_the_same_in_every_process() -> None:
    """Not Python's hash (randomised per process): two workers route a player alike."""
    pools = tuple(f"p{k}" for k in range(7))
    code = (
        "from app.redpacket.routing import order;"
        f"print([list(order({pools!r}, f'u{{i}}')) for i in range(50)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert outputs == {str([list(order(pools, f"u{i}")) for i in range(50)]) + "\n"}
