"""``make bench``: end-to-end figures of the platform on this machine, written to docs/benchmarks.md.

Measured against a real embedded broker and a runner started as its own process (as in production):
- papermill CLI on the trivial template (the baseline: what running it by hand costs),
- end-to-end latency submit -> ``succeeded`` for the same template, one at a time, cold and warm kernels,
- the platform's overhead on warm kernels (end to end minus the notebook's own cell time) for the trivial
  template and the MARI template, with where it goes (each run's ``timings``),
- throughput of trivial runs with 2 reductions in parallel, and a soak of 1,000 with the runner's memory,
- 1,000 malformed messages at once: how long until every one is dead-lettered (and shown ``rejected``),
- the real scipp templates (WISH powder, MARI spectrometer) end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psutil

from runner.bus.clients import Publisher
from runner.bus.embedded import EmbeddedBroker
from runner.bus.models import ReductionRequest, StatusEvent
from runner.bus.status import StatusView
from runner.bus.topics import REDUCTION_REQUESTS
from runner.config import Settings
from runner.pipeline.reduce import job_id_for, request_job_id

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def runner_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``nbreduce runner`` as its own process, as in production."""
    process = subprocess.Popen([sys.executable, "-m", "runner.cli", "-v", "runner"], env=env,
                               stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        yield process
    finally:
        process.terminate()
        process.wait(120)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return (f"{cpu}, {psutil.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


class Tracker:
    """Follows the status topic and timestamps final states as they arrive."""

    def __init__(self, settings: Settings):
        self.final: dict[str, tuple[float, StatusEvent]] = {}
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=StatusView(settings).follow, args=(self.stop, self._on), daemon=True)
        self.thread.start()

    def _on(self, event: StatusEvent) -> None:
        if event.state.final:
            with self.cond:
                self.final[event.job_id] = (time.perf_counter(), event)
                self.cond.notify_all()

    def wait(self, job_ids: set[str], timeout: float = 600) -> dict[str, tuple[float, StatusEvent]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not job_ids <= self.final.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(job_ids - self.final.keys())} jobs not finished")
                self.cond.wait(left)
            return {j: self.final[j] for j in job_ids}


class BenchPublisher(Publisher):
    """The runner's publisher, plus raw records (malformed on purpose) sent without waiting."""

    def send_raw(self, topic: str, value: bytes, key: bytes) -> None:
        self._produce(topic, value, key, lambda err: None).poll(0)


def submit(publisher: Publisher, **fields) -> tuple[str, float]:
    request = ReductionRequest(requested_by="bench", **fields)
    t0 = time.perf_counter()
    publisher.publish(REDUCTION_REQUESTS, request, key=request.message_id)
    return request_job_id(request), t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


#: The platform's phases of one run, as ``StatusEvent.timings`` records them (ms), in the order they happen.
PHASES = (
    ("queue", "run completion produced → taken by the runner (broker, fetch)"),
    ("admit", "validate, redelivery check, template, data paths and readiness"),
    ("handoffs", "thread hand-offs (poll → check → reduction slot)"),
    ("reserve", "reserve the archive version"),
    ("kernel", "warm kernel handed out and moved to the version folder"),
    ("papermill", "papermill: parameterise, connect, cells' round trips, write (execute − cells)"),
    ("scraps", "scraps from the notebook's outputs"),
    ("notebook", "executed notebook stamped (failures only)"),
    ("archive", "version published read-only, job.json"),
    ("announce", "final status published → seen by a follower of the status topic"),
)


def phases(e2e_ms: float, event: StatusEvent) -> dict[str, float]:
    """Milliseconds per phase of one run, and its overhead (end to end minus the notebook's own cell time)."""
    t = dict(event.timings)
    inside = sum(t.get(k, 0.0) for k in ("admit", "reserve", "kernel", "execute", "scraps", "notebook", "archive"))
    found = {name: t.get(name, 0.0) for name, _ in PHASES}
    found["papermill"] = t.get("execute", 0.0) - t.get("cells", 0.0)
    found["handoffs"] = max(0.0, t.get("runner", 0.0) - inside)
    found["announce"] = e2e_ms - t.get("queue", 0.0) - t.get("runner", 0.0)
    found["cells"] = t.get("cells", 0.0)
    found["overhead"] = e2e_ms - t.get("cells", 0.0)
    found["end to end"] = e2e_ms
    return found


def breakdown_table(columns: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: p50 of each phase per template, then overhead p50 / p95 and the notebook's own time."""
    names = list(columns)
    head = "| phase | " + " | ".join(f"{n} p50 (ms)" for n in names) + " |\n|---|" + "---:|" * len(names) + "\n"
    rows = []
    for key, label in [*PHASES, ("cells", "the notebook's own cells (kernel-side), for reference")]:
        values = [statistics.median(s[key] for s in columns[n]) for n in names]
        rows.append(f"| {key}: {label} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    for key in ("overhead", "end to end"):
        values = [f"**{statistics.median(s[key] for s in columns[n]):.0f}** / "
                  f"{pct([s[key] for s in columns[n]], 0.95):.0f}" for n in names]
        rows.append(f"| **{key}** (p50 / p95 of {', '.join(str(len(columns[n])) for n in names)} runs) | "
                    + " | ".join(values) + " |")
    return head + "\n".join(rows) + "\n"


def sequential(tracker: Tracker, publisher: Publisher, runs: int, gap: float, timeout: float, **fields
               ) -> list[dict[str, float]]:
    """``runs`` runs one at a time (``gap`` seconds apart, as run completions come): their phases."""
    samples = []
    for i in range(runs):
        job, t0 = submit(publisher, **{**fields, "run_number": fields["run_number"] + i})
        t_end, event = tracker.wait({job}, timeout)[job]
        assert event.state.value == "succeeded", event.reason
        samples.append(phases((t_end - t0) * 1000, event))
        time.sleep(gap)
    return samples


def rejection(settings: Settings, publisher: BenchPublisher, tracker: Tracker, count: int = 1000
              ) -> tuple[float, int]:
    """``count`` malformed messages at once: seconds until every one has its dead letter (and, when it names a
    run, its ``rejected`` status); returns (seconds, rejected statuses)."""
    from runner.bus.models import DeadLetter
    from runner.bus.table import TopicTable
    from runner.bus.topics import DEAD_LETTER, RUN_COMPLETIONS

    arrived: dict[str, float] = {}
    stop = threading.Event()
    letters = TopicTable(settings, DEAD_LETTER, DeadLetter, key=lambda d: d.dead_letter_id)
    letters.start(stop, lambda d: arrived.setdefault(d.dead_letter_id, time.perf_counter()))
    letters.caught_up.wait(30)
    before = len(arrived)
    identifiable = []
    t0 = time.perf_counter()
    for i in range(count):
        if i % 2:  # names a run: also a `rejected` status
            mid = f"bench-bad-{i}-{os.getpid()}"
            body = {"message_id": mid, "instrument": "TRIVIAL", "run_number": -i, "rb_number": "1", "data": "/x"}
            identifiable.append(job_id_for(RUN_COMPLETIONS, -1, -1, mid))
            raw = json.dumps(body).encode()
        else:
            raw = b"{not json " + str(i).encode()
        publisher.send_raw(RUN_COMPLETIONS, raw, key=os.urandom(6).hex().encode())
    publisher.close(30)
    deadline = time.monotonic() + 120
    while len(arrived) - before < count and time.monotonic() < deadline:
        time.sleep(0.05)
    done = tracker.wait(set(identifiable), 120)
    stop.set()
    last = max([*sorted(arrived.values())[-count:], *(t for t, _ in done.values())])
    return last - t0, sum(e.state.value == "rejected" for _, e in done.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--mari-runs", type=int, default=10)
    parser.add_argument("--throughput-runs", type=int, default=60)
    parser.add_argument("--soak-runs", type=int, default=1000)
    parser.add_argument("--malformed", type=int, default=1000)
    args = parser.parse_args()

    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="nbreduce-bench-"))
    notebooks = work / "notebooks"
    notebooks.mkdir()
    shutil.copytree(REPO / "bench" / "notebooks" / "TRIVIAL", notebooks / "TRIVIAL")
    for inst in ("WISH", "MARI", "techniques"):
        if (REPO / "notebooks" / inst).is_dir():
            shutil.copytree(REPO / "notebooks" / inst, notebooks / inst, ignore=shutil.ignore_patterns("sample_*"))
    env = {**os.environ, "NBREDUCE_HOME": str(work / "home"), "NBREDUCE_NOTEBOOKS": str(notebooks),
           "NBREDUCE_DATA_ROOTS": str(work / "home" / "data"), "NBREDUCE_RUNNER__MAX_PARALLEL": "2"}
    settings = Settings.from_env(env)
    data = settings.data_roots[0]
    data.mkdir(parents=True)
    trivial_file = data / "TRIVIAL00000001.txt"
    trivial_file.write_text("counts")
    rows: list[tuple[str, str]] = []

    # -- baseline: papermill CLI on the same template ------------------------------------------
    cli_times = []
    for i in range(5):
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "papermill"), "--no-progress-bar", "-p", "run_number", str(i),
                        "-p", "data_file", str(trivial_file), str(notebooks / "TRIVIAL" / "reduce.ipynb"),
                        str(work / f"pm{i}.ipynb")], check=True, capture_output=True, env=env)
        cli_times.append(time.perf_counter() - t0)
    papermill_cli = statistics.median(cli_times)
    rows.append(("papermill CLI, trivial template (median of 5, wall)", f"{papermill_cli:.2f} s"))

    from runner.kernels.environments import build
    from runner.sim.runs import simulate

    for name in ("scipp", "diffraction", "spectroscopy"):
        t0 = time.perf_counter()
        result = build(settings, [name])[0]
        rows.append((f"`nbreduce env build {name}` ({result.status}, from uv's cache)",
                     f"{time.perf_counter() - t0:.1f} s"))
    scipp_runs = {inst: simulate(settings, inst, 1, publish=False)[0] for inst in ("WISH", "MARI")
                  if (notebooks / inst).is_dir()}
    mari = scipp_runs.get("MARI")
    breakdown: dict[str, list[dict[str, float]]] = {}
    soak: list[tuple[int, float, float]] = []

    broker = EmbeddedBroker(settings)
    broker.start(memory=True)
    try:
        for mode, warm, fork in (("cold", "0", "0"), ("warm", "auto", "1")):
            with runner_process({**env, "NBREDUCE_KERNELS__WARM": warm, "NBREDUCE_KERNELS__FORK_SERVERS": fork},
                                work / f"runner-{mode}.log") as runner:
                tracker = Tracker(settings)
                publisher = Publisher(settings)
                trivial = {"instrument": "TRIVIAL", "data": str(trivial_file), "rb_number": "1"}
                try:
                    job, _ = submit(publisher, run_number=1, **trivial)
                    tracker.wait({job}, 300)  # group join, first run
                    time.sleep(8 if warm != "0" else 0)  # let the pool fill
                    if warm == "0":
                        samples = sequential(tracker, publisher, 10, 0.0, 600, run_number=100, **trivial)
                        e2e = [s["end to end"] / 1000 for s in samples]
                        rows.append(("cold kernels: submit -> succeeded, trivial template, p50 / p95 of 10",
                                     f"{statistics.median(e2e):.2f} s / {pct(e2e, 0.95):.2f} s "
                                     f"({statistics.median(e2e) / papermill_cli:.2f}x the papermill CLI)"))
                    else:
                        breakdown["trivial"] = sequential(tracker, publisher, args.latency_runs, 1.0, 600,
                                                          run_number=100, **trivial)
                        e2e = [s["end to end"] / 1000 for s in breakdown["trivial"]]
                        over = [s["overhead"] for s in breakdown["trivial"]]
                        rows.append((f"warm kernels: submit -> succeeded, trivial template, p50 / p95 of "
                                     f"{args.latency_runs}", f"{statistics.median(e2e) * 1000:.0f} ms / "
                                     f"{pct(e2e, 0.95) * 1000:.0f} ms ({statistics.median(e2e) / papermill_cli:.2f}x "
                                     "the papermill CLI)"))
                        rows.append(("warm kernels: platform overhead (end to end − the notebook's cells), trivial "
                                     "template, p50 / p95", f"**{statistics.median(over):.0f} ms** / "
                                     f"{pct(over, 0.95):.0f} ms (target ≤ 100 ms p50)"))
                        if mari is not None:
                            time.sleep(8)
                            breakdown["MARI"] = sequential(
                                tracker, publisher, args.mari_runs, 3.0, 900, instrument="MARI",
                                run_number=mari.run_number, data=mari.data, rb_number=mari.rb_number)
                            over = [s["overhead"] for s in breakdown["MARI"]]
                            cells = statistics.median(s["cells"] for s in breakdown["MARI"])
                            rows.append(("warm kernels: platform overhead, MARI (direct-spectroscopy family template, "
                                         "`spectroscopy` environment, simulated run), p50 / p95 of "
                                         f"{args.mari_runs}", f"**{statistics.median(over):.0f} ms** / "
                                         f"{pct(over, 0.95):.0f} ms (the notebook's own cells: {cells / 1000:.2f} s; "
                                         "target ≤ 100 ms p50)"))
                        t0 = time.perf_counter()
                        jobs = {submit(publisher, run_number=1000 + i, **trivial)[0]
                                for i in range(args.throughput_runs)}
                        done = tracker.wait(jobs, 1800)
                        elapsed = max(t for t, _ in done.values()) - t0
                        failed = sum(e.state.value != "succeeded" for _, e in done.values())
                        rows.append((f"warm kernels: throughput, {args.throughput_runs} trivial runs submitted "
                                     "at once, 2 in parallel", f"**{args.throughput_runs / elapsed * 60:.0f} runs/min**"
                                     f"{f' ({failed} failed)' if failed else ''} (target ≥ 120)"))
                        memory = psutil.Process(runner.pid).memory_full_info()
                        rows.append(("runner memory after these runs (kernels excluded): resident / unique",
                                     f"{memory.rss / 2**20:.0f} MB / {memory.uss / 2**20:.0f} MB"))
                        seconds, rejected = rejection(settings, BenchPublisher(settings), tracker, args.malformed)
                        rows.append((f"{args.malformed} malformed messages at once (half not JSON, half naming a run): "
                                     "all dead-lettered, and the ones naming a run shown `rejected`",
                                     f"**{seconds:.1f} s** ({rejected} `rejected` statuses; target ≤ 10 s)"))
                    for inst, message in scipp_runs.items():
                        if warm != "0":
                            time.sleep(8)  # the pool refills after the trivial runs
                        job, t0 = submit(publisher, instrument=inst, run_number=message.run_number,
                                         data=message.data, rb_number=message.rb_number)
                        t_end, event = tracker.wait({job}, 900)[job]
                        rows.append((f"{mode} kernel: {inst} scipp template end to end (simulated run, "
                                     f"{event.scraps.get('total_events', 'default')} events)",
                                     f"{t_end - t0:.1f} s ({event.state.value})"))
                    if warm != "0" and args.soak_runs:
                        process = psutil.Process(runner.pid)
                        started = time.perf_counter()
                        for batch in range(0, args.soak_runs, 100):
                            jobs = {submit(publisher, run_number=10_000 + batch + i, **trivial)[0]
                                    for i in range(min(100, args.soak_runs - batch))}
                            done = tracker.wait(jobs, 1800)
                            assert all(e.state.value == "succeeded" for _, e in done.values())
                            info = process.memory_full_info()
                            soak.append((batch + len(jobs), info.rss / 2**20, info.uss / 2**20))
                        soak_minutes = (time.perf_counter() - started) / 60
                        rss = [r for _, r, _ in soak]
                        rows.append((f"soak: {args.soak_runs} trivial runs, runner memory (kernels excluded) after "
                                     "each 100: resident MB", " → ".join(f"{r:.0f}" for r in rss)
                                     + f" (first {rss[0]:.0f}, last {rss[-1]:.0f}, max {max(rss):.0f}; "
                                     f"{args.soak_runs / soak_minutes:.0f} runs/min over the soak)"))
                finally:
                    tracker.stop.set()
                    publisher.close()
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    section = (f"## Core pipeline ({datetime.now(UTC):%Y-%m-%d})\n\nMachine: {machine()}; 1-min load average at "
               f"start {load:.2f} (the machine is shared).\n"
               "Broker: embedded Tansu (memory storage); runner as its own process (2 reductions in parallel). "
               "*Warm*: kernels from the pool, the environment's imports done (forked from the environment's fork "
               "server), one kernel per run; *cold*: a kernel launched for each run "
               "(`NBREDUCE_KERNELS__WARM=0 NBREDUCE_KERNELS__FORK_SERVERS=0`). The trivial template runs in the "
               "`scipp` environment, MARI in the `spectroscopy` environment (the direct-spectroscopy family "
               "template). *Overhead* is end to end (request produced → `succeeded` seen by a follower of the "
               "status topic) minus the notebook's own cell time (kernel-side, `execute_input` → `execute_reply`).\n\n"
               f"| measurement | result |\n|---|---|\n{table}\n")
    if breakdown:
        section += ("\n### Where the platform's time goes (warm kernels)\n\nFrom each run's `timings` (recorded by "
                    "the runner in the final status event and `job.json`); *announce* is what is left of the end to "
                    "end time outside the runner. Runs one at a time, a second apart (three for MARI).\n\n"
                    + breakdown_table(breakdown))
    print(section)
    _write_section(args.output, "Core pipeline", section)


def _write_section(path: Path, title: str, section: str) -> None:
    """Replace this benchmark's section of docs/benchmarks.md, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nProduced by `make bench`; never timed in tests.\n"
    start = text.find(f"## {title}")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
