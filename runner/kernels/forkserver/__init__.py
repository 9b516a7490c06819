"""Fork servers: one preloaded process per environment that forks fresh kernels (see :mod:`.server`)."""

from runner.kernels.forkserver.client import ForkedKernel, ForkServer, ForkServerError, ForkServers

__all__ = ["ForkServer", "ForkServerError", "ForkServers", "ForkedKernel"]
