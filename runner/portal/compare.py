"""Two versions of a run, or two runs of one instrument, side by side: parameters, results, plots and the
whole notebook diff, rendered by nbdime's own web viewer (its ``nbdime.js`` and static assets, served here).

nbdime's viewer asks ``<baseUrl>api/diff`` for ``{base, remote}``; here those are job ids, checked against
the user's access like every other page, and the answer is nbdime's ``diff_notebooks`` of the two archived
notebooks. The viewer runs in a frame of its own with a policy that lets nbdime insert its styles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
from tornado import web
from tornado.ioloop import IOLoop

from runner.bus.models import StatusEvent
from runner.portal.app import BaseHandler, Portal
from runner.portal.notebooks import IMAGE_SUFFIXES, notebook_images
from runner.portal.results import scrap_view

#: nbdime's packaged web app (nbdime.js and its chunks, fonts).
NBDIME_STATIC = Path(__import__("nbdime").__file__).resolve().parent / "webapp" / "static"
#: The viewer inserts its CSS as <style> elements: inline styles allowed in its frame, scripts only from here.
NBDIME_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
              "font-src 'self' data:; connect-src 'self'; frame-ancestors 'self'; form-action 'none'")
#: Parameters that differ between any two versions by construction (not a change anyone made).
IDENTITY = {"output_dir"}


def notebook_of(portal: Portal, job: StatusEvent) -> Path:
    path = portal.downloads(job).get(Path(job.notebook).name) if job.notebook else None
    if path is None or not path.is_file():
        raise web.HTTPError(404, f"job {job.job_id[:12]} has no executed notebook")
    return path


def side_by_side(a: dict[str, Any], b: dict[str, Any], view=None) -> list[dict[str, Any]]:
    """Rows ``{name, a, b, changed, only}`` over the union of names, in ``a``'s order then ``b``'s."""
    rows = []
    for name in dict.fromkeys([*a, *b]):
        in_a, in_b = name in a, name in b
        rows.append({"name": name, "a": view(name, a[name]) if view and in_a else a.get(name),
                     "b": view(name, b[name]) if view and in_b else b.get(name),
                     "in_a": in_a, "in_b": in_b, "changed": not (in_a and in_b and a[name] == b[name]),
                     "identity": name in IDENTITY})
    return rows


def plots_of(portal: Portal, job: StatusEvent) -> list[tuple[str, str]]:
    """The job's figures as the run page shows them: the notebook's, else its image files (as URLs)."""
    try:
        images = [f"data:{mime};base64,{data}" for mime, data in notebook_images(notebook_of(portal, job))]
    except web.HTTPError:
        images = []
    if images:
        return [(f"figure {i + 1}", src) for i, src in enumerate(images)]
    return [(name, f"jobs/{job.job_id}/files/{name}") for name in portal.downloads(job)
            if Path(name).suffix.lower() in IMAGE_SUFFIXES]


class CompareHandler(BaseHandler):
    """``compare?a=JOB&b=JOB``, or ``b_run=RUN`` for the latest version of another run of ``a``'s instrument."""

    def other_run(self, a: StatusEvent, run: str) -> StatusEvent:
        wanted = run.strip()
        candidates = [r for r in self.portal.index.runs.values()
                      if r.instrument == a.instrument and r.label == wanted and self.access.can_see(r.instrument, r.rb)]
        if not candidates:
            raise web.HTTPError(404, f"no run {wanted} of {a.instrument} that you may see")
        same_rb = [r for r in candidates if r.rb == a.rb_number]
        return (same_rb or candidates)[0].latest

    @web.authenticated
    def get(self) -> None:
        a = self.job(self.get_argument("a"))
        b_id, b_run = self.get_argument("b", "").strip(), self.get_argument("b_run", "").strip()
        if not b_id and not b_run:
            raise web.HTTPError(400, "choose what to compare with: another version or another run")
        b = self.job(b_id) if b_id else self.other_run(a, b_run)
        if _older(b, a):  # the older one on the left, as the base of the diff
            a, b = b, a
        if a.instrument != b.instrument:
            raise web.HTTPError(400, "only runs of the same instrument (the same template) can be compared")
        plots_a, plots_b = plots_of(self.portal, a), plots_of(self.portal, b)
        self.page("compare.html", a=a, b=b, run_a=self.portal.index.run_of(a.job_id),
                  run_b=self.portal.index.run_of(b.job_id),
                  parameters=side_by_side(a.parameters, b.parameters),
                  scraps=side_by_side(a.scraps, b.scraps, scrap_view),
                  warnings=(a.warnings, b.warnings),
                  plots=[(plots_a[i] if i < len(plots_a) else None, plots_b[i] if i < len(plots_b) else None)
                         for i in range(max(len(plots_a), len(plots_b)))],
                  diffable=bool(a.notebook and b.notebook))


def _older(x: StatusEvent, y: StatusEvent) -> bool:
    """Versions of one run by number; anything else by when it was queued."""
    same_run = x.instrument == y.instrument and x.rb_number == y.rb_number and x.runs == y.runs
    if same_run and x.version is not None and y.version is not None:
        return x.version < y.version
    return (x.queued_at or x.timestamp) < (y.queued_at or y.timestamp)


class NbdimePageHandler(BaseHandler):
    """nbdime's diff viewer for two jobs (shown in a frame of the compare page)."""

    @web.authenticated
    def get(self) -> None:
        base, remote = self.job(self.get_argument("base")), self.job(self.get_argument("remote"))
        config = {"base": base.job_id, "remote": remote.job_id, "baseUrl": self.url("nbdime/"),
                  "closable": False, "savable": False, "hideUnchanged": True, "collapseIdentical": 2}
        self.set_header("Content-Security-Policy", NBDIME_CSP)
        env = self.settings["jinja"]
        self.finish(env.get_template("nbdime.html").render(
            config=json.dumps(config).replace("</", "<\\/"), url=self.url, a=base, b=remote))


class NbdimeDiffApiHandler(BaseHandler):
    """``POST nbdime/api/diff`` ``{base, remote}`` (job ids) -> ``{base: notebook, diff: nbdime diff}``."""

    def check_xsrf_cookie(self) -> None:
        """Read-only (a diff of two notebooks the user may see): a cross-site page could make the request but
        never read the answer, so there is nothing to forge; nbdime's viewer sends no form token."""

    @web.authenticated
    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
            base_id, remote_id = str(body["base"]), str(body["remote"])
        except (ValueError, KeyError, TypeError):
            raise web.HTTPError(400, "expected {base, remote}") from None
        base, remote = self.job(base_id), self.job(remote_id)
        paths = notebook_of(self.portal, base), notebook_of(self.portal, remote)
        data = await IOLoop.current().run_in_executor(None, diff_payload, *paths)
        self.set_header("Content-Type", "application/json")
        self.finish(data)


def diff_payload(base: Path, remote: Path) -> str:
    """nbdime's answer to its viewer, as nbdime's own server builds it."""
    from nbdime import diff_notebooks

    a, b = nbformat.read(base, as_version=4), nbformat.read(remote, as_version=4)
    return json.dumps({"base": a, "diff": diff_notebooks(a, b)})
