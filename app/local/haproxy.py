"""HAProxy in front of local workers: render haproxy/haproxy.cfg for their ports, run it.

The checked-in config lists two sample workers between the ``# workers: begin`` and
``# workers: end`` markers; rendering replaces those lines with one ``server`` line
per worker port. Everything else is tuned through the ``HB_*`` environment variables
the config reads (see its header).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

HAPROXY_DIR = Path(__file__).resolve().parents[2] / "haproxy"
LOCAL_CONFIG = HAPROXY_DIR / "haproxy.cfg"
COMPOSE_CONFIG = HAPROXY_DIR / "haproxy-compose.cfg"
BEGIN_MARK = "# workers: begin"
END_MARK = "# workers: end"


def haproxy_binary() -> str | None:
    """Path of ``haproxy`` on PATH, or None."""
    return shutil.which("haproxy")


def render_local_config(template: str, worker_ports: list[int], host: str = "127.0.0.1") -> str:
    """``template`` with its sample servers replaced by one per worker port."""
    lines = template.splitlines()
    begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN_MARK)
    end = next(i for i, line in enumerate(lines) if line.strip() == END_MARK)
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    servers = [f"{indent}server w{n} {host}:{port}" for n, port in enumerate(worker_ports, 1)]
    return "\n".join([*lines[: begin + 1], *servers, *lines[end:]]) + "\n"


@dataclass
class EdgeProxy:
    """A master-worker HAProxy child process serving ``config_path``."""

    config_path: Path
    public_port: int
    env: Mapping[str, str]
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def check(self) -> None:
        """``haproxy -c``: raise with HAProxy's explanation if the config is invalid."""
        result = subprocess.run(
            [_require_binary(), "-c", "-f", str(self.config_path)],
            env=dict(self.env),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"invalid HAProxy config:\n{result.stdout}{result.stderr}")

    def start(self, log_path: Path | None = None) -> EdgeProxy:
        """Start in the foreground master-worker mode and wait for the public port."""
        self.check()
        log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [_require_binary(), "-W", "-db", "-f", str(self.config_path)],
            env=dict(self.env),
            stdout=log if log else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if log:
            log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.public_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"haproxy did not open port {self.public_port}")

    def reload(self) -> None:
        """Seamless reload: the master starts new workers on the same sockets (SIGUSR2)."""
        self.check()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGUSR2)

    def stop(self, timeout: float = 10) -> None:
        """Soft stop (SIGUSR1: finish open connections), then hard stop if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGUSR1)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _require_binary() -> str:
    binary = haproxy_binary()
    if binary is None:
        raise RuntimeError("haproxy is not installed (Debian/Ubuntu: apt-get install haproxy)")
    return binary


def edge_env(public_port: int, stats_port: int, socket_path: Path) -> dict[str, str]:
    """The environment HAProxy reads its HB_* settings from, for a local run."""
    return {
        **os.environ,
        "HB_BIND": f"127.0.0.1:{public_port}",
        "HB_STATS_BIND": f"127.0.0.1:{stats_port}",
        "HB_STATS_SOCKET": str(socket_path),
    }
