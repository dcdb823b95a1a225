"""Players grabbing red packets (and drawing lottery prizes), with an invariant check.

Headless run against a local service (see README "Load tests"):

    HB_ADMIN_TOKEN=$(cat .data/admin-token) \\
    .venv/bin/locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8080 \\
        -u 200 -r 50 -t 60s

Environment:
    HB_ADMIN_TOKEN   operator token (required: creates the campaign, reads stats)
    HB_CAMPAIGN      red-packet id to grab; unset, one is created (HB_TOTAL_FEN, HB_COUNT)
    HB_LOTTERY       lottery id to draw in too (optional)
    HB_SESSIONS      file from `./hb mint-sessions` (openid<TAB>cookie): players use these
                     sessions instead of spending load on logins; unset, each player logs
                     in through /auth/dev-login (needs DEV_LOGIN=1)
    HB_RECONCILE     "1": at the end also run `python -m app reconcile <campaign>` (needs
                     REDIS_URL and DATABASE_URL of the service in this environment)

When the run stops, the checker compares what players were told with the
operator's view: nobody won twice, every already_won repeats the player's own
amount, the won amounts add up to won_fen, won_fen + remaining_fen == total_fen,
and (with HB_RECONCILE=1) PostgreSQL matches Redis once the ledger lag is zero.
With HB_LOTTERY: no tier won more than its stock or its released stock, the draws
and prizes players heard are the service's counts (per tier), and each player's
prizes as told are the prizes /me shows them (up to HB_CHECK_PLAYERS players, 1000).
Any mismatch sets the exit code to 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import requests
from locust import FastHttpUser, between, events, task
from locust.env import Environment

ADMIN_TOKEN = os.environ.get("HB_ADMIN_TOKEN", "")
SESSIONS_FILE = os.environ.get("HB_SESSIONS")
CHECK_PLAYERS = int(os.environ.get("HB_CHECK_PLAYERS", "1000"))


class Book:
    """What players were told, for the end-of-run check (one locust process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.won: dict[str, int] = {}
        # Lottery: openid -> session token, draws heard, prizes heard as {(draw_no, tier)}
        self.tokens: dict[str, str] = {}
        self.draws: dict[str, int] = {}
        self.prizes: dict[str, set[tuple[int, int]]] = {}
        self.problems: list[str] = []
        self.campaign = os.environ.get("HB_CAMPAIGN", "")
        self.lottery = os.environ.get("HB_LOTTERY", "")
        self.sessions: Iterator[tuple[str, str]] | None = None

    def record(self, openid: str, body: dict[str, Any]) -> None:
        result = body.get("result")
        with self.lock:
            if result == "won":
                if openid in self.won:
                    self.problems.append(f"{openid} won twice")
                self.won[openid] = int(body["amount_fen"])
            elif result == "already_won":
                known = self.won.get(openid)
                if known is not None and known != body["amount_fen"]:
                    self.problems.append(
                        f"{openid} won {known} but already_won says {body['amount_fen']}"
                    )

    def record_draw(self, openid: str, body: dict[str, Any]) -> None:
        with self.lock:
            self.draws[openid] = self.draws.get(openid, 0) + 1
            if body.get("result") == "prize":
                told = self.prizes.setdefault(openid, set())
                told.add((int(body["draw_no"]), int(body["prize"]["tier"])))

    def next_session(self) -> tuple[str, str] | None:
        with self.lock:
            if self.sessions is None:
                return None
            return next(self.sessions, None)


BOOK = Book()


def _admin(host: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    resp = requests.request(
        method,
        f"{host}{path}",
        data=None if body is None else orjson.dumps(body),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=120,
    )
    resp.raise_for_status()
    return resp.json()


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    if not ADMIN_TOKEN:
        sys.exit("HB_ADMIN_TOKEN is required")
    host = environment.host
    if not BOOK.campaign:
        BOOK.campaign = _admin(
            host,
            "POST",
            "/api/admin/campaigns",
            {
                "kind": "red_packet",
                "name": "locust 压测",
                "total_fen": int(os.environ.get("HB_TOTAL_FEN", "10000000")),
                "count": int(os.environ.get("HB_COUNT", "10000")),
            },
        )["id"]
    if SESSIONS_FILE:
        with open(SESSIONS_FILE, encoding="utf-8") as fh:
            pairs = [tuple(line.rstrip("\n").split("\t", 1)) for line in fh if "\t" in line]
        BOOK.sessions = iter(pairs)  # type: ignore[arg-type]


def _drained_stats(host: str, campaign: str) -> Any:
    """The campaign's operator stats once its ledger lag is zero (or after 60 s)."""
    stats = _admin(host, "GET", f"/api/admin/campaigns/{campaign}")
    deadline = time.monotonic() + 60
    while stats.get("ledger_lag", 0) and time.monotonic() < deadline:
        time.sleep(0.5)
        stats = _admin(host, "GET", f"/api/admin/campaigns/{campaign}")
    return stats


def _reconcile(campaign: str) -> list[str]:
    rc = subprocess.run([sys.executable, "-m", "app", "reconcile", campaign], check=False)
    return [] if rc.returncode == 0 else [f"reconcile {campaign} exited {rc.returncode}"]


def _lottery_problems(host: str, exact: bool) -> list[str]:
    """Lottery invariants; ``exact`` when no request failed (every answer was heard)."""
    stats = _drained_stats(host, BOOK.lottery)
    problems = []
    heard = Counter(tier for told in BOOK.prizes.values() for _, tier in told)
    for tier in stats["tiers"]:
        i, won = tier["tier"], tier["won"]
        if won > tier["stock"] or won > tier["released"]:
            problems.append(
                f"tier {i}: {won} won, stock {tier['stock']}, released {tier['released']}"
            )
        if won < heard[i] or (exact and won != heard[i]):
            problems.append(f"tier {i}: players heard {heard[i]} prizes, service says {won}")
    draws = sum(BOOK.draws.values())
    if stats["draws"] < draws or (exact and stats["draws"] != draws):
        problems.append(f"players heard {draws} draws, service says {stats['draws']}")
    for openid in sorted(BOOK.draws)[:CHECK_PLAYERS]:
        resp = requests.get(
            f"{host}/api/campaigns/{BOOK.lottery}/me",
            headers={"Cookie": f"hb_session={BOOK.tokens[openid]}"},
            timeout=30,
        )
        me = resp.json()
        shown = {(p["draw_no"], p["tier"]) for p in me.get("prizes", [])}
        told = BOOK.prizes.get(openid, set())
        if not told <= shown or (exact and shown != told):
            problems.append(f"{openid}: heard prizes {sorted(told)}, /me shows {sorted(shown)}")
    print(
        f"lottery: {draws} draws / {sum(heard.values())} prizes heard by players; service "
        f"draws={stats['draws']} prizes_won={stats['prizes_won']} "
        f"won per tier={[t['won'] for t in stats['tiers']]}"
    )
    return problems


@events.quitting.add_listener
def _check(environment: Environment, **_: Any) -> None:
    host = environment.host
    stats = _drained_stats(host, BOOK.campaign)
    problems = list(BOOK.problems)
    told = sum(BOOK.won.values())
    # Players whose response was lost (timeouts) may have won without our knowing,
    # so the operator's totals may exceed what we heard, never the reverse.
    if stats["won_count"] < len(BOOK.won) or stats["won_fen"] < told:
        problems.append(
            f"players were told {len(BOOK.won)} wins / {told} fen, "
            f"service says {stats['won_count']} / {stats['won_fen']}"
        )
    failures = environment.stats.total.num_failures
    if failures == 0 and (stats["won_count"], stats["won_fen"]) != (len(BOOK.won), told):
        problems.append(
            f"no request failed, yet service says {stats['won_count']} wins / "
            f"{stats['won_fen']} fen and players heard {len(BOOK.won)} / {told}"
        )
    if stats["won_fen"] + stats["remaining_fen"] != stats["total_fen"]:
        problems.append(f"won_fen + remaining_fen != total_fen: {stats}")
    if BOOK.lottery:
        problems += _lottery_problems(host, exact=failures == 0)
    if os.environ.get("HB_RECONCILE") == "1":
        problems += _reconcile(BOOK.campaign)
        if BOOK.lottery:
            problems += _reconcile(BOOK.lottery)
    print(
        f"invariants: {len(BOOK.won)} wins / {told} fen heard by players; service "
        f"won_count={stats['won_count']} won_fen={stats['won_fen']} "
        f"remaining_fen={stats['remaining_fen']} total_fen={stats['total_fen']}"
    )
    for problem in problems:
        print(f"INVARIANT VIOLATED: {problem}")
    if problems:
        environment.process_exit_code = 1
    else:
        print("invariants: OK")


class Player(FastHttpUser):
    """A player: opens the page, grabs once, checks the result, maybe draws."""

    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        self.headers = {"Origin": self.host, "X-Requested-With": "hongbao"}
        pair = BOOK.next_session()
        if pair is None:
            self.openid = f"locust-{uuid.uuid4().hex[:16]}"
            resp = self.client.post(
                "/auth/dev-login", json={"openid": self.openid}, headers=self.headers
            )
            token = resp.headers.get("Set-Cookie", "").partition("hb_session=")[2].split(";")[0]
        else:
            self.openid, token = pair
            self.headers["Cookie"] = f"hb_session={token}"
        with BOOK.lock:
            BOOK.tokens[self.openid] = token
        self.grabbed = False

    @task(2)
    def view(self) -> None:
        self.client.get(f"/api/campaigns/{BOOK.campaign}", name="/api/campaigns/[id]")

    @task(3)
    def grab(self) -> None:
        with self.client.post(
            f"/api/campaigns/{BOOK.campaign}/grab",
            headers=self.headers,
            name="/api/campaigns/[id]/grab",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"grab answered {resp.status_code}: {resp.text}")
                return
            BOOK.record(self.openid, orjson.loads(resp.content))
            self.grabbed = True

    @task(1)
    def me(self) -> None:
        with self.client.get(
            f"/api/campaigns/{BOOK.campaign}/me",
            headers=self.headers,
            name="/api/campaigns/[id]/me",
            catch_response=True,
        ) as resp:
            body = orjson.loads(resp.content)
            known = BOOK.won.get(self.openid)
            if known is not None and body != {"result": "won", "amount_fen": known}:
                resp.failure(f"/me says {body}, the grab said {known}")

    @task(2)
    def draw(self) -> None:
        if not BOOK.lottery:
            return
        with self.client.post(
            f"/api/campaigns/{BOOK.lottery}/draw",
            headers=self.headers,
            name="/api/campaigns/[id]/draw",
            catch_response=True,
        ) as resp:
            if resp.status_code == 429:
                resp.success()  # quota_exhausted is a correct answer
            elif resp.status_code != 200:
                resp.failure(f"draw answered {resp.status_code}: {resp.text}")
            else:
                BOOK.record_draw(self.openid, orjson.loads(resp.content))
