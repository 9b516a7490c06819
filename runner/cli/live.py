"""``nbreduce logs`` and ``nbreduce diff``: a job's log (live while it runs) and what changed between two jobs."""

from __future__ import annotations

import json
import sys
import threading
from types import SimpleNamespace

import click

from runner.cli.common import load_settings


def resolve(settings, prefix: str):
    """The job whose id starts with ``prefix`` (as ``nbreduce runs`` shows them), from the status topic."""
    from runner.bus.status import StatusView

    view = StatusView.rebuild(settings)
    found = [job for job_id, job in view.items() if job_id.startswith(prefix.strip())]
    if not found:
        raise click.ClickException(f"no job {prefix}")
    if len(found) > 1:
        raise click.ClickException(f"{prefix} is ambiguous: {', '.join(j.job_id[:12] for j in found[:5])}")
    return found[0], view


def _print_lines(lines) -> None:
    for line in lines:
        text = line.text if hasattr(line, "text") else line["text"]
        stream = line.stream if hasattr(line, "stream") else line["stream"]
        click.echo(click.style(text, fg="red") if stream == "stderr" else text)


@click.command()
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing while the job runs, until it ends.")
def logs(job: str, follow: bool) -> None:
    """What a job printed: from the progress topic while it runs, from its executed notebook once it ended."""
    from runner.bus.models import ProgressEvent
    from runner.bus.table import TopicTable
    from runner.bus.topics import REDUCTION_PROGRESS
    from runner.portal.notebooks import notebook_outputs

    settings = load_settings()
    event, view = resolve(settings, job)
    if event.state.final:
        path = settings.archive / event.notebook if event.notebook else None
        if path is None or not path.is_file():
            raise click.ClickException(f"job {event.job_id[:12]} is {event.state.value} and has no notebook"
                                       + (f": {event.reason}" if event.reason else ""))
        cell = None
        for number, stream, text in notebook_outputs(path):
            if number != cell:
                click.echo(click.style(f"── cell {number}", fg="cyan"))
                cell = number
            _print_lines({"stream": stream, "text": t} for t in text.rstrip("\n").split("\n"))
        click.echo(click.style(f"── {event.outcome}", fg="green" if event.state.value == "succeeded" else "red"))
        for warning in event.warnings:
            click.echo(click.style(f"warning: {warning}", fg="yellow"))
        return
    stop = threading.Event()
    printed = {"end": 0}

    def on_change(progress: ProgressEvent) -> None:
        if progress.job_id != event.job_id:
            return
        if progress.log_offset > printed["end"]:
            click.echo(click.style(f"… {progress.log_offset - printed['end']} lines not shown …", fg="cyan"))
        skip = max(0, printed["end"] - progress.log_offset)
        _print_lines(progress.lines[skip:])
        printed["end"] = max(printed["end"], progress.log_offset + len(progress.lines))
        if progress.done:
            stop.set()

    if not follow:  # every event of the job so far, in order (a table would keep only the last)
        from runner.bus.clients import read_topic

        for msg in read_topic(settings, REDUCTION_PROGRESS):
            if msg.key() == event.job_id.encode():
                on_change(ProgressEvent.from_bytes(msg.value()))
        return
    # following: the table hands over every event as it folds it, from the start of the topic
    table = TopicTable(settings, REDUCTION_PROGRESS, ProgressEvent, key=lambda e: e.job_id,
                       where=lambda e: e.job_id == event.job_id)
    thread = table.start(stop, on_change)
    try:
        while not stop.wait(0.5):
            current = view.get(event.job_id)
            if current is not None and current.state.final:
                break
    except KeyboardInterrupt:
        pass
    stop.set()
    thread.join(5)


@click.command()
@click.argument("job_a")
@click.argument("job_b")
@click.option("--no-notebook", is_flag=True, help="Parameters and results only, not the notebook diff.")
@click.option("--metadata", is_flag=True, help="Include metadata and ids in the notebook diff (timings differ always).")
def diff(job_a: str, job_b: str, no_notebook: bool, metadata: bool) -> None:
    """What changed between two jobs: parameters, results (scraps), warnings, then nbdime's notebook diff."""
    settings = load_settings()
    a, _ = resolve(settings, job_a)
    b, _ = resolve(settings, job_b)

    def name(job) -> str:
        return f"{job.instrument} {job.run_number} v{job.version} ({job.job_id[:10]})"

    click.echo(click.style(f"--- {name(a)}\n+++ {name(b)}", bold=True))
    def shown(values: dict, key: str, missing: str) -> str:
        return json.dumps(values[key]) if key in values else missing

    results_a = {k: v for k, v in a.scraps.items() if k != "nbreduce_warnings"}
    results_b = {k: v for k, v in b.scraps.items() if k != "nbreduce_warnings"}
    for title, left, right, missing in (
            ("parameters", a.parameters, b.parameters, "(template default)"),
            ("results", results_a, results_b, "(not glued)"),
            ("warnings", {"warnings": a.warnings}, {"warnings": b.warnings}, "")):
        changed = [k for k in dict.fromkeys([*left, *right]) if left.get(k) != right.get(k) and k != "output_dir"]
        click.echo(click.style(f"\n{title}: {len(changed)} changed", fg="cyan"))
        for key in changed:
            click.echo(f"  {key}: " + click.style(shown(left, key, missing), fg="red") + " -> "
                       + click.style(shown(right, key, missing), fg="green"))
    if no_notebook:
        return
    paths = [settings.archive / j.notebook if j.notebook else None for j in (a, b)]
    if not all(p is not None and p.is_file() for p in paths):
        raise click.ClickException("both jobs need an executed notebook for the notebook diff")
    import nbformat
    from nbdime import diff_notebooks
    from nbdime.prettyprint import PrettyPrintConfig, pretty_print_diff

    base, remote = (nbformat.read(p, as_version=4) for p in paths)
    click.echo(click.style("\nnotebook (nbdime):", fg="cyan"))
    include = None if metadata else SimpleNamespace(metadata=False, id=False, details=False)
    pretty_print_diff(base, diff_notebooks(base, remote), "",
                      PrettyPrintConfig(out=sys.stdout, include=include, use_color=sys.stdout.isatty()))
