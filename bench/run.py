"""``make bench``: end-to-end figures of the platform on this machine, written to docs/benchmarks.md.

Measured against a real embedded broker and a runner started as its own process (as in production):
- papermill CLI on the trivial template (the baseline: what running it by hand costs),
- end-to-end latency submit -> ``succeeded`` for the same template, one at a time,
- throughput of trivial runs with 2 reductions in parallel,
- runner resident memory (kernels excluded),
- the real scipp templates (WISH powder, MARI spectrometer) end to end.
"""

from __future__ import annotations

import argparse
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
from runner.pipeline.reduce import request_job_id

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


def submit(publisher: Publisher, **fields) -> tuple[str, float]:
    request = ReductionRequest(requested_by="bench", **fields)
    t0 = time.perf_counter()
    publisher.publish(REDUCTION_REQUESTS, request, key=request.message_id)
    return request_job_id(request), t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--throughput-runs", type=int, default=30)
    args = parser.parse_args()

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

    broker = EmbeddedBroker(settings)
    broker.start(memory=True)
    try:
        for mode, warm, fork in (("cold", "0", "0"), ("warm", "auto", "1")):
            with runner_process({**env, "NBREDUCE_KERNELS__WARM": warm, "NBREDUCE_KERNELS__FORK_SERVERS": fork},
                                work / f"runner-{mode}.log") as runner:
                tracker = Tracker(settings)
                publisher = Publisher(settings)
                try:
                    job, _ = submit(publisher, instrument="TRIVIAL", run_number=1, data=str(trivial_file),
                                    rb_number="1")
                    tracker.wait({job}, 300)  # group join, first run
                    time.sleep(8 if warm != "0" else 0)  # let the pool fill
                    latencies = []
                    for i in range(args.latency_runs):
                        job, t0 = submit(publisher, instrument="TRIVIAL", run_number=100 + i,
                                         data=str(trivial_file), rb_number="1")
                        t_end, event = tracker.wait({job})[job]
                        assert event.state.value == "succeeded", event.reason
                        latencies.append(t_end - t0)
                        time.sleep(0.5 if warm != "0" else 0)  # one run at a time, as a run completion would come
                    p50 = statistics.median(latencies)
                    rows.append((f"{mode} kernels: submit -> succeeded, trivial template, p50 / p95 of "
                                 f"{args.latency_runs}", f"{p50:.2f} s / {pct(latencies, 0.95):.2f} s "
                                 f"({p50 / papermill_cli:.2f}x the papermill CLI)"))
                    if warm != "0":
                        t0 = time.perf_counter()
                        jobs = {submit(publisher, instrument="TRIVIAL", run_number=1000 + i, data=str(trivial_file),
                                       rb_number="1")[0] for i in range(args.throughput_runs)}
                        done = tracker.wait(jobs, 1800)
                        elapsed = max(t for t, _ in done.values()) - t0
                        failed = sum(e.state.value != "succeeded" for _, e in done.values())
                        rows.append((f"warm kernels: throughput, {args.throughput_runs} trivial runs submitted "
                                     "at once, 2 in parallel", f"{args.throughput_runs / elapsed * 60:.0f} runs/min"
                                     f"{f' ({failed} failed)' if failed else ''}"))
                        memory = psutil.Process(runner.pid).memory_full_info()
                        rows.append(("runner memory after these runs (kernels excluded): resident / unique",
                                     f"{memory.rss / 2**20:.0f} MB / {memory.uss / 2**20:.0f} MB"))
                    for inst, message in scipp_runs.items():
                        if warm != "0":
                            time.sleep(8)  # the pool refills after the trivial runs
                        job, t0 = submit(publisher, instrument=inst, run_number=message.run_number,
                                         data=message.data, rb_number=message.rb_number)
                        t_end, event = tracker.wait({job}, 900)[job]
                        rows.append((f"{mode} kernel: {inst} scipp template end to end (simulated run, "
                                     f"{event.scraps.get('total_events', 'default')} events)",
                                     f"{t_end - t0:.1f} s ({event.state.value})"))
                finally:
                    tracker.stop.set()
                    publisher.close()
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    section = (f"## Core pipeline ({datetime.now(UTC):%Y-%m-%d})\n\nMachine: {machine()}.\n"
               "Broker: embedded Tansu (memory storage); runner as its own process (2 reductions in parallel); "
               "templates in the `scipp` environment (kernel `nbreduce-scipp`). *Warm*: kernels from the pool, "
               "the environment's imports done (forked from the environment's fork server), one kernel per run; "
               "*cold*: a kernel launched for each run (`NBREDUCE_KERNELS__WARM=0 NBREDUCE_FORK_SERVERS=0`).\n\n"
               f"| measurement | result |\n|---|---|\n{table}\n")
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
