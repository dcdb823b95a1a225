"""Every typed application key, in one place."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from app.assets import Assets
from app.campaigns import CampaignService
from app.login import LoginService
from app.scripts import Scripts
from app.sessions import SessionStore
from app.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
PG = web.AppKey("pg", asyncpg.Pool)
SCRIPTS = web.AppKey("scripts", Scripts)
SESSIONS = web.AppKey("sessions", SessionStore)
CAMPAIGNS = web.AppKey("campaigns", CampaignService)
LOGINS = web.AppKey("logins", LoginService)
ASSETS = web.AppKey("assets", Assets)
