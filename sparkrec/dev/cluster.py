"""A Spark standalone cluster on localhost, for trying spark-submit and for the cluster tests.

The pip-installed pyspark has `bin/spark-class` but not `sbin/start-master.sh`,
so the master and the workers are started as `spark-class` processes of
their own (each in a new session, so a test can kill one worker alone), and
everything started is stopped again by process id, never by name.

    python -m sparkrec.dev.cluster start --dir /tmp/sparkrec-cluster   # prints the master URL
    python -m sparkrec.dev.cluster stop --dir /tmp/sparkrec-cluster
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparkrec.core.processes import process_running

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STATE = "cluster.json"


def spark_home() -> Path:
    """SPARK_HOME if set, else the pyspark package itself (which carries bin/ and jars/)."""
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"])
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """What was started: enough to reach it, watch it and stop it from another process."""

    directory: str
    master_url: str
    web_url: str
    master_pid: int
    worker_pids: list[int] = field(default_factory=list)

    def save(self) -> None:
        Path(self.directory, STATE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Cluster:
        path = Path(directory, STATE)
        if not path.exists():
            raise FileNotFoundError(f"no cluster state at {path}: was it started with --dir {directory}?")
        return cls(**json.loads(path.read_text()))

    def alive_workers(self) -> int:
        """Workers the master currently counts as ALIVE (from its JSON status page).

        -1 while the page is unreachable or is not this master's (another
        process's page on that port once failed CI, so the page must name our URL).
        """
        try:
            with urllib.request.urlopen(f"{self.web_url}/json/", timeout=5) as r:
                status = json.load(r)
        except (OSError, ValueError):
            return -1
        if not isinstance(status, dict) or status.get("url") != self.master_url:
            return -1
        return sum(1 for w in status.get("workers", []) if w.get("state") == "ALIVE")

    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill one worker and the executors it launched (its process group), as a lost machine would be."""
        _kill_group(self.worker_pids[index], sig)

    def stop(self) -> None:
        for pid in [*self.worker_pids, self.master_pid]:
            _kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for pid in [*self.worker_pids, self.master_pid]:
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _running(pid):
                _kill_group(pid, signal.SIGKILL)
        Path(self.directory, STATE).unlink(missing_ok=True)


_running = process_running


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> int:
    with log_path.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc.pid


def start(directory: str | Path, workers: int = 2, cores: int = 1, memory: str = "2g", timeout: float = 90) -> Cluster:
    """Start a master and `workers` workers and wait until the master lists every one as ALIVE.

    Raises:
        RuntimeError: a process died or the workers did not register in time (the logs are named).
    """
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    spark_class = str(spark_home() / "bin" / "spark-class")
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": HOST,
        "SPARK_HOME": str(spark_home()),
        # Executors run Python with the driver's interpreter, whatever PATH says.
        "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
        "SPARK_LOG_DIR": str(d / "logs"),
    }
    (d / "logs").mkdir(exist_ok=True)
    # Port 0: the master binds what it gets and says so in its log. A port picked
    # here and passed on could be taken by another process before the master binds it.
    master_log = d / "logs" / "master.log"
    master_log.unlink(missing_ok=True)
    master_pid = _spawn(
        [spark_class, "org.apache.spark.deploy.master.Master", "--host", HOST, "--port", "0", "--webui-port", "0"],
        master_log,
        env,
    )
    cluster = Cluster(str(d), "", "", master_pid)
    try:
        found: dict[str, str] = {}

        def bound() -> bool:
            found.update(_bound_addresses(master_log))
            return len(found) == 2

        _wait(bound, timeout, "the master to bind its ports (master.log)", cluster)
        cluster.master_url, cluster.web_url = found["master"], found["web"]
        cluster.save()
        _wait(lambda: cluster.alive_workers() >= 0, timeout, "the master's status page", cluster)
        for i in range(workers):
            work = d / f"worker{i}"
            work.mkdir(exist_ok=True)
            pid = _spawn(
                [spark_class, "org.apache.spark.deploy.worker.Worker", cluster.master_url,
                 "--host", HOST, "--cores", str(cores), "--memory", memory,
                 "--webui-port", "0", "--work-dir", str(work)],
                d / "logs" / f"worker{i}.log",
                env,
            )
            cluster.worker_pids.append(pid)
            cluster.save()
        _wait(lambda: cluster.alive_workers() >= workers, timeout, f"{workers} workers to register", cluster)
    except BaseException:
        cluster.stop()
        raise
    log.info("standalone cluster up at %s with %d workers (%s)", cluster.master_url, workers, cluster.web_url)
    return cluster


_MASTER_URL = re.compile(r"Starting Spark master at (spark://\S+)")
_MASTER_UI = re.compile(r"Successfully started service 'MasterUI' on port (\d+)")


def _bound_addresses(master_log: Path) -> dict[str, str]:
    """The master's RPC URL and web UI address as its log reports them (what is found so far)."""
    try:
        text = master_log.read_text(errors="replace")
    except FileNotFoundError:
        return {}
    out = {}
    if m := _MASTER_URL.search(text):
        out["master"] = m.group(1)
    if m := _MASTER_UI.search(text):
        out["web"] = f"http://{HOST}:{m.group(1)}"
    return out


def _wait(ready, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        for pid in [cluster.master_pid, *cluster.worker_pids]:
            if not _running(pid):
                raise RuntimeError(f"a cluster process (pid {pid}) exited while waiting for {what}; see {cluster.directory}/logs")
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}; see {cluster.directory}/logs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparkrec.dev.cluster", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--dir", default="/tmp/sparkrec-cluster", help="where state, logs and work directories go")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--memory", default="2g")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.action == "start":
            c = start(args.dir, args.workers, args.cores, args.memory)
            print(c.master_url)
        elif args.action == "stop":
            Cluster.load(args.dir).stop()
        else:
            c = Cluster.load(args.dir)
            print(f"{c.master_url}: {c.alive_workers()} alive workers ({c.web_url})")
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
