"""Step 5, JupyterHub: who may see what (access), the demo authenticator, the spawner hook, the
single-user server's reductions tree, and starting the hub."""
