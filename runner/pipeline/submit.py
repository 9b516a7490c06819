"""Manual submissions and reruns: publish a :class:`ReductionRequest`, optionally wait for its outcome."""

from __future__ import annotations

import threading
import time
from typing import Any

from runner.bus.clients import Publisher
from runner.bus.models import ReductionRequest, StatusEvent
from runner.bus.status import StatusView
from runner.bus.topics import REDUCTION_REQUESTS
from runner.config import Settings
from runner.pipeline.reduce import request_job_id


def submit_request(settings: Settings, publisher: Publisher | None = None, **fields: Any) -> str:
    """Validate and publish one request; returns its job id."""
    request = ReductionRequest(**fields)
    own = publisher is None
    publisher = publisher or Publisher(settings, timeout=settings.broker.timeout_seconds)
    try:
        publisher.publish(REDUCTION_REQUESTS, request, key=request.message_id)  # spread over the runners
    finally:
        if own:
            publisher.close()
    return request_job_id(request)


def wait_for_job(settings: Settings, job_id: str, timeout: float) -> StatusEvent | None:
    """Follow the status topic until ``job_id`` reaches a final state (None after ``timeout``)."""
    return wait_for_jobs(settings, {job_id}, timeout).get(job_id)


def wait_for_jobs(settings: Settings, job_ids: set[str], timeout: float) -> dict[str, StatusEvent]:
    """Final events of the given jobs, as many as finished within ``timeout``."""
    finished: dict[str, StatusEvent] = {}
    stop = threading.Event()

    def on_change(event: StatusEvent) -> None:
        if event.job_id in job_ids and event.state.final:
            finished[event.job_id] = event
            if finished.keys() >= job_ids:
                stop.set()

    thread = StatusView(settings).start(stop, on_change)
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        stop.wait(0.05)
    stop.set()
    thread.join(5)
    return finished
