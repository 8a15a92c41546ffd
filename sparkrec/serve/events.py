"""Events posted to the server: checked field by field, then handed to the durable path unchanged.

The server does not write tables. A posted event goes where `sparkrec stream`
reads (`stream.source`): produced to the Kafka topic, keyed by the customer so
one customer's events keep their order, or written as a JSON-lines file into
the directory a file-source stream watches (the local default, no broker). The
stream then ingests exactly what the server accepted, and the clean judges it
like any other row; the server refuses only what could never be an event.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from sparkrec.core.config import Config
from sparkrec.core.errors import ConfigError

log = logging.getLogger(__name__)


class EventError(ValueError):
    """An event that cannot be accepted: `where` is its position and field, as a client reads it."""

    def __init__(self, where: list[Any], message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


def _synonyms(cfg: Config) -> dict[str, str]:
    return {s.strip().lower(): canonical for canonical, names in cfg.source.event_types.items() for s in names}


def check(events: list[Any], cfg: Config) -> list[dict[str, Any]]:
    """The events as they will be sent, or EventError naming the first bad one (its position and field).

    Each is an object with the input's own column names (`source.columns`): the customer, the item and the
    time are required text or numbers, no longer than `serve.max_key_length`; an event type must be one
    the config maps (`source.event_types`); an ISO-8601 time must parse when no `source.timestamp_format` is set.
    """
    cols, limit = cfg.source.columns, cfg.serve.max_key_length
    required = [cols.user_id, cols.item_id, cols.timestamp] + ([cols.event_type] if cols.event_type else [])
    types = _synonyms(cfg)
    out = []
    for i, event in enumerate(events):
        if not isinstance(event, dict):
            raise EventError([i], f"event {i} is a {type(event).__name__}; expected an object")
        for name in required:
            value = event.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise EventError([i, name], f"event {i}: field {name!r} is required")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise EventError([i, name], f"event {i}: field {name!r} must be text or a number, not {type(value).__name__}")
            if len(str(value)) > limit:
                raise EventError([i, name], f"event {i}: field {name!r} is longer than serve.max_key_length={limit}")
        if cols.event_type and str(event[cols.event_type]).strip().lower() not in types:
            raise EventError([i, cols.event_type], f"event {i}: event type {event[cols.event_type]!r} is not one of "
                             f"{sorted(types)} (source.event_types)")
        if cfg.source.timestamp_format is None:
            try:
                datetime.fromisoformat(str(event[cols.timestamp]).strip().replace("Z", "+00:00"))
            except ValueError:
                raise EventError([i, cols.timestamp], f"event {i}: field {cols.timestamp!r} is not an ISO-8601 time: "
                                 f"{str(event[cols.timestamp])[:40]!r}") from None
        out.append(event)
    return out


def shape(cfg: Config) -> dict[str, Any]:
    """How an event of this shop is written (its column names, type names and time format): for the shop page,
    which posts the events its buttons stand for in the shape `check` accepts."""
    src, cols = cfg.source, cfg.source.columns
    return {
        "kind": src.kind,
        "columns": {"user": cols.user_id, "item": cols.item_id, "time": cols.timestamp, "type": cols.event_type,
                    "invoice": cols.invoice, "quantity": cols.quantity, "price": cols.price},
        "types": {canonical: names[0] for canonical, names in src.event_types.items() if names},
        "time_format": src.timestamp_format,
        "timezone": src.timezone,
    }


class Sink:
    """Where accepted events go: the stream's Kafka topic or its directory. Thread-safe."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        live = cfg.stream.source
        self.kind = live.kind
        self._producer = None
        self._lock = threading.Lock()
        if self.kind == "files":
            where = cfg.serve.events_dir or live.path
            if not where:
                raise ConfigError("serve.events_dir or stream.source.path must name the directory posted events go to")
            self.dir = Path(where)
        else:
            self.dir = None

    @property
    def target(self) -> str:
        live = self.cfg.stream.source
        return f"kafka:{live.bootstrap_servers}/{live.topic}" if self.kind == "kafka" else f"files:{self.dir}"

    def send(self, events: list[dict[str, Any]]) -> None:
        """Hand the events on; returns once they are durable (the broker acknowledged, or the file is in place).

        Raises:
            OSError: the directory cannot be written. RuntimeError: the broker did not acknowledge in time.
        """
        if not events:
            return
        if self.kind == "files":
            self._write_file(events)
        else:
            self._produce(events)

    def _write_file(self, events: list[dict[str, Any]]) -> None:
        # Written under a dot-name, then renamed: the file source never sees half a file.
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"serve-{datetime.now().strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.json"
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for e in events:
                fh.write(json.dumps(e, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / name)

    def _produce(self, events: list[dict[str, Any]]) -> None:
        from confluent_kafka import Producer

        live = self.cfg.stream.source
        with self._lock:
            if self._producer is None:
                opts = {k.removeprefix("kafka."): v for k, v in live.options.items() if k.startswith("kafka.")}
                self._producer = Producer({"bootstrap.servers": live.bootstrap_servers, "enable.idempotence": True,
                                           "linger.ms": 1, "log_level": 3, **opts})
            producer = self._producer
        key = self.cfg.source.columns.user_id
        failed: list[str] = []

        def done(err, _msg) -> None:
            if err is not None:
                failed.append(str(err))

        for e in events:
            producer.produce(live.topic, json.dumps(e, ensure_ascii=False).encode(), key=str(e[key]).encode(),
                             on_delivery=done)
        left = producer.flush(10)
        if left or failed:
            raise RuntimeError(f"the broker {live.bootstrap_servers} did not acknowledge {left or len(failed)} event(s)"
                               f" on topic {live.topic!r}" + (f": {failed[0]}" if failed else ""))

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5)
