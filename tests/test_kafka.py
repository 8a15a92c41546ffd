"""The development Kafka broker (`sparkrec.dev.kafka`, `make kafka-up`): real, local, and stopped by process id.

The live stream's tests need a real broker, not a mock; this proves the one
they get: fetched from Maven Central, bound to 127.0.0.1, keeping its data
across a restart (the stream must survive one), and gone after `stop`.
A broker that cannot start fails the test; it never skips.
"""

from __future__ import annotations

import json
import socket

import pytest

from sparkrec.core.processes import process_running
from sparkrec.dev import kafka as devkafka

pytestmark = pytest.mark.kafka


def _produce(bootstrap: str, topic: str, values: list[dict]) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for v in values:
        p.produce(topic, json.dumps(v).encode())
    assert p.flush(30) == 0


def _consume(bootstrap: str, topic: str, n: int, group: str) -> list[dict]:
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    got: list[dict] = []
    try:
        for _ in range(120):
            for msg in c.consume(num_messages=n, timeout=1.0):
                assert msg.error() is None, msg.error()
                got.append(json.loads(msg.value()))
            if len(got) >= n:
                break
    finally:
        c.close()
    return got


def test_a_broker_from_maven_central_serves_keeps_its_data_across_a_restart_and_stops(tmp_path):
    broker = devkafka.start(tmp_path / "kafka")
    try:
        host, _ = broker.bootstrap.split(":")
        assert host == "127.0.0.1"
        # every listener is bound to the loopback address only (nothing listens on the machine's other addresses)
        listening = open("/proc/net/tcp").read().split("\n")[1:] + open("/proc/net/tcp6").read().split("\n")[1:]
        ours = [line.split()[1] for line in listening if line.strip() and line.split()[3] == "0A"
                and int(line.split()[1].rsplit(":", 1)[1], 16) == broker.port]
        assert ours and all(addr.split(":")[0].endswith("0100007F") for addr in ours), ours  # 127.0.0.1 (or v4-mapped)
        events = [{"event_id": f"e{i}", "user_id": f"u{i % 7}", "item_id": f"i{i % 5}"} for i in range(50)]
        _produce(broker.bootstrap, "events", events)
        assert _consume(broker.bootstrap, "events", 50, "first") == events

        broker.stop()
        assert not process_running(broker.pid)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()

        broker = devkafka.start(tmp_path / "kafka")  # the same storage and address: nothing lost
        assert broker.port == int(json.loads((tmp_path / "kafka" / "ports.json").read_text())[0])
        _produce(broker.bootstrap, "events", [{"event_id": "late"}])
        got = _consume(broker.bootstrap, "events", 51, "second")
        assert got == [*events, {"event_id": "late"}]
    finally:
        broker.stop()
    assert not process_running(broker.pid)
    assert not (tmp_path / "kafka" / devkafka.STATE).exists()
