# Production example: append to (or load after) jupyterhub_config.py; every line is commented out.
# Nothing here runs in the demo. Read docs/hub.md first.
#
# Needs: pip install oauthenticator==17.4.0 jupyterhub-kubespawner==7.1.0 (pin what you deploy).
#
# --- Authentication: the facility's identity provider over generic OAuth2 / OpenID Connect --------------
# c.JupyterHub.authenticator_class = "generic-oauth"
# c.GenericOAuthenticator.client_id = "nbreduce-hub"
# c.GenericOAuthenticator.client_secret = os.environ["NBREDUCE_OAUTH_CLIENT_SECRET"]   # never in this file
# c.GenericOAuthenticator.oauth_callback_url = "https://reduce.example.org/hub/oauth_callback"
# c.GenericOAuthenticator.authorize_url = "https://login.example.org/oauth2/authorize"
# c.GenericOAuthenticator.token_url = "https://login.example.org/oauth2/token"
# c.GenericOAuthenticator.userdata_url = "https://login.example.org/oauth2/userinfo"
# c.GenericOAuthenticator.scope = ["openid", "profile", "email"]
# c.GenericOAuthenticator.username_claim = "preferred_username"
# c.GenericOAuthenticator.allow_all = True          # who may log in; access to data is decided by groups below
# c.GenericOAuthenticator.refresh_pre_spawn = True
# c.GenericOAuthenticator.auth_refresh_age = 300
#
# Groups rb-<RB> / instrument-<INST> / admin must come from the experiment database, not from the
# identity provider's claims. Two ways:
#
# (a) Keep the IdP for login and take groups from a MembershipSource (runner.hub.access) -- a sketch: check the
#     hook names against the oauthenticator version you pin. E.g. a class
#     that asks the user office API which experiments a user is on:
#
# from oauthenticator.generic import GenericOAuthenticator
# from runner.hub.access import MembershipSource, UserMembership, groups_for
#
# class UserOfficeMembership(MembershipSource):
#     def lookup(self, username):
#         record = user_office_client.experiments_of(username)         # your facility's API
#         return UserMembership(rbs=record.rbs, instruments=record.instrument_scientist_for,
#                               admin=username in record.admins)
#
# class FacilityAuthenticator(GenericOAuthenticator):
#     membership = UserOfficeMembership()
#     async def update_auth_model(self, auth_model):
#         auth_model = await super().update_auth_model(auth_model)
#         entry = self.membership.lookup(auth_model["name"])
#         auth_model["groups"] = groups_for(entry) if entry else []
#         return auth_model
#
# c.JupyterHub.authenticator_class = FacilityAuthenticator
# c.FacilityAuthenticator.manage_groups = True
#
# (b) If the IdP already carries experiment groups in a claim, map them:
# c.GenericOAuthenticator.manage_groups = True
# c.GenericOAuthenticator.auth_state_groups_key = "oauth_user.experiments"   # then rename to rb-<RB>
#
# --- Spawner: one pod per user; the archive mounted read-only, only the user's experiments --------------
# c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
# c.KubeSpawner.image = "registry.example.org/nbreduce-lab@sha256:..."   # pin by digest
# c.KubeSpawner.cmd = ["jupyterhub-singleuser"]
# c.KubeSpawner.args = ["--ServerApp.contents_manager_class=runner.hub.contents.ReductionsContentsManager"]
# c.KubeSpawner.pre_spawn_hook = pre_spawn_hook     # same hook: NBREDUCE_HUB__ACCESS, NBREDUCE_ARCHIVE, JUPYTER_PATH
# c.KubeSpawner.environment = {"NBREDUCE_ARCHIVE": "/archive"}
# c.KubeSpawner.volumes = [{"name": "archive", "persistentVolumeClaim": {"claimName": "nbreduce-archive"}}]
# c.KubeSpawner.volume_mounts = [{"name": "archive", "mountPath": "/archive", "readOnly": True}]
# # Stronger than the contents manager alone: mount only the user's experiments (one subPath per RB),
# # built in a pre_spawn_hook from spawner.user.groups, so kernels cannot read other experiments either.
# c.KubeSpawner.storage_pvc_ensure = True                # a home volume per user for copies of notebooks
# c.KubeSpawner.cpu_limit = 4
# c.KubeSpawner.mem_limit = "16G"
#
# --- Hub behind TLS ------------------------------------------------------------------------------------
# c.JupyterHub.bind_url = "http://0.0.0.0:8000"   # TLS terminated by the ingress
# c.JupyterHub.db_url = "postgresql://jupyterhub@db/jupyterhub"
# c.JupyterHub.cookie_secret_file = "/srv/jupyterhub/cookie_secret"
