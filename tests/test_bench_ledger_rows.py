"""bench/ledger_rows.py runs on its own PostgreSQL and reports every schema variant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_every_variant_is_measured_against_the_shipped_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.ledger_rows", "--rows", "5000", "--rounds", "1"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    rows = {
        cells[0]: (float(cells[1]), float(cells[2]))
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| schema")
        for cells in ([c.strip() for c in line.strip("|").split("|")],)
    }
    assert set(rows) == {
        "as shipped",
        "no foreign key to envelopes",
        "no payout row (outbox trigger)",
        "neither",
    }
    assert all(cpu > 0 for cpu, _ in rows.values())
    # The foreign key and the payout row are work: without both, a grant costs less.
    assert rows["neither"][0] < rows["as shipped"][0]
