"""The application factory: wiring only, no I/O."""

from __future__ import annotations

from aiohttp import web

from app.csrf import csrf_middleware
from app.drainer import drainer_ctx
from app.errors import error_middleware
from app.handlers import admin, auth, h5, ops, page, wechat
from app.keys import SETTINGS
from app.resources import assets_ctx, postgres_ctx, redis_ctx, services_ctx, wechat_ctx
from app.settings import Settings


def create_app(settings: Settings) -> web.Application:
    """Build the aiohttp application for ``settings``."""
    app = web.Application(
        middlewares=[error_middleware, csrf_middleware], client_max_size=settings.client_max_size
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.extend([redis_ctx, postgres_ctx, services_ctx])
    app.cleanup_ctx.extend([wechat_ctx, assets_ctx])
    app.cleanup_ctx.append(drainer_ctx)
    ops.setup(app)
    auth.setup(app)
    h5.setup(app)
    admin.setup(app)
    wechat.setup(app)
    page.setup(app)
    return app
