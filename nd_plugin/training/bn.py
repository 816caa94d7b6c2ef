"""BatchNorm recalibration with eval-time gates, after (or between epochs of) training.

Training sees noisy, partly soft gates; evaluation sees hard ones, so the running statistics of the
layers after a gate drift. :func:`recalibrate_bn` re-estimates them with the gates in eval mode. It
works in any loop (plain PyTorch, Lightning, timm's scripts); the
:class:`~nd_plugin.training.trainer.Trainer` calls it after each decoupling epoch.

Example:
    >>> import torch, nd_plugin
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
    ...                     nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> dm = nd_plugin.wrap(net, torch.randn(1, 3, 16, 16))
    >>> loader = [(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))] * 3
    >>> len(nd_plugin.recalibrate_bn(dm, loader, batches=2))  # the BatchNorms it re-estimated
    2
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from nd_plugin.errors import ConfigError, DataError
from nd_plugin.training.config import TrainConfig

__all__ = ["recalibrate_bn"]


def _inputs(loader: Iterable, device: torch.device | None) -> Iterator[torch.Tensor]:
    for batch in loader:
        x = batch if isinstance(batch, torch.Tensor) else batch[0]
        yield x.to(device, non_blocking=True) if device is not None else x


@torch.no_grad()
def recalibrate_bn(
    dm: nn.Module, loader: Iterable, *, batches: int = TrainConfig.bn_recalibrate, device: torch.device | str | None = None
) -> list[nn.Module]:
    """Re-estimates the BatchNorm statistics of a wrapped model with eval-time gates.

    Training sees noisy, partly soft gates; evaluation sees hard ones, so the running statistics of
    the layers after a gate drift. This runs ``batches`` batches with the gates (and everything
    else) in eval mode and only the BatchNorms in training mode, and sets each BatchNorm's
    statistics to the population mean and variance of those batches: fvcore's
    ``fvcore.nn.update_bn_stats`` (precise BN) does the estimation. Every module's training mode,
    the BatchNorms' momenta and their buffer tensors (so CUDA graphs and DDP keep them) are kept.

    Only what fvcore handles is re-estimated: ``nn.BatchNorm1d/2d/3d`` (and subclasses such as
    timm's ``BatchNormAct2d``) and ``nn.SyncBatchNorm`` that track running statistics; other norms
    stay as they are. fvcore refuses a BatchNorm that runs twice in one forward.

    Args:
        dm: the wrapped model (or any module whose gates are in eval mode when it is).
        loader: yields batches ``(inputs, ...)`` or input tensors, at least ``batches`` of them
            when it has no ``len()``; typically the training data.
        batches: how many batches to use (at most ``len(loader)``); the default is the Trainer's
            (:attr:`TrainConfig.bn_recalibrate <nd_plugin.training.config.TrainConfig>`).
        device: where to send the inputs; None leaves them where they are.

    Returns:
        The BatchNorm modules whose statistics were re-estimated (to average them across ranks
        under DDP, as the Trainer does).

    Raises:
        ConfigError: ``batches`` < 1.
        DataError: the loader is empty.
    """
    from nd_plugin.flops import fvcore_nn

    precise_bn = fvcore_nn().precise_bn
    if batches < 1:
        raise ConfigError(f"batches must be >= 1, got {batches}.")
    norms = [m for m in dm.modules() if isinstance(m, precise_bn.BN_MODULE_TYPES) and m.track_running_stats]
    if not norms:
        return []
    try:
        batches = min(batches, len(loader))  # type: ignore[arg-type]
    except TypeError:
        pass  # an iterable without len(): trusted to yield enough
    if batches == 0:
        raise DataError("recalibrate_bn got an empty loader; pass the training data.")
    device = torch.device(device) if device is not None else None
    modes = [(m, m.training) for m in dm.modules()]
    buffers = [(m.running_mean, m.running_var, m.momentum) for m in norms]
    dm.eval()
    try:
        for m in norms:
            m.train()
        precise_bn.update_bn_stats(dm, _inputs(loader, device), num_iters=batches)
        for m, (mean, var, _) in zip(norms, buffers):
            mean.copy_(m.running_mean)
            var.copy_(m.running_var)
    finally:
        for m, (mean, var, momentum) in zip(norms, buffers):
            m.running_mean, m.running_var, m.momentum = mean, var, momentum
        for m, training in modes:
            m.training = training
    return norms
