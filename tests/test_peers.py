"""Two real HAProxy replicas of haproxy/haproxy-compose.cfg, peers on loopback, in
front of one real worker: the per-IP rate limit is one shared count, not one per replica.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from app.local.embedded import free_port
from app.local.haproxy import COMPOSE_CONFIG, haproxy_binary
from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.skipif(
    haproxy_binary() is None, reason="haproxy not installed (./hb test installs it)"
)

IP_RATE = 10
# The tables count requests over 10 s (haproxy-compose.cfg): the test must run well within.
WINDOW_S = 10
PEERS = ("haproxy-0", "haproxy-1")


class Replica:
    """One HAProxy process playing peer ``name``."""

    def __init__(self, name: str, tmp: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port, stats = free_port(), free_port()
        self.socket = tmp / f"{name}.sock"
        env = {
            **env,
            "HB_BIND": f"127.0.0.1:{self.port}",
            "HB_STATS_BIND": f"127.0.0.1:{stats}",
            "HB_STATS_SOCKET": str(self.socket),
        }
        with (tmp / f"{name}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [str(haproxy_binary()), "-W", "-db", "-L", name, "-f", str(COMPOSE_CONFIG)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def admin(self, command: str) -> str:
        """One command on the admin socket, its whole answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket))
            sock.sendall(command.encode() + b"\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        return raw.decode()

    def workers_up(self) -> bool:
        """Whether HAProxy sees a worker passing /readyz."""
        return any(
            line.startswith("workers,app") and ",UP," in line
            for line in self.admin("show stat").splitlines()
        )

    def get(self, path: str) -> tuple[int, dict[str, object]]:
        """GET through this replica: status and JSON body."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read())

    def request_rate(self) -> int:
        """http_req_rate of 127.0.0.1 in this replica's per-IP table."""
        return self.entry()[0]

    def entry(self) -> tuple[int, int]:
        """(http_req_rate, conn_cur) of 127.0.0.1 in this replica's per-IP table."""
        table = self.admin("show table st_ip")
        rate = re.search(r"http_req_rate\(\d+\)=(\d+)", table)
        conn_cur = re.search(r"conn_cur=(\d+)", table)
        return (int(rate.group(1)) if rate else 0, int(conn_cur.group(1)) if conn_cur else 0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def worker(tmp_path: Path, redis_url: str, database_url: str, clean: None) -> Iterator[int]:
    """One real worker process on a free loopback port, stopped afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DRAIN_DELAY_S": "0.1",
    }
    with (tmp_path / "worker.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "worker"], env=env, stdout=log, stderr=log
        )
    try:
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def replicas(tmp_path: Path, worker: int) -> Iterator[tuple[Replica, Replica]]:
    """Two peered replicas in front of the worker, started, connected to each other and
    seeing the worker up; stopped afterwards."""
    env = {
        **os.environ,
        "HB_PEER_0": f"127.0.0.1:{free_port()}",
        "HB_PEER_1": f"127.0.0.1:{free_port()}",
        "HB_APP_ADDR": f"127.0.0.1:{worker}",
        "HB_CHECK_INTER": "200ms",
        "HB_IP_RATE": str(IP_RATE),
    }
    started = [Replica(name, tmp_path, env) for name in PEERS]
    try:
        deadline = time.monotonic() + 30
        for replica in started:
            while True:
                assert replica.proc.poll() is None, (tmp_path / f"{replica.name}.log").read_text()
                try:
                    if "ESTA" in replica.admin("show peers") and replica.workers_up():
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.05)
        yield started[0], started[1]
    finally:
        for replica in started:
            replica.stop()


def test_a_client_rate_is_counted_across_both_replicas(
    replicas: tuple[Replica, Replica],
) -> None:
    first, second = replicas
    sent = 3 * IP_RATE
    answers: Counter[tuple[str, int]] = Counter()
    started = time.monotonic()
    for n in range(sent):
        replica = replicas[n % 2]
        status, body = replica.get("/healthz")
        assert (status, body.get("error")) in {(429, "rate_limited"), (200, None)}, body
        answers[replica.name, status] += 1
        # The next request goes to the other replica once the update has reached it: the
        # sync is asynchronous and a received entry replaces the local one, so requests
        # closer together than the sync would each count from the same old value.
        # (Compared with the sender's own count, not n + 1: on a slow machine the first
        # requests may already have left the 10 s window of both.) The connection's
        # close must have reached it too (conn_cur back to 0 in both tables): the close
        # is one more update of the entry, and one sent after the other replica counted
        # the next request would overwrite that count with the older one.
        other = replicas[(n + 1) % 2]
        deadline = time.monotonic() + 5
        while (mine := replica.entry())[1] != 0 or other.entry() != mine:
            assert time.monotonic() < deadline, f"request {n + 1} never reached {other.name}"
            time.sleep(0.002)
    admitted = answers[first.name, 200] + answers[second.name, 200]
    # One shared count: IP_RATE admitted in all. (Separate tables never get here: the
    # wait above finds the other table behind after the first request.) Now and then,
    # about 2 runs in 70 here, one request still goes uncounted, cause not established
    # (HAProxy's sync replaces an entry with the one received): one more is admitted.
    assert IP_RATE <= admitted <= IP_RATE + 1, answers
    # Neither replica admitted the whole limit by itself: each refused some.
    assert answers[first.name, 429] > 0, answers
    assert answers[second.name, 429] > 0, answers
    # Both tables hold the client's requests, whichever replica each went to (all, or all
    # but the one that went uncounted).
    if time.monotonic() - started < WINDOW_S - 1:
        counted = first.request_rate()
        assert second.request_rate() == counted
        assert sent - 1 <= counted <= sent
