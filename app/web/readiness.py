"""Whether this worker wants new traffic: false once it has been told to stop."""

from __future__ import annotations


class Readiness:
    """Flipped once, by the worker's SIGTERM handler; read by ``/readyz``."""

    def __init__(self) -> None:
        self.draining = False

    def start_draining(self) -> None:
        """From now on ``/readyz`` answers 503 so load balancers stop sending traffic."""
        self.draining = True
