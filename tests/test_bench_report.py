"""The bench report's targets table: each of issue 17's targets, its value, met or not."""

from __future__ import annotations

from bench.measure import Result
from bench.report import targets
from bench.rounds import GRAB, SOLD, Measured


def run(rps: float, p99_ms: float = 10.0, **cpu_s: float) -> Result:
    """A wrk run of 1,000 requests: ``rps`` req/s, CPU seconds by component."""
    return Result("run", rps, 1.0, p99_ms, 0, 1000, dict(cpu_s))


def rows(measured: Measured) -> dict[str, tuple[str, str]]:
    """The targets table as {target: (measured, met)}."""
    table = {}
    for line in targets(measured):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("target", "---"):
            table[cells[0]] = (cells[1], cells[2])
    return table


def test_every_target_of_the_paths_run_is_reported_against_its_bound() -> None:
    floor = run(10_000, floor=0.1)  # 100 µs of floor-worker CPU per request
    measured = Measured(
        pairs={
            # Ratios 0.5, 0.6, 0.65 (median 0.6); app CPU 180 µs per request: 1.8x.
            GRAB: [
                (floor, run(5_000, 30.0, app=0.18)),
                (floor, run(6_000, 20.0, app=0.18)),
                (floor, run(6_500, 25.0, app=0.18)),
            ],
            # Ratio 0.95; 110 µs: 1.1x.
            SOLD: [(floor, run(9_500, app=0.11))],
        },
        grab_calls=150,
        grab_requests=1000,
        openresty=[((floor, run(6_000)), run(12_000))],
    )
    assert rows(measured) == {
        "grab >= 0.7 of the floor": ("0.60", "**no**"),
        "sold out >= 0.9 of the floor": ("0.95", "yes"),
        "worker CPU, sold out <= 1.25x the floor worker's": ("1.10", "yes"),
        "worker CPU, winning grab <= 1.6x the floor worker's": ("1.80", "**no**"),
        # The median p99 is 25 ms: not below 25.
        "grab p99 < 25 ms at the measured peak": ("25.00", "**no**"),
        "grab >= 1.0x OpenResty's grabs/s": ("0.50", "**no**"),
        "script calls per grab <= 0.2": ("0.150", "yes"),
    }


def test_a_value_printed_at_its_bound_is_judged_as_printed() -> None:
    # Three rounds of 80 µs of floor-worker CPU and 100 µs of app CPU per request: the
    # ratio computes to 1.2500000000000002 in floating point, and reads 1.25.
    floor = run(10_000, floor=0.08)
    measured = Measured(pairs={SOLD: [(floor, run(9_000, app=0.1))] * 3})
    assert rows(measured)["worker CPU, sold out <= 1.25x the floor worker's"] == ("1.25", "yes")


def test_no_paths_no_targets() -> None:
    assert targets(Measured()) == []
