"""``python -m runner.notify``: the notification service, as JupyterHub starts it (``nbreduce notify``)."""

from runner.cli.notify import notify

if __name__ == "__main__":
    notify()
