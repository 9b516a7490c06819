"""State rebuild from Kafka: ``StatusView.rebuild`` over 100,000 status events (target <= 10 s).

There is no database: every CLI call, runner start and portal start folds the whole status topic, so
this is the price of that design at the scale of a few ISIS cycles. Events are realistic in size
(final events carry parameters, scraps, provenance; failures a traceback), ~3 per job. Each rebuild runs
in a fresh process, as ``nbreduce runs`` does, which also reports its peak resident memory. A second
child splits the time into fetching (``read_topic``) and parsing (pydantic), the two candidates
for tuning. Writes the "State rebuild" section of docs/benchmarks.md.

    .venv/bin/python -m bench.bench_state [--events 100000] [--storage memory s3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

from bench.run import _write_section, machine
from runner.bus.clients import producer, read_topic
from runner.bus.embedded import EmbeddedBroker
from runner.bus.models import ErrorInfo, JobState, StatusEvent, TriggerRef
from runner.bus.status import StatusView
from runner.bus.topics import REDUCTION_REQUESTS, REDUCTION_STATUS
from runner.config import Settings

REPO = Path(__file__).resolve().parent.parent
INSTRUMENTS = ["MARI", "WISH", "LET", "MERLIN", "MAPS", "OSIRIS", "IRIS", "POLARIS", "GEM", "HRPD"]
TRACEBACK = "".join(f'  File "/tmp/reduce.py", line {n}, in step_{n}\n    result = reduce(ws, ei={n}.5)\n'
                    for n in range(12)) + "RuntimeError: Ei not found in the monitor spectrum\n"


def status_events(count: int, seed: int = 7) -> Iterator[StatusEvent]:
    """``count`` events: queued -> running -> final per job, with the fields the runner fills in."""
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    produced = job = 0
    while produced < count:
        inst = INSTRUMENTS[job % len(INSTRUMENTS)]
        run, rb = 40000 + job, f"2{job // 300:06d}"
        queued = start + timedelta(seconds=90 * job)
        base = dict(job_id=f"{rng.getrandbits(128):032x}", instrument=inst, run_number=run, rb_number=rb,
                    run_title=f"{inst} sample {rng.randint(1, 999)} T={rng.randint(5, 300)}K Ei={rng.randint(10, 500)}",
                    requested_by="run-detection" if job % 9 else "alice.smith", queued_at=queued,
                    trigger=TriggerRef(topic=REDUCTION_REQUESTS, partition=job % 6, offset=job,
                                       message_id=f"{job:032x}"),
                    data=[f"/archive/NDX{inst}/Instrument/data/cycle_25_1/{inst}{run:08d}.nxs"],
                    parameters={"ei": rng.randint(10, 500), "sum_runs": False, "mask_file": f"{inst}_mask_251.xml",
                                "energy_bins": [-10.0, 0.1, 45.0], "normalisation": "monitor-1"},
                    kernel="nbreduce-scipp", environment="scipp-26", runner=f"runner-{job % 4}@ndxreduce01:4312")
        started = queued + timedelta(seconds=3)
        final = rng.choice([JobState.SUCCEEDED] * 8 + [JobState.FAILED, JobState.SKIPPED])
        path = f"{inst}/RB{rb}/{run}/v1"
        finished = dict(
            version=1, started_at=started, finished_at=started + timedelta(seconds=rng.randint(10, 600)),
            notebook=f"{path}/{inst}_{run}.ipynb", environment_hash=f"{rng.getrandbits(256):064x}",
            template_hash=f"{rng.getrandbits(256):064x}",
            output_files=[f"{path}/{inst}{run}_reduced.nxs", f"{path}/{inst}{run}_summary.png"]
            if final == JobState.SUCCEEDED else [],
            scraps={"total_counts": rng.randint(10**6, 10**9), "ei_fitted": round(rng.uniform(10, 500), 3),
                    "monitor_ratio": round(rng.random(), 5)} if final == JobState.SUCCEEDED else {},
            error=ErrorInfo(ename="RuntimeError", evalue="Ei not found in the monitor spectrum", cell_index=7,
                            cell_source="ws = convert_to_energy(ws, ei=ei)", traceback=TRACEBACK)
            if final == JobState.FAILED else None,
            reason="template disabled for this RB" if final == JobState.SKIPPED else None)
        for state, at, extra in ((JobState.QUEUED, queued, {}), (JobState.RUNNING, started, {"started_at": started}),
                                 (final, finished["finished_at"], finished)):
            if produced == count:
                return
            yield StatusEvent(state=state, timestamp=at, **base, **extra)
            produced += 1
        job += 1


def publish(settings: Settings, count: int) -> tuple[int, int, float]:
    """Publish with one raw producer, batched; returns (events, bytes, seconds)."""
    client = producer(settings, **{"linger.ms": 50, "batch.num.messages": 10000, "queue.buffering.max.messages": 500000,
                                   "queue.buffering.max.kbytes": 1048576})
    errors: list[str] = []
    size = 0
    t0 = time.perf_counter()
    for event in status_events(count):
        value = event.to_bytes()
        size += len(value)
        while True:
            try:
                client.produce(REDUCTION_STATUS, value=value, key=event.job_id,
                               on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
                break
            except BufferError:
                client.poll(0.1)
        client.poll(0)
    if client.flush(300) or errors:
        raise RuntimeError(f"publishing failed: {errors[:3]}")
    return count, size, time.perf_counter() - t0


def child_rebuild(phases: bool) -> None:
    """Runs in a fresh process: one rebuild (or its phases), result as one JSON line on stdout."""
    settings = Settings.from_env()
    before = psutil.Process().memory_info().rss
    if phases:
        t0 = time.perf_counter()
        values = [msg.value() for msg in read_topic(settings, REDUCTION_STATUS)]
        fetch = time.perf_counter() - t0
        t0 = time.perf_counter()
        for value in values:
            StatusEvent.from_bytes(value)
        result = {"fetch": fetch, "parse": time.perf_counter() - t0, "messages": len(values)}
    else:
        t0 = time.perf_counter()
        view = StatusView.rebuild(settings)
        result = {"seconds": time.perf_counter() - t0, "jobs": len(view.jobs), "invalid": view.invalid}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({**result, "rss_before": before, "rss_peak": peak}))


def run_child(env: dict[str, str], phases: bool = False) -> dict:
    argv = [sys.executable, __file__, "--child"] + (["--phases"] if phases else [])
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(storage: str, events: int, repeat: int) -> list[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="nbreduce-bench-state-"))
    env = {**os.environ, "NBREDUCE_HOME": str(work / "home")}
    env.pop("NBREDUCE_BROKER__BOOTSTRAP_SERVERS", None)
    settings = Settings.from_env(env)
    broker = EmbeddedBroker(settings)
    broker.start(memory=storage == "memory")
    try:
        count, size, seconds = publish(settings, events)
        runs = [run_child(env) for _ in range(repeat)]
        phases = run_child(env, phases=True)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    times = [r["seconds"] for r in runs]
    mib = 2**20
    label = "memory" if storage == "memory" else "durable (S3 on localbucket)"
    return [
        (f"{label}: published", f"{count:,} events, {runs[0]['jobs']:,} jobs, {size / mib:.1f} MiB "
                                f"(mean {size / count:.0f} B/event) in {seconds:.1f} s"),
        (f"{label}: `StatusView.rebuild`, median of {repeat} fresh processes",
         f"**{statistics.median(times):.2f} s** (min {min(times):.2f}, max {max(times):.2f}; "
         f"{'meets' if statistics.median(times) <= 10 else 'MISSES'} the 10 s target)"),
        (f"{label}: rebuild split", f"fetch (`read_topic`) {phases['fetch']:.2f} s + parse "
                                    f"(`StatusEvent.model_validate_json`) {phases['parse']:.2f} s"),
        (f"{label}: peak RSS of the rebuilding process", f"{max(r['rss_peak'] for r in runs) / mib:.0f} MiB "
         f"({runs[0]['rss_before'] / mib:.0f} MiB after imports)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--storage", nargs="+", choices=["memory", "s3"], default=["memory", "s3"])
    parser.add_argument("--repeat", type=int, default=3, help="fresh rebuild processes per storage")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_rebuild(args.phases)
        return
    load = os.getloadavg()[0]  # other work on the machine inflates the times: say how busy it was
    rows = [row for storage in args.storage for row in measure(storage, args.events, args.repeat)]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    section = (f"## State rebuild ({datetime.now(UTC):%Y-%m-%d})\n\nMachine: {machine()}; "
               f"1-min load average at start {load:.2f}.\n"
               f"`bench/bench_state.py`: {args.events:,} status events on the embedded Tansu broker, folded by "
               f"`StatusView.rebuild` in a fresh process (what `nbreduce runs`, a runner or the portal does "
               f"at start). Target: <= 10 s.\n\n| measurement | result |\n|---|---|\n{table}\n")
    print(section)
    _write_section(args.output, "State rebuild", section)


if __name__ == "__main__":
    main()
