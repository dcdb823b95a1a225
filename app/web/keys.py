"""Every typed application key, in one place."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from app.background.events import Events
from app.campaigns.results import Results
from app.campaigns.service import CampaignService
from app.identity.login import LoginService
from app.identity.operators import Operator, OperatorDirectory
from app.identity.sessions import SessionStore
from app.metrics import Metrics
from app.payout.service import PayoutService
from app.settings import Settings
from app.store.scripts import Scripts
from app.web.accesslog import AccessLog
from app.web.assets import Assets
from app.web.readiness import Readiness

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
PG = web.AppKey("pg", asyncpg.Pool)
SCRIPTS = web.AppKey("scripts", Scripts)
EVENTS = web.AppKey("events", Events)
SESSIONS = web.AppKey("sessions", SessionStore)
CAMPAIGNS = web.AppKey("campaigns", CampaignService)
RESULTS = web.AppKey("results", Results)
LOGINS = web.AppKey("logins", LoginService)
PAYOUTS = web.AppKey("payouts", PayoutService)
OPERATORS = web.AppKey("operators", OperatorDirectory)
ASSETS = web.AppKey("assets", Assets)
METRICS = web.AppKey("metrics", Metrics)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
READINESS = web.AppKey("readiness", Readiness)
# The OpenAPI document (app.web.openapi), serialised once the routes are in place.
OPENAPI = web.AppKey("openapi", bytes)
# The openid of the request's session, once a handler has looked it up (for the access log).
OPENID = web.RequestKey("openid", str)
# Who calls an admin route (app.web.operators), and the campaign a call created (audit).
OPERATOR = web.RequestKey("operator", Operator)
AUDITED_CAMPAIGN = web.RequestKey("audited_campaign", str)
