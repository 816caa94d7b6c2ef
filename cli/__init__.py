"""The ``nd`` command line: a thin typer layer over the Python API.

Every command turns :class:`nd_plugin.errors.NDError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

from nd_plugin.cli._app import app, main

__all__ = ["app", "main"]
