"""The topology behind the ``amqp://`` backend's topics: what is declared, bound and deleted.

Queue model: a topic is a durable direct exchange ``TOPIC``; partition ``p`` of group ``G`` is the
durable queue ``TOPIC:p:G`` bound to it with the routing key ``p``. Stream model: a topic is one
stream (``_rabbitmq_state``). Topics and groups are recorded in the registry stream
(``_rabbitmq_registry``); ``Topology`` caches what it says about each topic this client uses, and
declares again what the cache names (declaring is idempotent, and a restarted node may need it).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from infeed.brokers import _rabbitmq_recovery as recovery
from infeed.brokers._rabbitmq_io import Chan
from infeed.brokers._rabbitmq_registry import TopicMeta
from infeed.errors import BrokerError, TopicNotFoundError
from infeed.types import TopicInfo

if TYPE_CHECKING:
    from infeed.brokers.rabbitmq import RabbitMQBroker

#: Group that keeps dead letters in the queue model until someone reads them.
DEAD_LETTER_GROUP = "dead-letters"


def queue_name(topic: str, partition: int, group: str) -> str:
    """The queue that holds partition ``partition`` of ``topic`` for ``group``."""
    name = f"{topic}:{partition}:{group}"
    if len(name.encode()) > 255:
        raise ValueError(f"topic and group names are too long for a RabbitMQ queue name: {name!r}")
    return name


class Topology:
    """Declares, describes and deletes one broker's topics; caches their registry entries."""

    def __init__(self, broker: RabbitMQBroker) -> None:
        self._b = broker
        self._known: dict[str, TopicMeta] = {}
        self._known_lock = threading.Lock()

    def meta(self, topic: str, *, create: bool, partitions: int | None = None) -> TopicMeta:
        """Return the topic's metadata, creating the topic if asked and missing."""
        b = self._b
        with self._known_lock:
            meta = self._known.get(topic)
        if meta is not None and partitions is None:
            return meta
        topics = b._sync()
        meta = topics.get(topic)
        if meta is None:
            if not create:
                raise TopicNotFoundError(f"no topic {topic!r} on {b.config.url}")
            wanted = TopicMeta(
                b.model,
                partitions or b.config.default_partitions,
                b.config.queue_type,
                b.config.max_priority,
            )
            self._declare_topic(topic, wanted)
            b._registry.append([wanted.record(topic)])
            meta = b._sync().get(topic) or wanted  # another client may have won the race
        if meta.model != b.model:
            raise BrokerError(
                f"topic {topic!r} is a {meta.model}-model topic (queue_type={meta.queue_type}); "
                f"open the broker with that queue_type to use it"
            )
        self._declare_topic(topic, meta)
        with self._known_lock:
            self._known[topic] = meta
        return meta

    def forget(self, topic: str) -> None:
        """Drop the cached entry of ``topic`` (it was deleted since it was cached)."""
        with self._known_lock:
            self._known.pop(topic, None)

    def _declare_topic(self, topic: str, meta: TopicMeta) -> None:
        if meta.model == "stream":
            from infeed.brokers._rabbitmq_state import declare_stream

            self._b._admin("declaring a stream", lambda chan: declare_stream(chan, topic))
            return
        self._b._admin(
            "declaring an exchange",
            lambda chan: chan.rpc(
                lambda cb: chan.impl.exchange_declare(topic, "direct", durable=True, callback=cb),
                f"declaring exchange {topic!r}",
            ),
        )

    def declare_group(self, topic: str, meta: TopicMeta, group: str) -> list[str]:
        """Declare and bind the group's queues (every partition); return their names."""
        b = self._b
        names = [queue_name(topic, p, group) for p in range(meta.partitions)]
        args: dict[str, Any] = {"x-queue-type": meta.queue_type}
        if meta.max_priority:
            args["x-max-priority"] = meta.max_priority

        def declare(chan: Chan) -> None:
            for p, name in enumerate(names):
                chan.sync(f"declaring {name!r}", chan.impl.queue_declare, name, durable=True, arguments=args)
                chan.sync(f"binding {name!r}", chan.impl.queue_bind, name, topic, routing_key=str(p))

        quorum = meta.queue_type == "quorum"
        new = quorum and not b._admin(
            "checking group queues", lambda chan: recovery.queues_exist(chan, names)
        )
        b._admin("declaring group queues", declare)
        if new:  # a node killed before the new queues' names reach its disk would lose them
            b._admin("persisting quorum queue names", recovery.persist_quorum_names)
        if group not in meta.groups:
            b._registry.append([{"op": "group", "name": topic, "group": group}])
            meta.groups.add(group)
        return names

    def ensure_dead_letters(self, topic: str) -> None:
        """Queue model: make sure dead letters sent to ``topic`` are kept (in DEAD_LETTER_GROUP)."""
        meta = self.meta(topic, create=True)
        if DEAD_LETTER_GROUP not in meta.groups and self._b.model == "queue":
            self.declare_group(topic, meta, DEAD_LETTER_GROUP)

    def delete(self, topic: str) -> None:
        """Delete the topic's exchange (or stream), its group queues and its registry entry."""
        b = self._b
        meta = b._sync().get(topic)
        if meta is None or meta.model != b.model:
            raise TopicNotFoundError(f"no topic {topic!r} on {b.config.url}")
        self.forget(topic)
        if b.model == "stream":
            from infeed.brokers._rabbitmq_state import stream_queues

            queues = stream_queues(topic, meta)
        else:
            queues = [queue_name(topic, p, g) for g in sorted(meta.groups) for p in range(meta.partitions)]

        def delete(chan: Chan) -> None:
            for name in queues:
                chan.sync(f"deleting {name!r}", chan.impl.queue_delete, name)
            if b.model == "queue":
                chan.rpc(lambda cb: chan.impl.exchange_delete(topic, callback=cb), f"deleting {topic!r}")

        b._admin("deleting a topic", delete)
        b._registry.append([{"op": "delete", "name": topic}])

    def names(self) -> list[str]:
        """The names of this model's topics, sorted."""
        return sorted(n for n, m in self._b._sync().items() if m.model == self._b.model)

    def describe(self, topic: str) -> TopicInfo:
        """Partitions and groups of ``topic`` (``RabbitMQBroker.describe_topic``)."""
        b = self._b
        meta = b._sync().get(topic)
        if meta is None or meta.model != b.model:
            raise TopicNotFoundError(f"no topic {topic!r} on {b.config.url}")
        if b.model == "stream":
            from infeed.brokers._rabbitmq_stream import describe

            return describe(b, topic, meta)
        from infeed.brokers._rabbitmq_queue import describe_queues

        return describe_queues(b, topic, meta)
