"""``python -m infeed``: the command-line interface."""

from infeed.cli import main

main()
