"""The rounds of a bench: each path measured right after the floor, ledger settled between."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.campaigns import Campaigns
from bench.measure import Result, catch_up, script_calls, tree_cpu_s, won_count, wrk
from bench.stack import Stack

GRAB = "grab (won)"
SOLD = "sold out"
ENDED = "ended (409)"
EARLY = "not started (409)"
ALWAYS = "grab (won), appendfsync always"
DRAW = "lottery draw"
PATHS = ("grab", "sold-out", "ended", "not-started", "draw", "always")

Pair = tuple[Result, Result]


@dataclass
class Measured:
    """Everything the rounds measured, for the report."""

    pairs: dict[str, list[Pair]] = field(default_factory=dict)
    catch_ups: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    grab_calls: int = 0
    grab_requests: int = 0
    won: int = 0


@dataclass
class Rounds:
    """Runs wrk against the stack, path by path, each paired with a floor run before it."""

    stack: Stack
    sessions: Path
    seconds: int
    connections: int
    measured: Measured = field(default_factory=Measured)

    def run(self, name: str, url: str) -> Result:
        """One wrk run, with the CPU every component used during it."""
        print(f"  {name} ...", file=sys.stderr, flush=True)
        components = self.stack.components
        before = {c: tree_cpu_s(pids) for c, pids in components.items()}
        result = wrk(name, url, self.sessions, self.seconds, self.connections, self.stack.base)
        for c, pids in components.items():
            result.cpu_s[c] = tree_cpu_s(pids) - before[c]
        return result

    def paired(self, name: str, url: str) -> Pair:
        """The path and, right before it, the floor: the machine is shared."""
        return self.run("floor", self.stack.floor_url), self.run(name, url)

    async def settled(self, name: str, pair: Pair) -> None:
        """Record a run that grants or draws, once the ledger has caught up with it,
        so that no run pays for the previous one's backlog."""
        self.measured.catch_ups.setdefault(name, []).append(await catch_up(self.stack.redis))
        self.record(name, pair)

    def record(self, name: str, pair: Pair) -> None:
        """Record a run that writes nothing."""
        self.measured.pairs.setdefault(name, []).append(pair)

    def grab_url(self, campaign_id: str) -> str:
        """The grab route of ``campaign_id``."""
        return f"{self.stack.base}/api/campaigns/{campaign_id}/grab"

    async def grab(self, campaign_id: str) -> None:
        """A grab run on a fresh campaign, counting script calls and envelopes won."""
        redis = self.stack.redis
        before = await script_calls(redis)
        pair = self.paired(GRAB, self.grab_url(campaign_id))
        self.measured.grab_calls += await script_calls(redis) - before
        self.measured.grab_requests += pair[1].requests
        self.measured.won += await won_count(redis, campaign_id)
        await self.settled(GRAB, pair)

    async def always(self, campaign_id: str) -> None:
        """A grab run with Redis fsyncing every write (appendfsync always)."""
        redis = self.stack.redis
        await redis.config_set("appendfsync", "always")
        pair = self.paired(ALWAYS, self.grab_url(campaign_id))
        await redis.config_set("appendfsync", "everysec")
        await self.settled(ALWAYS, pair)

    async def one(self, round_no: int, paths: set[str], campaigns: Campaigns) -> None:
        """Round ``round_no`` of every path in ``paths``, in the order of PATHS."""
        if "grab" in paths:
            await self.grab(campaigns.grab[round_no])
        for path, name, cid in (
            ("sold-out", SOLD, campaigns.sold),
            ("ended", ENDED, campaigns.ended),
            ("not-started", EARLY, campaigns.early),
        ):
            if path in paths:
                self.record(name, self.paired(name, self.grab_url(cid)))
        if "draw" in paths:
            url = f"{self.stack.base}/api/campaigns/{campaigns.lottery[round_no]}/draw"
            await self.settled(DRAW, self.paired(DRAW, url))
        if "always" in paths:
            await self.always(campaigns.always[round_no])
