"""A private Redis whose clock the test sets: the real server, under libfaketime.

The settlement scripts read Redis's own clock (TIME), so a test that crosses a quota day
or a release slot moves that clock rather than the worker's. libfaketime (Debian package
``faketime``) is preloaded into redis-server with a frozen absolute time read from a file
on every call; the monotonic clock stays real, so the server's timers run as usual.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from app.local.embedded import free_port, redis_server_binary

LIBFAKETIME = "/usr/lib/*/faketime/libfaketime.so.1"


def libfaketime() -> str:
    """Path of libfaketime; fails the test with what to install when it is missing."""
    found = sorted(glob.glob(LIBFAKETIME))
    if not found:
        raise RuntimeError("libfaketime is missing: apt-get install faketime")
    return found[0]


class FrozenRedis:
    """redis-server on a free loopback port whose wall clock stands at ``now`` (unix ms)."""

    def __init__(self, data_dir: Path, now: int) -> None:
        self.port = free_port()
        self._stamp = data_dir / "faketime"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.now = now
        env = {
            **os.environ,
            "LD_PRELOAD": libfaketime(),
            "FAKETIME_TIMESTAMP_FILE": str(self._stamp),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "TZ": "UTC",
        }
        with open(data_dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(redis_server_binary()),
                    *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data_dir)),
                    *("--save", "", "--appendonly", "no"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait()

    @property
    def url(self) -> str:
        """Its URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def now(self) -> int:
        """The time Redis reads, unix milliseconds."""
        return self._now

    @now.setter
    def now(self, ms: int) -> None:
        self._now = ms
        moment = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        part = self._stamp.with_suffix(".part")
        part.write_text(moment + "\n")
        part.replace(self._stamp)  # atomic: Redis never reads half a time

    def _wait(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("frozen redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
