"""The markdown report of a bench: the throughput table, the figures, the CPU table."""

from __future__ import annotations

import operator
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from bench.measure import Result
from bench.rounds import ALWAYS, EARLY, ENDED, GRAB, OPENRESTY, SOLD, WON_AGAIN, Measured, Pair
from bench.stack import DRAIN_NICE

CPU_COLUMNS = ("app", "floor", "drainer", "HAProxy", "Redis", "PostgreSQL", "OpenResty", "wrk")
FLOOR = "floor (minimal aiohttp handler)"


@dataclass(frozen=True)
class Setup:
    """How the bench ran, for the report's first line."""

    workers: int
    connections: int
    seconds: int
    rounds: int
    players: int
    drain: str
    # The Debian packages of the OpenResty comparison, if it ran.
    openresty: str = ""


def median_rps(pairs: list[Pair]) -> float:
    """Median req/s of the path runs of ``pairs``."""
    return statistics.median(p.rps for _, p in pairs)


def paired_ratio(runs: list[Result], others: list[Result]) -> float:
    """The median over rounds of each run's req/s over its paired run's."""
    return statistics.median(r.rps / o.rps for r, o in zip(runs, others, strict=True))


def summary(name: str, runs: list[Result], floors: list[Result] | None) -> str:
    """One table row: medians over rounds; the ratio is the median of paired ratios."""
    ratio = "—" if floors is None else f"{paired_ratio(runs, floors):.2f}"
    return (
        f"| {name} | {statistics.median(r.rps for r in runs):,.0f} "
        f"| {statistics.median(r.p50_ms for r in runs):.2f} "
        f"| {statistics.median(r.p99_ms for r in runs):.2f} | {ratio} "
        f"| {sum(r.errors for r in runs)} |"
    )


def cpu_per_request(runs: list[Result]) -> list[float]:
    """Mean CPU µs per request of each component (CPU_COLUMNS) over ``runs``."""
    requests = sum(r.requests for r in runs) or 1
    return [sum(r.cpu_s.get(c, 0.0) for r in runs) * 1e6 / requests for c in CPU_COLUMNS]


def cpu_row(name: str, runs: list[Result], floors: list[Result] | None, server: str = "app") -> str:
    """CPU µs per request by component, the total, and the floor's total over it: the
    throughput ratio the machine allows when CPU is what runs out (less noisy than
    req/s of 5-second runs on a shared machine); then the ``server``'s CPU per request
    over the floor worker's."""
    per = cpu_per_request(runs)
    ratio, worker = "—", "—"
    if floors is not None:
        floor = cpu_per_request(floors)
        ratio = f"{sum(floor) / sum(per):.2f}"
        worker = f"{server_over_floor(per, floor, server):.2f}"
    cells = " | ".join(f"{max(v, 0.0):.0f}" for v in per)
    return f"| {name} | {cells} | {sum(per):.0f} | {ratio} | {worker} |"


def server_over_floor(per: list[float], floor: list[float], server: str) -> float:
    """The ``server``'s column of ``per`` over the floor workers' column of ``floor``
    (both as cpu_per_request gives them)."""
    return per[CPU_COLUMNS.index(server)] / floor[CPU_COLUMNS.index("floor")]


def worker_ratio(runs: list[Result], floors: list[Result]) -> float:
    """The app workers' CPU per request over the floor workers', over all rounds."""
    return server_over_floor(cpu_per_request(runs), cpu_per_request(floors), "app")


def throughput(setup: Setup, measured: Measured, floors: list[Result]) -> list[str]:
    """The heading line and the req/s table."""
    return [
        f"{setup.workers} app workers and {setup.workers} floor workers, each set behind "
        "HAProxy (haproxy/haproxy.cfg, rate limits lifted); "
        f"wrk -t2 -c{setup.connections} -d{setup.seconds}s per run, {setup.rounds} rounds; "
        f"{setup.players:,} players; {os.cpu_count()} cores shared by everything",
        "",
        "| path | req/s | p50 ms | p99 ms | ratio to floor | errors |",
        "|---|---:|---:|---:|---:|---:|",
        summary(FLOOR, floors, None),
        *(
            summary(name, [p for _, p in pairs], [f for f, _ in pairs])
            for name, pairs in measured.pairs.items()
        ),
        *(
            [summary(OPENRESTY, [o for _, o in measured.openresty], grab_floors(measured))]
            if measured.openresty
            else []
        ),
        "",
    ]


def grab_floors(measured: Measured) -> list[Result]:
    """The floor runs before the grab runs the OpenResty runs followed."""
    return [floor for (floor, _), _ in measured.openresty]


def openresty(setup: Setup, measured: Measured) -> list[str]:
    """Our grab path against the OpenResty comparison of the same rounds."""
    if not measured.openresty:
        return []
    ours = [grab for (_, grab), _ in measured.openresty]
    theirs = [o for _, o in measured.openresty]
    rps = paired_ratio(ours, theirs)
    our_cpu, their_cpu = cpu_per_request(ours), cpu_per_request(theirs)
    server = CPU_COLUMNS.index("app"), CPU_COLUMNS.index("OpenResty")
    requests = sum(o.requests for o in theirs) or 1
    return [
        "",
        "OpenResty comparison (bench/openresty/: 2 nginx workers with ngx_lua, an HMAC-SHA1",
        "cookie checked per request, one EVALSHA of lua/grab_envelope.lua per grab over",
        "keepalive Redis connections; the same Redis, players and wrk script; no HAProxy, no",
        "ledger drain), run right after our grab run in each round, on a fresh campaign;",
        f"{setup.openresty}:",
        "",
        "| grab path | grabs/s | p50 ms | p99 ms | server CPU µs/grab | total CPU µs/grab |",
        "|---|---:|---:|---:|---:|---:|",
        comparison_row("ours (HAProxy + app workers)", ours, our_cpu[server[0]], sum(our_cpu)),
        comparison_row("OpenResty", theirs, their_cpu[server[1]], sum(their_cpu)),
        "",
        f"our grab path / OpenResty: grabs/s {rps:.2f} (median of paired rounds); "
        f"CPU per grab {sum(our_cpu) / sum(their_cpu):.2f} times OpenResty's "
        f"(its server alone: {our_cpu[server[0]] / their_cpu[server[1]]:.2f} times)",
        f"OpenResty: {measured.openresty_calls / requests:.3f} script calls per grab; "
        "winners = ledger entries = envelopes taken = grabs answered, nobody twice, "
        "in every run: " + ("yes" if measured.openresty_settled else "**NO**"),
    ]


def comparison_row(name: str, runs: list[Result], server_us: float, total_us: float) -> str:
    """One row of the OpenResty comparison: medians over rounds, CPU over all of them."""
    return (
        f"| {name} | {statistics.median(r.rps for r in runs):,.0f} "
        f"| {statistics.median(r.p50_ms for r in runs):.2f} "
        f"| {statistics.median(r.p99_ms for r in runs):.2f} "
        f"| {server_us:.0f} | {total_us:.0f} |"
    )


def figures(setup: Setup, measured: Measured, ledger_ok: bool) -> list[str]:
    """Script calls per grab, the cost of durability, the ledger's catch-up and check."""
    lines = []
    pairs = measured.pairs
    if GRAB in pairs:
        lines.append(
            f"grab runs: {measured.grab_requests:,} requests, {measured.won:,} envelopes won, "
            f"{measured.grab_calls:,} script calls: "
            f"{measured.grab_calls / max(measured.grab_requests, 1):.3f} script calls per grab"
        )
    if GRAB in pairs and ALWAYS in pairs:
        ratio = median_rps(pairs[ALWAYS]) / median_rps(pairs[GRAB])
        lines.append(f"durability: appendfsync always / everysec = {ratio:.2f}")
    drainer = (
        f"one drainer process at nice {DRAIN_NICE}"
        if setup.drain == "process"
        else "a drainer in each worker"
    )
    for name, caught in measured.catch_ups.items():
        lines.append(
            f"ledger ({drainer}), {name}: at most {max(n for n, _ in caught):,} entries "
            f"not yet in PostgreSQL when a run ended, all in within "
            f"{max(t for _, t in caught):.1f} s"
        )
    if measured.catch_ups:
        lines.append(
            "PostgreSQL grants = Redis winners for every grab campaign: "
            + ("yes" if ledger_ok else "**NO**")
        )
    return lines


def cpu_table(measured: Measured, floors: list[Result]) -> list[str]:
    """CPU per request by component, path by path."""
    return [
        "",
        "CPU per request in µs, by component (all rounds; the machine's CPU is the sum), the",
        "floor's total over the path's (the ratio when CPU is what runs out), and the",
        "server's CPU per request (app workers; nginx for OpenResty) over the floor workers':",
        "",
        "| path | " + " | ".join(CPU_COLUMNS) + " | total | CPU ratio | worker / floor |",
        "|---|" + "---:|" * (len(CPU_COLUMNS) + 3),
        cpu_row(FLOOR, floors, None),
        *(
            cpu_row(name, [p for _, p in pairs], [f for f, _ in pairs])
            for name, pairs in measured.pairs.items()
        ),
        *(
            [
                cpu_row(
                    OPENRESTY,
                    [o for _, o in measured.openresty],
                    grab_floors(measured),
                    "OpenResty",
                )
            ]
            if measured.openresty
            else []
        ),
    ]


def median_p99(runs: list[Result], floors: list[Result]) -> float:
    """The median p99 in ms of ``runs`` (their floors play no part)."""
    return statistics.median(r.p99_ms for r in runs)


class Target(NamedTuple):
    """One of issue 17's targets: ``measure(runs, floors)`` of ``path`` against ``bound``."""

    what: str
    path: str
    measure: Callable[[list[Result], list[Result]], float]
    met: Callable[[float, float], bool]
    bound: float


TARGETS = (
    Target("grab >= 0.7 of the floor", GRAB, paired_ratio, operator.ge, 0.7),
    Target("sold out >= 0.9 of the floor", SOLD, paired_ratio, operator.ge, 0.9),
    Target("already won >= 0.9 of the floor", WON_AGAIN, paired_ratio, operator.ge, 0.9),
    Target("ended >= 0.9 of the floor", ENDED, paired_ratio, operator.ge, 0.9),
    Target("not started >= 0.9 of the floor", EARLY, paired_ratio, operator.ge, 0.9),
    Target(
        "worker CPU, sold out <= 1.25x the floor worker's", SOLD, worker_ratio, operator.le, 1.25
    ),
    Target(
        "worker CPU, winning grab <= 1.6x the floor worker's", GRAB, worker_ratio, operator.le, 1.6
    ),
    Target("grab p99 < 25 ms at the measured peak", GRAB, median_p99, operator.lt, 25.0),
)
OPENRESTY_TARGET = "grab >= 1.0x OpenResty's grabs/s"
CALLS_TARGET = "script calls per grab <= 0.2"


def target_row(
    what: str, value: float, met: Callable[[float, float], bool], bound: float, places: int = 2
) -> str:
    """One row of the targets table: the value as printed (to ``places``) is what is
    judged, so a row never reads "1.25" beside "no" under a bound of 1.25."""
    shown = round(value, places)
    return f"| {what} | {shown:.{places}f} | {'yes' if met(shown, bound) else '**no**'} |"


def targets(measured: Measured) -> list[str]:
    """Every target of issue 17 whose paths ran, with its measured value, met or not."""
    rows = []
    for target in TARGETS:
        pairs = measured.pairs.get(target.path)
        if pairs:
            value = target.measure([r for _, r in pairs], [f for f, _ in pairs])
            rows.append(target_row(target.what, value, target.met, target.bound))
    if measured.openresty:
        ours = [grab for (_, grab), _ in measured.openresty]
        ratio = paired_ratio(ours, [o for _, o in measured.openresty])
        rows.append(target_row(OPENRESTY_TARGET, ratio, operator.ge, 1.0))
    if GRAB in measured.pairs:
        calls = measured.grab_calls / max(measured.grab_requests, 1)
        rows.append(target_row(CALLS_TARGET, calls, operator.le, 0.2, places=3))
    if not rows:
        return []
    return ["", "Targets (issue 17):", "", "| target | measured | met? |", "|---|---:|---|", *rows]


def render(setup: Setup, measured: Measured, ledger_ok: bool) -> str:
    """The whole report."""
    floors = [f for pairs in measured.pairs.values() for f, _ in pairs]
    return "\n".join(
        [
            *throughput(setup, measured, floors),
            *figures(setup, measured, ledger_ok),
            *cpu_table(measured, floors),
            *openresty(setup, measured),
            *targets(measured),
        ]
    )
