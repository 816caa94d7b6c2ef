"""``nd decouple``: build the model, wrap it, train it, write the run directory.

The Trainer (:mod:`nd_plugin.training.trainer`) trains; this module decides what goes where in the run
directory (:mod:`nd_plugin.run`): it checks and locks ``--out``, writes
``config.json``, hands the Trainer a per-epoch checkpoint writer, and writes ``paths.npz`` and
``summary.json`` at the end.
"""

from __future__ import annotations

import os
import platform
from contextlib import ExitStack
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from nd_plugin import run as rundir
from nd_plugin.decoupled import wrap
from nd_plugin.errors import ConfigError
from nd_plugin.training.config import TrainConfig, resolve_device
from nd_plugin.training.distributed import distributed_cleanup
from nd_plugin.training.trainer import Trainer, seed_everything

__all__ = ["decouple"]


def _versions() -> dict[str, str]:
    import timm
    import torch_pruning
    import torchvision

    from nd_plugin import __version__

    return {
        "nd_plugin": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "unknown"),
        "python": platform.python_version(),
    }


def _say(line: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(line, highlight=False, soft_wrap=True)


def _start(cfg: TrainConfig) -> str:
    """Where the model's weights come from, for the messages and ``config.json``.

    Example:
        >>> _start(TrainConfig(weights="w.pt")), _start(TrainConfig(pretrained=True)), _start(TrainConfig())
        ('the weights in w.pt', "the library's pretrained weights", 'random weights (no pretrained weights given)')
    """
    if cfg.weights:
        return f"the weights in {cfg.weights}"
    if cfg.pretrained:
        return "the library's pretrained weights"
    return "random weights (no pretrained weights given)"


def _run_config(cfg: TrainConfig, data: Any, dm: Any, trainer: Trainer, device: torch.device) -> dict[str, Any]:
    """What ``config.json`` records: every option, the data, the gated layers, versions."""
    return {
        "model": cfg.model,
        "data": cfg.data,
        "num_classes": data.num_classes,
        "classes": list(data.classes),
        "input_size": list(data.input_size),
        "mean": list(data.mean),
        "std": list(data.std),
        "sites": dm.site_names,
        "sites_mode": cfg.sites,
        "reduction": cfg.reduction,
        "noise_std": cfg.noise_std,
        "warmup": (
            f"{cfg.warmup_epochs} plain epochs before decoupling, from {_start(cfg)}"
            if cfg.warmup_epochs
            else f"none (decoupling from {_start(cfg)})"
        ),
        "train": asdict(cfg),
        "world_size": trainer.dist.world,
        "device": str(device),
        "versions": _versions(),
    }


def decouple(
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    data: Any = None,
) -> dict[str, Any]:
    """Builds the model, wraps it, trains it and writes the run directory. What ``nd decouple`` runs.

    Args:
        config: the options (``None`` fields get the model's defaults).
        out: the run directory.
        resume: continue from ``out/checkpoint.pt`` (options are read from ``out/config.json``).
        overwrite: start again in a directory that holds a run of the same model.
        progress: show progress and the per-epoch log (rank 0).
        data: an already loaded :class:`~nd_plugin.data.DataBundle` for ``config.data`` (saves
            decoding it again when several runs share it); loaded from ``config.data`` when omitted.

    Returns:
        The summary (also written to ``summary.json``).

    Example:
        >>> cfg = TrainConfig(model="cifar:resnet20", data="synthetic:64", ratio=0.6, epochs=1, warmup_epochs=0, batch_size=32)
        >>> summary = decouple(cfg, tmp / "r20", progress=False)
        >>> sorted(summary)[:3], (tmp / "r20" / "paths.npz").is_file()
        (['density', 'dynamic_value', 'filter_states'], True)
    """
    from nd_plugin.adapters import create_model, resolve_name
    from nd_plugin.data import load_data

    out = Path(out)
    config.validate()
    config = TrainConfig(**{**asdict(config), "model": resolve_name(config.model)})
    if resume:
        saved = rundir.prepare_out(out, config.model, resume=True)
        names = {f.name for f in fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in saved["train"].items() if k in names} | {"device": config.device})
    cfg = config.resolved()
    if cfg.distill_weight > 0 and cfg.epochs == 0:  # decouple() has no teacher but the network as decoupling begins
        raise ConfigError(
            "distill_weight > 0 distils from the network as the decoupling phase begins, and this run has no "
            "decoupling epoch: set epochs > 0 or distill_weight 0.",
            params=("distill_weight", "epochs"),
        )
    device = resolve_device(cfg.device)
    with distributed_cleanup(), ExitStack() as held:
        main = int(os.environ.get("RANK", "0")) == 0
        if main and not resume:  # refuse a bad --out before any work
            rundir.check_new_out(out, cfg.model, overwrite)
        seed_everything(cfg.seed)
        data = data if data is not None else load_data(cfg.data, download=cfg.download)
        model = create_model(cfg.model, num_classes=data.num_classes, pretrained=cfg.pretrained, checkpoint=cfg.weights)
        dm = wrap(
            model,
            torch.zeros(1, *data.input_size),
            sites=cfg.sites,
            reduction=cfg.reduction,
            noise_std=cfg.noise_std,
            init_bias=cfg.gate_bias,
            hard_share=cfg.hard_share,
            acm_init=cfg.acm_init,
        )
        if main:  # everything the run needs exists: only now hold and touch the directory
            held.enter_context(rundir.hold_run(out))
            if not resume:
                rundir.prepare_out(out, cfg.model, overwrite=overwrite)
        trainer = Trainer(dm, data, cfg, progress=progress, on_epoch_end=rundir.epoch_writer(out, cfg.model))
        if resume:  # the newest good checkpoint (a damaged latest one falls back to the one before)
            state, note = rundir.Run(out).resume_state(trainer.dm.state_dict(), trainer.device)
            trainer.load_state_dict(state)
            if main:
                rundir.write_metrics(out, state.get("history", []), cfg.model)
                _say(note)
        elif main:
            rundir.write_config(out, _run_config(cfg, data, dm, trainer, device))
            if progress and cfg.warmup_epochs:
                _say(
                    f"starting from {_start(cfg)}: training the plain model for {cfg.warmup_epochs} warm-up epoch(s) "
                    f"with gates open, then decoupling for {cfg.epochs} epoch(s)"
                )
        stats = trainer.fit()
        summary: dict[str, Any] = {}
        if trainer.dist.main:
            from nd_plugin.report.summary import summarize

            rundir.write_paths(out, stats)
            summary = {"model": cfg.model, **summarize(dm.cpu().eval(), stats, data)}
            rundir.write_summary(out, summary)
        return summary
