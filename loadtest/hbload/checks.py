"""The invariants checked when a test stops: what players heard against the service's
own records (operator stats, players' /me, and with --hb-reconcile the ledger)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hbload.book import Book
from hbload.service import Service, reconcile


@dataclass(frozen=True)
class Check:
    """One test's campaigns and how strictly to compare."""

    campaign: str
    lottery: str
    check_players: int
    reconcile: bool


def red_packet_problems(service: Service, book: Book, campaign: str) -> list[str]:
    """Red-packet invariants; exact when every grab that could win was answered."""
    stats = service.drained_stats(campaign)
    problems = []
    told = sum(book.won.values())
    # Players whose response was lost (timeouts) may have won without our knowing,
    # so the operator's totals may exceed what we heard, never the reverse.
    if stats["won_count"] < len(book.won) or stats["won_fen"] < told:
        problems.append(
            f"players were told {len(book.won)} wins / {told} fen, "
            f"service says {stats['won_count']} / {stats['won_fen']}"
        )
    if book.exact("grab") and (stats["won_count"], stats["won_fen"]) != (len(book.won), told):
        problems.append(
            f"no request failed, yet service says {stats['won_count']} wins / "
            f"{stats['won_fen']} fen and players heard {len(book.won)} / {told}"
        )
    if stats["won_fen"] + stats["remaining_fen"] != stats["total_fen"]:
        problems.append(f"won_fen + remaining_fen != total_fen: {stats}")
    if stats["won_count"] + stats["remaining_count"] != stats["count"]:
        problems.append(
            f"won_count {stats['won_count']} + remaining_count {stats['remaining_count']} "
            f"!= count {stats['count']}"
        )
    print(
        f"invariants: {len(book.won)} wins / {told} fen heard by players; service "
        f"won_count={stats['won_count']} won_fen={stats['won_fen']} "
        f"remaining_fen={stats['remaining_fen']} total_fen={stats['total_fen']}; "
        f"{book.failures} failed requests, {book.unanswered['grab']} grabs and "
        f"{book.unanswered['draw']} draws unanswered (stopped players)"
    )
    return problems


def lottery_problems(service: Service, book: Book, lottery: str, check_players: int) -> list[str]:
    """Lottery invariants; exact when every draw was answered."""
    exact = book.exact("draw")
    stats = service.drained_stats(lottery)
    problems = []
    heard = Counter(tier for told in book.prizes.values() for _, tier in told)
    for tier in stats["tiers"]:
        i, won = tier["tier"], tier["won"]
        if won > tier["stock"] or won > tier["released"]:
            problems.append(
                f"tier {i}: {won} won, stock {tier['stock']}, released {tier['released']}"
            )
        if won < heard[i] or (exact and won != heard[i]):
            problems.append(f"tier {i}: players heard {heard[i]} prizes, service says {won}")
    draws = sum(book.draws.values())
    if stats["draws"] < draws or (exact and stats["draws"] != draws):
        problems.append(f"players heard {draws} draws, service says {stats['draws']}")
    for openid in sorted(book.draws)[:check_players]:
        me = service.me(lottery, book.tokens[openid])
        shown = {(p["draw_no"], p["tier"]) for p in me.get("prizes", [])}
        told = book.prizes.get(openid, set())
        if not told <= shown or (exact and shown != told):
            problems.append(f"{openid}: heard prizes {sorted(told)}, /me shows {sorted(shown)}")
    print(
        f"lottery: {draws} draws / {sum(heard.values())} prizes heard by players; service "
        f"draws={stats['draws']} prizes_won={stats['prizes_won']} "
        f"won per tier={[t['won'] for t in stats['tiers']]}"
    )
    return problems


def problems(service: Service, book: Book, check: Check) -> list[str]:
    """Every violated invariant of a stopped test."""
    found = list(book.problems)
    found += red_packet_problems(service, book, check.campaign)
    if check.lottery:
        found += lottery_problems(service, book, check.lottery, check.check_players)
    if check.reconcile:
        found += reconcile(check.campaign)
        if check.lottery:
            found += reconcile(check.lottery)
    return found
