"""Reconcile payouts: every cash grant has exactly one bill, nothing is paid that was not
won, and WeChat Pay's answer to a query agrees with the state we hold."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.payout.client import Refused, Unclear, WeChatPayClient
from app.reports import MAX_LISTED, Totals, conclusion
from app.store import payouts
from app.store.payouts import FINAL, STATES, Bill

_LISTS = (
    ("pending", lambda b: not b.final),
    ("failed", lambda b: b.state == "FAIL"),
    ("cancelled", lambda b: b.state == "CANCELLED"),
)


@dataclass
class PayoutReport:
    """What reconcile found for one campaign's payouts."""

    campaign_id: str
    grants: Totals = Totals()
    bills: Totals = Totals()
    by_state: dict[str, Totals] = field(default_factory=dict)
    queried: int = 0
    in_flight: int = 0
    listed: dict[str, list[Bill]] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    wechat: bool = False

    @property
    def ok(self) -> bool:
        """True when nothing disagrees."""
        return not self.mismatches

    def render(self) -> str:
        """A readable report."""
        lines = [
            f"payouts of campaign {self.campaign_id}",
            f"{'':26}{'count':>10}{'fen':>16}",
            f"{'cash grants':26}{self.grants.count:>10}{self.grants.fen:>16}",
            f"{'bills':26}{self.bills.count:>10}{self.bills.fen:>16}",
            *(
                f"{'  ' + state:26}{t.count:>10}{t.fen:>16}"
                for state in STATES
                if (t := self.by_state.get(state)) is not None
            ),
        ]
        if self.wechat:
            lines.append(
                f"WeChat Pay queried for {self.queried} bills: "
                f"{self.in_flight} still moving (not mismatches)"
            )
        else:
            lines.append("WeChat Pay not queried (payouts not configured here)")
        for name, bills in self.listed.items():
            lines.append(f"{name} bills: {len(bills)}")
            lines.extend(
                f"  {b.out_bill_no}  {b.state:<17} {b.amount_fen:>10} fen  {b.openid}"
                + (f"  ({b.fail_reason})" if b.fail_reason else "")
                for b in bills[:MAX_LISTED]
            )
            if len(bills) > MAX_LISTED:
                lines.append(f"  ... and {len(bills) - MAX_LISTED} more")
        lines.extend(conclusion(self.mismatches))
        return "\n".join(lines)


async def reconcile(
    pg: asyncpg.Pool, campaign_id: str, wechat: WeChatPayClient | None = None
) -> PayoutReport:
    """Check a campaign's payouts against its grants, and against WeChat Pay if given."""
    report = PayoutReport(campaign_id, wechat=wechat is not None)
    mismatches = report.mismatches
    won: dict[str, int] = defaultdict(int)
    grant_fen: list[int] = []
    for r in await payouts.grants_and_payouts(pg, campaign_id):
        if r["g_kind"] is None:
            mismatches.append(
                f"bill {r['out_bill_no']}: pays {r['grant_kind']} {r['grant_no']} of "
                f"{r['openid']} ({r['amount_fen']} fen), which is no grant"
            )
            continue
        won[r["g_openid"]] += r["g_fen"]
        grant_fen.append(r["g_fen"])
        if r["out_bill_no"] is None:
            mismatches.append(
                f"{r['g_kind']} {r['g_no']} of {r['g_openid']} ({r['g_fen']} fen) has no bill"
            )
        elif r["amount_fen"] != r["g_fen"]:
            mismatches.append(
                f"bill {r['out_bill_no']}: {r['amount_fen']} fen for a grant of {r['g_fen']}"
            )
    report.grants = Totals.of(grant_fen)
    bills = await payouts.campaign_bills(pg, campaign_id)
    report.bills = Totals.of(b.amount_fen for b in bills)
    states: dict[str, list[int]] = defaultdict(list)
    paid: dict[str, int] = defaultdict(int)
    for b in bills:
        states[b.state].append(b.amount_fen)
        if b.state == "SUCCESS":
            paid[b.openid] += b.amount_fen
    report.by_state = {s: Totals.of(v) for s, v in states.items()}
    for openid, fen in sorted(paid.items()):
        if fen > won.get(openid, 0):
            mismatches.append(f"player {openid}: paid {fen} fen, won {won.get(openid, 0)}")
    if sum(paid.values()) > report.grants.fen:
        mismatches.append(f"paid {sum(paid.values())} fen in all, won {report.grants.fen}")
    report.listed = {name: [b for b in bills if keep(b)] for name, keep in _LISTS}
    if wechat is not None:
        for b in bills:
            try:
                await _against_wechat(pg, wechat, b, report)
            except _QueryFailed:
                continue
    return report


async def _against_wechat(
    pg: asyncpg.Pool, wechat: WeChatPayClient, bill: Bill, report: PayoutReport
) -> None:
    """Our state of one bill (and of its earlier attempts) against WeChat Pay's."""
    for earlier in bill.previous_bills:
        found = await _query(wechat, earlier, report)
        if found is not None and found.get("state") not in ("FAIL", "CANCELLED"):
            report.mismatches.append(
                f"bill {earlier} (retried as {bill.out_bill_no}) is {found.get('state')} "
                "at WeChat Pay: paid twice?"
            )
    found = await _query(wechat, bill.out_bill_no, report)
    # Re-read ours after the query: a notification may have moved it meanwhile.
    current = await payouts.bill(pg, bill.out_bill_no) or bill
    theirs = None if found is None else found.get("state")
    if theirs is None:
        # Fine for a bill not created yet, or whose create WeChat Pay refused outright.
        if current.transfer_bill_no is not None or current.state not in ("NEW", "FAIL"):
            report.mismatches.append(
                f"bill {current.out_bill_no}: {current.state} here, unknown to WeChat Pay"
            )
        return
    if (found or {}).get("transfer_amount") != current.amount_fen or (found or {}).get(
        "openid"
    ) != current.openid:
        report.mismatches.append(
            f"bill {current.out_bill_no}: WeChat Pay pays another amount or player"
        )
    if theirs == current.state:
        return
    if theirs in FINAL or current.state in FINAL:
        report.mismatches.append(
            f"bill {current.out_bill_no}: {current.state} here, {theirs} at WeChat Pay"
        )
    else:
        report.in_flight += 1


class _QueryFailed(Exception):
    pass


async def _query(
    wechat: WeChatPayClient, out_bill_no: str, report: PayoutReport
) -> dict[str, Any] | None:
    report.queried += 1
    try:
        return await wechat.query(out_bill_no)
    except (Unclear, Refused) as exc:
        report.mismatches.append(f"bill {out_bill_no}: WeChat Pay query failed ({exc})")
        raise _QueryFailed from None
