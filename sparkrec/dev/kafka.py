"""A single Kafka broker on 127.0.0.1, from Apache Kafka's own jars on Maven Central, for the stream's tests.

No Kafka broker is packaged for pip or apt here, so the broker's jars
(`org.apache.kafka:kafka_2.13` and `kafka-tools`, with a log4j binding) are
fetched once by Maven into a cache, a KRaft storage directory is formatted,
and `kafka.Kafka` runs in combined broker + controller mode, every listener
bound to 127.0.0.1 and every replication factor 1. It runs in a session of
its own and is stopped by the process id saved at start, never by name.

    python -m sparkrec.dev.kafka up --dir build/kafka      # prints the bootstrap servers
    python -m sparkrec.dev.kafka down --dir build/kafka
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from sparkrec.core.processes import process_running
from sparkrec.dev.cluster import HOST, _free_port, _kill_group

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.25.3"  # the log4j2 line Spark 4.2 ships; Kafka 4.x logs through log4j2 too
STATE = "kafka.json"
CACHE = Path(os.environ.get("SPARKREC_KAFKA_CACHE", Path.home() / ".cache" / "sparkrec" / f"kafka-{KAFKA_VERSION}"))

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sparkrec</groupId><artifactId>kafka-broker-jars</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
"""


def fetch(cache: Path = CACHE) -> Path:
    """The directory of the broker's jars, fetched by Maven from Maven Central on first use.

    Raises:
        RuntimeError: Maven is missing or could not resolve the jars (its output is in the message).
    """
    lib = cache / "lib"
    done = cache / ".complete"
    if done.exists() and any(lib.glob("kafka_2.13-*.jar")):
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("Maven (mvn) is needed once to fetch Kafka's jars from Maven Central; install it (apt: maven)")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
    log.info("fetching Kafka %s's jars from Maven Central into %s", KAFKA_VERSION, lib)
    out = subprocess.run(
        [mvn, "-q", "-B", "-f", str(cache / "pom.xml"), "dependency:copy-dependencies", f"-DoutputDirectory={lib}",
         "-DincludeScope=runtime"],
        capture_output=True, text=True,
    )
    if out.returncode != 0 or not any(lib.glob("kafka_2.13-*.jar")):
        raise RuntimeError(f"Maven could not fetch Kafka {KAFKA_VERSION}'s jars:\n{(out.stdout + out.stderr)[-3000:]}")
    done.touch()
    return lib


@dataclass
class Broker:
    """What was started: enough to reach the broker and to stop it from another process."""

    directory: str
    bootstrap: str
    pid: int

    def save(self) -> None:
        Path(self.directory, STATE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Broker:
        path = Path(directory, STATE)
        if not path.exists():
            raise FileNotFoundError(f"no broker state at {path}: was it started with --dir {directory}?")
        return cls(**json.loads(path.read_text()))

    @property
    def port(self) -> int:
        return int(self.bootstrap.rsplit(":", 1)[1])

    def answers(self) -> bool:
        """Whether the broker serves metadata (a listening socket alone is not enough: KRaft starts first)."""
        try:
            from confluent_kafka.admin import AdminClient
        except ImportError:  # without the client, an open port is the best available sign
            try:
                with socket.create_connection((HOST, self.port), timeout=2):
                    return True
            except OSError:
                return False
        try:
            meta = AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 3000}).list_topics(timeout=3)
            return bool(meta.brokers)
        except Exception:  # noqa: BLE001 - any client error means "not yet"
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop exactly the process this broker was started as (its session), forcefully after `timeout`."""
        _kill_group(self.pid, sig)
        deadline = time.monotonic() + timeout
        while process_running(self.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if process_running(self.pid):
            _kill_group(self.pid, signal.SIGKILL)
        Path(self.directory, STATE).unlink(missing_ok=True)


def _cluster_id(draw=uuid.uuid4) -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64 without padding (what `random-uuid` prints).

    One UUID in 64 encodes to a string starting with '-', which the storage tool's argument parser
    takes for an option ("--cluster-id: expected one argument"); Kafka's own `random-uuid` draws again
    in that case, and so does this.
    """
    while True:
        cid = base64.urlsafe_b64encode(draw().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _properties(data: Path, port: int, controller_port: int) -> str:
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{HOST}:{controller_port}",
        f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={data}",
        "num.partitions=1",
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        "",
    ])


def start(directory: str | Path, port: int | None = None, timeout: float = 120, heap: str = "512m") -> Broker:
    """Format a KRaft storage directory under `directory` (once) and start the broker; wait until it answers.

    Starting again on the same directory after `stop` keeps the topics and their offsets (the restart
    a stream must survive); the port is then the one saved, so clients reconnect to the same address.

    Raises:
        RuntimeError: the broker exited or did not answer within `timeout` (its log is named).
    """
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    lib = fetch()
    java = str(Path(os.environ["JAVA_HOME"], "bin", "java")) if os.environ.get("JAVA_HOME") else shutil.which("java") or "java"
    classpath = f"{lib}/*"
    props = d / "server.properties"
    ports = d / "ports.json"
    if ports.exists():  # a restart: same addresses, same storage
        port, controller_port = json.loads(ports.read_text())
    else:
        port, controller_port = port or _free_port(), _free_port()
        ports.write_text(json.dumps([port, controller_port]))
    props.write_text(_properties(d / "data", port, controller_port))
    log4j = d / "log4j2.properties"
    log4j.write_text(_LOG4J2.format(log=d / "server.log"))
    jvm = [java, f"-Xmx{heap}", f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
    if not (d / "data" / "meta.properties").exists():
        fmt = subprocess.run([*jvm, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props)],
                             capture_output=True, text=True)
        if fmt.returncode != 0:
            raise RuntimeError(f"formatting the KRaft storage failed:\n{(fmt.stdout + fmt.stderr)[-3000:]}")
    with (d / "stdout.log").open("ab") as out:
        proc = subprocess.Popen([*jvm, "kafka.Kafka", str(props)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    broker = Broker(str(d), f"{HOST}:{port}", proc.pid)
    broker.save()
    deadline = time.monotonic() + timeout
    try:
        while not broker.answers():
            if proc.poll() is not None:
                raise RuntimeError(f"the Kafka broker exited with {proc.returncode}; see {d}/server.log and {d}/stdout.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Kafka broker did not answer within {timeout:.0f}s; see {d}/server.log")
            time.sleep(0.5)
    except BaseException:
        broker.stop(signal.SIGKILL)
        raise
    log.info("Kafka %s broker up at %s (pid %d, %s)", KAFKA_VERSION, broker.bootstrap, broker.pid, d)
    return broker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparkrec.dev.kafka", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["fetch", "up", "down", "status"])
    p.add_argument("--dir", default="build/kafka", help="where the state, logs and the broker's data go")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.action == "fetch":
            print(fetch())
        elif args.action == "up":
            print(start(args.dir).bootstrap)
        elif args.action == "down":
            Broker.load(args.dir).stop()
        else:
            b = Broker.load(args.dir)
            print(f"{b.bootstrap}: {'answers' if b.answers() else 'does not answer'} (pid {b.pid})")
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
