"""Where and how sparkrec runs: `spark` (the session) and `stream` (the live path)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sparkrec.core.config.base import Strict


class SparkConfig(Strict):
    master: str | None = Field(
        default="local[2]",
        description="Spark master; null under spark-submit, where the submitter sets it.",
    )
    app_name: str = "sparkrec"
    shuffle_partitions: int = Field(default=8, ge=1)
    driver_memory: str | None = None
    delta_packages: bool = Field(
        default=True,
        description="Resolve Delta's jars from Maven Central at session start (local mode). "
        "Set false when the submitter passes --packages or jars are configured.",
    )
    jars: list[str] = Field(default_factory=list, description="Pre-downloaded jars (offline use).")
    packages: list[str] = Field(
        default_factory=list,
        description="More Maven coordinates resolved with Delta's in local mode (the stream adds Spark's Kafka "
        "connector); under spark-submit pass them with --packages.",
    )
    conf: dict[str, str] = Field(default_factory=dict, description="Extra Spark settings.")
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = "WARN"

class StreamSourceConfig(Strict):
    """Where the live events come from (`stream.source`): a Kafka topic, or a directory new files land in."""

    kind: Literal["kafka", "files"] = "kafka"
    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Kafka's bootstrap servers (kind kafka).")
    topic: str = Field(default="events", description="The topic of JSON events, one event per message (kind kafka).")
    starting_offsets: Literal["earliest", "latest"] = Field(
        default="earliest", description="Where a stream with no checkpoint starts reading (kind kafka)."
    )
    max_offsets_per_trigger: int | None = Field(
        default=5000, ge=1, description="At most this many events per micro-batch (kind kafka): bounds a batch after a pause."
    )
    path: str | None = Field(default=None, description="The directory to watch (kind files); files in source.format.")
    max_files_per_trigger: int = Field(default=50, ge=1, description="At most this many new files per micro-batch (kind files).")
    options: dict[str, str] = Field(default_factory=dict, description="More options for Spark's reader (kafka.* settings).")

    @model_validator(mode="after")
    def _has_place(self) -> StreamSourceConfig:
        if self.kind == "files" and not self.path:
            raise ValueError("stream.source.path is required when stream.source.kind is 'files'")
        if self.kind == "kafka" and not self.topic.strip():
            raise ValueError("stream.source.topic must name a topic")
        return self


class StreamConfig(Strict):
    """The live path (`sparkrec stream`): micro-batches cleaned like batch, customers re-scored within seconds."""

    source: StreamSourceConfig = StreamSourceConfig()
    trigger_seconds: float = Field(default=1.0, ge=0, description="How often a micro-batch starts (0: as soon as the last ends).")
    checkpoint: str | None = Field(default=None, description="The stream's checkpoint; default <checkpoint_dir>/stream.")
    clean_seconds: float = Field(
        default=10.0, gt=0,
        description="How often the clean classifies what the stream appended (the batch clean, incremental). "
        "Lists are published before it, from the clean tables plus the unclassified rows passed through the row rules.",
    )
    kafka_package: str = Field(
        default="org.apache.spark:spark-sql-kafka-0-10_2.13:4.2.0",
        description="Spark's Kafka connector, resolved from Maven Central in local mode (pass it with --packages under spark-submit).",
    )
    refresh_minutes: float = Field(
        default=5.0, gt=0,
        description="How often the fallback rankings (popular, trending) and the blend are recomputed from the interactions, "
        "the stream's included; a new model is picked up at once.",
    )
    compact_every: int = Field(
        default=30, ge=0, description="Compact the tables the stream appends to every this many clean passes (0: never)."
    )
    max_users_per_batch: int = Field(
        default=20000, ge=1, description="Customers re-scored per micro-batch at most (they are scored on the driver)."
    )
    publish_lists: bool = Field(
        default=True,
        description="Re-score each micro-batch's customers into live_recommendations (a table for SQL readers). "
        "`sparkrec serve` computes fresher lists itself: with only its answers needed, false skips that work.",
    )


class ServeConfig(Strict):
    """`sparkrec serve`: the HTTP API over the published tables, with the live events folded in."""

    host: str = Field(default="127.0.0.1", description="Address to bind; anything but loopback needs a token.")
    port: int = Field(default=8000, ge=1, le=65535)
    token_env: str = Field(default="SPARKREC_SERVE_TOKEN", description="Environment variable holding the bearer token.")
    token_file: str | None = Field(default=None, description="A file holding the bearer token (read at start; wins over token_env).")
    reload_seconds: float = Field(
        default=10.0, gt=0, description="How often the server looks in `runs` for newly published lists and loads them."
    )
    events_dir: str | None = Field(
        default=None,
        description="Where POST /v1/events appends events when stream.source.kind is 'files'; default stream.source.path.",
    )
    max_n: int = Field(default=100, ge=1, le=10000, description="The largest n a client may ask for.")
    max_key_length: int = Field(default=256, ge=1, description="The longest customer or item key accepted in a path.")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="The largest request body accepted.")
    max_events_per_call: int = Field(default=1000, ge=1, description="Events accepted in one POST /v1/events.")
