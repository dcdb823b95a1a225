"""The command line as an operator meets it: create-campaign from a definition of any
kind (the stores checked afterwards), its refusals in the command's own terms, --help
on every command and flag, and tables that line up CJK names."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import wcwidth
from redis.asyncio import Redis

from app.__main__ import build_parser
from app.records import Envelope
from app.reports import table
from app.store.scripts import CampaignKeys
from bench import drain as bench_drain
from bench import run as bench_run

ROOT = Path(__file__).resolve().parent.parent
RED_PACKET = {"kind": "red_packet", "name": "新春红包", "total_fen": 1_234_567, "count": 50_000}
LOTTERY = {
    "kind": "lottery",
    "name": "财神到",
    "tiers": [
        {"name": "一等奖 iPhone", "stock": 3, "weight": 1, "value_fen": 599_900},
        {"name": "福", "stock": 100, "weight": 50, "value_fen": 888},
    ],
    "no_prize_weight": 949,
}


def hb(*argv: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Any:
    """``python -m app *argv`` (what ./hb runs), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "app", *argv],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def one_line(result: Any) -> str:
    """The single line a refused command printed: exit code 2, nothing on stdout."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return str(lines[0])


@pytest.fixture
def env(redis_url: str, database_url: str, clean: None) -> dict[str, str]:
    """The environment of a CLI run against the (emptied) test stores."""
    return dict(os.environ, REDIS_URL=redis_url, DATABASE_URL=database_url)


async def nothing_created(redis_url: str, database_url: str) -> None:
    """No campaign in either store."""
    redis = Redis.from_url(redis_url)
    try:
        assert [k for k in await redis.keys("hb:{*") if b"}:" in k] == []
        assert await redis.scard("hb:campaigns") == 0
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(database_url)
    try:
        # A command refused before it touched PostgreSQL has not even migrated it.
        if await conn.fetchval("SELECT to_regclass('campaigns')") is not None:
            assert await conn.fetchval("SELECT count(*) FROM campaigns") == 0
    finally:
        await conn.close()


def bar(stderr: str, phase: str) -> str:
    """The final line of ``phase``'s progress bar."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"{phase} ")]
    assert len(lines) == 1, stderr
    return lines[0]


async def test_create_from_file_red_packet(
    env: dict[str, str], redis_url: str, database_url: str, tmp_path: Path
) -> None:
    definition = tmp_path / "definition.json"
    definition.write_bytes(orjson.dumps(RED_PACKET))
    done = hb("create-campaign", "--file", str(definition), env=env)
    assert done.returncode == 0, done.stderr
    # Each phase has its bar, in order, at 100% (rich prints the final state off a TTY).
    lines = done.stderr.splitlines()
    assert [line.split()[0] for line in lines] == ["split", "PostgreSQL", "Redis"]
    for phase in ("split", "PostgreSQL", "Redis"):
        assert "50,000/50,000 (100%)" in bar(done.stderr, phase)
    stats = orjson.loads(done.stdout)
    assert (stats["kind"], stats["name"], stats["state"]) == ("red_packet", "新春红包", "open")
    assert (stats["remaining_count"], stats["remaining_fen"]) == (50_000, 1_234_567)

    redis = Redis.from_url(redis_url)
    try:
        keys = CampaignKeys.of(stats["id"])
        pool = [Envelope.decode(raw) for raw in await redis.lrange(keys.pool, 0, -1)]
        assert await redis.hget(keys.meta, "total_fen") == b"1234567"
        assert await redis.sismember("hb:campaigns", stats["id"])
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT seq, amount_fen FROM envelopes WHERE campaign_id = $1", stats["id"]
        )
        kind = await conn.fetchval("SELECT kind FROM campaigns WHERE id = $1", stats["id"])
    finally:
        await conn.close()
    # Both stores hold the same 50,000 envelopes, summing to the budget.
    assert len(pool) == len(rows) == 50_000
    assert sum(e.amount_fen for e in pool) == 1_234_567
    assert {(e.seq, e.amount_fen) for e in pool} == {(r["seq"], r["amount_fen"]) for r in rows}
    assert kind == "red_packet"


async def test_create_from_stdin_lottery(
    env: dict[str, str], redis_url: str, database_url: str
) -> None:
    done = hb("create-campaign", "--file", "-", env=env, stdin=orjson.dumps(LOTTERY).decode())
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stderr.splitlines()] == ["PostgreSQL", "Redis"]
    for phase in ("PostgreSQL", "Redis"):
        assert "2/2 (100%)" in bar(done.stderr, phase)
    stats = orjson.loads(done.stdout)
    assert (stats["kind"], stats["name"]) == ("lottery", "财神到")
    assert [(t["name"], t["stock"], t["left"]) for t in stats["tiers"]] == [
        ("一等奖 iPhone", 3, 3),
        ("福", 100, 100),
    ]
    redis = Redis.from_url(redis_url)
    try:
        tiers = await redis.hgetall(CampaignKeys.of(stats["id"]).tiers)
    finally:
        await redis.aclose()
    assert (tiers[b"stock:0"], tiers[b"stock:1"], tiers[b"won:0"]) == (b"3", b"100", b"0")
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT kind, config FROM campaigns WHERE id = $1", stats["id"])
    finally:
        await conn.close()
    assert row is not None
    assert row["kind"] == "lottery"
    recorded = orjson.loads(row["config"])
    assert [t["stock"] for t in recorded["tiers"]] == [3, 100]


async def test_create_fixed_split_from_flags(
    env: dict[str, str], redis_url: str, database_url: str
) -> None:
    argv = ["--name", "普通红包", "--total-fen", "1200", "--count", "300", "--split", "fixed"]
    done = hb("create-campaign", *argv, env=env)
    assert done.returncode == 0, done.stderr
    assert "300/300 (100%)" in bar(done.stderr, "Redis")
    stats = orjson.loads(done.stdout)
    assert (stats["split"], stats["count"], stats["total_fen"]) == ("fixed", 300, 1200)
    redis = Redis.from_url(redis_url)
    try:
        pool = await redis.lrange(CampaignKeys.of(stats["id"]).pool, 0, -1)
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(database_url)
    try:
        amounts = await conn.fetch(
            "SELECT amount_fen FROM envelopes WHERE campaign_id = $1", stats["id"]
        )
    finally:
        await conn.close()
    assert [Envelope.decode(raw).amount_fen for raw in pool] == [4] * 300
    assert [r["amount_fen"] for r in amounts] == [4] * 300


def _with(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**base, **fields}


@pytest.mark.parametrize(
    ("definition", "says"),
    [
        (_with(RED_PACKET, count=0), "field count: must be ≥ 1"),
        (_with(RED_PACKET, count="ten"), "field count: must be an integer, not a string"),
        (_with(RED_PACKET, total_fen=10), "field total_fen must be at least count * min_fen"),
        ({"kind": "red_packet", "count": 1, "total_fen": 1}, "field name: is required"),
        (_with(RED_PACKET, budget=1), "field budget: is not a known field"),
        (_with(RED_PACKET, kind="coupon"), "field kind must be one of 'red_packet', 'lottery'"),
        (
            _with(LOTTERY, tiers=[{"name": "福", "stock": "3", "weight": 1}]),
            "field tiers[0].stock: must be an integer, not a string",
        ),
        (_with(LOTTERY, tiers=[]), "field tiers: must have at least 1 item"),
    ],
    ids=["count", "type", "sum", "missing", "unknown", "kind", "tier", "no-tiers"],
)
async def test_a_bad_field_is_named_in_one_line(
    env: dict[str, str],
    redis_url: str,
    database_url: str,
    tmp_path: Path,
    definition: dict[str, Any],
    says: str,
) -> None:
    path = tmp_path / "definition.json"
    path.write_bytes(orjson.dumps(definition))
    assert one_line(hb("create-campaign", "--file", str(path), env=env)) == (
        f"hb create-campaign: {path}: {says}"
    )
    assert one_line(
        hb("create-campaign", "--file", "-", env=env, stdin=orjson.dumps(definition).decode())
    ) == (f"hb create-campaign: stdin: {says}")
    await nothing_created(redis_url, database_url)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["--name", "x", "--total-fen", "5", "--count", "10"],
            "--total-fen must be at least --count * --min-fen",
        ),
        (["--name", "x", "--total-fen", "500", "--count", "10", "--min-fen", "0"], "--min-fen: "),
        (["--name", "x", "--total-fen", "5", "--count", "0"], "argument --count: "),
        (
            ["--name", "x", "--total-fen", "10", "--count", "3", "--split", "fixed"],
            "--split: a fixed --split needs --total-fen to be a multiple of --count",
        ),
        (["--name", "x", "--total-fen", "500", "--count", "5", "--ends-at", "soon"], "--ends-at: "),
        (["--file", "{file}", "--count", "3"], "--file holds the whole definition: drop --count"),
        (["--name", "x", "--count", "3"], "give --file, or a red packet's --total-fen"),
        ([], "give --file, or a red packet's --name, --total-fen, --count"),
    ],
    ids=["sum", "min", "count", "split", "time", "both", "missing", "nothing"],
)
async def test_a_bad_flag_is_named_in_one_line(
    env: dict[str, str],
    redis_url: str,
    database_url: str,
    tmp_path: Path,
    argv: list[str],
    says: str,
) -> None:
    path = tmp_path / "definition.json"
    path.write_bytes(orjson.dumps(RED_PACKET))
    line = one_line(hb("create-campaign", *[a.replace("{file}", str(path)) for a in argv], env=env))
    assert line.startswith(f"hb create-campaign: {says}"), line
    await nothing_created(redis_url, database_url)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'{"kind": "red_packet",', "not valid JSON (unexpected end of data: line 1 column 23"),
        (b"\xff\xfe{}", "not valid JSON ("),
        (b"[1, 2]", "must hold one JSON object, a campaign definition"),
        (b"", "not valid JSON ("),
    ],
    ids=["cut", "not-utf8", "array", "empty"],
)
def test_bad_json_gets_one_line(
    env: dict[str, str], tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "definition.json"
    path.write_bytes(content)
    line = one_line(hb("create-campaign", "--file", str(path), env=env))
    assert line.startswith(f"hb create-campaign: {path}: {says}"), line


def test_an_unreadable_file_gets_one_line(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    assert one_line(hb("create-campaign", "--file", str(missing), env=env)) == (
        f"hb create-campaign: {missing}: cannot read it (No such file or directory)"
    )
    assert one_line(hb("create-campaign", "--file", str(tmp_path), env=env)) == (
        f"hb create-campaign: {tmp_path}: cannot read it (Is a directory)"
    )


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Every command and flag under ``parser`` that has no help, by its path."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not helped.get(name):
                    missing.append(f"{path} {name}")
                missing.extend(_walk(sub, f"{path} {name}"))
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_command_and_flag_has_help() -> None:
    parser = build_parser()
    assert _walk(parser, "hb") == []
    # ./hb bench and ./hb bench-drain parse their own flags.
    assert _walk(bench_run.parser(), "hb bench") == []
    assert _walk(bench_drain.parser(), "hb bench-drain") == []
    # `hb <command> --help` renders for every command (a stray % in a help text breaks it).
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in commands.choices.values():
        assert sub.format_help()


def test_help_lists_every_command_with_a_line() -> None:
    shown = hb("--help")
    assert shown.returncode == 0, shown.stderr
    listed = dict(
        re.findall(r"^ {4}(\S+) +(\S.*)$", shown.stdout.split("commands:")[1], re.MULTILINE)
    )
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(listed) == set(commands.choices)
    # The ./hb script's own commands (its case arms) are listed too.
    arms = re.findall(r"^ {2}([\w|-]+)\)", (ROOT / "hb").read_text(), re.MULTILINE)
    own = {name for arm in arms for name in arm.split("|")} - {"help", "-h", "--help"}
    wrapper = shown.stdout.split("./hb itself also runs:")[1]
    for name in own - set(commands.choices):
        assert re.search(rf"^  {re.escape(name)}\b.* \S", wrapper, re.MULTILINE), name


def _columns(line: str, cells: list[str]) -> list[tuple[int, int]]:
    """Where (first and last display column) each of ``cells`` sits in ``line``."""
    spans, at = [], 0
    for cell in cells:
        start = line.index(cell, at)
        spans.append((wcwidth.width(line[:start]), wcwidth.width(line[: start + len(cell)])))
        at = start + len(cell)
    return spans


def test_table_lines_up_cjk_by_display_width() -> None:
    rows = [
        ("红包雨", 3, "管理员", None),
        ("ops", 12_345, "viewer", "2026-01-28"),
        ("É́mile 😀", 7, "财务", "2026-02-10"),
    ]
    text = table(rows, ("name", "tokens", "role", "since"), indent="  ")
    lines = text.splitlines()
    assert len(lines) == 4
    assert len({wcwidth.width(line) for line in lines}) == 1, text
    cells = [["name", "tokens", "role", "since"]] + [
        ["-" if c is None else str(c) for c in row] for row in rows
    ]
    spans = [_columns(line, row) for line, row in zip(lines, cells, strict=True)]
    # Text columns start together; the number column ends together (right-aligned).
    for column in (0, 2, 3):
        assert len({s[column][0] for s in spans}) == 1, text
    assert len({s[1][1] for s in spans}) == 1, text


async def test_reconcile_lines_up_cjk_tier_names(env: dict[str, str]) -> None:
    tiers = [
        {"name": "一等奖 iPhone 16 Pro Max 256G", "stock": 3, "weight": 1},
        {"name": "福", "stock": 100, "weight": 50},
        {"name": "lucky", "stock": 20, "weight": 5},
    ]
    created = hb(
        "create-campaign",
        "--file",
        "-",
        env=env,
        stdin=orjson.dumps(_with(LOTTERY, tiers=tiers, no_prize_weight=10)).decode(),
    )
    assert created.returncode == 0, created.stderr
    report = hb("reconcile", orjson.loads(created.stdout)["id"], env=env)
    assert report.returncode == 0, report.stdout + report.stderr
    lines = report.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("tier ")))
    rows = [lines[header], *lines[header + 1 : header + 4]]
    # The stock, won and recorded columns end at the same display column on every row.
    assert len({wcwidth.width(line) for line in rows}) == 1, "\n".join(rows)
    ends = [[m.end() for m in re.finditer(r"\S+", line)][-3:] for line in rows[1:]]
    widths = {
        tuple(wcwidth.width(line[:e]) for e in row)
        for line, row in zip(rows[1:], ends, strict=True)
    }
    assert len(widths) == 1, "\n".join(rows)
