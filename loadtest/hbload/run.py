"""One locust process's part in a test: the campaign, the players' sessions and book,
and in a distributed run the master collecting every worker's book for the check."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import requests
from locust.env import Environment
from locust.rpc import Message
from locust.runners import MasterRunner, WorkerRunner

from hbload import checks
from hbload.book import Book
from hbload.options import RUN_CAMPAIGN, RUN_WORKERS, Options
from hbload.service import Service

# Master -> worker: stop your players and send me your book. Worker -> master: the book.
SEND_BOOK = "hb_send_book"
BOOK = "hb_book"
BOOK_TIMEOUT_S = 30

log = logging.getLogger("hongbao.loadtest")


def read_sessions(path: str, part: int, parts: int) -> Iterator[tuple[str, str]]:
    """Part ``part`` of ``parts`` of a sessions file: every worker its own players."""
    with open(path, encoding="utf-8") as fh:
        pairs = [line.rstrip("\n").split("\t", 1) for line in fh if "\t" in line]
    return ((openid, token) for openid, token in pairs[part % parts :: parts])


class LoadRun:
    """The state of one locust process across its tests."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self.book = Book()
        self.sessions: Iterator[tuple[str, str]] = iter(())
        self.campaign = ""
        self.lottery = ""
        self.started = False
        self.tests = 0
        self.books: dict[str, dict[str, Any]] = {}
        events = environment.events
        events.test_start.add_listener(self.on_test_start)
        events.test_stop.add_listener(self.on_test_stop)
        events.quitting.add_listener(self.on_quitting)
        events.request.add_listener(self.on_request)
        runner = environment.runner
        if isinstance(runner, MasterRunner):
            runner.register_message(BOOK, self.on_book)
        elif isinstance(runner, WorkerRunner):
            runner.register_message(SEND_BOOK, self.on_send_book)

    @property
    def options(self) -> Options:
        """This test's ``--hb-*`` options."""
        return Options.of(self.environment.parsed_options)

    def service(self) -> Service:
        """The service under test."""
        return Service(self.environment.host or "", self.options.admin_token)

    def next_session(self) -> tuple[str, str] | None:
        """A minted session for a new player, or None when there are none left."""
        with self.book.lock:
            return next(self.sessions, None)

    def on_test_start(self, environment: Environment, **_: Any) -> None:
        """Pick the campaign (the master creates it for every worker) and the sessions."""
        self.book = Book()
        self.lottery = self.options.lottery
        runner = environment.runner
        if isinstance(runner, WorkerRunner):
            self.follow_master(runner)
        elif not self.open_campaign():
            return
        log.info("players grab red packet %s", self.campaign)
        self.started = True
        self.tests += 1

    def follow_master(self, runner: WorkerRunner) -> None:
        """Worker: the master's campaign, and this worker's share of the sessions."""
        parsed = self.environment.parsed_options
        self.campaign = getattr(parsed, RUN_CAMPAIGN)
        sessions = self.options.sessions
        parts = max(1, getattr(parsed, RUN_WORKERS))
        self.sessions = (
            read_sessions(sessions, runner.worker_index, parts) if sessions else iter(())
        )

    def open_campaign(self) -> bool:
        """Master or single process: the red packet of this test (created unless given),
        handed to the workers with the options; False (and the test stopped) on failure."""
        environment, options = self.environment, self.options
        parsed, runner = environment.parsed_options, environment.runner
        assert parsed is not None
        assert runner is not None
        try:
            self.campaign = options.campaign or self.service().create_red_packet(
                options.total_fen, options.count
            )
        except requests.RequestException as exc:
            log.error("cannot create the red packet at %s: %s", environment.host, exc)
            environment.process_exit_code = 1
            runner.greenlet.spawn(runner.quit if parsed.headless else runner.stop)
            return False
        setattr(parsed, RUN_CAMPAIGN, self.campaign)
        if isinstance(runner, MasterRunner):
            setattr(parsed, RUN_WORKERS, len(runner.clients.ready))
        self.sessions = read_sessions(options.sessions, 0, 1) if options.sessions else iter(())
        return True

    def on_request(self, exception: BaseException | None = None, **_: Any) -> None:
        """Count failed requests: their answers were not heard."""
        if exception is not None:
            self.book.failed()

    def on_send_book(self, environment: Environment, msg: Message, **_: Any) -> None:
        """Worker: stop the players, so the book is final, and send it to the master."""
        runner = environment.runner
        assert isinstance(runner, WorkerRunner)
        runner.stop()
        runner.send_message(BOOK, self.book.dump())

    def on_book(self, environment: Environment, msg: Message, **_: Any) -> None:
        """Master: a worker's book."""
        self.books[msg.node_id] = msg.data

    def collect_books(self, runner: MasterRunner) -> None:
        """Master: every worker's book, merged into this process's (empty) one."""
        workers = list(runner.clients.keys())
        self.books = {}
        for worker in workers:
            runner.send_message(SEND_BOOK, None, worker)
        deadline = time.monotonic() + BOOK_TIMEOUT_S
        while set(workers) - set(self.books) and time.monotonic() < deadline:
            time.sleep(0.1)
        for worker in workers:
            if worker in self.books:
                self.book.merge(worker, self.books[worker])
            else:
                self.book.problems.append(f"worker {worker} sent no book")
        print(f"books of {len(self.books)} worker(s) merged")

    def on_test_stop(self, environment: Environment, **_: Any) -> None:
        """Master or single process: check the invariants, exit 1 on any violation."""
        runner = environment.runner
        if not self.started or isinstance(runner, WorkerRunner):
            return
        self.started = False
        if isinstance(runner, MasterRunner):
            self.collect_books(runner)
        options = self.options
        check = checks.Check(self.campaign, self.lottery, options.check_players, options.reconcile)
        try:
            found = checks.problems(self.service(), self.book, check)
        except requests.RequestException as exc:
            found = [f"cannot read the service's records: {exc}"]
        for problem in found:
            print(f"INVARIANT VIOLATED: {problem}")
        if found:
            environment.process_exit_code = 1
        else:
            print("invariants: OK")

    def on_quitting(self, environment: Environment, **_: Any) -> None:
        """Say so when no test ran, instead of checking nothing."""
        if self.tests == 0 and not isinstance(environment.runner, WorkerRunner):
            print("invariants: no test ran, nothing to check")
