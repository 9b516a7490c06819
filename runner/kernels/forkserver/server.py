"""Fork server: one long-lived process per environment that forks fresh, preloaded kernels.

Starting a kernel costs an interpreter start plus importing ipykernel (~0.5 s CPU), and the scipp
stack another ~2-3 s; a warm pool pays that for every run. The fork server pays it once: it runs
under the environment's interpreter, imports ipykernel and the environment's ``preload`` statements,
never runs user code, and on request forks a child that becomes a brand-new ipykernel. Every run
still gets its own process (the preloaded modules are shared copy-on-write), so nothing of one run
can leak into the next, but a kernel start costs a fork plus ``IPKernelApp.initialize``.

This is the server half; :mod:`.client` is the other. It is executed *by path* with the environment's python,
whose venv does not contain nbreduce, so the whole module depends on the standard library only
(ipykernel is imported by the server at run time). The client half (:class:`ForkServer`,
:class:`ForkServers`) runs in the runner; :mod:`runner.kernels.provisioner` plugs it into jupyter_client.

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
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

log = logging.getLogger(__name__)

SERVER_SCRIPT = Path(__file__).resolve()
#: Runs this file by path without putting runner/ on sys.path (``python FILE`` would: its config.py,
#: state.py ... would shadow a notebook's imports in every kernel forked from the server).
BOOTSTRAP = ("import runpy, sys\nif sys.path[:1] == ['']: del sys.path[0]\n"
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


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def exit_status(wait_status: int) -> int:
    """``Popen.returncode`` convention: exit code, or minus the signal that killed the process."""
    return os.waitstatus_to_exitcode(wait_status)




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
            self.sock.sendall(encode(message))

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


def pid_running(pid: int) -> bool:
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


if __name__ == "__main__":
    sys.exit(main())
