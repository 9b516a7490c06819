# JupyterHub configuration of the CI overlay's hub pod (deploy/overlays/ci/hub.yaml): nbreduce's own hub
# configuration, hub_config/jupyterhub_config.py (the one `nbreduce hub` runs: MembershipAuthenticator,
# pre-spawn hook, state under NBREDUCE_HOME/hub), with what changes when the proxy and the portal run in
# containers of their own, as on Kubernetes with the z2jh chart.
# ruff: noqa: F821  (`c` and `load_subconfig` are injected by JupyterHub)
import os

from runner.hub.launch import hub_config_dir

load_subconfig(str(hub_config_dir() / "jupyterhub_config.py"))

# the proxy is the pod's other container: not started by the hub; API on the pod's loopback, token from
# CONFIGPROXY_AUTH_TOKEN (read by JupyterHub itself)
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:8001"
# the hub's API for the proxy (same pod) and the portal (pod nbreduce-portal-pod-0 calls http://hub:8081)
c.JupyterHub.hub_bind_url = "http://0.0.0.0:8081"
c.JupyterHub.hub_connect_url = "http://hub:8081"

# the portal is Deployment nbreduce-portal (deploy/base/portal.yaml), an external service with a token of
# its own, as the chart registers it (hub.services.portal in deploy/jupyterhub/values.yaml), instead of the
# hub-managed one; podman names the Deployment's pod nbreduce-portal-pod-0. Other services stay as they are.
c.JupyterHub.services = [
    {
        "name": "portal",
        "url": "http://nbreduce-portal-pod-0:8090",
        "api_token": os.environ["PORTAL_API_TOKEN"],
        "display": True,
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": ["read:users:groups!user"],
    },
    *(service for service in c.JupyterHub.services if service["name"] != "portal"),
]
