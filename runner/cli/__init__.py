"""``nbreduce``: the command line."""

from runner.cli.main import main

__all__ = ["main"]
