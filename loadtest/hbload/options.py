"""The locust command-line options of the hongbao load test (also in the web UI).

Each takes its default from the environment variable the README has long documented,
so ``HB_ADMIN_TOKEN=... locust ...`` keeps working; on the command line it wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from locust.argument_parser import LocustArgumentParser

# Set by the master at test start and sent to the workers with the other options.
RUN_CAMPAIGN = "hb_run_campaign"
RUN_WORKERS = "hb_run_workers"


def add_options(parser: LocustArgumentParser) -> None:
    """Register the ``--hb-*`` options (init_command_line_parser listener)."""
    parser.add_argument(
        "--hb-admin-token",
        env_var="HB_ADMIN_TOKEN",
        default="",
        is_secret=True,
        is_required=True,
        help="operator token: creates the campaign, reads its stats (required)",
    )
    parser.add_argument(
        "--hb-campaign",
        env_var="HB_CAMPAIGN",
        default="",
        help="red-packet id to grab; empty: one is created per test (--hb-total-fen, --hb-count)",
    )
    parser.add_argument(
        "--hb-total-fen",
        env_var="HB_TOTAL_FEN",
        type=int,
        default=10_000_000,
        help="total of the red packet created when --hb-campaign is empty",
    )
    parser.add_argument(
        "--hb-count",
        env_var="HB_COUNT",
        type=int,
        default=10_000,
        help="envelopes of the red packet created when --hb-campaign is empty",
    )
    parser.add_argument(
        "--hb-lottery", env_var="HB_LOTTERY", default="", help="lottery id to draw in too"
    )
    parser.add_argument(
        "--hb-sessions",
        env_var="HB_SESSIONS",
        default="",
        help="file from `./hb mint-sessions` (openid<TAB>cookie); empty: players log in "
        "through /auth/dev-login (needs DEV_LOGIN=1)",
    )
    parser.add_argument(
        "--hb-reconcile",
        env_var="HB_RECONCILE",
        action="store_true",
        default=False,
        help="at the end also run `python -m app reconcile` on each campaign (needs "
        "REDIS_URL and DATABASE_URL of the service)",
    )
    parser.add_argument(
        "--hb-check-players",
        env_var="HB_CHECK_PLAYERS",
        type=int,
        default=1000,
        help="players whose lottery prizes are compared with their /me",
    )


@dataclass(frozen=True)
class Options:
    """The ``--hb-*`` options of one test, as parsed (or as the master sent them)."""

    admin_token: str
    campaign: str
    total_fen: int
    count: int
    lottery: str
    sessions: str
    reconcile: bool
    check_players: int

    @classmethod
    def of(cls, parsed: Any) -> Options:
        """The options in locust's ``environment.parsed_options``."""
        return cls(
            admin_token=parsed.hb_admin_token,
            campaign=parsed.hb_campaign,
            total_fen=int(parsed.hb_total_fen),
            count=int(parsed.hb_count),
            lottery=parsed.hb_lottery,
            sessions=os.path.expanduser(parsed.hb_sessions),
            reconcile=bool(parsed.hb_reconcile),
            check_players=int(parsed.hb_check_players),
        )
