"""Client half of the fork server: start one per environment, fork kernels, learn their exit statuses.

Runs in the runner; :mod:`runner.kernels.provisioner` plugs it into jupyter_client. The protocol and
the server itself are in :mod:`.server` (standard library only, run by path with the environment's python).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from runner.kernels.forkserver.server import (
    BOOTSTRAP,
    PER_KERNEL_ENV,
    SERVER_SCRIPT,
    CloseRequest,
    ForkReply,
    ForkRequest,
    InitRequest,
    ReadyEvent,
    encode,
    pid_running,
)

log = logging.getLogger(__name__)


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
                [python, "-c", BOOTSTRAP, str(SERVER_SCRIPT), "--fd", str(theirs.fileno())],
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
        if pid_running(pid):
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
                self._sock.sendall(encode(message))
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

