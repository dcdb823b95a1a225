"""The opening second of a red packet as a locust load shape: every player at once.

    .venv/bin/locust -f loadtest/locustfile.py,loadtest/spike.py --headless \\
        -H http://127.0.0.1:8080 --hb-admin-token "$(cat .data/admin-token)" -u 2000

All ``-u`` players arrive within the first second (``-r`` is not used), stay for
``--hb-spike-hold`` seconds while the envelopes go, then all but a tenth leave (the
ones who look at what they won) for ``--hb-spike-tail`` seconds, and the test stops.
"""

from __future__ import annotations

from locust import LoadTestShape, events
from locust.argument_parser import LocustArgumentParser


def add_options(parser: LocustArgumentParser) -> None:
    """Register the spike's options (init_command_line_parser listener)."""
    parser.add_argument(
        "--hb-spike-hold",
        type=float,
        default=10.0,
        help="seconds every player stays after the opening second",
    )
    parser.add_argument(
        "--hb-spike-tail",
        type=float,
        default=20.0,
        help="seconds a tenth of the players stay after that",
    )


class OpeningSpike(LoadTestShape):
    """-u players within one second, held, then a tenth of them, then the end."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        """Users and spawn rate now; None once the tail is over."""
        assert self.runner is not None
        parsed = self.runner.environment.parsed_options
        assert parsed is not None
        peak = max(1, int(parsed.num_users or 1))
        now = self.get_run_time()  # type: ignore[no-untyped-call]  # locust: unannotated
        if now < parsed.hb_spike_hold:
            return peak, float(peak)
        if now < parsed.hb_spike_hold + parsed.hb_spike_tail:
            return max(1, peak // 10), float(peak)
        return None


events.init_command_line_parser.add_listener(add_options)
