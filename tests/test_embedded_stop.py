"""Stopping an embedded redis-server never leaves it running."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from app.local import embedded
from app.local.embedded import EmbeddedRedis, free_port


def test_a_redis_that_ignores_sigterm_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", free_port()).start()
    assert server.proc is not None
    # A stopped process takes no SIGTERM until continued; SIGKILL still ends it.
    os.kill(server.proc.pid, signal.SIGSTOP)
    monkeypatch.setattr(embedded, "STOP_WAIT_S", 0.5)
    server.stop()
    assert server.proc.poll() == -signal.SIGKILL
    assert "ignored SIGTERM" in capsys.readouterr().err
