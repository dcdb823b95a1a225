"""What players were told, for the end-of-run check; one per locust process, merged on
the master of a distributed run."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class Book:
    """Answers players heard: red-packet wins, lottery draws and prizes, failures."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.won: dict[str, int] = {}
        # Lottery: openid -> session token, draws heard, prizes heard as {(draw_no, tier)}
        self.tokens: dict[str, str] = {}
        self.draws: dict[str, int] = {}
        self.prizes: dict[str, set[tuple[int, int]]] = {}
        self.problems: list[str] = []
        # Requests that got no answer a player could trust (timeouts, errors).
        self.failures = 0
        # Grabs that could win and draws, sent and not (yet) answered: those of players
        # stopped mid-request (a test's end, a shape ramping down) were settled unheard.
        self.unanswered: Counter[str] = Counter()
        # A player heard sold_out: no grab sent after that can win.
        self.sold_out = False

    def joined(self, openid: str, token: str) -> None:
        """A player started, with the session ``token``."""
        with self.lock:
            self.tokens[openid] = token

    def record(self, openid: str, body: dict[str, Any]) -> None:
        """A grab's answer."""
        result = body.get("result")
        with self.lock:
            if result == "won":
                if openid in self.won:
                    self.problems.append(f"{openid} won twice")
                self.won[openid] = int(body["amount_fen"])
            elif result == "sold_out":
                self.sold_out = True
            elif result == "already_won":
                known = self.won.get(openid)
                if known is not None and known != body["amount_fen"]:
                    self.problems.append(
                        f"{openid} won {known} but already_won says {body['amount_fen']}"
                    )

    def record_draw(self, openid: str, body: dict[str, Any]) -> None:
        """A draw's answer."""
        with self.lock:
            self.draws[openid] = self.draws.get(openid, 0) + 1
            if body.get("result") == "prize":
                told = self.prizes.setdefault(openid, set())
                told.add((int(body["draw_no"]), int(body["prize"]["tier"])))

    def could_win(self, openid: str) -> bool:
        """Whether a grab ``openid`` sends now could win (its answer matters)."""
        with self.lock:
            return not self.sold_out and openid not in self.won

    def asking(self, kind: str) -> None:
        """A request of ``kind`` ("grab", "draw") whose answer changes the book is sent."""
        with self.lock:
            self.unanswered[kind] += 1

    def answered(self, kind: str) -> None:
        """Its answer arrived (and was recorded, or counted as a failure)."""
        with self.lock:
            self.unanswered[kind] -= 1

    def exact(self, kind: str) -> bool:
        """Whether every answer of ``kind`` was heard: no failure, none unanswered."""
        with self.lock:
            return self.failures == 0 and self.unanswered[kind] == 0

    def failed(self) -> None:
        """A request failed."""
        with self.lock:
            self.failures += 1

    def dump(self) -> dict[str, Any]:
        """The book as plain data, for a message to the master."""
        with self.lock:
            return {
                "won": dict(self.won),
                "tokens": dict(self.tokens),
                "draws": dict(self.draws),
                "prizes": {o: sorted(p) for o, p in self.prizes.items()},
                "problems": list(self.problems),
                "failures": self.failures,
                "unanswered": dict(self.unanswered),
            }

    def merge(self, worker: str, data: dict[str, Any]) -> None:
        """Add a worker's book (``dump()``); a player seen by two workers is a problem."""
        with self.lock:
            for openid in data["tokens"]:
                if openid in self.tokens:
                    self.problems.append(f"{openid} played on two workers")
            self.tokens.update(data["tokens"])
            for openid, fen in data["won"].items():
                if openid in self.won:
                    self.problems.append(f"{openid} won twice (worker {worker})")
                self.won[openid] = int(fen)
            for openid, n in data["draws"].items():
                self.draws[openid] = self.draws.get(openid, 0) + int(n)
            for openid, prizes in data["prizes"].items():
                self.prizes.setdefault(openid, set()).update((int(d), int(t)) for d, t in prizes)
            self.problems += [f"worker {worker}: {p}" for p in data["problems"]]
            self.failures += int(data["failures"])
            self.unanswered.update(data["unanswered"])
