"""The papermill engine that runs on a kernel nbreduce provides (warm from the pool or cold).

papermill always starts (and owns) a new kernel. nbreduce needs the kernel in hand: to kill it when a
run exceeds its time limit, to give every run its own working directory without papermill's
process-wide ``os.chdir``, and to serve runs from a warm pool. papermill's own client
(:class:`PapermillNotebookClient`) still does the work, so parameter injection, error banners and
per-cell metadata stay papermill's.

papermill saves the output notebook before and after every cell (``request_save_on_cell_execute``): on
a notebook of a few fast cells those writes (each one validated against the notebook schema) cost more
than the cells. Here a save during the run happens at most every :data:`SAVE_INTERVAL` seconds, so a
long run is still visible as it goes and a short one is written once, by papermill's final write, already
stamped with nbreduce's metadata (``nbreduce_metadata``: the kernel that really ran, provenance).

Registered through papermill's ``papermill.engine`` entry point (pyproject.toml). papermill loads its
entry points while it is itself being imported, so this module is only ever imported by papermill and
imports nothing of papermill's package beyond what is defined by then (``engines``, ``clientwrap``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from queue import Empty
from typing import Any

from jupyter_core.utils import ensure_async, run_sync
from nbclient.util import run_hook
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine
from papermill.utils import merge_kwargs, remove_args

#: Least time between two saves of the output notebook during a run (the final write always happens).
SAVE_INTERVAL = 1.0


class _ReadyClient(PapermillNotebookClient):
    """papermill's client, connecting to an already running kernel without idle waits.

    jupyter_client's ``wait_for_ready`` waits for 0.2 s of silence on IOPub, once to see that IOPub is
    connected and once to flush it: 0.4 s, most of the runner's overhead on a warm kernel. The same
    handshake (a kernel_info reply on shell, then any IOPub message) is done here in 20 ms steps.
    """

    async def async_start_new_kernel_client(self):
        assert self.km is not None
        self.kc = self.km.client()
        # shell and IOPub are all a run uses (no stdin; liveness is the manager's, not a heartbeat thread's)
        await ensure_async(self.kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False))
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            msg_id = self.kc.kernel_info()
            try:
                reply = await ensure_async(self.kc.shell_channel.get_msg(timeout=1))
            except Empty:
                reply = None
            if reply is not None and reply["parent_header"].get("msg_id") == msg_id:
                try:
                    await ensure_async(self.kc.iopub_channel.get_msg(timeout=0.02))
                except Empty:
                    continue  # IOPub not subscribed yet (zmq slow joiner): ask again
                self.kc._handle_kernel_info_reply(reply)
                while True:  # drop the handshake's remaining IOPub messages (the rest arrive before any output)
                    try:
                        await ensure_async(self.kc.iopub_channel.get_msg(timeout=0))
                    except Empty:
                        break
                self.kc.allow_stdin = False
                await run_hook(self.on_notebook_start, notebook=self.nb)
                return self.kc
            if not await ensure_async(self.km.is_alive()):
                raise RuntimeError("kernel died before replying to kernel_info")
        raise RuntimeError(f"kernel did not reply to kernel_info within {self.startup_timeout} s")

    # nbclient binds the synchronous wrapper to its own coroutine at class creation
    start_new_kernel_client = run_sync(async_start_new_kernel_client)

    def watch(self, progress: Any) -> None:
        """Report to ``progress`` (a :class:`runner.pipeline.progress.RunProgress`): the cells it will run, then
        each cell as it starts (nbclient's ``on_cell_start`` hook); streams reach it as papermill's
        ``stdout_file``/``stderr_file``."""
        progress.begin(self.nb.cells)
        self.on_cell_start = progress.cell_start


class ProvidedKernelEngine(NBClientEngine):
    """NBClientEngine that executes on the kernel manager passed as ``km`` and leaves it to its provider.

    nbclient's own clean-up shuts a kernel down gracefully (seconds); here only the client channels
    are closed and the provider kills the kernel, so a finished run is published without that wait.
    """

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None, stderr_file=None,
                                 start_timeout=60, execution_timeout=None, nbreduce_metadata=None, **kwargs: Any):
        _throttle_saves(nb_man)
        progress = kwargs.pop("progress", None)
        kwargs = remove_args(["input_path"], **kwargs)
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
        final_kwargs = merge_kwargs(
            safe_kwargs,
            timeout=execution_timeout,
            startup_timeout=start_timeout,
            kernel_name=kernel_name,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
        )
        client = _ReadyClient(nb_man, **final_kwargs)
        if progress is not None:
            client.watch(progress)
        try:
            nb = client.execute(cleanup_kc=False)
        finally:
            if client.kc is not None:
                client.kc.stop_channels()
        if nbreduce_metadata is not None:  # papermill's final write then carries it: no second write
            from runner.pipeline.provenance import stamp_notebook

            kernel = nbreduce_metadata.get("kernel", {})
            stamp_notebook(nb_man.nb, kernel.get("kernel") or kernel_name, kernel.get("display_name"),
                           {**nbreduce_metadata, "finished_at": datetime.now(UTC).isoformat(), "state": "succeeded"})
        return nb


def _throttle_saves(nb_man: Any) -> None:
    """Let papermill's per-cell saves through at most every :data:`SAVE_INTERVAL` seconds."""
    save = nb_man.save
    last = time.monotonic()

    def throttled(**kwargs: Any) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= SAVE_INTERVAL:
            last = now
            save(**kwargs)

    nb_man.save = throttled

