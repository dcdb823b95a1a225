"""The application factory: wiring only, no I/O."""

from __future__ import annotations

from aiohttp import web

from app.access import observe_middleware, redis_errors_middleware
from app.errors import error_middleware
from app.handlers import admin, auth, h5, ops
from app.keys import METRICS, READINESS, SETTINGS
from app.metrics import Metrics
from app.readiness import Readiness
from app.resources import postgres_ctx, redis_ctx, services_ctx
from app.settings import Settings


def create_app(settings: Settings) -> web.Application:
    """Build the aiohttp application for ``settings``."""
    app = web.Application(
        middlewares=[observe_middleware, error_middleware, redis_errors_middleware],
        client_max_size=settings.client_max_size,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[READINESS] = Readiness()
    app.cleanup_ctx.extend([redis_ctx, postgres_ctx, services_ctx])
    ops.setup(app)
    auth.setup(app)
    h5.setup(app)
    admin.setup(app)
    return app
