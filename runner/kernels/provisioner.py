"""jupyter_client kernel provisioner that forks kernels from the environment's fork server.

Kernelspecs of nbreduce's uv environments name this provisioner (``metadata.kernel_provisioner``,
see :func:`runner.kernels.environments.register_kernels`), so KernelManager, nbclient and papermill work
unchanged. The fork path is taken only when the kernel manager offers a
:class:`runner.kernels.forkserver.ForkServers` registry as ``fork_servers`` (the runner's
:class:`runner.kernels.pool.KernelPool` does) and the command is a plain ``ipykernel_launcher`` one;
every other manager (Jupyter servers in the hub, the papermill CLI) and any fork-server failure
get :class:`LocalProvisioner`'s normal launch. A forked kernel is handled through a Popen-like
handle, so LocalProvisioner's poll/wait/signal/kill logic (process-group signals included)
applies to it as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import LocalProvisioner
from traitlets import List, Unicode

from runner.kernels.environments import FORK_PROVISIONER as PROVISIONER_NAME
from runner.kernels.forkserver import ForkServerError, ForkServers

__all__ = ["PROVISIONER_NAME", "ForkProvisioner", "kernel_arguments"]
_LAUNCHER = ["-m", "ipykernel_launcher"]


def kernel_arguments(cmd: Sequence[str]) -> list[str] | None:
    """The ipykernel arguments of ``python -m ipykernel_launcher ...``; None for any other command."""
    if len(cmd) < 3 or list(cmd[1:3]) != _LAUNCHER or "-f" not in cmd[3:]:
        return None
    return list(cmd[3:])


class ForkProvisioner(LocalProvisioner):
    """Forks the kernel from a preloaded fork server when the manager allows it, else launches normally."""

    #: Statements the fork server runs once (from the kernelspec); a pool's own preload list wins.
    preload = List(Unicode(), config=True, help="Python statements the fork server runs before forking")
    #: Whether this kernel came from a fork server (it then has the preload modules already).
    forked = False

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        servers: ForkServers | None = getattr(self.parent, "fork_servers", None)
        argv = kernel_arguments(cmd)
        self.forked = False
        if servers is None or argv is None:
            return await super().launch_kernel(cmd, **kwargs)
        preload = getattr(self.parent, "preload", None)
        env = dict(kwargs.get("env") or os.environ)
        cwd = str(kwargs.get("cwd") or os.getcwd())
        try:
            # blocking calls: a fork is a round trip of milliseconds; only a server's first start takes
            # seconds, and the pool starts kernels on its own threads
            server = servers.get(cmd[0], self.preload if preload is None else preload, env)
            process = server.fork(argv, cwd, env)
        except ForkServerError as exc:
            self.log.warning("kernel %s: %s; starting it without the fork server", self.kernel_id, exc)
            return await super().launch_kernel(cmd, **kwargs)
        self.process = process
        self.pid = self.pgid = process.pid  # the child called setsid: it leads its own process group
        self.cwd = cwd
        self.forked = True
        return self.connection_info

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["forked"] = self.forked
        return info
