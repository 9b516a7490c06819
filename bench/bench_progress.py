"""The cost of live progress to a trivial run: what ``make bench`` reports as "Live progress".

Two figures, on the bench's trivial template executed by :func:`runner.pipeline.execute.execute` on warm
``python3`` kernels from a :class:`~runner.kernels.pool.KernelPool`, progress published to a real embedded
broker (memory storage):

* **on the run's path**: the time the executing thread spends in the progress hooks (cell starts, stream
  writes) plus the final, forced send — everything live progress adds to a run's critical path (the
  sender thread works beside it);
* **end to end**: the median wall time of ``execute`` with and without progress, runs interleaved (this
  difference is within the run-to-run noise of kernel execution; it is shown so the first figure can be
  checked against it).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.run import REPO, _write_section, machine, pct
from runner.bus.clients import Publisher
from runner.bus.embedded import EmbeddedBroker
from runner.config import Settings
from runner.kernels.pool import KernelPool
from runner.pipeline.execute import execute
from runner.pipeline.progress import ProgressSender

TARGET_MS = 5.0


def measure(runs: int) -> list[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="nbreduce-bench-progress-"))
    settings = Settings.from_env({"NBREDUCE_HOME": str(work / "home"), "NBREDUCE_DATA_ROOTS": str(work / "data")})
    template = REPO / "bench" / "notebooks" / "TRIVIAL" / "reduce.ipynb"
    broker = EmbeddedBroker(settings)
    broker.start(memory=True)
    pool = KernelPool(settings, {"python3": 2}, {"python3": ["import scrapbook"]}, fork_servers=False).start()
    publisher = Publisher(settings)
    sender = ProgressSender(publisher)
    plain: list[float] = []
    live: list[float] = []
    on_path: list[float] = []
    try:
        for i in range(runs * 2 + 2):
            out = work / f"run{i}"
            out.mkdir()
            with_progress = i % 2 == 1
            progress = sender.start(f"bench-{i}", "TRIVIAL", "1") if with_progress else None
            t0 = time.perf_counter()
            result = execute(template, out / "out.ipynb", out, {"run_number": i, "output_dir": str(out)}, "python3",
                             pool, timeout=120, progress=progress)
            if progress is not None:
                t_send = time.perf_counter()
                sender.finish(progress)
                send = time.perf_counter() - t_send
            elapsed = time.perf_counter() - t0
            assert result.state.value == "succeeded", result.reason
            if i >= 2:  # the first pair warms up imports and the pool
                if progress is not None:
                    live.append(elapsed)
                    on_path.append(progress.hook_seconds + send)
                else:
                    plain.append(elapsed)
            time.sleep(1.0)  # let the pool refill: kernel starts must not overlap the next run
    finally:
        sender.close()
        publisher.close()
        pool.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    p50 = statistics.median(on_path) * 1000
    diff = (statistics.median(live) - statistics.median(plain)) * 1000
    return [
        (f"on the run's path: hooks + final send, p50 / p95 / max of {len(on_path)} runs",
         f"**{p50:.3f} ms** / {pct(on_path, 0.95) * 1000:.3f} ms / {max(on_path) * 1000:.3f} ms "
         f"({'meets' if p50 < TARGET_MS else 'misses'} the {TARGET_MS:.0f} ms target)"),
        (f"`execute` wall time without / with progress, p50 of {len(plain)} / {len(live)} interleaved runs",
         f"{statistics.median(plain) * 1000:.1f} ms / {statistics.median(live) * 1000:.1f} ms "
         f"(difference {diff:+.1f} ms, within run-to-run noise: p95 without {pct(plain, 0.95) * 1000:.1f} ms)"),
    ]


def section(rows: list[tuple[str, str]]) -> str:
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (f"## Live progress ({datetime.now(UTC):%Y-%m-%d})\n\nMachine: {machine()}.\n"
            "`bench/bench_progress.py`: the trivial template run by `execute` on warm `python3` kernels, progress "
            "published to the embedded broker (memory storage) at most once a second by the runner's sender thread. "
            f"Target: what live progress adds to a trivial run, under {TARGET_MS:.0f} ms p50.\n\n"
            f"| measurement | result |\n|---|---|\n{table}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    text = section(measure(args.runs))
    print(text)
    _write_section(args.output, "Live progress", text)


if __name__ == "__main__":
    main()
