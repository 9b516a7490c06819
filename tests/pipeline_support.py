"""Shared by the pipeline tests: a broker plus an in-process runner on the test templates."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.bus.embedded import EmbeddedBroker
from runner.config import Settings

FIXTURE_NOTEBOOKS = Path(__file__).parent / "fixtures" / "notebooks"


@contextmanager
def running_platform(home: Path, **env: str) -> Iterator[Settings]:
    """A memory broker and an in-process runner on the test templates; yields their Settings."""
    from runner.pipeline.consumer import Runner

    data = home / "data"
    data.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env({
        "NBREDUCE_HOME": str(home), "NBREDUCE_NOTEBOOKS": str(FIXTURE_NOTEBOOKS), "NBREDUCE_DATA_ROOTS": str(data),
        **env,
    })
    broker = EmbeddedBroker(settings)
    broker.start(memory=True)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=Runner(settings).run, args=(stop, ready.set), daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "runner did not start"
        yield settings
    finally:
        stop.set()
        thread.join(60)
        broker.stop()
