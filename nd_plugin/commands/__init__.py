"""The commands layer: the run directory and the workflows that the ``nd`` CLI runs on it.

- :mod:`~nd_plugin.commands.rundir`: the layout of a run directory (its file names), the lock,
  checkpoints, and :class:`~nd_plugin.commands.rundir.Run` / :func:`open_run`, every read validated;
- :mod:`~nd_plugin.commands.decoupling`: :func:`decouple` (``nd decouple``): build, wrap, train, write
  the run directory;
- :mod:`~nd_plugin.commands.analyze`: :func:`build_report` (``nd analyze``): analyse a run's paths
  and write its report;
- :mod:`~nd_plugin.commands.pruning`: :func:`prune_run` (``nd prune``): prune, decide per layer
  what the runtime skips, measure every engine, export;
- :mod:`~nd_plugin.commands.detect`: :func:`run_detection` (``nd detect``): fit or load the
  detectors, attack, evaluate, write ``detect.json``.

The method modules they call take modules, tensors, loaders and path statistics, return objects,
and write files only through those objects' ``save()`` methods. The workflows load on first use
(they pull in scikit-learn, matplotlib, torch-pruning).

Example:
    >>> from nd_plugin.commands import open_run
    >>> open_run(tmp / "missing")
    Traceback (most recent call last):
    ...
    nd_plugin.errors.RunDirError: run directory .../missing does not exist; create one with `nd decouple MODEL --out .../missing`.
"""

from __future__ import annotations

import importlib
from typing import Any

from nd_plugin.commands.rundir import Run, open_run

_LAZY = {
    "decouple": "nd_plugin.commands.decoupling",
    "build_report": "nd_plugin.commands.analyze",
    "run_detection": "nd_plugin.commands.detect",
    "prune_run": "nd_plugin.commands.pruning",
}

__all__ = ["Run", "build_report", "decouple", "open_run", "prune_run", "run_detection"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nd_plugin.commands' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
