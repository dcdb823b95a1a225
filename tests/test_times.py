"""Every time the service records (a grant, a draw, a row's creation) is written RFC 3339
in UTC to the millisecond, one fixed width, so that the strings sort as the times do (a
grant on a whole second once came out as ``…:53Z``, which sorts after ``…:53.012Z``).
A time an operator gave (a campaign's window) is echoed to the second."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta, timezone

from app.model import iso, recorded_at, rfc3339

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_recorded_times_are_fixed_width_to_the_millisecond() -> None:
    assert recorded_at(1_802_145_600_000) == "2027-02-09T04:00:00.000Z"
    assert recorded_at(1_802_145_600_012) == "2027-02-09T04:00:00.012Z"


def test_an_operators_whole_second_is_echoed_as_written() -> None:
    assert iso(1_802_145_600_000) == "2027-02-09T04:00:00Z"
    assert iso(None) is None


def test_strings_sort_as_the_times() -> None:
    rng = random.Random(17)
    moments = [1_802_145_600_000 + rng.randrange(0, 5_000) for _ in range(500)]
    moments += [1_802_145_600_000, 1_802_145_601_000, 1_802_145_602_000]
    written = [recorded_at(ms) for ms in moments]
    assert all(TIME.fullmatch(w) for w in written)
    assert sorted(written) == [recorded_at(ms) for ms in sorted(moments)]


def test_datetimes_from_postgresql_are_written_alike() -> None:
    # asyncpg hands back microseconds and, with a session time zone, any offset.
    shanghai = timezone(timedelta(hours=8))
    assert rfc3339(datetime(2027, 2, 9, 12, 0, 0, 123_456, shanghai)) == "2027-02-09T04:00:00.123Z"
    assert rfc3339(datetime(2027, 2, 9, 4, 0, 0, tzinfo=UTC)) == "2027-02-09T04:00:00.000Z"
