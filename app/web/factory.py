"""The application factory: wiring only, no I/O."""

from __future__ import annotations

from aiohttp import web

from app.metrics import Metrics
from app.settings import Settings
from app.web import openapi
from app.web.accesslog import AccessLog
from app.web.edge import edge_middleware
from app.web.handlers import admin, admin_reads, auth, h5, ops, page, results, wechat, wechatpay
from app.web.keys import ACCESS_LOG, METRICS, READINESS, SETTINGS
from app.web.readiness import Readiness
from app.web.resources import (
    assets_ctx,
    drainer_ctx,
    postgres_ctx,
    redis_ctx,
    services_ctx,
    wechat_ctx,
)


async def _flush_access_log(app: web.Application) -> None:
    app[ACCESS_LOG].flush()


def create_app(settings: Settings, access_log: AccessLog | None = None) -> web.Application:
    """Build the aiohttp application for ``settings`` (access lines to ``access_log``,
    default stdout)."""
    metrics = Metrics()
    access_log = AccessLog() if access_log is None else access_log
    app = web.Application(
        middlewares=[edge_middleware(settings, metrics, access_log)],
        client_max_size=settings.client_max_size,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[ACCESS_LOG] = access_log
    app[READINESS] = Readiness()
    # Cleanup runs in reverse: the drainer stops before the batchers it records drain.
    app.cleanup_ctx.extend(
        [redis_ctx, postgres_ctx, services_ctx, wechat_ctx, assets_ctx, drainer_ctx]
    )
    app.on_cleanup.append(_flush_access_log)
    ops.setup(app)
    auth.setup(app)
    h5.setup(app)
    results.setup(app)
    admin.setup(app)
    admin_reads.setup(app)
    wechat.setup(app)
    wechatpay.setup(app)
    page.setup(app)
    openapi.setup(app)
    return app
