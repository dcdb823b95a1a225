"""The redis-py client every process uses: one Redis, or a Redis Cluster.

With ``REDIS_CLUSTER=1`` the URL names a seed node and the client is redis-py's
``redis.asyncio.cluster.RedisCluster``: it learns the slot map from the seed, sends each
command to the master of its key's slot, follows MOVED and ASK, and splits a
non-transactional pipeline by node. It offers the same command methods as ``Redis``
(not a subclass of it), so the rest of the code keeps one type, ``Redis``, and the few
places a cluster refuses what one Redis accepts (a command or MULTI over keys of
different slots) ask ``cluster_of`` and do it slot by slot.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from app.store.scriptline import keepalive_options

# Per node, the least bound of redis-py's cluster pool (see open_redis).
CLUSTER_MIN_CONNECTIONS = 1024


def open_redis(
    url: str,
    *,
    cluster: bool = False,
    max_connections: int | None = None,
    timeout_s: float | None = None,
) -> Redis:
    """A client for ``url``; with ``cluster``, for the Redis Cluster ``url`` is a node of.

    ``max_connections`` bounds the pool (callers then wait for a free connection),
    ``timeout_s`` every connect and reply. redis-py's cluster pool does not wait: past
    its bound a call fails, so there the bound is per node and at least
    CLUSTER_MIN_CONNECTIONS (a burst opens connections rather than fail; the hot path's
    calls go through the script line and the batchers, not one connection each).
    """
    options: dict[str, Any] = {}
    if timeout_s is not None:
        options.update(
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
            socket_keepalive_options=keepalive_options(),
        )
    if cluster:
        options["max_connections"] = max(max_connections or 0, CLUSTER_MIN_CONNECTIONS)
        # Same commands as Redis (see the module docstring); cluster_of gives it back.
        return cast(Redis, RedisCluster.from_url(url, **options))
    if max_connections is None:
        return Redis.from_url(url, **options)
    # A blocking pool waits for a free connection instead of failing under bursts.
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=5, **options
    )
    return Redis.from_pool(pool)


def cluster_of(redis: Redis) -> RedisCluster | None:
    """The client as a RedisCluster when it is one, else None."""
    client: object = redis
    return client if isinstance(client, RedisCluster) else None


async def clock_ms(redis: Redis, key: str) -> int:
    """Redis's clock (TIME), in unix ms, on the server holding ``key``: the clock the
    scripts touching ``key`` decide by. (A cluster pipeline refuses TIME.)"""
    cluster = cluster_of(redis)
    if cluster is None:
        seconds, micros = await redis.time()
    else:
        await cluster.initialize()
        node = cluster.get_node_from_key(key)
        seconds, micros = await cluster.execute_command("TIME", target_nodes=node)
    return int(seconds) * 1000 + int(micros) // 1000
