"""Players grabbing red packets (and drawing lottery prizes), with an invariant check.

Headless run against a local service (see README "Load tests"):

    .venv/bin/locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8080 \\
        --hb-admin-token "$(cat .data/admin-token)" -u 200 -r 50 -t 60s

The ``--hb-*`` options (loadtest/hbload/options.py; also in the web UI's start form)
default to the HB_* environment variables of the same name: HB_ADMIN_TOKEN,
HB_CAMPAIGN, HB_TOTAL_FEN, HB_COUNT, HB_LOTTERY, HB_SESSIONS, HB_RECONCILE,
HB_CHECK_PLAYERS. Tasks are tagged by behaviour (``--tags`` / ``--exclude-tags``):
view, grab, me, draw. loadtest/spike.py adds the opening-second spike as a load shape
(``-f loadtest/locustfile.py,loadtest/spike.py``). Distributed (``--master`` and
``--worker``), the master creates the one red packet every worker's players grab,
splits the sessions file between the workers, and checks the invariants from every
worker's book when the test stops.

The check compares what players were told with the service's own records: nobody won
twice, every already_won repeats the player's own amount, the won amounts add up to
won_fen, won_count + remaining_count == count, and (with --hb-reconcile) PostgreSQL
matches Redis once the ledger lag is zero. With --hb-lottery: no tier won more than its
stock or its released stock, the draws and prizes players heard are the service's
counts (per tier), and each player's prizes as told are the prizes /me shows them (up
to --hb-check-players players). Any mismatch sets the exit code to 1.
"""

from __future__ import annotations

import sys
import uuid
from typing import Any, ClassVar

import orjson
from hbload.options import add_options
from hbload.run import LoadRun
from locust import FastHttpUser, between, events, tag, task
from locust.env import Environment
from locust.runners import WorkerRunner


class Player(FastHttpUser):
    """A player: opens the page, grabs, checks the result, maybe draws."""

    wait_time = between(0.05, 0.3)
    # This process's test state, set when locust starts (attach).
    load: ClassVar[LoadRun]

    def on_start(self) -> None:
        """Log in (or take a minted session)."""
        self.headers = {"Origin": self.host or "", "X-Requested-With": "hongbao"}
        pair = self.load.next_session()
        if pair is None:
            self.openid = f"locust-{uuid.uuid4().hex[:16]}"
            resp = self.client.post(
                "/auth/dev-login", json={"openid": self.openid}, headers=self.headers
            )
            cookie = resp.headers.get("Set-Cookie") if resp.headers is not None else None
            token = str(cookie or "").partition("hb_session=")[2].split(";")[0]
        else:
            self.openid, token = pair
            self.headers["Cookie"] = f"hb_session={token}"
        self.load.book.joined(self.openid, token)

    @tag("view")
    @task(2)
    def view(self) -> None:
        """Look at the red packet."""
        self.client.get(f"/api/campaigns/{self.load.campaign}", name="/api/campaigns/[id]")

    @tag("grab")
    @task(3)
    def grab(self) -> None:
        """Grab the red packet."""
        book = self.load.book
        # Once a player has won or one heard sold_out, an unheard answer changes nothing.
        could_win = book.could_win(self.openid)
        if could_win:
            book.asking("grab")
        with self.client.post(
            f"/api/campaigns/{self.load.campaign}/grab",
            headers=self.headers,
            name="/api/campaigns/[id]/grab",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"grab answered {resp.status_code}: {resp.text}")
            else:
                book.record(self.openid, orjson.loads(resp.content or b"{}"))
        if could_win:
            book.answered("grab")

    @tag("me")
    @task(1)
    def me(self) -> None:
        """Look at what I won; it must be what the grab said."""
        with self.client.get(
            f"/api/campaigns/{self.load.campaign}/me",
            headers=self.headers,
            name="/api/campaigns/[id]/me",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"/me answered {resp.status_code}: {resp.text}")
                return
            body = orjson.loads(resp.content or b"{}")
            known = self.load.book.won.get(self.openid)
            if known is not None and (body.get("result"), body.get("amount_fen")) != ("won", known):
                resp.failure(f"/me says {body}, the grab said {known}")

    @tag("draw")
    @task(2)
    def draw(self) -> None:
        """Draw in the lottery, if there is one."""
        if not self.load.lottery:
            return
        book = self.load.book
        book.asking("draw")
        with self.client.post(
            f"/api/campaigns/{self.load.lottery}/draw",
            headers=self.headers,
            name="/api/campaigns/[id]/draw",
            catch_response=True,
        ) as resp:
            if resp.status_code == 429:
                resp.success()  # quota_exhausted is a correct answer
            elif resp.status_code != 200:
                resp.failure(f"draw answered {resp.status_code}: {resp.text}")
            else:
                book.record_draw(self.openid, orjson.loads(resp.content or b"{}"))
        book.answered("draw")


def attach(environment: Environment, **_: Any) -> None:
    """Give this process its test state; refuse a headless run without a token at once."""
    parsed = environment.parsed_options
    worker = isinstance(environment.runner, WorkerRunner)
    if parsed is not None and parsed.headless and not worker and not parsed.hb_admin_token:
        sys.exit("locust: --hb-admin-token (or HB_ADMIN_TOKEN) is required")
    Player.load = LoadRun(environment)


events.init_command_line_parser.add_listener(add_options)
events.init.add_listener(attach)
