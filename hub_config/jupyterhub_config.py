# JupyterHub configuration of the nbreduce demo hub (`nbreduce hub`, `nbreduce demo`).
#
# Everything comes from nbreduce's settings (NBREDUCE_* variables, `runner.config.Settings`), which
# `runner.hub.launch.hub_environment` fills in for `nbreduce hub` / `nbreduce demo`, so the same file
# serves a laptop, CI and the tests. Production: keep this file and override the authenticator and
# spawner as shown in production_example.py (docs/hub.md explains the access model).
# ruff: noqa: F821  (`c` is injected by JupyterHub)
import os
import sys
from pathlib import Path

from runner.config import Settings
from runner.hub.launch import hub_config_dir, hub_dir, proxy_command
from runner.hub.spawn import pre_spawn_hook, system_users

settings = Settings()
hub = settings.hub
state = hub_dir(settings)
state.mkdir(parents=True, exist_ok=True)

# -- network: public proxy port, internal hub API and proxy API on loopback --------------------------
c.JupyterHub.bind_url = f"http://{hub.ip}:{hub.port}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{hub.api_port or 8081}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{hub.proxy_api_port or 8001}"
c.ConfigurableHTTPProxy.command = hub.proxy_command or proxy_command()
c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")

# -- state under $NBREDUCE_HOME/hub ----------------------------------------------------------------------
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(state / "jupyterhub.pid")

# -- authentication: demo users of membership.yaml, one shared password, groups from membership -----------
c.JupyterHub.authenticator_class = "runner.hub.auth.MembershipAuthenticator"
c.MembershipAuthenticator.membership_file = str(hub.membership or hub_config_dir() / "membership.yaml")
c.MembershipAuthenticator.demo_password = hub.demo_password.get_secret_value()

# -- spawner: local JupyterLab servers ---------------------------------------------------------------------
# As root (or NBREDUCE_HUB__SYSTEM_USERS=true) every user's server runs as their own unprivileged account, in the
# lab environment every account can run; otherwise as the hub's user. pre_spawn_hook prepares the home either way.
# (swap for kubespawner.KubeSpawner in production: pre_spawn_hook and the contents manager stay)
if system_users(settings):
    from runner.hub.labenv import lab_python

    c.JupyterHub.spawner_class = "localprocess"
    server_python = str(hub.lab_python or lab_python(settings))
else:
    c.JupyterHub.spawner_class = "simple"
    c.SimpleLocalProcessSpawner.home_dir_template = str(state / "users" / "{username}")
    server_python = str(hub.lab_python or sys.executable)
c.Spawner.pre_spawn_hook = pre_spawn_hook
c.Spawner.cmd = [server_python, "-m", "jupyterhub.singleuser"]
c.Spawner.args = [
    "--ServerApp.contents_manager_class=runner.hub.contents.ReductionsContentsManager",
    "--ServerApp.jpserver_extensions=runner.hub.workcopy=True",
    # without system users the demo may run as root; read-only reductions are then enforced by the contents
    # manager (and the archive's file modes), not by accounts
    *([] if system_users(settings) else ["--ServerApp.allow_root=True"]),
]
c.Spawner.default_url = "/lab/tree/work"
c.Spawner.notebook_dir = "~"
c.Spawner.env_keep = ["PATH", "LANG", "LC_ALL", "PYTHONPATH", "JUPYTERHUB_SINGLEUSER_APP",
                      "PYDEVD_DISABLE_FILE_VALIDATION"]
c.Spawner.start_timeout = int(hub.start_timeout_seconds)
c.Spawner.http_timeout = int(hub.start_timeout_seconds)

# -- the reductions portal: a hub-managed service that logs users in through the hub's OAuth ----------------
# the portal gets the same settings, without the hub's own secrets
portal_env = {**settings.model_copy(update={"hub": hub.model_copy(update={"demo_password": ""})}).to_env(),
              **{k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "PYTHONPATH")}}
c.JupyterHub.services = [
    {
        "name": "portal",
        "display": True,
        "url": f"http://127.0.0.1:{settings.portal.port or 8090}",
        "command": [sys.executable, "-m", "runner.portal"],
        "cwd": str(Path(state)),
        "environment": portal_env,
        "oauth_no_confirm": True,
        # a busy machine takes more than JupyterHub's default 30 s to start the portal
        "timeout": int(hub.start_timeout_seconds),
        # the portal decides access from the user's groups (rb-*, instrument-*, admin)
        "oauth_client_allowed_scopes": ["read:users:groups!user"],
    }
]
# notifications of finished runs (`nbreduce notify`, runner/notify): a service without a web page that asks
# the hub which groups a subscriber has now, so access rules apply at every notification
c.JupyterHub.services.append({"name": "notify", "command": [sys.executable, "-m", "runner.notify"],
                              "cwd": str(Path(state)), "environment": portal_env})
c.JupyterHub.load_roles = [{"name": "nbreduce-notify", "scopes": ["read:users:groups"], "services": ["notify"]}]
# every user may log in to the portal; what they see there is decided by their groups
c.JupyterHub.extra_user_scopes = {"access:services!service=portal"}
# users arrive at the portal; the hub's home page (hub_config/templates/home.html) leads there too
c.JupyterHub.default_url = "/services/portal/"
c.JupyterHub.template_paths = [str(hub_config_dir() / "templates")]
# a link to a user's server (the portal's "Open in JupyterLab") starts it when it is not running
c.JupyterHub.implicit_spawn_seconds = 1
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True
