"""Lua scripts (one file per atomic operation in lua/) and the Redis key schema.

Key schema -- every key of one campaign shares the hash tag ``{<campaign id>}`` so
each script touches a single Redis Cluster slot:

    hb:{<cid>}:meta      hash   definition (kind, name, window, totals) + won counters;
                                lifecycle: paused (1|0), ends_at_ms moved to the end by
                                an operator's end, closed_ms once closed out, with
                                refunded_count / refunded_fen (red packet) or closeout
                                "unreleased:unwon," per tier (lottery)
    hb:{<cid>}:pool      list   un-granted envelopes, "seq:amount_fen", popped from the left
    hb:{<cid>}:winners   hash   openid -> "seq:amount_fen"
    hb:{<cid>}:ledger    stream one entry per grant or draw, drained into PostgreSQL
    hb:{<cid>}:tiers     hash   lottery tiers: weight:i stock:i value:i schedule:i, won:i counters
    hb:{<cid>}:draws     hash   lottery: openid -> draws so far (the last draw number)
    hb:{<cid>}:daily:<d> hash   lottery: openid -> draws on day d (YYYYMMDD, Asia/Shanghai)
    hb:{<cid>}:days      hash   lottery: d -> draws that day, won:d -> prizes that day
    hb:{<cid>}:wins      hash   lottery: openid -> "draw_no:tier,..." prizes won
    hb:{<cid>/<k>/<salt>}:meta, :pool, :winners, :ledger
                         a sharded red packet's sub-pool k (of "shards": K > 1): the
                                same four keys under a tag of its own, so a cluster
                                spreads the sub-pools (see spread_pools); its meta has
                                kind "shard", the window, lifecycle and counters of its
                                envelopes. The campaign's own hb:{<cid>}:meta keeps the
                                definition, "pools" (the sub-pools' ids) and the lifecycle
                                mirrored, and has no pool, winners or ledger entries.
    hb:{<cid>}:replay:<openid>:<key>
                         string lottery: the draw made under one Idempotency-Key,
                                "code:tier:draw_no", kept DRAW_REPLAY_TTL_S
    hb:campaigns         set    ids of the campaigns (and sub-pools) whose ledger streams
                                drainers follow: listed when opened, removed by a
                                drainer once the campaign has ended and its stream is
                                drained (PostgreSQL keeps all)
    hb:sess:<sid>        string session JSON, with a TTL (the token names the sid)
    hb:session-key       string the key that signs session tokens, shared by every worker
    hb:revoked           zset   sids of sessions ended early -> their token's expiry (unix s)
    hb:login:{<state>}   hash   one WeChat login in progress: browser hash, next, code, token
    hb:{payout}:rate:<call> string payout rate limit (GCRA), per WeChat Pay call kind
    hb:{payout}:pause    string set with a TTL: every payout process waits (rate limit, no balance)
    hb:{payout}:nonce:<n> string a WeChat Pay notification nonce seen, kept past its freshness

Pub/sub channel ``hb:events`` (app.background.events) carries revocations, sold-out news
and lifecycle changes (paused, resumed, ended).

Python builds key names here and nowhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from app.model import now_ms
from app.store.scriptline import ClusterLine, ScriptLine

CAMPAIGNS_SET = "hb:campaigns"
# The payout processes' shared rate limit (one key per call kind) and pause.
PAYOUT_RATE_KEY = "hb:{payout}:rate:"
PAYOUT_PAUSE_KEY = "hb:{payout}:pause"
# Notification nonces already seen (hash tag: their own slot; one key per nonce).
PAYOUT_NONCE_KEY = "hb:{payout}:nonce:"
# How long a draw's answer is kept for retries under the same Idempotency-Key: a day,
# well past any client's retry, and each record is a few dozen bytes.
DRAW_REPLAY_TTL_S = 86_400
# draw_prize is called again when the worker guessed the day wrong; the second call
# carries Redis's own day, so a third is needed only if midnight passed in between.
DRAW_DAY_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class CampaignKeys:
    """The Redis keys of one campaign."""

    meta: str
    pool: str
    winners: str
    ledger: str
    tiers: str
    draws: str
    days: str
    wins: str

    @classmethod
    def of(cls, campaign_id: str) -> CampaignKeys:
        """Key names for ``campaign_id``; all share its hash tag."""
        tag = f"hb:{{{campaign_id}}}"
        return cls(
            meta=f"{tag}:meta",
            pool=f"{tag}:pool",
            winners=f"{tag}:winners",
            ledger=f"{tag}:ledger",
            tiers=f"{tag}:tiers",
            draws=f"{tag}:draws",
            days=f"{tag}:days",
            wins=f"{tag}:wins",
        )


# A sub-pool's id: "<campaign>/<k>/<salt>". A "/" never matches a route's {id}, so no
# request can name a sub-pool as a campaign; the salt places the sub-pool's slot.
POOL_SEPARATOR = "/"


# How far from the centre of its range a sub-pool's slot may fall (in slots): the salt
# search then takes about 16384 / 17 tries per sub-pool (K = 256: a quarter second).
SPREAD_WINDOW = 8


def spread_pools(campaign_id: str, shards: int) -> tuple[str, ...]:
    """The ids of a red packet's ``shards`` sub-pools (just ``campaign_id`` for one).

    Sub-pool k takes the first salt whose hash slot lies within SPREAD_WINDOW of the
    centre of the k-th of ``shards`` equal ranges of the 16,384 slots. ``redis-cli
    --cluster create`` gives each of M masters an equal range of slots, and K evenly
    spaced centres fall K / M to a master's range (within one), none near its edges; so
    K sub-pools spread as evenly as K allows, where K hash tags picked at random would
    often share a master (three on three masters: all apart only 2 times in 9), and the
    first salt anywhere in the k-th range would straddle masters whenever that range does.
    """
    if shards == 1:
        return (campaign_id,)
    pools = []
    for k in range(shards):
        centre = (2 * k + 1) * REDIS_CLUSTER_HASH_SLOTS // (2 * shards)
        salt = 0
        while True:
            pool = f"{campaign_id}{POOL_SEPARATOR}{k}{POOL_SEPARATOR}{salt}"
            # The slot of the sub-pool's tag, which every one of its keys shares.
            if abs(key_slot(f"{{{pool}}}".encode()) - centre) <= SPREAD_WINDOW:
                pools.append(pool)
                break
            salt += 1
    return tuple(pools)


def pool_owner(pool: str) -> tuple[str, int]:
    """The campaign id and shard number of a pool id (a campaign's own id: shard 0)."""
    campaign_id, _, rest = pool.partition(POOL_SEPARATOR)
    return campaign_id, int(rest.partition(POOL_SEPARATOR)[0]) if rest else 0


def daily_key(campaign_id: str, day: int) -> str:
    """Per-player lottery draw counts of one day (YYYYMMDD in Asia/Shanghai)."""
    return f"hb:{{{campaign_id}}}:daily:{day}"


def replay_key(campaign_id: str, openid: str, idempotency_key: str) -> str:
    """Where draw_prize records the draw made under one player's idempotency key."""
    return f"hb:{{{campaign_id}}}:replay:{openid}:{idempotency_key}"


def session_key(sid: str) -> str:
    """Redis key of a session (``sid``: the session id its token names)."""
    return f"hb:sess:{sid}"


# The key that signs session tokens (app.identity.sessions), shared by every worker.
SESSION_SIGNING_KEY = "hb:session-key"
# Sessions ended before their expiry: sid -> expiry (unix s), pruned as they expire.
REVOKED_SET = "hb:revoked"
# The pub/sub channel of app.background.events.
EVENTS_CHANNEL = "hb:events"


def login_key(state: str) -> str:
    """Redis key of the WeChat login started with ``state``."""
    return f"hb:login:{{{state}}}"


class RedeemCode(enum.IntEnum):
    """What redeem_login answered for a callback."""

    UNKNOWN_STATE = 0
    OTHER_BROWSER = 1
    CLAIMED = 2
    OTHER_CODE = 3
    DONE = 4
    PENDING = 5


@dataclass(frozen=True, slots=True)
class Redeemed:
    """A callback's claim on its login: the code, where to go next, the session if made."""

    code: RedeemCode
    next: str = "/"
    token: str | None = None


class GrabStatus(enum.IntEnum):
    """Campaign-level outcome of one grab_envelope call."""

    SETTLED = 0
    NOT_FOUND = 1
    NOT_STARTED = 2
    ENDED = 3
    PAUSED = 4


class GrabCode(enum.IntEnum):
    """Per-user outcome inside a settled batch."""

    WON = 0
    ALREADY_WON = 1
    SOLD_OUT = 2


GRAB_CODES = tuple(GrabCode)  # by value


@dataclass(frozen=True, slots=True)
class GrabBatchResult:
    """What grab_envelope answered for one batch."""

    status: GrabStatus
    remaining_count: int
    outcomes: list[tuple[GrabCode, int]]
    now_ms: int  # Redis's clock, which decided the window


class DrawStatus(enum.IntEnum):
    """Campaign-level outcome of one draw_prize call."""

    SETTLED = 0
    NOT_FOUND = 1
    NOT_STARTED = 2
    ENDED = 3
    WRONG_KIND = 4
    WRONG_DAY = 5
    PAUSED = 6


class DrawCode(enum.IntEnum):
    """Per-draw outcome inside a settled batch."""

    PRIZE = 0
    NO_PRIZE = 1
    QUOTA_TOTAL = 2
    QUOTA_DAILY = 3


DRAW_CODES = tuple(DrawCode)  # by value


class DrawResult(NamedTuple):
    """One draw as settled by draw_prize: tier -1 unless a prize, draw_no 0 when refused."""

    code: DrawCode
    tier: int
    draw_no: int


class Draw(NamedTuple):
    """One draw to settle: the player, its randomness, its idempotency key if any (a
    NamedTuple, as DrawResult: one of each is made per draw, a third of a frozen
    dataclass's cost)."""

    openid: str
    rand: int
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class DrawBatchResult:
    """What draw_prize answered for one batch, and the clock and day that decided it."""

    status: DrawStatus
    results: list[DrawResult]
    now_ms: int
    day: int  # YYYYMMDD in Asia/Shanghai, of now_ms


class PauseStatus(enum.IntEnum):
    """What set_paused answered."""

    CHANGED = 0
    NOT_FOUND = 1
    ENDED = 2
    UNCHANGED = 3


class CloseStatus(enum.IntEnum):
    """What close_campaign answered."""

    CLOSED = 0
    NOT_FOUND = 1
    NOT_ENDED = 2
    ALREADY_CLOSED = 3


@dataclass(frozen=True, slots=True)
class CloseResult:
    """What close_campaign answered, with Redis's now and when the campaign ended."""

    status: CloseStatus
    now_ms: int
    ends_at_ms: int


class RedisClock:
    """Redis's clock as this worker last saw it: the local clock plus the offset the
    latest script reply showed. A hint for views and pre-checks; the scripts decide."""

    def __init__(self, local: Callable[[], int] = now_ms) -> None:
        self._local = local
        self._offset = 0
        self.synced = False

    def observe(self, redis_ms: int) -> None:
        """Take the time a script reply reported as Redis's now."""
        self._offset = redis_ms - self._local()
        self.synced = True

    async def sync(self, redis: Redis) -> None:
        """Read Redis's clock (TIME) once, before any script reply has shown it."""
        seconds, micros = await redis.time()
        self.observe(seconds * 1000 + micros // 1000)

    def __call__(self) -> int:
        """Unix milliseconds, by Redis's clock as last seen."""
        return self._local() + self._offset


def load_lua(name: str) -> str:
    """Source of ``lua/<name>.lua``, shipped inside the wheel as package ``app.lua``."""
    return (resources.files("app.lua") / f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """Registered scripts with one typed method each.

    EVALSHA reloads the script once on NOSCRIPT (after a failover or SCRIPT FLUSH). The
    settlement scripts go through ``line`` (app.store.scriptline) when given one, else, like
    the others, through redis-py's AsyncScript.
    """

    def __init__(self, redis: Redis, line: ScriptLine | ClusterLine | None = None) -> None:
        self._line = line
        self._sources = {name: load_lua(name) for name in ("grab_envelope", "draw_prize")}
        self._grab = redis.register_script(self._sources["grab_envelope"])
        self._redeem = redis.register_script(load_lua("redeem_login"))
        self._draw = redis.register_script(self._sources["draw_prize"])
        self._set_paused = redis.register_script(load_lua("set_paused"))
        self._close = redis.register_script(load_lua("close_campaign"))

    async def _settle(
        self, name: str, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> Any:
        if self._line is not None:
            return await self._line.evalsha(script.sha, self._sources[name], keys, args)
        return await script(keys=keys, args=args)

    @property
    def line(self) -> ScriptLine | None:
        """The hot path's pipelined connection to a single Redis, for its reads too;
        None on a cluster, without one, and with REDIS_WAIT_REPLICAS (a read queued
        behind a script's WAIT would wait for the replicas as well)."""
        line = self._line
        return line if isinstance(line, ScriptLine) and not line.wait_replicas else None

    async def preload(self, redis: Redis) -> None:
        """SCRIPT LOAD every script, so a syntax error stops start-up."""
        for script in self._all():
            await redis.script_load(script.script)

    async def ping_line(self) -> None:
        """PING on the script line (readiness: the hot path's connection answers)."""
        if self._line is not None:
            await self._line.ping()

    async def ensure_loaded(self, redis: Redis) -> int:
        """Load any script Redis lost (restart, failover, SCRIPT FLUSH); return how many."""
        scripts = self._all()
        present = await redis.script_exists(*(script.sha for script in scripts))
        missing = [s for s, there in zip(scripts, present, strict=True) if not there]
        for script in missing:
            await redis.script_load(script.script)
        return len(missing)

    def _all(self) -> list[AsyncScript]:
        return [self._grab, self._redeem, self._draw, self._set_paused, self._close]

    async def redeem_login(self, state: str, browser_hash: str, code_hash: str) -> Redeemed:
        """Claim the login of ``state`` for one code, from the browser that started it."""
        raw = cast(
            list[Any],
            await self._redeem(keys=[login_key(state)], args=[browser_hash, code_hash]),
        )
        code = RedeemCode(int(raw[0]))
        nxt = raw[1].decode() if len(raw) > 1 else "/"
        token = raw[2].decode() if len(raw) > 2 else None
        return Redeemed(code, nxt, token)

    async def grab_envelope(self, campaign_id: str, users: list[str]) -> GrabBatchResult:
        """Settle grabs of ``users`` (distinct or not) on one campaign atomically, at
        Redis's time."""
        k = CampaignKeys.of(campaign_id)
        raw = cast(
            list[Any],
            await self._settle(
                "grab_envelope", self._grab, [k.meta, k.pool, k.winners, k.ledger], users
            ),
        )
        status = GrabStatus(int(raw[0]))
        # Lua's integers arrive as ints; an index into the codes is a tenth of GrabCode().
        outcomes = [(GRAB_CODES[raw[i]], raw[i + 1]) for i in range(3, len(raw), 2)]
        return GrabBatchResult(status, int(raw[1]), outcomes, int(raw[2]))

    async def set_paused(self, campaign_id: str, paused: bool) -> tuple[PauseStatus, int]:
        """Pause or resume a campaign (refused once ended); its status and Redis's now."""
        k = CampaignKeys.of(campaign_id)
        raw = cast(
            list[Any],
            await self._set_paused(keys=[k.meta, k.ledger], args=["1" if paused else "0"]),
        )
        return PauseStatus(int(raw[0])), int(raw[1])

    async def close_campaign(self, campaign_id: str, end_now: bool) -> CloseResult:
        """Close out an ended campaign once (``end_now``: end it at Redis's now first)."""
        k = CampaignKeys.of(campaign_id)
        raw = cast(
            list[Any],
            await self._close(
                keys=[k.meta, k.pool, k.tiers, k.ledger], args=["1" if end_now else "0"]
            ),
        )
        return CloseResult(CloseStatus(int(raw[0])), int(raw[1]), int(raw[2]))

    async def draw_prize(self, campaign_id: str, day: int, draws: list[Draw]) -> DrawBatchResult:
        """Settle draws on a lottery atomically at Redis's time; ``day`` (YYYYMMDD) is the
        caller's guess of Redis's day in Asia/Shanghai, corrected by Redis when wrong."""
        k = CampaignKeys.of(campaign_id)
        replays: list[str] = []
        per_draw: list[str | int] = []
        for draw in draws:
            at = 0
            if draw.idempotency_key is not None:
                replays.append(replay_key(campaign_id, draw.openid, draw.idempotency_key))
                at = 7 + len(replays)  # its index in KEYS (1-based, after the 7 fixed keys)
            per_draw += [draw.openid, draw.rand, at]
        for _ in range(DRAW_DAY_ATTEMPTS):
            keys = [k.meta, k.tiers, k.draws, daily_key(campaign_id, day), k.days, k.wins]
            args: list[str | int] = [day, DRAW_REPLAY_TTL_S, *per_draw]
            raw = cast(
                list[Any],
                await self._settle("draw_prize", self._draw, [*keys, k.ledger, *replays], args),
            )
            status, redis_ms, redis_day = DrawStatus(int(raw[0])), int(raw[1]), int(raw[2])
            if status is not DrawStatus.WRONG_DAY:
                results = [
                    DrawResult(DRAW_CODES[raw[i]], raw[i + 1], raw[i + 2])
                    for i in range(3, len(raw), 3)
                ]
                return DrawBatchResult(status, results, redis_ms, redis_day)
            day = redis_day
        raise RuntimeError(f"Redis's day changed {DRAW_DAY_ATTEMPTS} times during one draw")
