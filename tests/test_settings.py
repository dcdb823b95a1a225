"""Settings are read once: every default is written once, and every command finds the
stores the way `./hb serve` does, EMBEDDED_* ports included."""

from __future__ import annotations

import asyncio
import os
import sys
from urllib.parse import urlsplit

import pytest

from app.settings import LedgerSettings, Settings, SettingsError, Stores

BASE = {"REDIS_URL": "redis://r", "DATABASE_URL": "postgresql://p", "ADMIN_TOKEN": "x" * 16}


def test_environment_defaults_are_the_fields_defaults() -> None:
    read = Settings.from_env(BASE)
    assert read == Settings(
        redis_url="redis://r", database_url="postgresql://p", admin_token="x" * 16
    )
    assert LedgerSettings.from_env({}) == LedgerSettings()


def test_stores_default_to_the_embedded_services_on_their_ports() -> None:
    assert Stores.from_env({}) == Stores(
        "redis://127.0.0.1:16379/0",
        "postgresql://postgres@127.0.0.1:15432/postgres",
        redis_given=False,
        database_given=False,
    )
    moved = Stores.from_env({"EMBEDDED_REDIS_PORT": "26379", "EMBEDDED_PG_PORT": "25432"})
    assert (moved.redis_url, moved.database_url) == (
        "redis://127.0.0.1:26379/0",
        "postgresql://postgres@127.0.0.1:25432/postgres",
    )
    given = Stores.from_env({"REDIS_URL": "redis://elsewhere:1/2", "EMBEDDED_REDIS_PORT": "1"})
    assert (given.redis_url, given.redis_given) == ("redis://elsewhere:1/2", True)
    with pytest.raises(SettingsError, match="EMBEDDED_PG_PORT"):
        Stores.from_env({"EMBEDDED_PG_PORT": "-1"})


async def test_a_command_follows_the_embedded_ports(settings: Settings) -> None:
    """`reconcile` with no REDIS_URL/DATABASE_URL talks to the stores on EMBEDDED_* ports:
    here the test's own Redis and PostgreSQL servers, whose database `postgres` (the
    embedded service's name) holds no tables of ours: it gets as far as asking for them,
    and says so in one line."""
    redis_port = urlsplit(settings.redis_url).port or 6379
    pg_port = urlsplit(settings.database_url).port or 5432
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env.update(EMBEDDED_REDIS_PORT=str(redis_port), EMBEDDED_PG_PORT=str(pg_port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "reconcile",
        "no-such-campaign",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 2, text
    assert (
        f"PostgreSQL at postgresql://postgres@127.0.0.1:{pg_port}/postgres has no hongbao" in text
    )
    assert "Traceback" not in text
