"""``./hb bench --redis-cluster 3`` end to end in its smallest form: a real cluster, both
worker sets, sharded campaigns created through the operator API, wrk at each
configuration; the report has every configuration's row with every master's figures,
K = 3 spreads the grabs over the three masters where K = 1 puts them on one, and
PostgreSQL holds exactly what the sub-pools counted.

Needs wrk and haproxy (scripts/bench-packages); skipped without them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None or shutil.which("haproxy") is None, reason="no wrk or haproxy"
)


def row(report: str, campaign: str) -> list[str]:
    """The cells of the first table's row of ``campaign``."""
    line = next(li for li in report.splitlines() if li.startswith(f"| {campaign} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@needs_wrk
def test_quick_cluster_bench_spreads_k3_over_every_master() -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.run", "--redis-cluster", "3", "--quick"),
            *("--seconds", "1", "--players", "10000", "--workers", "1", "--connections", "16"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stdout
    assert "PostgreSQL holds exactly the grants the pools counted: yes." in report
    assert "WARNING" not in report, report
    one, spread, waited = (row(report, c) for c in ("K=1, WAIT 0", "K=3, WAIT 0", "K=3, WAIT 1"))
    # grabs/s, then script calls per grab: something was settled, in batches or not.
    for cells in (one, spread, waited):
        assert float(cells[1].replace(",", "")) > 0
        assert 0 < float(cells[3]) <= 1
    # K = 1: every grab on one master; K = 3: every master takes some.
    assert one[4] == "100 %, 0 %, 0 %"
    assert one[7] == "one master"
    for cells in (spread, waited):
        shares = [int(s) for s in re.findall(r"(\d+) %", cells[4])]
        assert len(shares) == 3, cells
        assert min(shares) >= 15, cells
        assert len(cells[6].split(",")) == 3
    assert "K=3, WAIT 1 against K=3, WAIT 0:" in report
