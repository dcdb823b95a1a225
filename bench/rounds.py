"""The rounds of a bench: each path measured right after the floor, ledger settled between;
the OpenResty comparison right after our grab run, on a fresh campaign of its own."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from app.records import text
from app.store.scripts import CampaignKeys
from bench import openresty
from bench.campaigns import Campaigns
from bench.measure import Result, catch_up, script_calls, tree_cpu_s, won_count, wrk
from bench.stack import Stack

GRAB = "grab (won)"
WON_AGAIN = "already won"
SOLD = "sold out"
ENDED = "ended (409)"
EARLY = "not started (409)"
ALWAYS = "grab (won), appendfsync always"
DRAW = "lottery draw"
OPENRESTY = "grab, OpenResty (nginx + ngx_lua)"
PATHS = ("grab", "openresty", "already-won", "sold-out", "ended", "not-started", "draw", "always")
# Measured on the round's grab campaign, after its grab run: they need the grab path.
AFTER_GRAB = ("openresty", "already-won")

Pair = tuple[Result, Result]


@dataclass
class Measured:
    """Everything the rounds measured, for the report."""

    pairs: dict[str, list[Pair]] = field(default_factory=dict)
    catch_ups: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    grab_calls: int = 0
    grab_requests: int = 0
    won: int = 0
    # The OpenResty runs, each with our grab run of the same round (and its floor).
    openresty: list[tuple[Pair, Result]] = field(default_factory=list)
    openresty_calls: int = 0
    # Every OpenResty run settled exactly: winners == ledger entries == envelopes taken
    # == wrk's answered grabs (plus those in flight at the end), nobody twice.
    openresty_settled: bool = True


@dataclass
class Rounds:
    """Runs wrk against the stack, path by path, each paired with a floor run before it."""

    stack: Stack
    sessions: Path
    seconds: int
    connections: int
    # The same players with the OpenResty comparison's cookies.
    openresty_sessions: Path | None = None
    measured: Measured = field(default_factory=Measured)

    def run(self, name: str, url: str, sessions: Path | None = None) -> Result:
        """One wrk run, with the CPU every component used during it."""
        print(f"  {name} ...", file=sys.stderr, flush=True)
        components = self.stack.components
        before = {c: tree_cpu_s(pids) for c, pids in components.items()}
        players = sessions or self.sessions
        result = wrk(name, url, players, self.seconds, self.connections, self.stack.base)
        for c, pids in components.items():
            result.cpu_s[c] = tree_cpu_s(pids) - before[c]
        return result

    def paired(self, name: str, url: str, sessions: Path | None = None) -> Pair:
        """The path and, right before it, the floor: the machine is shared."""
        return self.run("floor", self.stack.floor_url), self.run(name, url, sessions)

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

    async def already_won(self, campaign_id: str) -> None:
        """Grabs again by the players who won the round's grab run: every answer is
        already_won (from the script: the campaign is not sold out)."""
        winners = await self.stack.redis.hkeys(CampaignKeys.of(campaign_id).winners)
        openids = {text(w) for w in winners}
        won = self.stack.work / "sessions-won.tsv"
        with open(self.sessions) as players:
            won.write_text("".join(li for li in players if li.partition("\t")[0] in openids))
        self.record(WON_AGAIN, self.paired(WON_AGAIN, self.grab_url(campaign_id), won))

    async def openresty(self, campaign_id: str) -> None:
        """An OpenResty run on its own fresh campaign, right after
        our grab run of the round; its settlement checked, then its campaign dropped."""
        nginx, sessions, redis = self.stack.openresty, self.openresty_sessions, self.stack.redis
        if nginx is None or sessions is None:
            raise RuntimeError("the OpenResty comparison is not running")
        before = await script_calls(redis)
        url = f"{nginx.url}/api/campaigns/{campaign_id}/grab"
        result = self.run(OPENRESTY, url, sessions)
        self.measured.openresty_calls += await script_calls(redis) - before
        settled = await openresty.settlement(redis, campaign_id)
        # Requests still in flight when wrk stops are settled but not counted by wrk.
        answered = result.requests <= settled.winners <= result.requests + self.connections
        if not (settled.ok and answered and result.errors == 0):
            print(f"  OpenResty settlement wrong: {settled}, wrk {result}", file=sys.stderr)
            self.measured.openresty_settled = False
        grab = self.measured.pairs[GRAB][-1]
        self.measured.openresty.append((grab, result))
        await openresty.discard(redis, campaign_id)

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
        if "openresty" in paths:
            await self.openresty(campaigns.openresty[round_no])
        if "already-won" in paths:
            await self.already_won(campaigns.grab[round_no])
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
