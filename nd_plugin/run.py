"""The run directory's old home, kept so that existing imports work.

The layout, the lock and :class:`Run` live in :mod:`nd_plugin.commands.rundir`; the atomic writes
and validated reads in :mod:`nd_plugin.files`. Import from there in new code;
``nd_plugin.open_run(path)`` is the public way to read a run.

Example:
    >>> from nd_plugin.run import Run, open_run
    >>> Run is nd_plugin.commands.rundir.Run
    True
"""

from __future__ import annotations

from nd_plugin.commands.rundir import (
    ARTEFACTS,
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    CONFIG,
    FORMAT,
    LOCK,
    METRICS,
    PATHS,
    PREVIOUS,
    SUMMARY,
    Run,
    check_new_out,
    check_unlocked,
    hold_run,
    open_run,
    prepare_out,
    save_checkpoint,
    write_metrics,
)
from nd_plugin.files import atomic_dir, atomic_save, atomic_write_text, load_tensors, read_json, weights_mismatch

__all__ = [
    "ARTEFACTS",
    "CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "CONFIG",
    "FORMAT",
    "LOCK",
    "METRICS",
    "PATHS",
    "PREVIOUS",
    "SUMMARY",
    "Run",
    "atomic_dir",
    "atomic_save",
    "atomic_write_text",
    "check_new_out",
    "check_unlocked",
    "hold_run",
    "load_tensors",
    "open_run",
    "prepare_out",
    "read_json",
    "save_checkpoint",
    "weights_mismatch",
    "write_metrics",
]
