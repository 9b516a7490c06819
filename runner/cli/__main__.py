"""``python -m runner.cli``: the same as the ``nbreduce`` command."""

from runner.cli.main import main

main()
