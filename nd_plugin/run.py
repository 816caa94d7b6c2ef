"""Run directories: what ``nd decouple`` writes and every other command reads.

::

    RUN/config.json      every option, versions, seed, the gated layers
    RUN/checkpoint.pt    model, optimiser, scheduler, RNG states, epoch (atomic, resumable)
    RUN/metrics.jsonl    one line per epoch
    RUN/paths.npz        path statistics on the validation split
    RUN/summary.json     accuracy, FLOPs, filter states
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from nd_plugin.errors import RunDirError
from nd_plugin.paths import PathStats

__all__ = ["Run", "open_run", "atomic_save", "atomic_write_text"]

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PATHS = "paths.npz"
SUMMARY = "summary.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    """A run directory.

    Args:
        path: the directory.

    Example:
        >>> run = open_run("runs/resnet18")  # doctest: +SKIP
        >>> dm = run.build_model()  # doctest: +SKIP
        >>> stats = run.stats()  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def config(self) -> dict[str, Any]:
        """The run's ``config.json``."""
        file = self.path / CONFIG
        if not file.is_file():
            raise RunDirError(f"{self.path} is not a run directory (no {CONFIG}); create one with `nd decouple MODEL --out {self.path}`.")
        return json.loads(file.read_text(encoding="utf-8"))

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def load_checkpoint(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Loads ``checkpoint.pt`` (tensors and plain containers only: ``weights_only=True``)."""
        if not self.checkpoint_path.is_file():
            raise RunDirError(
                f"{self.path} has no {CHECKPOINT}; train first with `nd decouple MODEL --out {self.path}` "
                "(or finish an interrupted run with `--resume`)."
            )
        return torch.load(self.checkpoint_path, map_location=device, weights_only=True)

    def build_model(self, device: torch.device | str = "cpu", *, load_weights: bool = True):
        """Rebuilds the decoupled model of this run, in eval mode, with its trained weights."""
        from nd_plugin.adapters import create_model
        from nd_plugin.decoupled import wrap

        cfg = self.config
        ckpt = self.load_checkpoint(device) if load_weights else None
        model = create_model(cfg["model"], num_classes=cfg["num_classes"])
        dm = wrap(
            model,
            torch.zeros(1, *cfg["input_size"]),
            sites=cfg["sites"],
            reduction=cfg.get("reduction", 4),
            noise_std=cfg.get("noise_std", 1.0),
        )
        if ckpt is not None:
            dm.load_state_dict(ckpt["model"])
        return dm.to(device).eval()

    def data(self, spec: str | None = None, **kwargs: Any):
        """The run's data set (or ``spec``) at the run's input size, checked against its classes.

        A run trained on resized images (``decouple(..., data=load_data("digits", image_size=224))``)
        gets its images at that size again, not at the data set's own size.
        """
        from nd_plugin.data import load_data
        from nd_plugin.errors import DataError

        cfg = self.config
        if cfg.get("input_size") and "image_size" not in kwargs:
            kwargs["image_size"] = cfg["input_size"][-1]  # a data set at its own size is left as it is
        bundle = load_data(spec or cfg["data"], **kwargs)
        if bundle.num_classes != cfg["num_classes"]:
            raise DataError(
                f"data {spec or cfg['data']!r} has {bundle.num_classes} classes but the run was trained on "
                f"{cfg['num_classes']} ({cfg['data']!r}); pass data with the run's classes."
            )
        return bundle

    def stats(self) -> PathStats:
        """The validation path statistics ``paths.npz``."""
        file = self.path / PATHS
        if not file.is_file():
            raise RunDirError(
                f"{self.path} has no {PATHS} (path statistics); they are written at the end of `nd decouple`, "
                f"or collect them with `nd analyze {self.path}`."
            )
        return PathStats.load(file)

    def summary(self) -> dict[str, Any]:
        """The run's ``summary.json`` (empty when training has not finished)."""
        file = self.path / SUMMARY
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

    def metrics(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl``."""
        file = self.path / METRICS
        if not file.is_file():
            return []
        return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def open_run(path: str | os.PathLike) -> Run:
    """Opens a run directory, checking that it exists and has a config."""
    run = Run(path)
    if not run.path.is_dir():
        raise RunDirError(f"run directory {run.path} does not exist; create one with `nd decouple MODEL --out {run.path}`.")
    run.config  # noqa: B018 - validates
    return run
