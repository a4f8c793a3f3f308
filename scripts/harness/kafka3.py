"""Three-node Apache Kafka (KRaft) cluster for fault tests; see ``kafka.start_cluster``.

A module of its own so that ``scripts/brokers start kafka3`` finds it by name. ``restart`` is the
CLI's whole-cluster restart hook; ``kill_node`` / ``restart_node`` act on one node of this
broker's state entry (``core.read_state()["kafka3"]``).
"""

from __future__ import annotations

from . import core, kafka

NAME = kafka.NAME3
restart = kafka.restart
kill_node = kafka.kill_node
restart_node = kafka.restart_node


def start() -> core.Started:
    """Start the three nodes; url ``kafka://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3``."""
    return kafka.start_cluster()
