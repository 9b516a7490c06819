"""Fork server: one long-lived process per environment that forks fresh, preloaded kernels.

Starting a kernel costs an interpreter start plus importing ipykernel (~0.5 s CPU), and the scipp
stack another ~2-3 s; a warm pool pays that for every run. The fork server pays it once: it runs
under the environment's interpreter, imports ipykernel and the environment's ``preload`` statements,
never runs user code, and on request forks a child that becomes a brand-new ipykernel. Every run
still gets its own process (the preloaded modules are shared copy-on-write), so nothing of one run
can leak into the next, but a kernel start costs a fork plus ``IPKernelApp.initialize``.

This module is both halves. The server half is executed *by path* with the environment's python,
whose venv does not contain nbreduce, so the whole module depends on the standard library only
(ipykernel is imported by the server at run time). The client half (:class:`ForkServer`,
:class:`ForkServers`) runs in the runner; :mod:`runner.provisioner` plugs it into jupyter_client.

Protocol: newline-delimited JSON over a private ``socketpair`` (the server end is the only
inheritable fd passed to it). Requests (client -> server) and events (server -> client) are the
``TypedDict`` shapes below; pydantic is not available under the environment's interpreter.

Lifetimes: the server is the parent of its kernels, reaps them with ``waitpid`` and reports each
exit status (negative: killed by that signal, as ``Popen.returncode``), so death detection and
``kernel_exit_code`` work as for ordinary kernels. A ``close`` request lets it exit once its last
kernel has ended; end-of-file without ``close`` (the runner died) or a changed parent pid makes it
SIGKILL its kernels and exit at once. Kernels get ``JPY_PARENT_PID`` = the server's pid, so
ipykernel's own parent poller ends them should the server ever die first.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import importlib.util
import itertools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Literal, TypedDict

log = logging.getLogger(__name__)

SERVER_SCRIPT = Path(__file__).resolve()
#: Runs this file by path without putting runner/ on sys.path (``python FILE`` would: its config.py,
#: state.py ... would shadow a notebook's imports in every kernel forked from the server).
_BOOTSTRAP = ("import runpy, sys\nif sys.path[:1] == ['']: del sys.path[0]\n"
              "runpy.run_path(sys.argv.pop(1), run_name='__main__')")
#: ipykernel sets this default when it starts; preloaded matplotlib must see the same backend.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
#: What a kernel imports while it initialises (ipykernel 7.4: the debugger's pydevd, IPython's
#: inspector, history); imported by the server so that no kernel pays for them. Missing ones are skipped.
KERNEL_MODULES = ("ipykernel.kernelapp", "ipykernel.debugger", "IPython.core.debugger", "IPython.core.oinspect",
                  "IPython.core.completerlib", "IPython.extensions.storemagic", "sqlite3")
#: Variables that belong to one kernel launch, not to the server that forks it.
PER_KERNEL_ENV = ("JPY_PARENT_PID", "JPY_SESSION_NAME", "JPY_INTERRUPT_EVENT")
_PARENT_CHECK_SECONDS = 1.0


# --------------------------------------------------------------------------- protocol


class InitRequest(TypedDict):
    op: Literal["init"]
    preload: list[str]


class ForkRequest(TypedDict):
    op: Literal["fork"]
    id: int
    argv: list[str]  # ipykernel arguments, as after ``python -m ipykernel_launcher``
    cwd: str
    env: dict[str, str]


class CloseRequest(TypedDict):
    op: Literal["close"]


class ReadyEvent(TypedDict):
    event: Literal["ready"]
    pid: int
    errors: list[str]
    seconds: float
    cpu_seconds: float
    threads: int  # native threads at fork time (BLAS pools with atfork handlers are fine)
    python_threads: int


class ForkReply(TypedDict, total=False):
    id: int
    pid: int
    error: str


class ExitEvent(TypedDict):
    event: Literal["exit"]
    pid: int
    status: int


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def exit_status(wait_status: int) -> int:
    """``Popen.returncode`` convention: exit code, or minus the signal that killed the process."""
    return os.waitstatus_to_exitcode(wait_status)


# --------------------------------------------------------------------------- server half


class _Server:
    """The loop of the fork server process: single-threaded, no zmq context, so ``fork`` is safe."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.children: set[int] = set()
        self.closing = False
        self.parent = os.getppid()
        self.wake_r, self.wake_w = os.pipe()
        self.buffer = b""
        self.eof = False

    def send(self, message: Mapping[str, Any]) -> None:
        with contextlib.suppress(OSError):  # client gone: the end-of-file path cleans up
            self.sock.sendall(_encode(message))

    def read_init(self) -> InitRequest:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SystemExit(0)
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def preload(self, statements: Sequence[str]) -> ReadyEvent:
        """Import ipykernel and the environment's modules once, as a kernel would see them."""
        wall, cpu = time.perf_counter(), time.process_time()
        os.environ.setdefault("MPLBACKEND", INLINE_BACKEND)
        errors = []
        import ipykernel.kernelapp  # noqa: F401  the bulk of a kernel's own start-up; fails loudly if absent

        for module in KERNEL_MODULES:
            with contextlib.suppress(Exception):
                importlib.import_module(module)
        for statement in statements:
            try:  # a throwaway namespace: only sys.modules keeps what was imported
                exec(compile(statement, "<nbreduce-preload>", "exec"), {"__name__": "__nbreduce_preload__"})
            except BaseException as exc:
                errors.append(f"{statement}: {type(exc).__name__}: {exc}")
        gc.collect()
        gc.freeze()  # preloaded objects move to the permanent generation: GC never dirties their pages
        return ReadyEvent(event="ready", pid=os.getpid(), errors=errors, seconds=time.perf_counter() - wall,
                          cpu_seconds=time.process_time() - cpu, threads=_native_threads(),
                          python_threads=threading.active_count())

    def serve(self) -> None:
        # Python >= 3.12 warns on fork with native threads alive; ours are BLAS/allocator pools that
        # park themselves through atfork handlers (Python threads are reported in the ready event)
        warnings.filterwarnings("ignore", r".*use of fork\(\) may lead to deadlocks", DeprecationWarning)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler is needed for the wakeup fd to fire
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # -> finally: kernels are killed
        try:
            while True:
                readers = [self.wake_r] if self.eof else [self.sock, self.wake_r]
                ready, _, _ = select.select(readers, [], [], _PARENT_CHECK_SECONDS)
                if self.wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                self.reap()
                if self.sock in ready and not self.receive():
                    return  # runner gone without saying goodbye
                if os.getppid() != self.parent:
                    return  # runner died while we drain after ``close``
                if self.closing and not self.children:
                    return
        finally:
            self.kill_children()

    def receive(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
            return self.closing
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            request = json.loads(line)
            if request.get("op") == "fork" and not self.closing:
                self.fork(request)
            elif request.get("op") == "fork":
                self.send(ForkReply(id=request["id"], error="fork server is closing"))
            elif request.get("op") == "close":
                self.closing = True
        return True

    def fork(self, request: ForkRequest) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as exc:
            self.send(ForkReply(id=request["id"], error=f"fork failed: {exc}"))
            return
        if pid == 0:
            _become_kernel(request, close=(self.sock.fileno(), self.wake_r, self.wake_w))
        self.children.add(pid)
        self.send(ForkReply(id=request["id"], pid=pid))

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send(ExitEvent(event="exit", pid=pid, status=exit_status(status)))

    def kill_children(self) -> None:
        for pid in list(self.children):
            _kill_group(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(pid, 0)
                self.send(ExitEvent(event="exit", pid=pid, status=exit_status(status)))
        self.children.clear()


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _running(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie does not (an adoptive init that never reaps keeps it listed)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no procfs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _kill_group(pid: int, signum: int) -> None:
    """The kernel leads its own session (it calls ``setsid``): kill what it started as well."""
    try:
        os.killpg(pid, signum)
    except OSError:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)


def _become_kernel(request: ForkRequest, close: Sequence[int]) -> None:
    """In the forked child: turn into ``python -m ipykernel_launcher <argv>`` and never return."""
    code = 1
    try:
        os.setsid()  # own session and process group, as jupyter_client's launcher does
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        for fd in close:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        server = str(os.getppid())
        os.environ["JPY_PARENT_PID"] = server
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is not None:  # the legacy global generator was seeded once, in the server
            numpy_random.seed()
        from ipykernel.kernelapp import IPKernelApp

        # the trait's default was read from the server's environment at import: ipykernel's parent poller
        # must watch the server, so a kernel never outlives it
        argv = [*request["argv"], f"--IPKernelApp.parent_handle={server}"]
        launcher = importlib.util.find_spec("ipykernel_launcher")
        sys.argv = [launcher.origin if launcher and launcher.origin else "ipykernel_launcher", *argv]
        IPKernelApp.launch_instance(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # what interpreter exit would run; the server's loop must not resume
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code & 0xFF)


def main(argv: Sequence[str] | None = None) -> int:
    """``python forkserver.py --fd N``: serve fork requests on the inherited socket ``N``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--fd":
        print("usage: forkserver.py --fd N", file=sys.stderr)
        return 2
    server = _Server(socket.socket(fileno=int(args[1])))
    init = server.read_init()
    server.send(server.preload(init["preload"]))
    server.serve()
    return 0


# --------------------------------------------------------------------------- client half


class ForkServerError(RuntimeError):
    """The fork server could not be started or did not fork; callers fall back to a normal launch."""


class ForkedKernel:
    """``subprocess.Popen``-like handle of a forked kernel (what LocalProvisioner expects in ``process``).

    The kernel is the fork server's child, not ours: signals go straight to its pid, its exit status
    comes from the server, which reaped it.
    """

    stdin = stdout = stderr = None

    def __init__(self, server: ForkServer, pid: int):
        self.server = server
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_status(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"kernel pid {self.pid}", timeout or 0)
            self.server.wait_for_exit(min(left, 0.5) if left is not None else 0.5)
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # never signal a pid that may have been reused
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ForkServer:
    """Client of one fork server process: start it, fork kernels, learn their exit statuses."""

    def __init__(self, python: str, preload: Sequence[str], env: Mapping[str, str], *,
                 cwd: str | os.PathLike[str] = "/", timeout: float = 120.0):
        self.python = python
        self.preload = list(preload)
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in env.items() if k not in PER_KERNEL_ENV}
        try:
            self.process = subprocess.Popen(
                [python, "-c", _BOOTSTRAP, str(SERVER_SCRIPT), "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                start_new_session=True)  # a terminal's Ctrl-C is not for it: the runner stops it
        except OSError as exc:
            ours.close()
            raise ForkServerError(f"cannot start fork server with {python}: {exc}") from exc
        finally:
            theirs.close()
        self._sock = ours
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: dict[int, Future[ForkReply]] = {}
        self._ids = itertools.count(1)
        self._exits: dict[int, int] = {}
        self._live: set[int] = set()
        self._connected = True
        self._ready: Future[ReadyEvent] = Future()
        self._reader = threading.Thread(target=self._read, name=f"fork-server-{self.process.pid}", daemon=True)
        self._reader.start()
        try:
            self._send(InitRequest(op="init", preload=self.preload))
            self.ready = self._ready.result(timeout)
        except (FutureTimeout, ForkServerError, OSError) as exc:
            self.kill()
            raise ForkServerError(f"fork server ({python}) did not become ready: {str(exc) or 'timeout'}") from exc
        for error in self.ready["errors"]:
            log.warning("fork server %s: preload failed (kernels still start): %s", self.pid, error)
        if self.ready["python_threads"] > 1:
            log.warning("fork server %s: preload started %d Python threads; forked kernels will not have them",
                        self.pid, self.ready["python_threads"] - 1)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        with self._cond:
            return self._connected and self.process.poll() is None

    def fork(self, argv: Sequence[str], cwd: str | os.PathLike[str], env: Mapping[str, str],
             timeout: float = 30.0) -> ForkedKernel:
        """A new kernel process running ``ipykernel_launcher <argv>`` in ``cwd`` with exactly ``env``."""
        if not Path(cwd).is_dir():
            raise FileNotFoundError(f"working directory {cwd} does not exist")
        request_id = next(self._ids)
        reply: Future[ForkReply] = Future()
        with self._cond:
            if not self._connected:
                raise ForkServerError(f"fork server {self.pid} is gone")
            self._pending[request_id] = reply
        self._send(ForkRequest(op="fork", id=request_id, argv=list(argv), cwd=str(cwd), env=dict(env)))
        try:
            answer = reply.result(timeout)
        except FutureTimeout as exc:
            raise ForkServerError(f"fork server {self.pid} did not answer within {timeout:.0f} s") from exc
        finally:
            with self._cond:
                self._pending.pop(request_id, None)
        if "error" in answer:
            raise ForkServerError(f"fork server {self.pid}: {answer['error']}")
        return ForkedKernel(self, answer["pid"])

    def exit_status(self, pid: int) -> int | None:
        """Exit status of kernel ``pid`` once it ended, None while it runs."""
        with self._cond:
            if pid in self._exits:
                return self._exits.pop(pid)  # asked once: ForkedKernel keeps it
            if self._connected:
                return None
        # the server died before reporting: the orphan's status goes to whoever adopted it
        if _running(pid):
            return None
        log.warning("fork server %s gone: exit status of kernel %s unknown", self.pid, pid)
        return 1

    def wait_for_exit(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def live_kernels(self) -> set[int]:
        with self._cond:
            return set(self._live)

    def close(self, timeout: float = 10.0) -> None:
        """No more forks; the server exits when its last kernel has ended (at once if none runs)."""
        with contextlib.suppress(OSError, ForkServerError):
            self._send(CloseRequest(op="close"))
            self._sock.shutdown(socket.SHUT_WR)
        if not self.live_kernels():
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL the server; its kernels follow through ipykernel's parent poller."""
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    # ----------------------------------------------------------------- internals

    def _send(self, message: Mapping[str, Any]) -> None:
        try:
            with self._send_lock:
                self._sock.sendall(_encode(message))
        except OSError as exc:
            raise ForkServerError(f"fork server {self.pid} is gone: {exc}") from exc

    def _read(self) -> None:
        try:
            with self._sock.makefile("rb") as stream:
                for line in stream:
                    self._dispatch(json.loads(line))
        except (OSError, ValueError) as exc:
            log.debug("fork server %s: %s", self.process.pid, exc)
        finally:
            with self._cond:
                self._connected = False
                pending, self._pending = list(self._pending.values()), {}
                self._cond.notify_all()
            error = ForkServerError(f"fork server {self.process.pid} exited")
            for future in [self._ready, *pending]:
                if not future.done():
                    future.set_exception(error)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)  # reap it: it is exiting
            self._sock.close()

    def _dispatch(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "exit":
            with self._cond:
                self._exits[message["pid"]] = message["status"]
                self._live.discard(message["pid"])
                self._cond.notify_all()
        elif event == "ready":
            self._ready.set_result(message)  # type: ignore[arg-type]
        elif "id" in message:
            with self._cond:
                if "pid" in message:  # before any exit event of it, which the server sends later
                    self._live.add(message["pid"])
                future = self._pending.get(message["id"])
            if future is not None and not future.done():
                future.set_result(message)  # type: ignore[arg-type]


class ForkServers:
    """The fork servers of one owner (a kernel pool), one per interpreter and preload list, started lazily."""

    def __init__(self, cwd: str | os.PathLike[str] = "/", start_timeout: float = 120.0, retry_after: float = 60.0):
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.retry_after = retry_after
        self._failed: dict[tuple[str, tuple[str, ...]], tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._servers: dict[tuple[str, tuple[str, ...]], ForkServer] = {}
        self._starting: dict[tuple[str, tuple[str, ...]], threading.Lock] = {}
        self._closed = False

    def get(self, python: str, preload: Sequence[str], env: Mapping[str, str]) -> ForkServer:
        """The running server for ``python`` + ``preload``; started (or restarted after a crash) here."""
        key = (python, tuple(preload))
        with self._lock:
            if self._closed:
                raise ForkServerError("fork servers are closed")
            starting = self._starting.setdefault(key, threading.Lock())
        with starting:  # one start per key; other callers wait for it
            with self._lock:
                server = self._servers.get(key)
            if server is not None and server.alive:
                return server
            if server is not None:
                log.warning("fork server %s (%s) died; starting a new one", server.pid, python)
            failed_at, reason = self._failed.get(key, (-self.retry_after, ""))
            if time.monotonic() - failed_at < self.retry_after:  # every launch would wait for it again
                raise ForkServerError(f"fork server for {python} failed recently: {reason}")
            try:
                server = ForkServer(python, preload, env, cwd=self.cwd, timeout=self.start_timeout)
            except ForkServerError as exc:
                self._failed[key] = (time.monotonic(), str(exc))
                raise
            self._failed.pop(key, None)
            with self._lock:
                closed = self._closed
                if not closed:
                    self._servers[key] = server
            if closed:
                server.close()
                raise ForkServerError("fork servers are closed")
            log.info("fork server %s for %s ready: preload %.1f s (%.1f s CPU)", server.pid, python,
                     server.ready["seconds"], server.ready["cpu_seconds"])
            return server

    def servers(self) -> list[ForkServer]:
        with self._lock:
            return list(self._servers.values())

    def close(self) -> None:
        """Stop forking; each server exits once its kernels (if any are still handed out) have ended."""
        with self._lock:
            self._closed = True
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
