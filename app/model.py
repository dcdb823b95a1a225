"""The campaign definition, its kinds, and time conversions.

The bottom layer: everything else imports it, and it imports nothing of ours. A
campaign's common part (id, kind, name, window) is here; what a kind adds (a red
packet's budget, a lottery's tiers) is the kind's own ``spec`` type, defined in its
package (app.redpacket, app.lottery).
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Generic, TypeVar
from zoneinfo import ZoneInfo

# No campaign window reaches past this (an "open-ended" campaign ends here).
FAR_FUTURE_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z
# The lottery's quota day is the calendar day in China.
SHANGHAI = ZoneInfo("Asia/Shanghai")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class Kind(enum.StrEnum):
    """What a campaign gives out: the one place kinds are named."""

    RED_PACKET = "red_packet"
    LOTTERY = "lottery"


S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Campaign(Generic[S]):
    """An immutable campaign definition: the common part and its kind's ``spec``."""

    id: str
    kind: Kind
    name: str
    starts_at_ms: int | None
    ends_at_ms: int | None
    spec: S

    @property
    def opens_ms(self) -> int:
        """When grabs or draws open (0: always)."""
        return 0 if self.starts_at_ms is None else self.starts_at_ms

    @property
    def closes_ms(self) -> int:
        """When the campaign ends (FAR_FUTURE_MS: never)."""
        return FAR_FUTURE_MS if self.ends_at_ms is None else self.ends_at_ms

    def state(self, now: int, remaining: int | None = None, life: Lifecycle | None = None) -> str:
        """scheduled | open | paused | sold_out | ended (``remaining`` None: never sells
        out). Ended wins over everything, paused over open and sold out."""
        life = life or ACTIVE
        if life.ended(now, self):
            return "ended"
        if now < self.opens_ms:
            return "scheduled"
        if life.paused:
            return "paused"
        return "sold_out" if remaining == 0 else "open"

    def summary(self, state: str) -> dict[str, Any]:
        """The fields every view of a campaign starts with."""
        return {
            "id": self.id,
            "kind": str(self.kind),
            "name": self.name,
            "state": state,
            "starts_at": iso(self.starts_at_ms),
            "ends_at": iso(self.ends_at_ms),
        }


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """What operators and time did to a campaign since its creation, kept beside its
    immutable definition: paused, ended early (``ends_at_ms`` moved to the end), closed
    out (its leftovers returned, once it ended)."""

    paused: bool = False
    ends_at_ms: int | None = None
    closed: bool = False

    def ended(self, now: int, campaign: Campaign[Any]) -> bool:
        """Whether ``campaign`` has ended by ``now``: closed out, or past its end."""
        ends = campaign.closes_ms if self.ends_at_ms is None else self.ends_at_ms
        return self.closed or now >= min(ends, campaign.closes_ms)


# A campaign no operator has touched.
ACTIVE = Lifecycle()


def new_campaign_id() -> str:
    """A random campaign id, safe inside a Redis hash tag."""
    return secrets.token_hex(8)


def now_ms() -> int:
    """Wall-clock unix milliseconds."""
    return time.time_ns() // 1_000_000


def to_datetime(ms: int) -> datetime:
    """The UTC datetime of a unix-millisecond time, exact to the millisecond."""
    return _EPOCH + ms * _MS


def optional_datetime(ms: int | None) -> datetime | None:
    """``to_datetime``, passing None through."""
    return None if ms is None else to_datetime(ms)


def from_datetime(moment: datetime) -> int:
    """Unix milliseconds of an aware datetime (truncated to the millisecond)."""
    return (moment - _EPOCH) // _MS


def optional_ms(moment: datetime | None) -> int | None:
    """``from_datetime``, passing None through."""
    return None if moment is None else from_datetime(moment)


def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC to the millisecond (``2027-02-10T16:00:00.000Z``), as every time
    the service records (a grant, a draw, a row's creation) is written: one fixed width,
    so that a list of them sorts as strings the way it sorts as times."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def recorded_at(ms: int) -> str:
    """``rfc3339`` of a unix-millisecond time the service recorded."""
    return rfc3339(to_datetime(ms))


def iso(ms: int | None) -> str | None:
    """RFC 3339 (UTC, ``Z``) of a time an operator gave (a campaign's window), None for
    None: to the second when it is a whole second, as operators write them."""
    if ms is None:
        return None
    return to_datetime(ms).isoformat().replace("+00:00", "Z")


def shanghai_day(ms: int) -> int:
    """The calendar day (YYYYMMDD) of a unix-millisecond time in Asia/Shanghai."""
    moment = datetime.fromtimestamp(ms // 1000, SHANGHAI)
    return moment.year * 10_000 + moment.month * 100 + moment.day


def day_date(day: int) -> date:
    """The date of a YYYYMMDD day number; ValueError if it is no date."""
    return date(day // 10_000, day // 100 % 100, day % 100)
