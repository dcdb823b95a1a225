"""Service settings: one frozen dataclass read from the environment at start-up."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

WECHAT_AUTHORIZE_URL = "https://open.weixin.qq.com/connect/oauth2/authorize"
WECHAT_API_BASE = "https://api.weixin.qq.com"
WECHAT_SCOPES = ("snsapi_base", "snsapi_userinfo")


class SettingsError(ValueError):
    """A setting is missing or malformed; the service refuses to start."""


def _default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name``: every default is written once, on its field."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
    raise KeyError(name)


@dataclass(frozen=True, slots=True)
class Stores:
    """Where Redis and PostgreSQL are: REDIS_URL and DATABASE_URL, else the services
    `./hb serve` embeds (on EMBEDDED_REDIS_PORT and EMBEDDED_PG_PORT)."""

    redis_url: str
    database_url: str
    # Whether each URL was given (False: the embedded service's).
    redis_given: bool = True
    database_given: bool = True
    embedded_redis_port: int = 16379
    embedded_pg_port: int = 15432
    # REDIS_CLUSTER=1: REDIS_URL is a seed node of a Redis Cluster (app.store.client).
    redis_cluster: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Stores:
        """Read the store URLs the way every command does."""
        env = os.environ if env is None else env
        redis_port = _int(
            env,
            "EMBEDDED_REDIS_PORT",
            _default(cls, "embedded_redis_port"),
            minimum=1,
            maximum=65535,
        )
        pg_port = _int(
            env, "EMBEDDED_PG_PORT", _default(cls, "embedded_pg_port"), minimum=1, maximum=65535
        )
        redis_url = env.get("REDIS_URL", "")
        database_url = env.get("DATABASE_URL", "")
        return cls(
            redis_url=redis_url or embedded_redis_url(redis_port),
            database_url=database_url or embedded_database_url(pg_port),
            redis_given=bool(redis_url),
            database_given=bool(database_url),
            embedded_redis_port=redis_port,
            embedded_pg_port=pg_port,
            redis_cluster=_bool(env, "REDIS_CLUSTER", _default(cls, "redis_cluster")),
        )


def embedded_redis_url(port: int) -> str:
    """The URL of the embedded Redis on ``port``."""
    return f"redis://127.0.0.1:{port}/0"


def embedded_database_url(port: int) -> str:
    """The URL of the embedded PostgreSQL on ``port``."""
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be a boolean (1/0), got {raw!r}")


def _int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int | None = None
) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be <= {maximum}, got {value}")
    return value


def _origin(env: Mapping[str, str], name: str) -> str:
    """An http(s) origin without path, query or trailing slash ("" when unset)."""
    raw = env.get(name, "").rstrip("/")
    if raw and not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?", raw):
        raise SettingsError(f"{name} must look like https://host[:port], got {raw!r}")
    return raw


# A session key id: short, and safe inside a token's dot-separated fields.
_KID = re.compile(r"[A-Za-z0-9_-]{1,16}")
MIN_SESSION_KEY_BYTES = 16


def session_keys_from_env(env: Mapping[str, str] | None = None) -> tuple[tuple[str, bytes], ...]:
    """SESSION_KEYS (``kid:base64key,kid:base64key``, the first signs) as ``(kid, key)``
    pairs; empty when unset (the Redis-shared key of local runs)."""
    env = os.environ if env is None else env
    keys: list[tuple[str, bytes]] = []
    for entry in filter(None, (e.strip() for e in env.get("SESSION_KEYS", "").split(","))):
        kid, colon, encoded = entry.partition(":")
        if not colon or not _KID.fullmatch(kid):
            raise SettingsError("SESSION_KEYS entries are kid:base64key, kid of [A-Za-z0-9_-]")
        try:
            key = base64.b64decode(
                encoded.replace("-", "+").replace("_", "/") + "=" * (-len(encoded) % 4),
                validate=True,
            )
        except binascii.Error:
            raise SettingsError(f"SESSION_KEYS: the key of {kid!r} is not base64") from None
        if len(key) < MIN_SESSION_KEY_BYTES:
            raise SettingsError(
                f"SESSION_KEYS: the key of {kid!r} must be at least {MIN_SESSION_KEY_BYTES} bytes"
            )
        if any(kid == known for known, _ in keys):
            raise SettingsError(f"SESSION_KEYS: key id {kid!r} is listed twice")
        keys.append((kid, key))
    return tuple(keys)


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name) or default
    if not re.match(r"https?://[^/?#]+", raw):
        raise SettingsError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    """The write-behind drainers that copy the ledger streams into PostgreSQL (LEDGER_*)."""

    # Run a drainer inside every worker; 0 leaves draining to `python -m app drain`.
    drain_in_worker: bool = True
    # Most entries read per stream by one XREADGROUP, written in one round trip.
    batch_max: int = 500
    # How long one XREADGROUP blocks waiting for entries.
    block_ms: int = 1000
    # After a batch smaller than batch_max, wait this long before reading again, so
    # that under load batches grow (fewer round trips and commits per entry) at the
    # price of this much more ledger lag. 0 reads again at once.
    linger_ms: int = 50
    # Pending entries idle this long belong to a dead drainer and are claimed (XAUTOCLAIM).
    claim_idle_ms: int = 30_000
    # Ceiling of the exponential back-off while PostgreSQL is unreachable.
    retry_max_ms: int = 5000
    # CPU niceness of a drainer process (`python -m app drain`), 0-19. Above 0, on a
    # machine it shares with workers, the hot path gets the CPU at a peak and the ledger
    # lag grows instead (the streams hold the backlog), to be drained when it eases.
    drain_nice: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LedgerSettings:
        """Read LEDGER_* variables; fail loudly on bad values."""
        env = os.environ if env is None else env
        d = cls()
        return cls(
            drain_in_worker=_bool(env, "LEDGER_DRAIN_IN_WORKER", d.drain_in_worker),
            batch_max=_int(env, "LEDGER_BATCH_MAX", d.batch_max, minimum=1),
            block_ms=_int(env, "LEDGER_BLOCK_MS", d.block_ms, minimum=10),
            linger_ms=_int(env, "LEDGER_LINGER_MS", d.linger_ms, minimum=0),
            claim_idle_ms=_int(env, "LEDGER_CLAIM_IDLE_MS", d.claim_idle_ms, minimum=100),
            retry_max_ms=_int(env, "LEDGER_RETRY_MAX_MS", d.retry_max_ms, minimum=10),
            drain_nice=_int(env, "LEDGER_DRAIN_NICE", d.drain_nice, minimum=0, maximum=19),
        )


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


WECHATPAY_API_BASE = "https://api.mch.weixin.qq.com"


def _read_file(env: Mapping[str, str], name: str) -> bytes:
    """The bytes of the file a setting names (b"" when unset); the path, never the bytes,
    appears in an error."""
    path = env.get(name, "")
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path!r} ({exc.strerror})") from None


@dataclass(frozen=True, slots=True)
class PayoutSettings:
    """Payouts through WeChat Pay's merchant transfer (WECHATPAY_*, PAYOUT_*). No mchid:
    payouts are off (grants still get their outbox rows)."""

    mchid: str = ""
    # The AppID the players' openids belong to (default: WECHAT_APPID).
    appid: str = ""
    api_base: str = WECHATPAY_API_BASE
    # The merchant API certificate's serial and its private key (apiclient_key.pem).
    merchant_serial: str = ""
    merchant_key_pem: bytes = field(default=b"", repr=False)
    # WeChat Pay's public key id (PUB_KEY_ID_...) and key (pub_key.pem).
    platform_key_id: str = ""
    platform_key_pem: bytes = field(default=b"", repr=False)
    apiv3_key: bytes = field(default=b"", repr=False)
    # Where WeChat Pay posts results: our POST /api/wechatpay/notify, reachable from WeChat.
    notify_url: str = ""
    # Local runs only: the fake WeChat Pay's confirm page, opened instead of
    # wx.requestMerchantTransfer outside WeChat. Empty in production.
    confirm_url: str = ""
    # 1000 is 现金营销 (cash marketing); its report infos are 活动名称 and 奖励说明.
    scene_id: str = "1000"
    remark: str = "活动奖励"
    perception: str = "活动奖励"
    # Calls per second to WeChat Pay, per call kind (create, query, cancel), shared by
    # every payout process through Redis; WeChat allows 100 bill creations per second.
    rate_per_s: int = 80
    # A bill waiting this long for the player's confirmation is cancelled.
    confirm_timeout_s: int = 43_200
    # How often a bill in flight is queried when no notification has settled it.
    poll_s: int = 30
    # Back-off ceiling after an unclear answer, a 5xx or a pause.
    retry_max_s: int = 300
    # A worker holds the bills it works on this long; a killed worker's are taken over.
    lease_s: int = 30
    batch_max: int = 50
    http_timeout_s: int = 10

    @property
    def enabled(self) -> bool:
        """Whether a merchant is configured."""
        return bool(self.mchid)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PayoutSettings:
        """Read WECHATPAY_* and PAYOUT_* variables; fail loudly on bad or partial ones."""
        env = os.environ if env is None else env
        d = cls()
        apiv3 = env.get("WECHATPAY_APIV3_KEY", "").encode()
        built = cls(
            mchid=env.get("WECHATPAY_MCHID", ""),
            appid=env.get("WECHATPAY_APPID") or env.get("WECHAT_APPID", ""),
            api_base=_url(env, "WECHATPAY_API_BASE", d.api_base),
            merchant_serial=env.get("WECHATPAY_SERIAL_NO", ""),
            merchant_key_pem=_read_file(env, "WECHATPAY_PRIVATE_KEY_FILE"),
            platform_key_id=env.get("WECHATPAY_PUBLIC_KEY_ID", ""),
            platform_key_pem=_read_file(env, "WECHATPAY_PUBLIC_KEY_FILE"),
            apiv3_key=apiv3,
            notify_url=env.get("WECHATPAY_NOTIFY_URL", ""),
            confirm_url=env.get("WECHATPAY_CONFIRM_URL", ""),
            scene_id=env.get("PAYOUT_SCENE_ID") or d.scene_id,
            remark=env.get("PAYOUT_REMARK") or d.remark,
            perception=env.get("PAYOUT_PERCEPTION") or d.perception,
            rate_per_s=_int(env, "PAYOUT_RATE_PER_S", d.rate_per_s, minimum=1, maximum=1000),
            confirm_timeout_s=_int(env, "PAYOUT_CONFIRM_TIMEOUT_S", d.confirm_timeout_s, minimum=1),
            poll_s=_int(env, "PAYOUT_POLL_S", d.poll_s, minimum=1),
            retry_max_s=_int(env, "PAYOUT_RETRY_MAX_S", d.retry_max_s, minimum=1),
            lease_s=_int(env, "PAYOUT_LEASE_S", d.lease_s, minimum=1),
            batch_max=_int(env, "PAYOUT_BATCH_MAX", d.batch_max, minimum=1),
            http_timeout_s=_int(env, "PAYOUT_HTTP_TIMEOUT_S", d.http_timeout_s, minimum=1),
        )
        if built.enabled:
            missing = [
                name
                for name, value in (
                    ("WECHATPAY_APPID or WECHAT_APPID", built.appid),
                    ("WECHATPAY_SERIAL_NO", built.merchant_serial),
                    ("WECHATPAY_PRIVATE_KEY_FILE", built.merchant_key_pem),
                    ("WECHATPAY_PUBLIC_KEY_ID", built.platform_key_id),
                    ("WECHATPAY_PUBLIC_KEY_FILE", built.platform_key_pem),
                    ("WECHATPAY_NOTIFY_URL", built.notify_url),
                )
                if not value
            ]
            if missing:
                raise SettingsError(f"WECHATPAY_MCHID is set: {', '.join(missing)} required too")
            if len(apiv3) != 32:
                raise SettingsError("WECHATPAY_APIV3_KEY must be 32 characters")
        return built


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
    # (key id, key) pairs that sign and verify session tokens, the first signing; empty:
    # one key shared through Redis (zero-config local runs only; see the README's security).
    session_keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    client_max_size: int = 64 * 1024
    redis_max_connections: int = 64
    # Bound on connecting to Redis and on waiting for any reply (script line and pools):
    # a Redis that went silent fails calls with 503 after this long instead of hanging.
    redis_timeout_ms: int = 2000
    # REDIS_CLUSTER=1: REDIS_URL is a seed node of a Redis Cluster (app.store.client).
    redis_cluster: bool = False
    # A settlement (grab, draw) is answered only once this many replicas of the Redis
    # that settled it have it (WAIT on the script line); 0 answers at once.
    redis_wait_replicas: int = 0
    pg_pool_max: int = 4
    # Upper bound on grabs settled by one script call; concurrent grabs coalesce up to it.
    grab_batch_max: int = 128
    shutdown_timeout_s: float = 10.0
    # WeChat web authorization (网页授权); the base URLs point at the fake in local runs.
    wechat_appid: str = ""
    wechat_secret: str = field(default="", repr=False)
    wechat_authorize_url: str = WECHAT_AUTHORIZE_URL
    wechat_api_base: str = WECHAT_API_BASE
    wechat_scope: str = "snsapi_base"
    # The origin players reach us at, e.g. https://hb.example.com: WeChat's redirect_uri
    # and the CSRF same-origin check. Empty: the origin of each request (local runs, tests).
    public_base_url: str = ""
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    payout: PayoutSettings = field(default_factory=PayoutSettings)
    # After SIGTERM a worker answers /readyz with 503 but keeps serving this long, so the
    # load balancer's health checks take it out of rotation before it stops accepting.
    drain_delay_s: float = 3.0
    # Salt of the SHA-256 that stands for the openid in access logs (never the raw openid).
    log_salt: str = field(default="", repr=False)
    access_log: bool = True
    # One in this many successful hot-path answers that settle nothing (sold out,
    # already won) gets an access line; errors and settlements always get one.
    access_log_sample: int = 100
    # Tests only (HB_CLOCK_SKEW_MS): the worker's clock runs this far ahead (or behind,
    # negative), to show that Redis's clock decides windows, slots and the quota day.
    clock_skew_ms: int = 0

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

        def d(name: str) -> Any:
            return _default(cls, name)

        wechat_scope = env.get("WECHAT_SCOPE") or d("wechat_scope")
        if wechat_scope not in WECHAT_SCOPES:
            raise SettingsError(
                f"WECHAT_SCOPE must be one of {WECHAT_SCOPES}, got {wechat_scope!r}"
            )
        if bool(env.get("WECHAT_APPID")) != bool(env.get("WECHAT_SECRET")):
            raise SettingsError("WECHAT_APPID and WECHAT_SECRET go together")
        if len(admin_token) < 16:
            raise SettingsError("ADMIN_TOKEN is required and must be at least 16 characters")
        return cls(
            redis_url=redis_url,
            database_url=database_url,
            admin_token=admin_token,
            host=env.get("HOST", d("host")),
            port=_int(env, "PORT", d("port"), minimum=0),
            dev_login=_bool(env, "DEV_LOGIN", d("dev_login")),
            insecure_cookies=_bool(env, "INSECURE_COOKIES", d("insecure_cookies")),
            session_ttl_s=_int(env, "SESSION_TTL_S", d("session_ttl_s"), minimum=60),
            session_keys=session_keys_from_env(env),
            client_max_size=_int(env, "CLIENT_MAX_SIZE", d("client_max_size"), minimum=1024),
            redis_max_connections=_int(
                env, "REDIS_MAX_CONNECTIONS", d("redis_max_connections"), minimum=2
            ),
            redis_timeout_ms=_int(env, "REDIS_TIMEOUT_MS", d("redis_timeout_ms"), minimum=50),
            redis_cluster=_bool(env, "REDIS_CLUSTER", d("redis_cluster")),
            redis_wait_replicas=_int(
                env, "REDIS_WAIT_REPLICAS", d("redis_wait_replicas"), minimum=0, maximum=16
            ),
            pg_pool_max=_int(env, "PG_POOL_MAX", d("pg_pool_max"), minimum=1),
            grab_batch_max=_int(env, "GRAB_BATCH_MAX", d("grab_batch_max"), minimum=1),
            shutdown_timeout_s=float(
                _int(env, "SHUTDOWN_TIMEOUT_S", int(d("shutdown_timeout_s")), minimum=1)
            ),
            wechat_appid=env.get("WECHAT_APPID", ""),
            wechat_secret=env.get("WECHAT_SECRET", ""),
            wechat_authorize_url=_url(env, "WECHAT_AUTHORIZE_URL", d("wechat_authorize_url")),
            wechat_api_base=_url(env, "WECHAT_API_BASE", d("wechat_api_base")),
            wechat_scope=wechat_scope,
            public_base_url=_origin(env, "PUBLIC_BASE_URL"),
            ledger=LedgerSettings.from_env(env),
            payout=PayoutSettings.from_env(env),
            drain_delay_s=_float(env, "DRAIN_DELAY_S", d("drain_delay_s")),
            log_salt=env.get("LOG_SALT", ""),
            access_log=_bool(env, "ACCESS_LOG", d("access_log")),
            access_log_sample=_int(env, "ACCESS_LOG_SAMPLE", d("access_log_sample"), minimum=1),
            clock_skew_ms=_int(env, "HB_CLOCK_SKEW_MS", d("clock_skew_ms"), minimum=-(10**12)),
        ).checked()

    def checked(self) -> Settings:
        """Cross-field rules; raises SettingsError."""
        if self.redis_wait_replicas and not self.redis_url.startswith("redis://"):
            # WAIT runs on the script line's connection, which speaks redis:// only.
            raise SettingsError("REDIS_WAIT_REPLICAS needs a redis:// REDIS_URL")
        if self.redis_timeout_ms <= self.ledger.block_ms:
            # The drainer's XREADGROUP blocks for block_ms on a pooled connection.
            raise SettingsError(
                f"REDIS_TIMEOUT_MS ({self.redis_timeout_ms}) must be above "
                f"LEDGER_BLOCK_MS ({self.ledger.block_ms})"
            )
        if self.drain_delay_s >= self.shutdown_timeout_s:
            raise SettingsError(
                f"DRAIN_DELAY_S ({self.drain_delay_s}) must be below "
                f"SHUTDOWN_TIMEOUT_S ({self.shutdown_timeout_s})"
            )
        return self

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the supervisor use this)."""
        return replace(self, **changes)
