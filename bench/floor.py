"""The floor: a minimal aiohttp + uvloop worker with the grab route's shape.

It reads the session cookie and answers a small orjson body, touching nothing else,
so the ratio of a real path to it is what our own work costs.
"""

from __future__ import annotations

import os

import orjson
import uvloop
from aiohttp import web

BODY = orjson.dumps({"result": "sold_out"})


async def grab(request: web.Request) -> web.Response:
    """Answer like a grab, without doing one."""
    if "hb_session" not in request.cookies:
        return web.Response(status=401)
    return web.Response(body=BODY, content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """Health check for HAProxy."""
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")


def main() -> None:
    """Serve on $PORT."""
    app = web.Application()
    app.router.add_post("/api/campaigns/{id}/grab", grab)
    app.router.add_get("/readyz", ready)
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
