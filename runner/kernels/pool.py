"""Warm kernel pool: pre-started kernels with the environment's imports done, one reduction each.

Starting a kernel and importing the scipp stack costs seconds on every run. The pool keeps ``size``
kernels per kernel name started and preloaded in the background. A kernel serves exactly one
reduction and is then killed (never reused), so nothing leaks from one run into the next; its
replacement starts as soon as it is handed out. When no warm kernel is ready, or the kernel name
is not pooled, :meth:`KernelPool.acquire` cold-starts one, so callers never wait on the pool.

Preload statements run in a throwaway namespace: modules end up in ``sys.modules`` (the slow part),
but the notebook's namespace is the same as on a cold kernel, so a template that forgets an import
fails in the pool exactly as it would without it.

Kernels of nbreduce's uv environments are forked from a per-environment fork server
(:mod:`runner.kernels.forkserver`, via the kernelspec's provisioner :mod:`runner.kernels.provisioner`) that did the
preload once: a refill or a cold start then costs a fork and ipykernel's initialisation instead of an
interpreter start plus the imports, and still yields a new process per run. Other kernels (the
runner's ``python3``, conda environments) start normally and run the preload in the kernel.

A replacement starts when a run gives its kernel back, not when it takes it (unless that emptied the
pool): a kernel start is a burst of CPU, and on a small machine it would slow the very run it replaces.
Kernels' runtime files (connection files, IPC sockets) live in ``<home>/run`` and go with their kernels;
files left by a runner that was killed are removed when the next pool of that home starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_core.utils import ensure_event_loop, run_sync
from pydantic import BaseModel, Field
from traitlets import Type

from runner.config import Settings
from runner.kernels.environments import jupyter_env, kernel_spec_manager
from runner.kernels.forkserver import ForkServers

log = logging.getLogger(__name__)

#: IPython writes history to a shared SQLite file by default; parallel kernels would contend for it.
KERNEL_ARGUMENTS = ["--HistoryManager.hist_file=:memory:"]
_IPC_PATH_MAX = 90  # AF_UNIX paths are limited to 107 bytes; jupyter appends "-<n>" per channel
#: Runtime files of a kernel in ``<home>/run``: ``kernel-<pid of the runner>-<id>[.json|-<n>]``.
_RUNTIME_FILE = re.compile(r"^kernel-(\d+)-[0-9a-f]+(?:\.json|-\d+)?$")


class PoolKernelManager(KernelManager):
    """Blocking manager API for the runner, asynchronous clients for nbclient.

    The runner's watchdog calls ``kill_kernel()``/``is_alive()`` from plain threads, which needs the
    blocking manager. nbclient, given a plain :class:`KernelManager`, gets a *blocking* client and then
    waits on the shell channel without a timeout: a kernel that dies mid-cell (OOM, kill) hangs the run
    for ever. With an async client nbclient polls the kernel's liveness alongside and raises
    ``DeadKernelError`` at once. The manager also remembers the clients it made, because nbclient
    leaves the channels of a provided kernel open (one heartbeat thread per run otherwise).
    """

    client_class = "jupyter_client.asynchronous.AsyncKernelClient"
    client_factory = Type(klass="jupyter_client.asynchronous.AsyncKernelClient")

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._made_clients: list[Any] = []
        #: A shell-only client kept connected from the start-up check: telling a warm kernel where to work then
        #: costs one round trip, not a new connection.
        self.shell_client: Any = None
        #: "warm" when it came out of the pool preloaded, "cold" when started for the request.
        self.origin = "cold"
        #: Read by runner.kernels.provisioner.ForkProvisioner: where to fork from (None: normal launch) and
        #: the preload of that fork server (None: the kernelspec's list).
        self.fork_servers: ForkServers | None = None
        self.preload: list[str] | None = None

    @property
    def forked(self) -> bool:
        """Whether the kernel was forked from a fork server (its preload then happened there)."""
        return bool(getattr(self.provisioner, "forked", False))

    def client(self, **kwargs: Any) -> Any:
        kc = super().client(**kwargs)
        self._made_clients.append(kc)
        return kc

    async def _async_wait(self, pollinterval: float = 0.1) -> None:
        """Until the (killed) kernel is gone. jupyter_client looks every ``pollinterval`` (0.1 s), so each kernel
        the pool's single reaper stops costs at least that: ~9 kernels a second, fewer than a burst of short runs
        hands back, and the kernels behind it (with their sockets, threads and memory in the runner) pile up.
        A killed kernel is gone within milliseconds: look at once, then at growing intervals up to that."""
        delay = 0.001
        while await self._async_is_alive():
            await asyncio.sleep(delay)
            delay = min(delay * 2, pollinterval)

    def close_clients(self) -> None:
        if self.shell_client is not None:
            self._made_clients.append(self.shell_client)
            self.shell_client = None
        while self._made_clients:
            kc = self._made_clients.pop()
            with contextlib.suppress(Exception):
                if kc.channels_running:
                    kc.stop_channels()


class PoolStats(BaseModel):
    """Counters of one pool since it was created; ``warm`` is the number ready now per kernel name."""

    warm_hits: int = 0
    cold_starts: int = 0
    kernels_started: int = 0
    #: Kernel starts (warm or cold) served by a fork server instead of a new interpreter.
    forked_starts: int = 0
    start_failures: int = 0
    discarded: int = 0
    released: int = 0
    warm: dict[str, int] = Field(default_factory=dict)
    last_errors: dict[str, str] = Field(default_factory=dict)


class KernelStartError(RuntimeError):
    """A kernel did not start or did not become ready in time."""


def parse_sizes(text: str) -> dict[str, int]:
    """Pool sizes from configuration text such as ``"nbreduce-scipp=2, python3=1"`` (empty: no pool)."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = item.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit():
            raise ValueError(f"pool size {item!r} is not KERNEL=COUNT")
        sizes[name.strip()] = int(count)
    return sizes


# --------------------------------------------------------------------------- kernel health


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def kernel_alive(km: KernelManager) -> bool:
    """Whether ``km``'s kernel process is running (False after OOM kill, ``kill -9``, crash or shutdown).

    Works for blocking and async managers alike, from any thread (a watchdog's, say).
    """
    try:
        if not km.has_kernel:
            return False
        alive = km.is_alive()
        return bool(run_sync(_awaited)(alive) if inspect.isawaitable(alive) else alive)
    except Exception:  # a half torn-down manager counts as dead
        return False


def kernel_exit_code(km: KernelManager) -> int | None:
    """Exit status of a dead kernel (negative: killed by that signal); None while it runs or is unknown."""
    provisioner = getattr(km, "provisioner", None)
    if provisioner is None or not km.has_kernel:
        return None
    with contextlib.suppress(Exception):
        return run_sync(provisioner.poll)()
    return None


def describe_exit(code: int | None) -> str:
    """Human reason for a kernel's death, for status messages."""
    if code is None:
        return "kernel stopped"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory? the OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"kernel killed by {name}{hint}"
    return f"kernel exited with status {code}"


def kernel_provenance(km: KernelManager) -> dict[str, str | None]:
    """Kernel name, display name and environment/hash (from nbreduce kernelspec metadata) of ``km``."""
    spec = km.kernel_spec
    meta = (spec.metadata or {}).get("nbreduce", {}) if spec is not None else {}
    return {
        "kernel": km.kernel_name,
        "display_name": spec.display_name if spec is not None else None,
        "environment": meta.get("environment"),
        "environment_hash": meta.get("hash12"),
    }


# --------------------------------------------------------------------------- starting and stopping


def _client(km: KernelManager) -> Any:
    """A blocking client on the shell channel only: a fresh IOPub subscription takes ~0.2 s to receive
    (zmq's slow joiner), while shell requests are queued until the kernel reads them."""
    kc = km.blocking_client()
    kc.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
    return kc


def wait_until_answering(km: KernelManager, timeout: float) -> None:
    """Until the kernel answers ``kernel_info`` (asked again each second: the request is harmless), noticing a
    kernel that died while starting at once instead of after ``timeout``. A pool kernel keeps the client."""
    kc = _client(km)
    deadline = time.monotonic() + timeout
    answered = False
    try:
        while True:
            try:
                kc.kernel_info(reply=True, timeout=min(1.0, max(0.05, deadline - time.monotonic())))
                answered = True
                return
            except TimeoutError:
                if not kernel_alive(km):
                    raise RuntimeError(describe_exit(kernel_exit_code(km))) from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"kernel {km.kernel_name} did not reply within {timeout:.0f} s") from None
    finally:
        if answered and isinstance(km, PoolKernelManager) and km.shell_client is None:
            km.shell_client = kc
        else:
            kc.stop_channels()


def _execute(km: KernelManager, code: str, timeout: float, user_expressions: dict[str, str] | None = None
             ) -> dict[str, Any]:
    """Execute ``code`` without history or outputs; returns the reply's content."""
    if not kernel_alive(km):
        raise RuntimeError(describe_exit(kernel_exit_code(km)))
    kept = km.shell_client if isinstance(km, PoolKernelManager) else None
    kc = kept or _client(km)
    try:
        reply = kc.execute(code, silent=True, store_history=False, allow_stdin=False,
                           user_expressions=user_expressions or {}, reply=True, timeout=timeout)
    except TimeoutError:
        if not kernel_alive(km):
            raise RuntimeError(describe_exit(kernel_exit_code(km))) from None
        raise TimeoutError(f"kernel {km.kernel_name} did not reply within {timeout:.0f} s") from None
    finally:
        if kept is None:
            kc.stop_channels()
    return reply["content"]


def _run_silently(km: KernelManager, code: str, timeout: float) -> None:
    """Execute ``code`` without history, outputs or execution-count change; raise if it fails."""
    content = _execute(km, code, timeout)
    if content.get("status") != "ok":
        raise RuntimeError(f"{content.get('ename', 'error')}: {content.get('evalue', '')}")


def evaluate_silently(km: KernelManager, code: str, expression: str, timeout: float) -> str:
    """Run ``code`` silently, then return ``expression``'s plain-text value (its ``repr``)."""
    content = _execute(km, code, timeout, {"value": expression})
    value = content.get("user_expressions", {}).get("value", {})
    if content.get("status") != "ok" or value.get("status") != "ok":
        failed = value if value.get("status") == "error" else content
        raise RuntimeError(f"{failed.get('ename', 'error')}: {failed.get('evalue', '')}")
    return value["data"]["text/plain"]


def preload_code(statements: Sequence[str]) -> str:
    """Run the statements in a throwaway namespace: imports are cached, the user namespace stays empty."""
    source = "\n".join(statements)
    return f"exec(compile({source!r}, '<nbreduce-preload>', 'exec'), {{'__name__': '__nbreduce_preload__'}})"


def shutdown(km: KernelManager) -> None:
    """Kill a kernel whatever state it is in (finished, dead or hung) and free its files and sockets."""
    if isinstance(km, PoolKernelManager):
        km.close_clients()
    try:
        if km.has_kernel:
            km.shutdown_kernel(now=True)  # it is discarded anyway: no graceful wait
    except Exception as exc:
        log.debug("kernel shutdown: %s", exc)
    finally:
        with contextlib.suppress(Exception):
            km.cleanup_resources()


def remove_stale_runtime_files(run_dir: Path) -> int:
    """Remove kernels' connection files and IPC sockets left in ``run_dir`` by runners that are gone (killed);
    returns how many. Files of live runners (several may share a home) are kept."""
    removed = 0
    if not run_dir.is_dir():
        return 0
    for path in run_dir.iterdir():
        match = _RUNTIME_FILE.match(path.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    if removed:
        log.info("removed %d runtime files of kernels whose runner is gone from %s", removed, run_dir)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class KernelPool:
    """Per-kernel-name pools of warm kernels; thread-safe ``acquire``/``release``, background refills.

    ``sizes`` maps kernel names to how many warm kernels to keep (absent or 0: cold start only);
    ``preload`` maps kernel names to Python statements run in each warm kernel (see
    :func:`runner.kernels.environments.preload_by_kernel`). Refills start when a warm kernel is handed out,
    so the replacement is ready for the next run; at most ``max_parallel_starts`` start at once.
    With ``fork_servers`` (default), kernels whose kernelspec names the fork provisioner are forked
    from per-environment fork servers, started on first use and stopped with the pool.
    """

    def __init__(self, settings: Settings, sizes: Mapping[str, int] | None = None,
                 preload: Mapping[str, Sequence[str]] | None = None, *, start_timeout: float = 60.0,
                 max_parallel_starts: int = 1, retry_delays: Sequence[float] = (2, 5, 15, 60),
                 spec_manager: KernelSpecManager | None = None, fork_servers: bool = True):
        self.settings = settings
        self.sizes = {name: int(n) for name, n in (sizes or {}).items() if int(n) > 0}
        self.preload = {name: list(stmts) for name, stmts in (preload or {}).items()}
        self.start_timeout = start_timeout
        self.retry_delays = tuple(retry_delays) or (5.0,)
        self._ksm = spec_manager or kernel_spec_manager(settings)
        self._env = jupyter_env(settings)
        self._run_dir = settings.home / "run"
        self._forks = ForkServers(cwd=self._run_dir, start_timeout=max(start_timeout, 120.0)) if fork_servers else None
        self._cond = threading.Condition()
        self._warm: dict[str, deque[PoolKernelManager]] = {name: deque() for name in self.sizes}
        self._starting: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._retries: dict[str, threading.Timer] = {}
        self._checked_out: set[PoolKernelManager] = set()
        self._stats = PoolStats()
        self._started = False
        self._closed = False
        # jupyter_client's blocking calls run an asyncio loop per thread; ours are closed in stop()
        self._loops: list[asyncio.AbstractEventLoop] = []
        self._starter = ThreadPoolExecutor(max(1, max_parallel_starts), thread_name_prefix="nbreduce-kernel-start",
                                           initializer=self._register_loop)
        self._reaper = ThreadPoolExecutor(1, thread_name_prefix="nbreduce-kernel-stop",
                                          initializer=self._register_loop)

    # ----------------------------------------------------------------- public interface

    def start(self) -> KernelPool:
        """Begin filling every pool in the background; returns at once."""
        with self._cond:
            if self._closed:
                raise RuntimeError("kernel pool is stopped")
            self._started = True
        remove_stale_runtime_files(self._run_dir)
        for name in self.sizes:
            self._refill(name)
        return self

    def acquire(self, kernel_name: str, cwd: Path, timeout: float = 60.0) -> PoolKernelManager:
        """A started kernel working in ``cwd``, used for one run only: warm if one is ready, else cold."""
        cwd = Path(cwd).resolve()
        if not cwd.is_dir():  # checked first: a bad cwd must not burn warm kernels
            raise FileNotFoundError(f"working directory {cwd} does not exist")
        deadline = time.monotonic() + timeout
        while (km := self._take_warm(kernel_name)) is not None:
            if not self._warm_count(kernel_name):  # the pool ran dry: refill now, not after this run
                self._refill(kernel_name)
            try:
                if not kernel_alive(km):
                    raise RuntimeError(describe_exit(kernel_exit_code(km)) + " while idle")
                _run_silently(km, f"__import__('os').chdir({str(cwd)!r})", max(1.0, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("discarding warm %s kernel: %s", kernel_name, exc)
                self._count(discarded=1)
                self._discard(km)
                continue
            self._hand_out(km, warm=True)
            return km
        self._refill(kernel_name)
        km = self._launch(kernel_name, cwd, max(1.0, deadline - time.monotonic()))
        self._hand_out(km, warm=False)
        return km

    def release(self, km: KernelManager) -> None:
        """Take a kernel back after its run: it is killed (never reused) and its pool refilled."""
        with self._cond:
            self._checked_out.discard(km)  # type: ignore[arg-type]
            self._stats.released += 1
        if isinstance(km, PoolKernelManager):
            km.close_clients()  # in the caller's thread, which made them
        self._discard(km)
        self._refill(km.kernel_name)

    def stop(self, kill_checked_out: bool = False) -> None:
        """Kill the warm kernels and stop refilling. Kernels handed out stay with their holders
        (``release`` still kills them) unless ``kill_checked_out``."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for timer in self._retries.values():
                timer.cancel()
            victims = [km for queue in self._warm.values() for km in queue]
            for queue in self._warm.values():
                queue.clear()
            if kill_checked_out:
                victims += list(self._checked_out)
                self._checked_out.clear()
            self._cond.notify_all()
        self._starter.shutdown(wait=True, cancel_futures=True)  # in-flight starts see _closed and clean up
        for km in victims:
            shutdown(km)
        self._reaper.shutdown(wait=True)
        if self._forks is not None:  # a server still forking for a handed-out kernel exits when that one ends
            self._forks.close()
        with self._cond:
            loops, self._loops = self._loops, []
        for loop in loops:
            loop.close()

    def wait_ready(self, timeout: float) -> bool:
        """Block until every pool is full (True) or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or all(len(self._warm[n]) >= size for n, size in self.sizes.items()), timeout
            ) and not self._closed

    def stats(self) -> PoolStats:
        with self._cond:
            stats = self._stats.model_copy(deep=True)
            stats.warm = {name: len(queue) for name, queue in self._warm.items()}
            return stats

    def __enter__(self) -> KernelPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(kill_checked_out=True)

    # ----------------------------------------------------------------- internals

    def _register_loop(self) -> None:
        loop = ensure_event_loop()
        with self._cond:
            self._loops.append(loop)

    def _count(self, **increments: int) -> None:
        with self._cond:
            for key, value in increments.items():
                setattr(self._stats, key, getattr(self._stats, key) + value)

    def _take_warm(self, name: str) -> PoolKernelManager | None:
        with self._cond:
            queue = self._warm.get(name)
            return queue.popleft() if queue else None

    def _warm_count(self, name: str) -> int:
        with self._cond:
            return len(self._warm.get(name, ())) + self._starting[name]

    def _hand_out(self, km: PoolKernelManager, warm: bool) -> None:
        km.origin = "warm" if warm else "cold"
        with self._cond:
            self._checked_out.add(km)
            if warm:
                self._stats.warm_hits += 1
            else:
                self._stats.cold_starts += 1

    def _new_manager(self, name: str) -> PoolKernelManager:
        stem = self._run_dir / f"kernel-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        connection_file = str(stem.with_name(stem.name + ".json"))  # with the kernel's other files, not in /tmp
        if len(str(stem)) <= _IPC_PATH_MAX:
            # IPC sockets: no TCP port races between kernels starting in parallel, no plain-TCP traffic
            km = PoolKernelManager(kernel_name=name, kernel_spec_manager=self._ksm, transport="ipc", ip=str(stem),
                                   connection_file=connection_file)
        else:
            km = PoolKernelManager(kernel_name=name, kernel_spec_manager=self._ksm, connection_file=connection_file)
        km.fork_servers = self._forks
        km.preload = self.preload.get(name)
        return km

    def _launch(self, name: str, cwd: Path, timeout: float) -> PoolKernelManager:
        """Start a kernel in ``cwd`` and wait until it answers; nothing is left behind on failure."""
        self._run_dir.mkdir(parents=True, exist_ok=True)
        km = self._new_manager(name)
        try:
            km.start_kernel(cwd=str(cwd), env=dict(self._env), extra_arguments=list(KERNEL_ARGUMENTS))
            wait_until_answering(km, timeout)
        except NoSuchKernel:
            shutdown(km)
            raise
        except Exception as exc:
            shutdown(km)
            raise KernelStartError(f"kernel {name} did not start: {exc}") from exc
        if km.forked:
            self._count(forked_starts=1)
        return km

    def _refill(self, name: str) -> None:
        with self._cond:
            if not self._started or self._closed or name in self._retries:
                return
            if name not in self.sizes:
                return
            for _ in range(self.sizes[name] - len(self._warm[name]) - self._starting[name]):
                self._starting[name] += 1
                self._starter.submit(self._start_warm, name)

    def _start_warm(self, name: str) -> None:
        try:
            km = self._launch(name, self._run_dir, self.start_timeout)
        except Exception as exc:
            self._start_failed(name, exc)
            return
        # a fork server ran the preload before forking; any kernel's first execution costs a few milliseconds
        # more than the next ones (IPython's lazy set-up): spent here, not in the run
        code = preload_code(self.preload[name]) if self.preload.get(name) and not km.forked else "pass"
        try:
            _run_silently(km, code, self.start_timeout)
        except Exception as exc:  # still a working kernel; it just saves less time
            log.warning("preload in %s kernel failed (kernel kept): %s", name, exc)
        with self._cond:
            self._starting[name] -= 1
            if not self._closed:
                self._failures[name] = 0
                self._stats.last_errors.pop(name, None)
                self._stats.kernels_started += 1
                self._warm[name].append(km)
                self._cond.notify_all()
                return
        shutdown(km)

    def _start_failed(self, name: str, exc: Exception) -> None:
        """Retry later with growing delays, so a broken kernelspec does not spin the CPU."""
        log.error("warm %s kernel failed to start: %s", name, exc)
        with self._cond:
            self._starting[name] -= 1
            self._stats.start_failures += 1
            self._stats.last_errors[name] = str(exc)
            delay = self.retry_delays[min(self._failures[name], len(self.retry_delays) - 1)]
            self._failures[name] += 1
            if self._closed or name in self._retries:
                return
            timer = threading.Timer(delay, self._retry, args=(name,))
            timer.daemon = True
            self._retries[name] = timer
            timer.start()

    def _retry(self, name: str) -> None:
        with self._cond:
            self._retries.pop(name, None)
        self._refill(name)

    def _discard(self, km: KernelManager) -> None:
        with self._cond:
            closed = self._closed
        if closed:
            shutdown(km)
            return
        try:
            self._reaper.submit(shutdown, km)
        except RuntimeError:  # reaper shut down concurrently
            shutdown(km)
