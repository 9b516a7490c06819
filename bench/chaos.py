"""``make chaos``: faults injected into a running platform, and the figures that prove nothing was lost.

Every scenario runs the real thing: the embedded broker on durable (S3) storage, runners as their own
processes (``nbreduce runner``), the lastrun.txt watcher as its own process, and a follower of the status
topic (the portal's :class:`~runner.bus.status.StatusView`) in this process. Faults are real too: SIGKILL of
a runner with its kernels, the broker stopped or killed while everything runs, a runner killed next to
another one, a thousand hostile messages, an archive on its own file system made read-only or full.

For each scenario the verdict comes from what is left, not from logs: every job must have exactly one
archived version (``job.json``) and show ``succeeded`` in the folded status topic (``exactly once N/N``);
*duplicates* are extra versions, *lost* are jobs without one, *stale* are jobs whose shown state is not
their archived result. No component is restarted by the harness except the runners it killed itself.

``python -m bench.chaos`` runs the full-size scenarios and writes docs/reliability.md; the chaos tests
(tests/test_chaos.py) run the same scenarios at CI size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import psutil
from confluent_kafka import KafkaError, Message

from runner.bus.clients import Publisher, producer, read_topic
from runner.bus.embedded import EmbeddedBroker
from runner.bus.health import RunnerHealth, health_table
from runner.bus.models import MAX_MESSAGE_BYTES, DeadLetter, JobState, ReductionRequest, StatusEvent
from runner.bus.status import StatusView
from runner.bus.table import TopicTable
from runner.bus.topics import DEAD_LETTER, REDUCTION_REQUESTS, REDUCTION_STATUS, RUN_COMPLETIONS
from runner.config import Settings
from runner.isis.layout import current_cycle, instrument_dir, lastrun_file, write_lastrun
from runner.pipeline.reduce import identity_of, job_id_for, message_id_of, request_job_id
from runner.triggers.base import stable_id

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "bench" / "notebooks"
INSTRUMENT = "CHAOS"
RB = "1999001"


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One scenario's figures."""

    scenario: str
    what: str
    runs: int = 0
    exactly_once: int = 0
    duplicates: int = 0
    lost: int = 0
    stale: int = 0
    recovery_s: float | None = None
    seconds: float = 0.0
    #: Facts worth reading (timings, counts); ``problems`` make the scenario fail.
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.exactly_once == self.runs and self.duplicates == 0 and self.lost == 0 and self.stale == 0
                and not self.problems)

    def figure(self) -> str:
        recovery = f"{self.recovery_s:.1f} s" if self.recovery_s is not None else "—"
        return (f"exactly once {self.exactly_once}/{self.runs}, duplicates {self.duplicates}, lost {self.lost}, "
                f"stale {self.stale}, recovery {recovery}")


# --------------------------------------------------------------------------- the platform


class Platform:
    """Broker (durable), runners as processes, optional watcher, and followers of status, health and dead letters.

    ``archive``: where the archive lives (its own file system for the archive faults).
    """

    def __init__(self, work: Path, *, parallel: int = 2, file_wait: float = 120.0, archive: Path | None = None,
                 env: dict[str, str] | None = None):
        self.work = work
        self.home = work / "home"
        self.data = self.home / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        notebooks = work / "notebooks"
        if not notebooks.exists():
            shutil.copytree(NOTEBOOKS / INSTRUMENT, notebooks / INSTRUMENT)
        self.env = {**os.environ, "NBREDUCE_HOME": str(self.home), "NBREDUCE_NOTEBOOKS": str(notebooks),
                    "NBREDUCE_DATA_ROOTS": str(self.data), "NBREDUCE_RUNNER__MAX_PARALLEL": str(parallel),
                    "NBREDUCE_RUNNER__HEARTBEAT_SECONDS": "1", "NBREDUCE_RUNNER__FILE_WAIT_SECONDS": str(file_wait),
                    "NBREDUCE_TRIGGERS__HEARTBEAT_SECONDS": "2", **(env or {})}
        self.env.pop("NBREDUCE_BROKER__BOOTSTRAP_SERVERS", None)
        if archive is not None:
            self.env["NBREDUCE_ARCHIVE"] = str(archive)
        self.settings = Settings.from_env(self.env)
        self.broker = EmbeddedBroker(self.settings)
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        self._stop = threading.Event()
        self._lock = threading.Condition()
        #: First time (monotonic) each job was seen final, and the state it had then.
        self.final_at: dict[str, float] = {}
        self.succeeded_by: dict[str, str] = {}
        self.status = StatusView(self.settings)
        self.health = health_table(self.settings, RunnerHealth)
        self.letters = TopicTable(self.settings, DEAD_LETTER, DeadLetter,
                                  key=lambda d: f"{d.source_topic}/{d.partition}/{d.offset}")
        #: When the dead letter of each source record (``topic/partition/offset``) arrived.
        self.letter_at: dict[str, float] = {}
        #: Heartbeat states seen per runner name (e.g. "broker unreachable" during an outage).
        self.states_seen: dict[str, set[str]] = {}
        self._publisher: Publisher | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Platform:
        self.broker.start()
        self.status.start(self._stop, self._on_status)
        self.health.start(self._stop, self._on_health)
        self.letters.start(self._stop, self._on_letter)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self.processes):
            self.terminate(name)
        self._stop.set()
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                self._publisher.close(2)
        self.broker.stop()

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.settings, timeout=120)
        return self._publisher

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _on_status(self, event: StatusEvent) -> None:
        if event.state.final:
            with self._lock:
                self.final_at.setdefault(event.job_id, time.monotonic())
                if event.state is JobState.SUCCEEDED and event.runner:
                    self.succeeded_by[event.job_id] = event.runner
                self._lock.notify_all()

    def _on_letter(self, letter: DeadLetter) -> None:
        with self._lock:
            self.letter_at.setdefault(f"{letter.source_topic}/{letter.partition}/{letter.offset}", time.monotonic())
            self._lock.notify_all()

    def _on_health(self, beat: RunnerHealth) -> None:
        self.states_seen.setdefault(beat.name, set()).add(beat.state)
        self._notify()

    # -- processes ----------------------------------------------------------------------------
    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``nbreduce <args>`` as its own process (own session: killed with its kernels, never with us)."""
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen([sys.executable, "-m", "runner.cli", "-v", *args], env={**self.env, **(env or {})},
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.work)
        log.close()
        self.processes[name] = process
        return process

    def start_runner(self, name: str = "runner") -> subprocess.Popen:
        return self.start(name, "runner")

    def runner_name(self, name: str) -> str:
        """The runner's identity in heartbeats and status events (``host:pid``)."""
        import socket

        return f"{socket.gethostname()}:{self.processes[name].pid}"

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started (kernels, fork servers), as a node failure would."""
        process = self.processes.pop(name)
        try:
            tree = psutil.Process(process.pid)
            victims = [tree, *tree.children(recursive=True)]
        except psutil.Error:
            victims = []
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.kill()
        process.wait(30)

    def terminate(self, name: str, timeout: float = 60) -> int | None:
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.processes[name] = process
            self.kill(name)
            return None

    def kill_when_archived(self, name: str, timeout: float = 120) -> bool:
        """SIGKILL runner ``name`` the moment one of its running jobs gets its ``job.json``: the version is
        published, its ``succeeded`` is about to be and the offset is not committed (the runner's next moves), so
        the message is redelivered and its result must be re-announced, not run again. The records of the jobs
        it runs (their folders are in their ``running`` events) are watched every millisecond."""
        identity, pid = self.runner_name(name), self.processes[name].pid
        deadline = time.monotonic() + timeout
        watched: list[Path] = []
        refreshed = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - refreshed > 0.05:
                refreshed = time.monotonic()
                watched = [(self.settings.archive / e.notebook).parent / "job.json" for e in self.status.snapshot()
                           if e.state is JobState.RUNNING and e.runner == identity and e.notebook]
            if any(record.exists() for record in watched):
                os.kill(pid, signal.SIGKILL)  # at once; then its kernels
                self.kill(name)
                return True
            time.sleep(0.001)
        return False

    def alive(self, name: str) -> bool:
        return name in self.processes and self.processes[name].poll() is None

    def wait_runners(self, names: list[str], timeout: float = 120, all_partitions: bool = True) -> None:
        """Until every named runner says ``ok`` (and, together, they hold every partition of the work topics)."""
        wanted = {self.runner_name(n) for n in names}
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                beats = {b.name: b for b in self.health.snapshot() if b.name in wanted and b.state == "ok"}
                held = {p for b in beats.values() for p in b.partitions}
                if beats.keys() == wanted and (not all_partitions or len(held) >= 12):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = {b.name: (b.state, b.problem) for b in self.health.snapshot() if b.name in wanted}
                    late = [n for n in names if self.runner_name(n) not in beats]
                    tails = "\n".join(f"--- {n} ({'alive' if self.alive(n) else 'exited'}), last log lines:\n"
                                      f"{self.log_tail(n)}" for n in late)
                    raise TimeoutError(f"runners {sorted(wanted - beats.keys())} not ready; partitions held {held}; "
                                       f"their last heartbeats (state, problem): {seen}\n{tails}")
                self._lock.wait(min(left, 0.5))

    # -- the broker ---------------------------------------------------------------------------
    def stop_broker(self, kill: bool = False) -> None:
        """Stop the broker cleanly, or SIGKILL it and its storage server (its state file stays, as after a crash)."""
        if not kill:
            self.broker.stop()
            return
        state = self.broker.state() or {}
        for pid in (state.get("pids") or {}).values():
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
                psutil.Process(pid).wait(10)

    def start_broker(self) -> None:
        self.broker.start()

    # -- work ---------------------------------------------------------------------------------
    def data_file(self, run: int) -> Path:
        path = self.data / "requests" / f"CHA{run:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("counts")
        return path

    def submit(self, runs: list[int], sleep: float | Callable[[int], float] = 1.0) -> dict[str, int]:
        """One request per run (data file written first); returns job id -> run."""
        jobs = {}
        for run in runs:
            seconds = sleep(run) if callable(sleep) else sleep
            request = ReductionRequest(instrument=INSTRUMENT, run_number=run, rb_number=RB,
                                       data=str(self.data_file(run)), requested_by="chaos",
                                       reduction_arguments={"sleep_seconds": round(seconds, 2)})
            self.publisher.publish(REDUCTION_REQUESTS, request, key=request.message_id)
            jobs[request_job_id(request)] = run
        return jobs

    def write_run(self, run: int) -> int:
        """A run the way the instrument ends one: the NeXus file, then lastrun.txt (for the watcher)."""
        folder = instrument_dir(self.data, INSTRUMENT) / "data" / f"cycle_{current_cycle()}"
        folder.mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / f"CHA{run:05d}.nxs", "w") as f:
            f.create_group("raw_data_1").create_dataset("experiment_identifier", data=[RB.encode()])
        write_lastrun(lastrun_file([self.data], INSTRUMENT), "CHA", run, 5)
        return run

    @staticmethod
    def watched_job(run: int) -> str:
        """Job id of the completion the lastrun watcher publishes for ``run``."""
        return job_id_for(RUN_COMPLETIONS, -1, -1, stable_id("lastrun", INSTRUMENT, run))

    def running(self) -> list[str]:
        return [e.job_id for e in self.status.snapshot() if e.state is JobState.RUNNING]

    def wait_final(self, jobs: set[str], timeout: float) -> set[str]:
        """Until every job is final; returns the ones that are not."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                pending = {j for j in jobs if (e := self.status.get(j)) is None or not e.state.final}
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    return pending
                self._lock.wait(min(left, 0.5))

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))
            return True

    def first_final_after(self, since: float, jobs: set[str]) -> float | None:
        """Seconds from ``since`` to the first job of ``jobs`` finishing after it."""
        after = [t for j, t in self.final_at.items() if j in jobs and t >= since]
        return min(after) - since if after else None

    # -- the verdict --------------------------------------------------------------------------
    def archived(self) -> tuple[dict[str, list[StatusEvent]], int]:
        """Archived records per job id, and versions without a record (reserved, never finished)."""
        records: dict[str, list[StatusEvent]] = {}
        orphans = 0
        for version in self.settings.archive.glob(f"{INSTRUMENT}/RB*/*/v*"):
            record = version / "job.json"
            if not record.is_file():
                orphans += 1
                continue
            event = StatusEvent.model_validate_json(record.read_text())
            records.setdefault(event.job_id, []).append(event)
        return records, orphans

    def verdict(self, result: Result, jobs: set[str]) -> Result:
        """Fill ``result`` from the archive and the folded status topic (read afresh, as a new reader would)."""
        folded = StatusView.rebuild(self.settings)
        records, orphans = self.archived()
        result.runs = len(jobs)
        for job in jobs:
            versions = records.get(job, [])
            shown = folded.get(job)
            result.duplicates += max(0, len(versions) - 1)
            if not versions:
                result.lost += 1
            elif shown is None or shown.state is not versions[0].state:
                result.stale += 1
            elif len(versions) == 1 and shown.state is JobState.SUCCEEDED:
                result.exactly_once += 1
        if orphans:
            result.problems.append(f"{orphans} version folders reserved but never finished")
        naive = _last_in_log_order(self.settings, jobs)
        if naive:
            result.notes.append(f"{naive} jobs whose last event in log order is not final (a reader that ignored "
                                "the state order would show them stale; every nbreduce reader folds by it)")
        return result

    def runtime_files(self) -> int:
        run_dir = self.settings.run_dir
        return sum(1 for p in run_dir.glob("kernel-*")) if run_dir.is_dir() else 0

    def log(self, name: str) -> list[str]:
        """The lines process ``name`` has logged so far (none before it wrote any)."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def log_tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.log(name)[-lines:]) or "(no log)"

    def log_lines(self, name: str, needle: str) -> int:
        return sum(needle in line for line in self.log(name))


def _last_in_log_order(settings: Settings, jobs: set[str]) -> int:
    last: dict[str, StatusEvent] = {}
    for msg in read_topic(settings, REDUCTION_STATUS):
        with contextlib.suppress(ValueError):
            event = StatusEvent.from_bytes(msg.value())
            if event.job_id in jobs:
                last[event.job_id] = event
    return sum(1 for e in last.values() if not e.state.final)


@contextmanager
def workspace(root: Path | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nbreduce-chaos-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- scenarios


def kill_storm(work: Path, runs: int = 30, kills: int = 8, seed: int = 13) -> Result:
    """SIGKILL of the runner and its kernels, mid-reduction and right after ``succeeded`` (before the commit)."""
    rng = random.Random(seed)
    result = Result("kill storm", f"{runs} runs, {kills} kills of the runner and its kernels (mid-reduction, and "
                    "the moment a version is published: before its `succeeded` and before the offset commit); the "
                    "runner is restarted after each kill")
    started = time.monotonic()
    with Platform(work) as platform:
        platform.start_runner()
        platform.wait_runners(["runner"])
        jobs = platform.submit(list(range(1, runs + 1)), sleep=lambda _run: rng.uniform(0.5, 2.0))
        recoveries = []
        for kill in range(kills):
            if kill % 2 == 0:  # mid-reduction
                platform.wait_for(lambda: bool(platform.running()), 60)
                time.sleep(rng.uniform(0.2, 0.8))
                how = "mid-reduction"
            else:  # as a job's version is published, before its `succeeded` and its commit
                how = "as a version is published"
            if how == "mid-reduction":
                platform.kill("runner")
            elif not platform.kill_when_archived("runner"):
                result.problems.append(f"kill {kill + 1}: no version was published to kill the runner at")
                platform.kill("runner")
            platform.start_runner()
            back = time.monotonic()
            platform.wait_runners(["runner"])
            pending = {j for j in jobs if j not in platform.final_at}
            if pending:
                platform.wait_for(lambda b=back, p=pending: platform.first_final_after(b, p) is not None, 120)
                recovery = platform.first_final_after(back, pending)
                if recovery is not None:
                    recoveries.append(recovery)
            result.notes.append(f"kill {kill + 1} {how}")
        missing = platform.wait_final(set(jobs), 300)
        if missing:
            result.problems.append(f"{len(missing)} jobs never reached a final state")
        platform.terminate("runner")
        leftover = platform.runtime_files()
        platform.verdict(result, set(jobs))
        if leftover:
            result.problems.append(f"{leftover} kernel runtime files left in {platform.settings.run_dir}")
        result.notes = [f"{kills} kills ({sum('mid' in n for n in result.notes)} mid-reduction, "
                        f"{sum('published' in n for n in result.notes)} the moment a version was published, before "
                        "its `succeeded` and its offset commit)",
                        f"kernel runtime files left after the storm: {leftover}"] + \
                       [n for n in result.notes if not n.startswith("kill ")]
        result.recovery_s = max(recoveries) if recoveries else None
    result.seconds = time.monotonic() - started
    return result


def broker_outages(work: Path, runs: int = 20, clean_s: float = 34, killed_s: float = 76) -> Result:
    """The broker stopped cleanly, then killed, while the runner, the watcher and a status follower keep running."""
    result = Result("broker outages", f"{runs} runs (half requested before the outages, half found by the lastrun "
                    f"watcher while the broker is away); broker stopped cleanly for {clean_s:.0f} s, later killed "
                    f"(SIGKILL) for {killed_s:.0f} s; runner, watcher and follower are never restarted")
    started = time.monotonic()
    first_watched = 1001
    with Platform(work) as platform:
        platform.start_runner()
        platform.start("watcher", "watch", "-i", INSTRUMENT, "--interval", "0.5", "--from",
                       f"{INSTRUMENT}={first_watched}")
        platform.wait_runners(["runner"])
        requested = runs // 2
        jobs = set(platform.submit(list(range(1, requested + 1)), sleep=1.5))
        watched = [first_watched + i for i in range(runs - requested)]
        per_outage = [watched[: len(watched) // 2], watched[len(watched) // 2:]]
        recoveries = []
        for kill, seconds, new_runs in ((False, clean_s, per_outage[0]), (True, killed_s, per_outage[1])):
            platform.wait_for(lambda: bool(platform.running()), 60)  # mid-work
            platform.stop_broker(kill=kill)
            down = time.monotonic()
            for run in new_runs:  # runs end while the broker is away: the watcher must publish them later
                platform.write_run(run)
                jobs.add(platform.watched_job(run))
                time.sleep(min(1.0, seconds / (2 * max(1, len(new_runs)))))
            time.sleep(max(0.0, seconds - (time.monotonic() - down)))
            platform.start_broker()
            back = time.monotonic()
            pending = {j for j in jobs if j not in platform.final_at}
            platform.wait_for(lambda b=back, p=pending: platform.first_final_after(b, p) is not None, 180)
            recovery = platform.first_final_after(back, pending)
            recoveries.append(recovery if recovery is not None else float("inf"))
            result.notes.append(f"{'killed' if kill else 'clean stop'} for {seconds:.0f} s: first job finished "
                                f"{recovery if recovery is not None else float('inf'):.1f} s after the broker was back")
        missing = platform.wait_final(jobs, 300)
        if missing:
            result.problems.append(f"{len(missing)} jobs never reached a final state")
        for name in ("runner", "watcher"):
            if not platform.alive(name):
                result.problems.append(f"{name} died (exit {platform.processes[name].poll()})")
        unreachable = any("broker unreachable" in states for states in platform.states_seen.values())
        result.notes.append("runner heartbeat said `broker unreachable` during the outage" if unreachable else
                            "no `broker unreachable` heartbeat reached the health topic")
        if not unreachable:
            result.problems.append("the runner never reported the broker as unreachable")
        noise = platform.log_lines("runner", "nbreduce.librdkafka")
        result.notes.append(f"librdkafka lines in the runner's log over both outages: {noise}")
        platform.terminate("watcher")
        platform.terminate("runner")
        platform.verdict(result, jobs)
        result.recovery_s = max(recoveries) if recoveries else None
    result.seconds = time.monotonic() - started
    return result


def two_runners(work: Path, runs: int = 40) -> Result:
    """Two runners in one group share one instrument's runs; one is killed right after a job succeeded."""
    result = Result("two runners, one killed", f"{runs} runs of one instrument, two runners in one group; one runner "
                    "killed (SIGKILL, with its kernels) the moment one of its versions is published, before its "
                    "`succeeded` and its commit, and not restarted: the other takes its partitions over, re-announces "
                    "that result and runs the rest")
    started = time.monotonic()
    with Platform(work) as platform:
        platform.start_runner("a")
        platform.start_runner("b")
        platform.wait_runners(["a", "b"])
        names = {platform.runner_name(n): n for n in ("a", "b")}
        jobs = platform.submit(list(range(1, runs + 1)), sleep=1.0)
        victim = platform.runner_name("b")
        platform.wait_for(lambda: sum(r == victim for r in platform.succeeded_by.values()) >= 2, 120)
        done = len([j for j, r in platform.succeeded_by.items() if r == victim])
        if not platform.kill_when_archived("b"):
            result.problems.append("runner b published no version to be killed at")
            platform.kill("b")
        killed = time.monotonic()
        pending = {j for j in jobs if j not in platform.final_at}
        missing = platform.wait_final(set(jobs), 300)
        if missing:
            result.problems.append(f"{len(missing)} jobs never reached a final state")
        recovery = platform.first_final_after(killed + 0.5, pending)
        result.recovery_s = recovery
        shares = {names.get(r, r): sum(1 for x in platform.succeeded_by.values() if x == r) for r in names}
        result.notes.append(f"runs reduced per runner: a {shares.get('a', 0)}, b {shares.get('b', 0)} "
                            f"(b killed after {done + 1} of its runs)")
        if not (shares.get("a") and shares.get("b")):
            result.problems.append("one runner did all the work: one instrument's runs were not shared")
        platform.terminate("a")
        platform.verdict(result, set(jobs))
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- the fuzz set

@dataclass
class Sent:
    """One fuzzed message and what must become of it."""

    kind: str
    value: bytes
    expect: str  # "dead letter", "rejected", "skipped", "failed", "succeeded"
    key: bytes | None = None
    headers: list[tuple[str, bytes]] | None = None
    topic: str = RUN_COMPLETIONS
    where: tuple[int, int] | None = None


def fuzz_messages(platform: Platform, count: int, seed: int = 7) -> list[Sent]:
    """``count`` hostile messages: the poison classes of issue 13 (each with a good run behind it in its partition),
    malformed and out-of-bounds input, reused ids, and good runs (some whose file comes late, some never)."""
    rng = random.Random(seed)
    data = platform.data
    outside = platform.work / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("not yours")
    link = data / "link-out.txt"
    if not link.exists():
        link.symlink_to(outside / "secret.txt")
    nexus = data / "CHA_rb300.nxs"
    with h5py.File(nexus, "w") as f:
        f.create_group("raw_data_1").create_dataset("experiment_identifier", data=[("9" * 300).encode()])
    marker = platform.work / "pwned"
    counter = iter(range(10**6))

    def run() -> int:
        return 50000 + next(counter)

    def valid(**extra: Any) -> dict[str, Any]:
        number = run()
        return {"message_id": f"fuzz-{number}", "instrument": INSTRUMENT, "run_number": number, "rb_number": RB,
                "data": str(platform.data_file(number)), "reduction_arguments": {"sleep_seconds": 0}, **extra}

    def good(expect: str = "succeeded", key: bytes | None = None, **extra: Any) -> Sent:
        return Sent("good run", json.dumps(valid(**extra)).encode(), expect, key=key)

    def bad(kind: str, body: Any = None, raw: bytes | None = None, expect: str | None = None,
            key: bytes | None = None) -> Sent:
        """A refused message: a dead letter, and a ``rejected`` status when it names something identifiable."""
        value = raw if raw is not None else json.dumps(body).encode()
        if expect is None:
            expect = "rejected" if len(value) <= MAX_MESSAGE_BYTES and identity_of(value) else "dead letter"
        return Sent(kind, value, expect, key=key)

    poison = [
        bad("10,000-deep nested JSON", raw=b'{"instrument": "CHAOS", "run_number": 1, "reduction_arguments": '
            b'{"a": ' + b"[" * 10000 + b"]" * 10000 + b"}}"),
        bad("scale = 10**400", valid(reduction_arguments={"scale": 10**400})),
        bad("message over 750 kB", raw=json.dumps({**valid(), "padding": "x" * 800_000}).encode()),
        bad("600 kB run_title", valid(run_title="t" * 600_000)),
        bad("600 kB missing data path", valid(data=str(data / ("d" * 600_000)))),
        bad("NeXus with a 300-digit RB", {**valid(data=str(nexus)), "rb_number": None}, expect="rejected"),
        bad("200 kB run_title (under the message limit)", valid(run_title="t" * 200_000)),
        bad("5,000-character missing data path", valid(data=str(data / ("d" * 5000)))),
    ]
    poison = [item for p in poison for item in (p, good(key=p.key or os.urandom(8).hex().encode()))]
    for first, behind in zip(poison[::2], poison[1::2], strict=True):
        first.key = behind.key  # one partition: the good run really is behind the poison
    reused = os.urandom(8).hex().encode()
    header = [("nbreduce-replay-id", b"fuzz-replay-1")]
    duplicates = [  # in order, in one partition
        bad("invalid message, its id used again next", valid(message_id="fuzz-reused-id", run_number=-1), key=reused),
        bad("valid message reusing a rejected message's id", {**valid(), "message_id": "fuzz-reused-id"},
            expect="dead letter", key=reused),
        Sent("replay-id header", json.dumps(valid()).encode(), "succeeded", key=reused, headers=header),
        Sent("another message with the same replay-id header", json.dumps(valid()).encode(), "dead letter",
             key=reused, headers=header),
    ]
    templates: list[Callable[[], Sent]] = [
        lambda: bad("random bytes", raw=bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))),
        lambda: bad("not JSON", raw=b"{" + os.urandom(8).hex().encode()),
        lambda: bad("JSON list", [1, 2, 3]),
        lambda: bad("wrong types", {"instrument": 5, "run_number": "x", "data": 7}),
        lambda: bad("missing fields", {"instrument": INSTRUMENT}),
        lambda: bad("negative run", valid(run_number=-rng.randint(1, 99))),
        lambda: bad("instrument traversal", valid(instrument="../../etc")),
        lambda: bad("RB traversal", valid(rb_number="../1")),
        lambda: bad("relative data path", valid(data="../../etc/passwd"), expect="rejected"),
        lambda: bad("data outside the roots", valid(data="/etc/passwd"), expect="rejected"),
        lambda: bad("symlink out of the data roots", valid(data=str(link)), expect="rejected"),
        lambda: bad("NUL in the data path", valid(data=str(data) + "/a\x00b"), expect="rejected"),
        lambda: bad("unknown instrument", valid(instrument="NOSUCH"), expect="skipped"),
        lambda: bad("unknown parameter", valid(reduction_arguments={"sacle": 1}), expect="rejected"),
        lambda: bad("code as a parameter", valid(reduction_arguments={
            "scale": f"__import__('pathlib').Path({str(marker)!r}).touch()"}), expect="rejected"),
        lambda: bad("NaN parameter", raw=json.dumps(valid(reduction_arguments={"scale": float("nan")})).encode()),
        lambda: bad("too many runs", valid(run_number=list(range(1, 2000)))),
        lambda: bad("overlong message id", valid(message_id="m" * 500)),
    ]
    late = [good() for _ in range(3)]
    platform.late_files = [Path(json.loads(s.value)["data"]) for s in late]  # type: ignore[attr-defined]
    for path in platform.late_files:  # type: ignore[attr-defined]
        path.unlink()  # written a few seconds after the messages
    never = [good("failed", data=str(data / f"never-{i}.txt")) for i in range(2)]
    rest = late + never + [good() for _ in range(5)]
    while len(poison) + len(duplicates) + len(rest) < count:
        rest.append(rng.choice(templates)())
    rng.shuffle(rest)
    return poison + duplicates + rest


def fuzz(work: Path, messages: int = 1000) -> Result:
    """The poison classes and a thousand hostile messages: everything accounted for, nothing run that should not."""
    result = Result("fuzz set", f"{messages} messages: the six poison classes of issue 13 (each followed by a good "
                    "run), reused ids, random and malformed bytes, traversal and symlinks out of the data roots, code "
                    "as parameters, unknown instruments, and good runs whose file comes late or never")
    started = time.monotonic()
    with Platform(work, file_wait=6) as platform:
        platform.start_runner()
        platform.wait_runners(["runner"])
        sent = fuzz_messages(platform, messages)
        client = producer(platform.settings, **{"message.timeout.ms": 60000})
        t0 = time.monotonic()
        for item in sent:
            def on_delivery(err: KafkaError | None, msg: Message, item: Sent = item) -> None:
                if err is None:
                    item.where = (msg.partition(), msg.offset())

            client.produce(item.topic, value=item.value, key=item.key or os.urandom(8).hex().encode(),
                           headers=item.headers, on_delivery=on_delivery)
            client.poll(0)
        client.flush(60)
        threading.Timer(3.0, lambda: [p.write_text("late counts") for p in platform.late_files]).start()

        def job_of(item: Sent) -> str:
            assert item.where is not None
            replay = dict(item.headers or {}).get("nbreduce-replay-id")
            return job_id_for(item.topic, item.where[0], item.where[1], message_id_of(item.value),
                              replay.decode() if replay else None)

        def outcome(item: Sent) -> tuple[str, float] | None:
            """What became of one message, and when: its job's final state (when the job is this message's),
            else the dead letter of its record; None while neither is there."""
            if item.where is None:
                return None
            event = platform.status.get(job_of(item))
            if event is not None and event.state.final and event.trigger is not None \
                    and (event.trigger.partition, event.trigger.offset) == item.where:
                return event.state.value, platform.final_at.get(event.job_id, time.monotonic())
            at = platform.letter_at.get(f"{item.topic}/{item.where[0]}/{item.where[1]}")
            return ("dead letter", at) if at is not None else None

        refused = [i for i in sent if i.expect in ("dead letter", "rejected", "skipped")]
        # every message's expected outcome (a dead letter comes before its `rejected`: waiting for the first
        # outcome would miss the second); a failing runner makes this wait its whole time and then fail
        platform.wait_for(lambda: all((o := outcome(i)) and o[0] == i.expect for i in sent), 180)
        outcomes = {id(i): outcome(i) for i in sent}
        wrong = [(i.kind, i.expect, (outcomes[id(i)] or ("nothing",))[0]) for i in sent
                 if outcomes[id(i)] is None or outcomes[id(i)][0] != i.expect]
        times = [o[1] for i in refused if (o := outcomes[id(i)]) is not None]
        rejection_s = max(times) - t0 if times else float("nan")
        result.runs = len(sent)
        result.exactly_once = len(sent) - len(wrong)
        result.lost = sum(1 for i in sent if outcomes[id(i)] is None)
        for kind, expect, got in sorted(set(wrong))[:10]:
            result.problems.append(f"{kind}: expected {expect}, got {got}")
        result.notes.append("`exactly once` here: every message ended exactly as expected (reduced, failed after its "
                            "file wait, skipped, rejected with a status, or only dead-lettered), with one dead letter "
                            "at most")
        result.notes.append(f"the {len(refused)} refused messages (malformed, out of bounds, unknown instrument) "
                            f"accounted for (a dead letter, and a `rejected`/`skipped` status when identifiable) "
                            f"{rejection_s:.1f} s after the first was sent, sharing the 2 cores with the good runs' "
                            "reductions and kernel starts (1,000 malformed messages alone: `make bench`, "
                            "docs/benchmarks.md)")
        counts: dict[str, int] = {}
        for item in sent:
            counts[item.expect] = counts.get(item.expect, 0) + 1
        result.notes.append("outcomes: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        good_runs = [i for i in sent if i.kind == "good run" and i.expect == "succeeded"]
        records, _ = platform.archived()
        result.duplicates = sum(max(0, len(records.get(job_of(i), [])) - 1) for i in good_runs)
        if (platform.work / "pwned").exists():
            result.problems.append("a parameter's code ran")
        ours = [platform.home, platform.work / "logs", platform.work / "notebooks", platform.work / "outside"]
        outside = [p for p in platform.work.rglob("*") if p.is_file() and not any(p.is_relative_to(o) for o in ours)]
        if outside:
            result.problems.append(f"files written outside NBREDUCE_HOME: {outside[:3]}")
        if not platform.alive("runner"):
            result.problems.append("the runner died")
        platform.terminate("runner")
        result.recovery_s = None
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- the archive on its own file system


def can_mount() -> bool:
    """Whether this process may mount file systems (root with CAP_SYS_ADMIN, as in a privileged container)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="nbreduce-mount-"))
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True)
        if mounted.returncode:
            return False
        subprocess.run(["umount", str(probe)], capture_output=True)
        return True
    finally:
        probe.rmdir()


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def archive_faults(work: Path, runs: int = 16, fault_s: float = 60, size_mb: int = 64) -> Result:
    """The archive (a tmpfs of its own) made read-only, later full, for ``fault_s`` each while runs go on."""
    result = Result("archive read-only, then full", f"{runs} runs; the archive, a {size_mb} MB tmpfs of its own, is "
                    f"made read-only for {fault_s:.0f} s (a read-only bind mount over it), later filled up for "
                    f"{fault_s:.0f} s (a filler file until ENOSPC)")
    started = time.monotonic()
    mount = work / "archive-fs"
    mount.mkdir()
    _sh("mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount))
    archive = mount / "archive"
    archive.mkdir()
    try:
        with Platform(work, archive=archive) as platform:
            platform.start_runner()
            platform.wait_runners(["runner"])
            jobs = platform.submit(list(range(1, runs + 1)), sleep=1.0)
            recoveries = []
            for fault in ("read-only", "full"):
                platform.wait_for(lambda: bool(platform.running()), 60)
                if fault == "read-only":
                    _sh("mount", "--bind", str(archive), str(archive))
                    _sh("mount", "-o", "remount,bind,ro", str(archive))
                else:
                    with contextlib.suppress(OSError), open(mount / "filler", "wb") as filler:
                        while True:
                            filler.write(b"\0" * (1 << 20))
                time.sleep(fault_s)
                if fault == "read-only":
                    _sh("umount", "-l", str(archive))
                else:
                    (mount / "filler").unlink()
                back = time.monotonic()
                pending = {j for j in jobs if j not in platform.final_at}
                platform.wait_for(lambda b=back, p=pending: platform.first_final_after(b, p) is not None, 120)
                recovery = platform.first_final_after(back, pending)
                recoveries.append(recovery if recovery is not None else float("inf"))
            missing = platform.wait_final(set(jobs), 300)
            if missing:
                result.problems.append(f"{len(missing)} jobs never reached a final state")
            reasons = [e.reason or "" for m in read_topic(platform.settings, REDUCTION_STATUS)
                       for e in [StatusEvent.from_bytes(m.value())] if e.state is JobState.WAITING]
            for cause in ("Read-only file system", "No space left on device"):
                shown = sum(cause in r for r in reasons)
                result.notes.append(f"`waiting` events naming \"{cause}\": {shown}")
                if not shown:
                    result.problems.append(f"the real cause \"{cause}\" was never shown")
            result.notes.append("runner heartbeat said `archive unwritable` during the faults"
                                if any("archive unwritable" in s for s in platform.states_seen.values()) else
                                "no `archive unwritable` heartbeat seen")
            platform.terminate("runner")
            platform.verdict(result, set(jobs))
            result.recovery_s = max(recoveries) if recoveries else None
    finally:
        subprocess.run(["umount", "-l", str(archive)], capture_output=True)
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- the report


def machine() -> str:
    from bench.run import machine as describe

    return describe()


def write_report(results: list[Result], path: Path, sizes: str) -> None:
    rows = "\n".join(f"| {r.scenario} | {r.runs} | {r.exactly_once}/{r.runs} | {r.duplicates} | {r.lost} | {r.stale} | "
                     f"{f'{r.recovery_s:.1f} s' if r.recovery_s is not None else '—'} | "
                     f"{'pass' if r.passed else 'FAIL'} |" for r in results)
    details = "\n\n".join(
        f"### {r.scenario}\n\n{r.what}.\n\n**{r.figure()}** ({r.seconds:.0f} s).\n\n"
        + "\n".join(f"- {n}" for n in r.notes + [f"**problem:** {p}" for p in r.problems]) for r in results)
    text = f"""# Reliability

Produced by `make chaos` (`python -m bench.chaos`); a reduced form of every scenario runs in `make test`
(tests/test_chaos.py). Each scenario runs the real platform: the embedded broker on durable (S3) storage,
runners and the lastrun.txt watcher as their own processes, the status topic followed as the portal follows
it. The verdict comes from what is left, not from logs: a job is *exactly once* when it has exactly one
archived version (`job.json`) and shows `succeeded` in the status topic as any reader folds it;
*duplicates* are extra versions, *lost* are jobs without a version, *stale* are jobs whose shown state is
not their archived result. *Recovery* is the longest time from the end of a fault (runner restarted,
broker back, archive writable again) to the next job finishing.

Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine()}. Sizes: {sizes}.

| scenario | runs | exactly once | duplicates | lost | stale | recovery | result |
|---|---:|---:|---:|---:|---:|---:|---|
{rows}

{details}
"""
    path.write_text(text)


SCENARIOS: dict[str, Callable[..., Result]] = {
    "kill-storm": kill_storm,
    "broker-outages": broker_outages,
    "two-runners": two_runners,
    "fuzz": fuzz,
    "archive-faults": archive_faults,
}


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nbreduce.librdkafka").setLevel(logging.CRITICAL)  # the harness's own clients, while faults
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--quick", action="store_true", help="CI sizes (what tests/test_chaos.py runs)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    results = []
    for name, scenario in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        if name == "archive-faults" and not can_mount():
            print(f"{name}: skipped (mounting a file system needs root with CAP_SYS_ADMIN)", flush=True)
            continue
        with workspace() as work:
            result = scenario(work, **sizes[name])
        print(f"{result.scenario}: {result.figure()} -> {'pass' if result.passed else 'FAIL'}", flush=True)
        for line in result.notes + [f"PROBLEM: {p}" for p in result.problems]:
            print(f"    {line}", flush=True)
        results.append(result)
    write_report(results, args.output, "CI (--quick)" if args.quick else "full")
    print(f"wrote {args.output}")
    if not all(r.passed for r in results):
        sys.exit(1)


#: Full sizes: the figures of issue 13. QUICK: what CI runs (a few minutes in all).
FULL: dict[str, dict[str, Any]] = {
    "kill-storm": {"runs": 30, "kills": 8},
    "broker-outages": {"runs": 20, "clean_s": 34, "killed_s": 76},
    "two-runners": {"runs": 40},
    "fuzz": {"messages": 1000},
    "archive-faults": {"runs": 16, "fault_s": 60},
}
QUICK: dict[str, dict[str, Any]] = {
    "kill-storm": {"runs": 8, "kills": 3},
    "broker-outages": {"runs": 6, "clean_s": 6, "killed_s": 8},
    "two-runners": {"runs": 12},
    "fuzz": {"messages": 200},
    "archive-faults": {"runs": 6, "fault_s": 8},
}

if __name__ == "__main__":
    main()
