"""The ``infeed`` command line (typer + rich); ``infeed.cli:main`` is the console entry point."""

from __future__ import annotations

from infeed.cli.app import app, main

__all__ = ["app", "main"]
