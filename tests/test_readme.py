"""The README's "Try it" block, run as written against a real ``./hb serve``.

Only what must differ on a shared machine is changed, each substitution checked to
apply: free ports for the public port and the embedded Redis and PostgreSQL, a
temporary data folder, the server's own output in a log file, and
``.venv/bin/python -m app serve`` for ``./hb serve`` (what ``./hb`` runs once ``.venv``
exists, without its install check).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from app.local.embedded import free_port, port_busy

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN_WITHIN_S = 180
pytestmark = pytest.mark.slow


def shell_blocks(section: str) -> list[str]:
    """The ```sh blocks of the README section titled ``section``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return re.findall(r"```sh\n(.*?)```", body, re.S)


def _substitute(script: str, old: str, new: str) -> str:
    assert old in script, f"the README's Try it block no longer has {old!r}"
    return script.replace(old, new)


def test_try_it_runs_as_written(tmp_path: Path) -> None:
    (script,) = shell_blocks("Try it")
    port, redis_port, pg_port = free_port(), free_port(), free_port()
    data, log = tmp_path / "data", tmp_path / "serve.log"
    script = _substitute(
        script,
        "./hb serve &",
        f"{sys.executable} -m app serve --port {port} --data-dir {data} > {log} 2>&1 &",
    )
    script = _substitute(script, "localhost:8080", f"127.0.0.1:{port}")
    script = _substitute(script, ".data/admin-token", f"{data}/admin-token")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"REDIS_URL", "DATABASE_URL", "ADMIN_TOKEN", "DEV_LOGIN", "PORT"}
    }
    env.update(EMBEDDED_REDIS_PORT=str(redis_port), EMBEDDED_PG_PORT=str(pg_port))
    env["PYTHONPATH"] = str(ROOT)
    # errexit: any failing command (a curl that cannot connect) fails the run.
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=RUN_WITHIN_S)
    finally:
        if proc.poll() is None:
            # SIGTERM reaches ./hb serve too, which stops what it started.
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=60)
    served = log.read_text()
    assert proc.returncode == 0, f"{err}\n--- serve ---\n{served}"
    answers: list[Any] = [json.loads(line) for line in out.splitlines() if line.strip()]
    login, grab, again, me, stats, draw, lottery_me = answers
    assert login == {"openid": "alice"}
    assert grab["result"] == "won"
    fen = grab["amount_fen"]
    assert 1 <= fen <= 1_000_000
    assert again == {"result": "already_won", "amount_fen": fen}
    assert (me["result"], me["amount_fen"]) == ("won", fen)
    # The money adds up: what alice got left the campaign, nothing else did.
    assert (stats["remaining_count"], stats["remaining_fen"]) == (999, 1_000_000 - fen)
    assert draw["result"] in {"prize", "no_prize"}
    assert draw["draw_no"] == 1
    assert lottery_me["draws"] == 1
    assert len(lottery_me["prizes"]) == (1 if draw["result"] == "prize" else 0)
    # The ready line names the worker count (one per core by default), then it stopped.
    workers = os.cpu_count() or 1
    assert f"hongbao: {workers} worker(s) on http://127.0.0.1:{port}/" in served
    assert "hongbao: stopped" in served
    for number in (port, redis_port, pg_port):
        assert not port_busy(number), f"port {number} still in use after kill %1"


def _checkout_missing_a_package(folder: Path) -> Path:
    """A copy of hb whose package list names one package nobody has."""
    (folder / "scripts").mkdir()
    shutil.copy(ROOT / "hb", folder / "hb")
    listed = (ROOT / "scripts" / "system-packages").read_text()
    (folder / "scripts" / "system-packages").write_text(
        listed + "hongbao-no-such-package  /nonexistent/hongbao-probe  the test's own\n"
    )
    for path in (folder, folder / "scripts"):
        path.chmod(0o755)
    return folder / "hb"


@pytest.mark.skipif(os.geteuid() != 0, reason="the install branch is root's")
def test_hb_test_as_root_installs_missing_system_packages_with_apt(tmp_path: Path) -> None:
    hb = _checkout_missing_a_package(tmp_path)
    # apt-get stands in for the Debian mirror (the outside world): it records its calls
    # and fails the install, so hb stops right after it (set -e) instead of going on.
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt-calls"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1" = install ] && exit 100\nexit 0\n'
    )
    (bin_dir / "apt-get").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", str(hb), "test"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 100, result
    assert result.stderr.splitlines()[0] == (
        "hb: installing the system packages the tests need: hongbao-no-such-package"
    )
    assert calls.read_text().splitlines() == ["update -q", "install -y -q hongbao-no-such-package"]
    assert not (tmp_path / ".venv").exists()


def test_hb_test_stops_at_once_naming_missing_system_packages() -> None:
    # A checkout whose package list names one package nobody has. /tmp, not tmp_path:
    # the ordinary user below must be able to enter it.
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        checkout = Path(folder)
        _checkout_missing_a_package(checkout)
        argv = ["bash", str(checkout / "hb"), "test"]
        if os.geteuid() == 0:
            # As root, hb installs with apt-get; an ordinary user is told the command.
            argv = ["runuser", "-u", "nobody", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            "hb: the tests need hongbao-no-such-package; install with: "
            "sudo apt-get install -y hongbao-no-such-package"
        ]
        # It stopped before creating .venv.
        assert not (checkout / ".venv").exists()
