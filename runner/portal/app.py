"""The reductions portal: a tornado app run as a JupyterHub service, users logged in by the hub's OAuth.

Every handler resolves the user's :class:`runner.hub.access.Access` from their hub groups and checks it
before touching a job, so run pages, notebook HTML, downloads, reruns and the live feed all answer
403 for runs of other experiments. Jobs come from the status topic (``runner.bus.status.StatusView``) folded
into a :class:`runner.portal.index.RunIndex`; reruns and defaults are published to Kafka, and the
runner turns each rerun into a new version — older versions stay in the archive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from pydantic import ValidationError
from tornado import web
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from runner.archive.integrity import cached_check
from runner.archive.layout import RECORD
from runner.bus.clients import Publisher
from runner.bus.models import JobState, ProgressEvent, ReductionRequest, StatusEvent
from runner.bus.status import StatusView
from runner.bus.topics import PARAMETER_DEFAULTS, REDUCTION_REQUESTS
from runner.config import Settings
from runner.hub.access import Access
from runner.hub.workcopy import ENDPOINT, REDUCTIONS
from runner.notify.subscriptions import DeliveryTable, SubscriptionTable
from runner.portal.index import Run, RunFilter, RunIndex
from runner.portal.notebooks import IMAGE_SUFFIXES, cell_timings, notebook_images, render_html
from runner.portal.progress import ProgressBoard, progress_payload
from runner.portal.results import hdf5_outputs, scrap_views
from runner.templates.defaults import DefaultsTable, ParameterDefaults, defaults_key
from runner.templates.params import ParamSpec, validate_form
from runner.templates.registry import TemplateError, TemplateRegistry

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MAX_BATCH = 200
#: The rendered notebook may contain scripts from its outputs: a sandboxed, script-less origin.
NOTEBOOK_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:"
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'self'")


@dataclass(eq=False)
class Subscriber:
    """One open live-update stream (server-sent events), what its user may see and the job whose log it shows."""

    access: Access
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=1000))
    job: str | None = None

    def push(self, kind: str, payload: dict[str, Any]) -> bool:
        try:
            self.queue.put_nowait((kind, payload))
        except asyncio.QueueFull:  # a stalled browser: drop it, it reconnects and reloads
            return False
        return True


class Portal:
    """State shared by all handlers: the run index, templates, the publisher, live subscribers."""

    def __init__(self, settings: Settings, publisher: Publisher | None = None):
        self.settings = settings
        self.archive_root = settings.archive.resolve()
        self.registry = TemplateRegistry(settings.notebooks)
        self.index = RunIndex()
        self.subscribers: set[Subscriber] = set()
        self.status = StatusView(settings)
        #: Running jobs: latest progress and the log so far (runner.portal.progress).
        self.progress = ProgressBoard(settings)
        #: Notification subscriptions and their deliveries (runner.portal.notify).
        self.subscriptions = SubscriptionTable(settings)
        self.deliveries = DeliveryTable(settings)
        self._publisher = publisher
        self._publisher_lock = threading.Lock()

    # -- status feed ----------------------------------------------------------------------------
    def on_event(self, event: StatusEvent) -> None:
        """Fold one status change (IOLoop thread) and push it to the streams allowed to see it."""
        run = self.index.apply(event)
        payload = {"job_id": event.job_id, "state": event.state.value, "instrument": event.instrument,
                   "rb_number": event.rb_number, "run": run.label, "version": event.version,
                   "latest_job": run.latest.job_id, "timestamp": event.timestamp.isoformat(),
                   "outcome": event.outcome, "warnings": len(event.warnings)}
        for sub in list(self.subscribers):
            if sub.access.can_see(event.instrument, event.rb_number) and not sub.push("status", payload):
                self.subscribers.discard(sub)

    def on_progress(self, event: ProgressEvent) -> None:
        """Fold one progress event (IOLoop thread): progress bars for every allowed stream, log lines for the
        streams of that job's page."""
        lines = self.progress.record(event)
        payload = progress_payload(event)
        for sub in list(self.subscribers):
            if not sub.access.can_see(event.instrument, event.rb_number):
                continue
            ok = sub.push("progress", payload)
            if ok and sub.job == event.job_id and lines:
                ok = sub.push("log", {"job_id": event.job_id, "lines": lines})
            if not ok:
                self.subscribers.discard(sub)

    def start_follower(self, loop: IOLoop, stop: threading.Event) -> threading.Thread:
        """Follow the status topic in a thread (it reconnects by itself after broker failures) until ``stop``;
        likewise the progress of running jobs and the notification subscriptions."""
        self.progress.start(stop, on_change=lambda event: loop.add_callback(self.on_progress, event))
        self.subscriptions.start(stop)
        self.deliveries.start(stop)
        return self.status.start(stop, on_change=lambda event: loop.add_callback(self.on_event, event))

    @property
    def feed_error(self) -> str | None:
        return self.status.error

    # -- publishing -----------------------------------------------------------------------------
    def publisher(self) -> Publisher:
        with self._publisher_lock:
            if self._publisher is None:
                self._publisher = Publisher(self.settings)
            return self._publisher

    async def publish(self, messages: list[tuple[str, Any, str]]) -> None:
        """Publish (topic, model, key) triples off the IOLoop: the publisher waits for acknowledgements."""

        def send() -> None:
            publisher = self.publisher()
            for topic, message, key in messages:
                publisher.publish(topic, message, key=key)

        await IOLoop.current().run_in_executor(None, send)

    # -- jobs -----------------------------------------------------------------------------------
    def specs(self, instrument: str) -> list[ParamSpec]:
        """Form fields of the instrument's current template (TemplateError if none is usable)."""
        return self.registry.resolve(instrument).specs()

    def version_dir(self, job: StatusEvent) -> Path | None:
        if not job.notebook:
            return None
        folder = (self.archive_root / job.notebook).parent.resolve()
        return folder if folder.is_relative_to(self.archive_root) else None

    def downloads(self, job: StatusEvent) -> dict[str, Path]:
        """Files of the job's version a user may download: its notebook and its declared outputs."""
        folder = self.version_dir(job)
        if folder is None:
            return {}
        files = {Path(job.notebook).name: folder / Path(job.notebook).name}
        for rel in job.output_files:
            path = (self.archive_root / rel).resolve()
            if path.is_relative_to(folder):
                files[str(path.relative_to(folder))] = path
        return files

    def rerun_request(self, job: StatusEvent, overrides: dict[str, Any], user: str,
                      environment_hash: str | None = None) -> ReductionRequest:
        return ReductionRequest(
            instrument=job.instrument, run_number=job.run_number, rb_number=job.rb_number, data=job.data,
            run_title=job.run_title or "", started_by=user, requested_by=user, rerun_of=job.job_id,
            reduction_arguments=overrides, environment_hash=environment_hash)


def carried_parameters(job: StatusEvent, fields: list[ParamSpec]) -> dict[str, Any]:
    """The job's own values of the editable parameters the template still declares."""
    editable = {spec.name for spec in fields if spec.editable}
    return {name: value for name, value in job.parameters.items() if name in editable}


# --------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------
class BaseHandler(HubOAuthenticated, web.RequestHandler):
    def initialize(self, portal: Portal, hub_auth: HubOAuth) -> None:
        self.portal = portal
        self.hub_auth = hub_auth

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("Content-Security-Policy", PAGE_CSP)

    @property
    def access(self) -> Access:
        return Access.from_groups(self.current_user.get("groups") or [])

    @property
    def username(self) -> str:
        return str(self.current_user["name"])

    def url(self, path: str = "", **query: Any) -> str:
        base = self.settings["portal_prefix"] + path
        query = {k: v for k, v in query.items() if v not in (None, "")}
        return f"{base}?{urlencode(query)}" if query else base

    def page(self, template: str, status: int = 200, **context: Any) -> None:
        self.set_status(status)
        env: jinja2.Environment = self.settings["jinja"]
        user = self.get_current_user()
        self.finish(env.get_template(template).render(
            h=self, url=self.url, user=user, access=self.access if user else Access(), portal=self.portal,
            hub_prefix=self.hub_auth.hub_prefix, feed_error=self.portal.feed_error, **context))

    def job(self, job_id: str) -> StatusEvent:
        job = self.portal.index.jobs.get(job_id)
        if job is None:
            raise web.HTTPError(404, "no such job")
        if not self.access.can_see(job.instrument, job.rb_number):
            raise web.HTTPError(403, "this run belongs to an experiment you are not a member of")
        return job

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        message = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else self._reason
        if self.request.path.startswith(self.settings["portal_prefix"] + "api/"):
            self.finish({"error": message, "status": status_code})
            return
        try:
            self.page("error.html", status=status_code, status_code=status_code, message=message)
        except Exception:  # no user (e.g. the hub is unreachable): plain text
            self.finish(f"{status_code}: {message}")


class RunListHandler(BaseHandler):
    def filters(self) -> RunFilter:
        args = {k: self.get_argument(k) for k in RunFilter.model_fields if self.get_argument(k, "").strip()}
        try:
            return RunFilter(**args)
        except ValidationError as exc:
            raise web.HTTPError(400, "invalid filter: " + "; ".join(e["msg"] for e in exc.errors())) from None

    @web.authenticated
    def get(self) -> None:
        flt = self.filters()
        result = self.portal.index.query(self.access, flt)
        self.page("runs.html", flt=flt, result=result, states=list(JobState),
                  instruments=self.portal.index.instruments(self.access),
                  query=flt.model_dump(exclude_none=True, exclude={"page"}))


class RunListApiHandler(RunListHandler):
    @web.authenticated
    def get(self) -> None:
        flt = self.filters()
        result = self.portal.index.query(self.access, flt)
        self.finish({"total": result.total, "page": result.page, "pages": result.pages, "per_page": result.per_page,
                     "runs": [run_summary(run) for run in result.runs]})


def run_summary(run: Run) -> dict[str, Any]:
    latest = run.latest
    return {"instrument": run.instrument, "rb_number": run.rb, "run": run.label, "state": latest.state.value,
            "outcome": latest.outcome, "warnings": latest.warnings,
            "latest_job": latest.job_id, "version": latest.version, "versions": len(run.versions()),
            "title": run.title, "active_job": run.active.job_id if run.active else None,
            "requested_by": latest.requested_by,
            "queued_at": latest.queued_at.isoformat() if latest.queued_at else None}


class EventsHandler(BaseHandler):
    """Server-sent events: status changes of the runs this user may see."""

    def check_xsrf_cookie(self) -> None:
        """EventSource GETs are CORS-mode fetches, which the hub's cookie auth would refuse without an xsrf
        token (and answer with a fresh OAuth round trip that invalidates open forms). This handler only
        reads, and cross-site pages cannot read it, so there is nothing to forge."""

    @web.authenticated
    async def get(self) -> None:
        job_id = self.get_argument("job", None)
        job = self.job(job_id) if job_id else None  # a run page: also its log, if the user may see the run
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        sub = Subscriber(self.access, job=job.job_id if job else None)
        self.portal.subscribers.add(sub)
        try:
            self.write("retry: 3000\n\n")
            if job is not None:  # what the page missed: the log so far and where the run is
                _, lines = self.portal.progress.log_of(job.job_id)
                backlog = {"job_id": job.job_id, "lines": lines, "reset": True}
                self.write(f"event: log\ndata: {json.dumps(backlog)}\n\n")
                current = self.portal.progress.get(job.job_id)
                if current is not None:
                    self.write(f"event: progress\ndata: {json.dumps(progress_payload(current))}\n\n")
            await self.flush()
            while sub in self.portal.subscribers:
                try:
                    kind, event = await asyncio.wait_for(sub.queue.get(), timeout=15)
                except TimeoutError:
                    self.write(": keep-alive\n\n")
                else:
                    self.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n")
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            self.portal.subscribers.discard(sub)


class JobHandler(BaseHandler):
    @web.authenticated
    async def get(self, job_id: str) -> None:
        job = self.job(job_id)
        run = self.portal.index.run_of(job_id)
        downloads = self.portal.downloads(job)
        notebook = downloads.get(Path(job.notebook).name) if job.notebook else None
        images = notebook_images(notebook) if notebook is not None and notebook.is_file() else []
        # each figure once: the notebook's own figures, or the image files when it showed none inline
        plots = [] if images else [name for name in downloads if Path(name).suffix.lower() in IMAGE_SUFFIXES]
        has_notebook = bool(job.notebook) and notebook is not None and notebook.is_file()
        user_redirect = f"{self.hub_auth.hub_prefix}user-redirect"
        # the user's own copy in their server (work/...), and the read-only record in their reductions/ tree
        copy_url = f"{user_redirect}/{ENDPOINT}?{urlencode({'path': f'{REDUCTIONS}/{job.notebook}'})}"
        archived_url = f"{user_redirect}/lab/tree/{REDUCTIONS}/{job.notebook}"
        folder = self.portal.version_dir(job)
        integrity = None
        if job.state.final and job.version and folder is not None and (folder / RECORD).is_file():
            integrity = await IOLoop.current().run_in_executor(None, cached_check, folder)
        files = [n for n in downloads if downloads[n].is_file()]
        h5web = {name: f"{user_redirect}/lab/tree/{REDUCTIONS}/"
                       f"{downloads[name].relative_to(self.portal.archive_root).as_posix()}"
                 for name in hdf5_outputs(files)}
        timings = cell_timings(notebook) if has_notebook and job.state.final else []
        self.page("job.html", job=job, run=run, versions=run.versions() if run else [job] if job.version else [],
                  requests=run.requests() if run else [] if job.version else [job],
                  downloads=files, images=images, plots=plots,
                  copy_url=copy_url, archived_url=archived_url, has_notebook=has_notebook, integrity=integrity,
                  durations=durations(job), requested=self.get_argument("requested", None),
                  progress=self.portal.progress.running(job.job_id),
                  timings=timings, slowest=max((t["seconds"] or 0 for t in timings), default=0),
                  scraps=scrap_views(job.scraps), h5web=h5web,
                  others=[r.label for r in self.portal.index.query(self.access, RunFilter(
                      instrument=job.instrument, per_page=200)).runs if not run or r.key != run.key][:200])


class JobApiHandler(BaseHandler):
    @web.authenticated
    def get(self, job_id: str) -> None:
        job = self.job(job_id)
        run = self.portal.index.run_of(job_id)
        self.finish({"job": json.loads(job.model_dump_json()),
                     "versions": [{"job_id": v.job_id, "version": v.version, "state": v.state.value}
                                  for v in (run.versions() if run else [job] if job.version else [])],
                     "requests": [{"job_id": r.job_id, "state": r.state.value, "reason": r.reason}
                                  for r in (run.requests() if run else [] if job.version else [job])]})


def seconds_text(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 60:
        return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"
    minutes, secs = divmod(round(value), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def durations(job: StatusEvent) -> dict[str, str]:
    def span(a: datetime | None, b: datetime | None) -> str | None:
        return f"{(b - a).total_seconds():.1f} s" if a and b else None

    found = {"waiting": span(job.queued_at, job.started_at), "running": span(job.started_at, job.finished_at)}
    return {k: v for k, v in found.items() if v}


class NotebookHandler(BaseHandler):
    """The executed notebook as HTML, sandboxed (no scripts, no access to the portal's origin)."""

    @web.authenticated
    async def get(self, job_id: str) -> None:
        job = self.job(job_id)
        path = self.portal.downloads(job).get(Path(job.notebook).name) if job.notebook else None
        if path is None or not path.is_file():
            raise web.HTTPError(404, "this job has no executed notebook")
        html = await IOLoop.current().run_in_executor(None, render_html, path)
        html = back_link(html, self.url(f"jobs/{job.job_id}"), f"{job.instrument} run {job.run_number}"
                         + (f" v{job.version}" if job.version else "") + f" · RB{job.rb_number}")
        self.set_header("Content-Security-Policy", NOTEBOOK_CSP)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(html)


def back_link(html: str, href: str, label: str) -> str:
    """The rendered notebook with a bar linking back to its run page (styled inline: the page is sandboxed)."""
    from html import escape

    bar = (f'<div style="font:14px system-ui,sans-serif;padding:.5em 1.2em;background:#22304a;color:#dfe7f5">'
           f'<a href="{escape(href)}" style="color:#fff;text-decoration:none">&larr; {escape(label)}: run page '
           f'(versions, compare, rerun)</a></div>')
    head, sep, rest = html.partition("<body")
    if not sep:
        return bar + html
    tag, close, body = rest.partition(">")
    return f"{head}<body{tag}{close}{bar}{body}"


class FileHandler(BaseHandler):
    """Downloads: only files the job's record names, from inside its version folder."""

    @web.authenticated
    async def get(self, job_id: str, name: str) -> None:
        job = self.job(job_id)
        path = self.portal.downloads(job).get(name)
        if path is None or not path.is_file():
            raise web.HTTPError(404, "no such file in this version")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.set_header("Content-Type", mime)
        self.set_header("Content-Security-Policy", "sandbox; default-src 'none'; style-src 'unsafe-inline'")
        inline = mime in IMAGE_SUFFIXES.values() and self.get_argument("download", None) is None
        disposition = "inline" if inline else "attachment"
        self.set_header("Content-Disposition", f"{disposition}; filename*=UTF-8''{_quote(path.name)}")
        self.set_header("Content-Length", str(path.stat().st_size))
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                self.write(chunk)
                await self.flush()
        self.finish()


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


class RerunHandler(BaseHandler):
    """Rerun one job with the template's parameters, prefilled with the job's values."""

    def fields(self, job: StatusEvent) -> list[ParamSpec]:
        try:
            return self.portal.specs(job.instrument or "")
        except TemplateError as exc:
            raise web.HTTPError(409, f"cannot rerun: {exc}") from None

    @web.authenticated
    def get(self, job_id: str) -> None:
        job = self.job(job_id)
        fields = self.fields(job)
        values = {spec.name: job.parameters.get(spec.name, spec.default) for spec in fields}
        self.page("rerun.html", job=job, fields=fields, text={s.name: s.format(values[s.name]) for s in fields},
                  errors={})

    @web.authenticated
    async def post(self, job_id: str) -> None:
        job = self.job(job_id)
        fields = self.fields(job)
        form = {spec.name: self.get_body_argument(spec.name) for spec in fields
                if self.get_body_argument(spec.name, None) is not None}
        values, errors = validate_form(fields, form)
        if errors:
            text = {s.name: form.get(s.name, s.format(job.parameters.get(s.name, s.default))) for s in fields}
            self.page("rerun.html", status=400, job=job, fields=fields, text=text, errors=errors)
            return
        overrides = {**carried_parameters(job, fields), **values}
        same_env = self.get_body_argument("same_environment", None) is not None
        request = self.portal.rerun_request(job, overrides, self.username,
                                            job.environment_hash if same_env else None)
        await self.portal.publish([(REDUCTION_REQUESTS, request, request.message_id)])
        log.info("%s requested a rerun of %s (%s)", self.username, job.job_id, request.message_id)
        self.redirect(self.url(f"jobs/{job.job_id}", requested=request.message_id))


class BatchRerunHandler(BaseHandler):
    """Rerun every visible run of one instrument in a run range, with optional parameter overrides."""

    def selection(self, source) -> tuple[RunFilter, list[Run]]:
        args = {k: source(k, "").strip() for k in ("instrument", "rb", "state", "run_from", "run_to")}
        try:
            flt = RunFilter(**{k: v for k, v in args.items() if v}, per_page=MAX_BATCH + 1)
        except ValidationError as exc:
            raise web.HTTPError(400, "invalid selection: " + "; ".join(e["msg"] for e in exc.errors())) from None
        if not flt.instrument:
            raise web.HTTPError(400, "choose an instrument: a batch rerun uses one template")
        if flt.run_from is None or flt.run_to is None:
            raise web.HTTPError(400, "give a run range (run_from and run_to)")
        return flt, self.portal.index.query(self.access, flt).runs

    def fields(self, instrument: str) -> list[ParamSpec]:
        try:
            return self.portal.specs(instrument)
        except TemplateError as exc:
            raise web.HTTPError(409, f"cannot rerun: {exc}") from None

    @web.authenticated
    def get(self) -> None:
        flt, runs = self.selection(self.get_argument)
        self.page("batch.html", flt=flt, runs=runs, fields=self.fields(flt.instrument), text={}, errors={},
                  max_batch=MAX_BATCH)

    @web.authenticated
    async def post(self) -> None:
        flt, runs = self.selection(self.get_body_argument)
        fields = self.fields(flt.instrument)
        form = {spec.name: self.get_body_argument(spec.name, "") for spec in fields}
        values, errors = validate_form(fields, form, keep_blank=True)
        if len(runs) > MAX_BATCH:
            errors["_selection"] = f"{len(runs)}+ runs selected; at most {MAX_BATCH} per batch"
        if not runs:
            errors["_selection"] = "no runs you may rerun match this selection"
        if errors:
            self.page("batch.html", status=400, flt=flt, runs=runs[:MAX_BATCH], fields=fields, text=form,
                      errors=errors, max_batch=MAX_BATCH)
            return
        requests = [self.portal.rerun_request(run.latest, {**carried_parameters(run.latest, fields), **values},
                                              self.username) for run in runs]
        await self.portal.publish([(REDUCTION_REQUESTS, r, r.message_id) for r in requests])
        log.info("%s requested a batch rerun of %d runs of %s", self.username, len(requests), flt.instrument)
        self.redirect(self.url("", instrument=flt.instrument, run_from=flt.run_from, run_to=flt.run_to,
                               batch=len(requests)))


class DefaultsHandler(BaseHandler):
    """Instrument scientists set default parameters for future runs of their instrument or one RB."""

    def check(self, instrument: str) -> list[ParamSpec]:
        instrument = instrument.upper()
        if not self.access.manages(instrument):
            raise web.HTTPError(403, f"only {instrument} instrument scientists and admins set its defaults")
        try:
            return self.portal.specs(instrument)
        except TemplateError as exc:
            raise web.HTTPError(409, str(exc)) from None

    async def current(self, instrument: str, rb: str | None) -> dict[str, Any]:
        table = await IOLoop.current().run_in_executor(None, DefaultsTable(self.portal.settings).load)
        found = table.get(defaults_key("rb" if rb else "instrument", instrument, rb))
        return found.parameters if found and found.instrument == instrument else {}

    @web.authenticated
    async def get(self, instrument: str) -> None:
        instrument = instrument.upper()
        fields = self.check(instrument)
        rb = self.get_argument("rb", "").strip() or None
        current = await self.current(instrument, rb)
        text = {s.name: s.format(current[s.name]) for s in fields if s.name in current}
        self.page("defaults.html", instrument=instrument, rb=rb, fields=fields, text=text, errors={},
                  saved=self.get_argument("saved", None))

    @web.authenticated
    async def post(self, instrument: str) -> None:
        instrument = instrument.upper()
        fields = self.check(instrument)
        rb = self.get_body_argument("rb", "").strip() or None
        form = {spec.name: self.get_body_argument(spec.name, "") for spec in fields}
        values, errors = validate_form(fields, form, keep_blank=True)
        try:
            message = ParameterDefaults(scope="rb" if rb else "instrument", instrument=instrument, rb_number=rb,
                                        parameters=values, set_by=self.username)
        except ValidationError:
            errors["rb"] = "an RB number is digits only"
        if errors:
            self.page("defaults.html", status=400, instrument=instrument, rb=rb, fields=fields, text=form,
                      errors=errors, saved=None)
            return
        await self.portal.publish([(PARAMETER_DEFAULTS, message, message.key)])
        self.redirect(self.url(f"defaults/{instrument}", rb=rb, saved="1"))


class CallbackHandler(HubOAuthCallbackHandler):
    def initialize(self, portal: Portal, hub_auth: HubOAuth) -> None:
        self.hub_auth = hub_auth


def make_app(portal: Portal, hub_auth: HubOAuth, prefix: str = "/") -> web.Application:
    prefix = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
    kw = {"portal": portal, "hub_auth": hub_auth}
    jinja = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                               undefined=jinja2.StrictUndefined)
    jinja.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, default=str)
    jinja.filters["when"] = lambda v: v.strftime("%Y-%m-%d %H:%M:%S") if v else ""
    jinja.filters["seconds"] = seconds_text
    from runner.portal import compare, notify  # their handlers build on this module's

    routes = [
        (prefix, RunListHandler, kw),
        (prefix + "compare", compare.CompareHandler, kw),
        (prefix + "compare/diff", compare.NbdimePageHandler, kw),
        (prefix + "nbdime/api/diff", compare.NbdimeDiffApiHandler, kw),
        (prefix + "nbdime/static/(.*)", web.StaticFileHandler, {"path": str(compare.NBDIME_STATIC)}),
        (prefix + "notifications", notify.NotificationsHandler, kw),
        (prefix + "api/runs", RunListApiHandler, kw),
        (prefix + "api/events", EventsHandler, kw),
        (prefix + r"api/jobs/([0-9A-Za-z_-]+)", JobApiHandler, kw),
        (prefix + r"jobs/([0-9A-Za-z_-]+)", JobHandler, kw),
        (prefix + r"jobs/([0-9A-Za-z_-]+)/notebook", NotebookHandler, kw),
        (prefix + r"jobs/([0-9A-Za-z_-]+)/files/(.+)", FileHandler, kw),
        (prefix + r"jobs/([0-9A-Za-z_-]+)/rerun", RerunHandler, kw),
        (prefix + "rerun", BatchRerunHandler, kw),
        (prefix + r"defaults/([A-Za-z][A-Za-z0-9_]{0,31})", DefaultsHandler, kw),
        (prefix + "oauth_callback", CallbackHandler, kw),
        (prefix + "static/(.*)", web.StaticFileHandler, {"path": str(HERE / "static")}),
    ]
    # the cookie only holds the hub token: a new secret per start just means a silent new OAuth round trip
    return web.Application(routes, xsrf_cookies=True, jinja=jinja, portal_prefix=prefix,
                           cookie_secret=secrets.token_bytes(32))
