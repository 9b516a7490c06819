# JupyterHub configuration of the nbreduce demo hub (`nbreduce hub`, `nbreduce demo`).
#
# Everything is read from the environment that `runner.hub.launch.hub_environment` prepares, so the same file
# serves a laptop, CI and the tests. Production: keep this file and override the authenticator and
# spawner as shown in production_example.py (docs/hub.md explains the access model).
# ruff: noqa: F821  (`c` is injected by JupyterHub)
import json
import os
import sys
from pathlib import Path

from runner.config import Settings
from runner.hub.launch import hub_config_dir, hub_dir, proxy_command
from runner.hub.spawn import pre_spawn_hook

settings = Settings.from_env()
state = hub_dir(settings)
state.mkdir(parents=True, exist_ok=True)
env = os.environ
ip = env.get("NBREDUCE_HUB_IP", "127.0.0.1")

# -- network: public proxy port, internal hub API and proxy API on loopback --------------------------
c.JupyterHub.bind_url = f"http://{ip}:{env.get('NBREDUCE_HUB_PORT', '8000')}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{env.get('NBREDUCE_HUB_API_PORT', '8081')}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env.get('NBREDUCE_PROXY_API_PORT', '8001')}"
c.ConfigurableHTTPProxy.command = json.loads(env["NBREDUCE_PROXY_COMMAND"]) if "NBREDUCE_PROXY_COMMAND" in env \
    else proxy_command()
c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")

# -- state under $NBREDUCE_HOME/hub ----------------------------------------------------------------------
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(state / "jupyterhub.pid")

# -- authentication: demo users of membership.yaml, one shared password, groups from membership -----------
c.JupyterHub.authenticator_class = "runner.hub.auth.MembershipAuthenticator"
c.MembershipAuthenticator.membership_file = env.get("NBREDUCE_MEMBERSHIP", str(hub_config_dir() / "membership.yaml"))
c.MembershipAuthenticator.demo_password = env.get("NBREDUCE_DEMO_PASSWORD", "nbreduce-demo")

# -- spawner: local JupyterLab servers, one home per user under the hub state -----------------------------
# (swap for kubespawner.KubeSpawner in production: pre_spawn_hook and the contents manager stay)
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = str(state / "users" / "{username}")
c.Spawner.pre_spawn_hook = pre_spawn_hook
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.args = [
    "--ServerApp.contents_manager_class=runner.hub.contents.ReductionsContentsManager",
    # the demo may run as root; read-only reductions are enforced by the contents manager, not file modes
    "--ServerApp.allow_root=True",
]
c.Spawner.default_url = "/lab/tree/reductions"
c.Spawner.env_keep = ["PATH", "LANG", "LC_ALL", "PYTHONPATH", "JUPYTERHUB_SINGLEUSER_APP",
                      "PYDEVD_DISABLE_FILE_VALIDATION"]
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120

# -- the reductions portal: a hub-managed service that logs users in through the hub's OAuth ----------------
portal_env = {k: v for k, v in env.items() if k.startswith("NBREDUCE_") or k in ("PATH", "LANG", "PYTHONPATH")}
c.JupyterHub.services = [
    {
        "name": "portal",
        "display": True,
        "url": f"http://127.0.0.1:{env.get('NBREDUCE_PORTAL_PORT', '8090')}",
        "command": [sys.executable, "-m", "runner.portal"],
        "cwd": str(Path(state)),
        "environment": portal_env,
        "oauth_no_confirm": True,
        # the portal decides access from the user's groups (rb-*, instrument-*, admin)
        "oauth_client_allowed_scopes": ["read:users:groups!user"],
    }
]
# every user may log in to the portal; what they see there is decided by their groups
c.JupyterHub.extra_user_scopes = {"access:services!service=portal"}
c.JupyterHub.default_url = "/hub/home"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True
