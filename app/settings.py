"""Service settings: one frozen dataclass read from the environment at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


class SettingsError(ValueError):
    """A setting is missing or malformed; the service refuses to start."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be a boolean (1/0), got {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not 0 <= value < 3600:
        raise SettingsError(f"{name} must be between 0 and 3600, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a worker needs to know; immutable once the app is built."""

    redis_url: str
    database_url: str
    admin_token: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    dev_login: bool = False
    # Cookies are Secure unless the service is explicitly run over plain HTTP locally.
    insecure_cookies: bool = False
    session_ttl_s: int = 7 * 24 * 3600
    client_max_size: int = 64 * 1024
    redis_max_connections: int = 64
    pg_pool_max: int = 4
    # Upper bound on grabs settled by one script call; concurrent grabs coalesce up to it.
    grab_batch_max: int = 128
    shutdown_timeout_s: float = 10.0
    # After SIGTERM a worker answers /readyz with 503 but keeps serving this long, so the
    # load balancer's health checks take it out of rotation before it stops accepting.
    drain_delay_s: float = 3.0
    # Salt of the SHA-256 that stands for the openid in access logs (never the raw openid).
    log_salt: str = field(default="", repr=False)
    access_log: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from environment variables; fail loudly on bad values."""
        env = os.environ if env is None else env
        redis_url = env.get("REDIS_URL", "")
        database_url = env.get("DATABASE_URL", "")
        admin_token = env.get("ADMIN_TOKEN", "")
        if not redis_url:
            raise SettingsError("REDIS_URL is required")
        if not database_url:
            raise SettingsError("DATABASE_URL is required")
        if len(admin_token) < 16:
            raise SettingsError("ADMIN_TOKEN is required and must be at least 16 characters")
        return cls(
            redis_url=redis_url,
            database_url=database_url,
            admin_token=admin_token,
            host=env.get("HOST", "127.0.0.1"),
            port=_int(env, "PORT", 8080, minimum=0),
            dev_login=_bool(env, "DEV_LOGIN", False),
            insecure_cookies=_bool(env, "INSECURE_COOKIES", False),
            session_ttl_s=_int(env, "SESSION_TTL_S", 7 * 24 * 3600, minimum=60),
            client_max_size=_int(env, "CLIENT_MAX_SIZE", 64 * 1024, minimum=1024),
            redis_max_connections=_int(env, "REDIS_MAX_CONNECTIONS", 64, minimum=2),
            pg_pool_max=_int(env, "PG_POOL_MAX", 4, minimum=1),
            grab_batch_max=_int(env, "GRAB_BATCH_MAX", 128, minimum=1),
            shutdown_timeout_s=float(_int(env, "SHUTDOWN_TIMEOUT_S", 10, minimum=1)),
            drain_delay_s=_float(env, "DRAIN_DELAY_S", 3.0),
            log_salt=env.get("LOG_SALT", ""),
            access_log=_bool(env, "ACCESS_LOG", True),
        ).checked()

    def checked(self) -> Settings:
        """Cross-field rules; raises SettingsError."""
        if self.drain_delay_s >= self.shutdown_timeout_s:
            raise SettingsError(
                f"DRAIN_DELAY_S ({self.drain_delay_s}) must be below "
                f"SHUTDOWN_TIMEOUT_S ({self.shutdown_timeout_s})"
            )
        return self

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the supervisor use this)."""
        return replace(self, **changes)
