"""Red-packet campaigns: creation (split, record, load), player views, grabs."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from app import ledger
from app.batching import KeyedBatchers
from app.errors import Ended, Invalid, NotFound, NotStarted, WrongKind
from app.events import Events
from app.lottery import DrawOutcome, LotteryService, parse_lottery
from app.scripts import (
    CAMPAIGNS_SET,
    CampaignKeys,
    GrabCode,
    GrabStatus,
    Scripts,
)
from app.soldout import SoldOut
from app.split import MAX_COUNT, MAX_TOTAL_FEN, split_envelopes
from app.validation import get_int, get_optional_int, get_str, get_time_ms, reject_unknown

# No campaign window reaches past this (an "open-ended" campaign ends here).
FAR_FUTURE_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z
MAX_NAME_LEN = 100
LOAD_CHUNK = 10_000
Progress = Callable[[int, int], None]


def now_ms() -> int:
    """Wall-clock unix milliseconds."""
    return time.time_ns() // 1_000_000


def iso(ms: int | None) -> str | None:
    """RFC 3339 (UTC) for a unix-millisecond time, None for None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Campaign:
    """An immutable campaign definition."""

    id: str
    kind: str
    name: str
    total_fen: int | None
    count: int | None
    min_fen: int | None
    max_fen: int | None
    starts_at_ms: int | None
    ends_at_ms: int | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def opens_ms(self) -> int:
        return 0 if self.starts_at_ms is None else self.starts_at_ms

    @property
    def closes_ms(self) -> int:
        return FAR_FUTURE_MS if self.ends_at_ms is None else self.ends_at_ms

    def to_meta(self) -> dict[FieldT, EncodableT]:
        """The definition as stored in the Redis meta hash."""
        return {
            "kind": self.kind,
            "name": self.name,
            "total_fen": self.total_fen or 0,
            "count": self.count or 0,
            "min_fen": self.min_fen or 0,
            "max_fen": "" if self.max_fen is None else self.max_fen,
            "starts_at": "" if self.starts_at_ms is None else self.starts_at_ms,
            "ends_at": "" if self.ends_at_ms is None else self.ends_at_ms,
            # The scripts compare against these two; always numbers.
            "starts_at_ms": self.opens_ms,
            "ends_at_ms": self.closes_ms,
        }

    @classmethod
    def from_meta(cls, campaign_id: str, meta: Mapping[bytes, bytes]) -> Campaign:
        """Parse the Redis meta hash."""

        def opt(name: bytes) -> int | None:
            raw = meta.get(name, b"")
            return int(raw) if raw else None

        return cls(
            id=campaign_id,
            kind=meta[b"kind"].decode(),
            name=meta[b"name"].decode(),
            total_fen=opt(b"total_fen"),
            count=opt(b"count"),
            min_fen=opt(b"min_fen"),
            max_fen=opt(b"max_fen"),
            starts_at_ms=opt(b"starts_at"),
            ends_at_ms=opt(b"ends_at"),
            config=orjson.loads(meta[b"config"]) if b"config" in meta else {},
        )

    def state(self, now: int, remaining: int | None = None) -> str:
        """scheduled | open | sold_out | ended (a lottery, remaining None, never sells out)."""
        if now < self.opens_ms:
            return "scheduled"
        if now >= self.closes_ms:
            return "ended"
        return "sold_out" if remaining == 0 else "open"


RED_PACKET_FIELDS = {
    "kind",
    "name",
    "total_fen",
    "count",
    "min_fen",
    "max_fen",
    "starts_at",
    "ends_at",
}
# 5,000 万元 in one envelope is beyond any real campaign.
MAX_ENVELOPE_FEN = 5_000_000_000


def parse_red_packet(data: Mapping[str, Any], campaign_id: str) -> Campaign:
    """Validate a red-packet definition; 422 naming the first bad field."""
    reject_unknown(data, RED_PACKET_FIELDS)
    name = get_str(data, "name", max_len=MAX_NAME_LEN)
    count = get_int(data, "count", minimum=1, maximum=MAX_COUNT)
    total = get_int(data, "total_fen", minimum=1, maximum=MAX_TOTAL_FEN)
    min_fen = get_int(data, "min_fen", minimum=1, maximum=MAX_ENVELOPE_FEN, default=1)
    max_fen = get_optional_int(data, "max_fen", minimum=1, maximum=MAX_ENVELOPE_FEN)
    if total < count * min_fen:
        raise Invalid("total_fen", "total_fen must be at least count * min_fen")
    if max_fen is not None:
        if max_fen < min_fen:
            raise Invalid("max_fen", "max_fen must be at least min_fen")
        if total > count * max_fen:
            raise Invalid("total_fen", "total_fen must be at most count * max_fen")
    starts = get_time_ms(data, "starts_at")
    ends = get_time_ms(data, "ends_at")
    if starts is not None and ends is not None and ends <= starts:
        raise Invalid("ends_at", "ends_at must be after starts_at")
    return Campaign(campaign_id, "red_packet", name, total, count, min_fen, max_fen, starts, ends)


def new_campaign_id() -> str:
    """A random campaign id, safe inside a Redis hash tag."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class GrabOutcome:
    """One player's grab result."""

    code: GrabCode
    amount_fen: int


SOLD_OUT = GrabOutcome(GrabCode.SOLD_OUT, 0)


class CampaignService:
    """Campaign definitions (cached per worker; they never change) and grabs."""

    def __init__(
        self,
        redis: Redis,
        pg: asyncpg.Pool,
        scripts: Scripts,
        *,
        grab_batch_max: int,
        events: Events | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._clock = clock
        self._lottery = LotteryService(redis, scripts, batch_max=grab_batch_max, clock=clock)
        self._redis = redis
        self._pg = pg
        self._scripts = scripts
        self._grab_batch_max = grab_batch_max
        self._cache: dict[str, Campaign] = {}
        self._fetching: dict[str, asyncio.Future[Campaign]] = {}
        self._grabs: KeyedBatchers[str, tuple[GrabStatus, GrabOutcome]] = KeyedBatchers(
            self._settle, max_size=grab_batch_max
        )
        self._lookups: KeyedBatchers[str, GrabOutcome] = KeyedBatchers(
            self._lookup, max_size=grab_batch_max
        )
        self._sold_out = None if events is None else SoldOut(redis, events)

    async def create(self, data: Mapping[str, Any], progress: Progress | None = None) -> Campaign:
        """Validate, split, record in PostgreSQL, then load into Redis and open."""
        kind = data.get("kind")
        if kind == "lottery":
            return await self._create_lottery(data)
        if kind != "red_packet":
            raise Invalid("kind", "kind must be 'red_packet' or 'lottery'")
        campaign = parse_red_packet(data, new_campaign_id())
        amounts = await asyncio.get_running_loop().run_in_executor(
            None,
            split_envelopes,
            campaign.total_fen or 0,
            campaign.count or 0,
            campaign.min_fen or 1,
            campaign.max_fen,
        )
        envelopes = list(enumerate(amounts))
        # PostgreSQL and Redis load side by side; the campaign opens only after both.
        await asyncio.gather(
            ledger.insert_campaign(self._pg, campaign, amounts),
            self._push_pool(campaign, envelopes, progress),
        )
        await self._open(campaign)
        return campaign

    async def _create_lottery(self, data: Mapping[str, Any]) -> Campaign:
        draft = parse_lottery(data)
        campaign = Campaign(
            new_campaign_id(),
            "lottery",
            draft.name,
            None,
            None,
            None,
            None,
            draft.starts_at_ms,
            draft.ends_at_ms,
            draft.config.to_json(),
        )
        await ledger.insert_campaign(self._pg, campaign, None)
        await self._lottery.load(campaign, campaign.to_meta())
        return campaign

    async def _push_pool(
        self, campaign: Campaign, envelopes: list[tuple[int, int]], progress: Progress | None
    ) -> None:
        keys = CampaignKeys.of(campaign.id)
        await self._redis.delete(keys.pool)
        total = len(envelopes)
        step = LOAD_CHUNK * 10
        for start in range(0, total, step):
            async with self._redis.pipeline(transaction=False) as pipe:
                for chunk in range(start, min(start + step, total), LOAD_CHUNK):
                    pipe.rpush(
                        keys.pool,
                        *[f"{s}:{a}" for s, a in envelopes[chunk : chunk + LOAD_CHUNK]],
                    )
                await pipe.execute()
            if progress is not None:
                progress(min(start + step, total), total)

    async def _open(self, campaign: Campaign) -> None:
        """Write meta (the scripts treat its absence as "not open") and list the campaign."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(CampaignKeys.of(campaign.id).meta, mapping=campaign.to_meta())
            pipe.sadd(CAMPAIGNS_SET, campaign.id)
            await pipe.execute()

    async def get(self, campaign_id: str) -> Campaign:
        """The definition of ``campaign_id`` (404 if unknown)."""
        cached = self._cache.get(campaign_id)
        if cached is not None:
            return cached
        if not (0 < len(campaign_id) <= 64) or "}" in campaign_id or "{" in campaign_id:
            raise NotFound("no such campaign")
        # Single flight: at an opening burst a cold worker reads the definition once,
        # however many requests are waiting for it.
        fetching = self._fetching.get(campaign_id)
        if fetching is None:
            fetching = asyncio.ensure_future(self._fetch(campaign_id))
            self._fetching[campaign_id] = fetching
            fetching.add_done_callback(lambda _: self._fetching.pop(campaign_id, None))
        # shield: a waiter that goes away must not cancel the others' fetch.
        return await asyncio.shield(fetching)

    async def _fetch(self, campaign_id: str) -> Campaign:
        meta = cast(
            dict[bytes, bytes], await self._redis.hgetall(CampaignKeys.of(campaign_id).meta)
        )
        if not meta:
            raise NotFound("no such campaign")
        campaign = Campaign.from_meta(campaign_id, meta)
        self._cache[campaign_id] = campaign
        return campaign

    @staticmethod
    def _summary(campaign: Campaign, state: str) -> dict[str, Any]:
        """The fields every view of a campaign starts with."""
        return {
            "id": campaign.id,
            "kind": campaign.kind,
            "name": campaign.name,
            "state": state,
            "starts_at": iso(campaign.starts_at_ms),
            "ends_at": iso(campaign.ends_at_ms),
        }

    async def public_view(self, campaign_id: str) -> dict[str, Any]:
        """What a player sees of a campaign."""
        campaign = await self.get(campaign_id)
        if campaign.kind == "lottery":
            return {
                **self._summary(campaign, campaign.state(self._clock())),
                **self._lottery.public_fields(campaign),
            }
        remaining = int(await self._redis.llen(CampaignKeys.of(campaign_id).pool))
        return {
            **self._summary(campaign, campaign.state(self._clock(), remaining)),
            "remaining_count": remaining,
        }

    async def stats(self, campaign_id: str) -> dict[str, Any]:
        """Live operator statistics, read as one consistent snapshot."""
        campaign = await self.get(campaign_id)
        if campaign.kind == "lottery":
            return {
                **self._summary(campaign, campaign.state(self._clock())),
                **await self._lottery.stats(campaign),
            }
        keys = CampaignKeys.of(campaign_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(keys.meta, "won_count", "won_fen")
            pipe.llen(keys.pool)
            # Drainers XDEL what they commit: the stream holds exactly the unrecorded entries.
            pipe.xlen(keys.ledger)
            (won_count, won_fen), remaining, ledger_lag = await pipe.execute()
        won_n = int(won_count or 0)
        won_f = int(won_fen or 0)
        total = campaign.total_fen or 0
        return {
            **self._summary(campaign, campaign.state(self._clock(), int(remaining))),
            "total_fen": total,
            "count": campaign.count,
            "min_fen": campaign.min_fen,
            "max_fen": campaign.max_fen,
            "remaining_count": int(remaining),
            "remaining_fen": total - won_f,
            "won_count": won_n,
            "won_fen": won_f,
            "ledger_lag": int(ledger_lag),
        }

    async def ensure_open(self, campaign_id: str) -> Campaign:
        """The campaign if its window is open now; 404 / 409 from the cached definition.

        Needs no Redis once the definition is cached, so ended and not-started
        campaigns are answered before any session lookup.
        """
        campaign = self._cache.get(campaign_id) or await self.get(campaign_id)
        now = self._clock()
        if now < campaign.opens_ms:
            raise NotStarted("the campaign has not started yet")
        if now >= campaign.closes_ms:
            raise Ended("the campaign has ended")
        return campaign

    async def grab(self, campaign: Campaign, openid: str) -> GrabOutcome:
        """Settle one player's grab in an open campaign (see ensure_open); raises
        WrongKind, or NotFound / NotStarted / Ended if Redis disagrees with the cache."""
        if campaign.kind != "red_packet":
            raise WrongKind("this campaign is a lottery; draw instead")
        campaign_id = campaign.id
        sold_out = self._sold_out
        if sold_out is not None and sold_out.knows(campaign_id):
            # Known sold out: a player not among the winners is answered from memory;
            # a winner's retry is looked up (a coalesced HMGET, not the script).
            if sold_out.surely_lost(campaign_id, openid):
                return SOLD_OUT
            return await self._lookups.submit(campaign_id, openid)
        status, outcome = await self._grabs.submit(campaign_id, openid)
        if status is GrabStatus.NOT_FOUND:
            raise NotFound("no such campaign")
        if status is GrabStatus.NOT_STARTED:
            raise NotStarted("the campaign has not started yet")
        if status is GrabStatus.ENDED:
            raise Ended("the campaign has ended")
        return outcome

    async def _settle(
        self, campaign_id: str, users: list[str]
    ) -> list[tuple[GrabStatus, GrabOutcome]]:
        result = await self._scripts.grab_envelope(campaign_id, users, self._clock())
        if result.status is not GrabStatus.SETTLED:
            return [(result.status, SOLD_OUT)] * len(users)
        if result.remaining_count == 0 and self._sold_out is not None:
            self._sold_out.announce(campaign_id)
        return [(result.status, GrabOutcome(code, amount)) for code, amount in result.outcomes]

    async def _lookup(self, campaign_id: str, users: list[str]) -> list[GrabOutcome]:
        raw = cast(
            list[bytes | None],
            await self._redis.hmget(CampaignKeys.of(campaign_id).winners, users),
        )
        return [
            SOLD_OUT
            if value is None
            else GrabOutcome(GrabCode.ALREADY_WON, int(value.rsplit(b":", 1)[1]))
            for value in raw
        ]

    async def draw(self, campaign: Campaign, openid: str) -> DrawOutcome:
        """Settle one lottery draw in an open campaign (see ensure_open); raises
        WrongKind or QuotaExhausted, or NotFound / NotStarted / Ended from the script."""
        return await self._lottery.draw(campaign, openid)

    async def my_view(self, campaign_id: str, openid: str) -> dict[str, Any]:
        """What ``openid`` has won in a campaign, as the player sees it."""
        campaign = await self.get(campaign_id)
        if campaign.kind == "lottery":
            return await self._lottery.player_view(campaign, openid)
        amount = await self.my_result(campaign_id, openid)
        if amount is None:
            return {"result": "none"}
        return {"result": "won", "amount_fen": amount}

    async def my_result(self, campaign_id: str, openid: str) -> int | None:
        """The amount ``openid`` won in ``campaign_id``, or None."""
        await self.get(campaign_id)
        raw = cast(
            bytes | None, await self._redis.hget(CampaignKeys.of(campaign_id).winners, openid)
        )
        return None if raw is None else int(raw.rsplit(b":", 1)[1])

    async def drain(self) -> None:
        """Finish grabs in flight (graceful shutdown)."""
        await self._grabs.drain()
        await self._lookups.drain()
        await self._lottery.drain()
        if self._sold_out is not None:
            await self._sold_out.close()
