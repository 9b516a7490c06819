"""``python -m runner.portal``: started by JupyterHub as the managed service ``portal``.

The hub passes the service's address, prefix and OAuth credentials in ``JUPYTERHUB_*`` variables;
nbreduce settings come from ``NBREDUCE_*`` as everywhere else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth
from tornado.ioloop import IOLoop

from runner.config import Settings
from runner.portal.app import Portal, make_app

log = logging.getLogger("runner.portal")


async def serve(settings: Settings) -> None:
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8090"))
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/portal/")
    hub_auth = HubOAuth(cache_max_age=60)  # group changes reach the portal within a minute
    portal = Portal(settings)
    app = make_app(portal, hub_auth, prefix)
    server = app.listen(url.port or 8090, url.hostname or "127.0.0.1", xheaders=True)
    stop = threading.Event()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    portal.start_follower(IOLoop.current(), stop)
    log.info("portal listening on %s%s (archive %s)", url.geturl(), prefix, settings.archive)
    await done.wait()
    stop.set()
    server.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s portal %(levelname)s %(message)s")
    asyncio.run(serve(Settings.from_env()))


if __name__ == "__main__":
    main()
