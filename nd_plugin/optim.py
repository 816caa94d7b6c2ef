"""The method's pieces of a training loop besides its losses: parameter groups, BN recalibration.

:func:`param_groups` splits a wrapped model's parameters into the network's group and the gates'
group (the ACMs, found by type, and the ``L_mi`` classifiers of a :class:`~nd_plugin.DecouplingLoss`),
each with its own learning rate and weight decay, as the paper trains them.
:func:`recalibrate_bn` re-estimates the BatchNorm statistics with eval-time gates after training.
Both work in any loop (plain PyTorch, Lightning, timm's scripts); the :class:`~nd_plugin.Trainer`
uses them too.

Example:
    >>> import torch, nd_plugin
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
    ...                     nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> dm = nd_plugin.wrap(net, torch.randn(1, 3, 16, 16))
    >>> loss_fn = nd_plugin.DecouplingLoss(channels=[s.channels for s in dm.gate_sites], num_classes=4)
    >>> groups = nd_plugin.param_groups(dm, loss_fn, lr=0.1, acm_lr=0.01, weight_decay=5e-4)
    >>> [(g["name"], len(g["params"]), g["lr"]) for g in groups]  # gates: 2 ACMs x 4 + 2 classifiers
    [('network', 10, 0.1), ('gates', 10, 0.01)]
    >>> optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    >>> loader = [(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))] * 3
    >>> len(nd_plugin.recalibrate_bn(dm, loader, batches=2))  # the BatchNorms it re-estimated
    2
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from nd_plugin.errors import ConfigError, DataError
from nd_plugin.gates import ACM

__all__ = ["gate_parameters", "param_groups", "recalibrate_bn"]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every :class:`~nd_plugin.gates.ACM` in ``model``, in ``model.parameters()`` order.

    ACMs are found by type, so the model may be wrapped again (DDP, ``torch.compile``, a
    ``LightningModule``) or its layers named anyhow.

    Example:
        >>> from nd_plugin.gates import GatedSite
        >>> len(gate_parameters(nn.Sequential(GatedSite(nn.Conv2d(4, 8, 3), None))))  # fc1, fc2: weight, bias
        4
    """
    ids = {id(p) for m in model.modules() if isinstance(m, ACM) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) in ids]


def param_groups(
    dm: nn.Module,
    loss_fn: nn.Module | None = None,
    *,
    lr: float,
    acm_lr: float | None = None,
    weight_decay: float = 0.0,
    gate_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The optimiser's two parameter groups: the network, and the gates with the ``L_mi`` classifiers.

    Args:
        dm: the wrapped model (a :class:`~nd_plugin.DecoupledModel`, or any module holding one).
        loss_fn: the :class:`~nd_plugin.DecouplingLoss` whose ``L_mi`` classifiers train with the
            gates; None when the loss has no parameters of its own.
        lr: learning rate of the network's weights.
        acm_lr: learning rate of the gates and classifiers (the Trainer's default is 0.1);
            defaults to ``lr``.
        weight_decay: weight decay of the network's weights.
        gate_weight_decay: weight decay of the gates and classifiers (0 by default, as in the
            Trainer; the authors' release uses 1e-4).

    Returns:
        ``[{"name": "network", "params", "lr", "weight_decay"}, {"name": "gates", ...}]``, for
        any ``torch.optim`` optimiser; the network's group comes first.

    Raises:
        ConfigError: a negative learning rate or weight decay.
    """
    acm_lr = lr if acm_lr is None else acm_lr
    for name, value in (("lr", lr), ("acm_lr", acm_lr), ("weight_decay", weight_decay), ("gate_weight_decay", gate_weight_decay)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}.")
    gates = gate_parameters(dm)
    ids = {id(p) for p in gates}
    network = [p for p in dm.parameters() if id(p) not in ids]
    extra = [p for p in loss_fn.parameters() if id(p) not in ids] if loss_fn is not None else []
    return [
        {"name": "network", "params": network, "lr": lr, "weight_decay": weight_decay},
        {"name": "gates", "params": gates + extra, "lr": acm_lr, "weight_decay": gate_weight_decay},
    ]


def _inputs(loader: Iterable, device: torch.device | None) -> Iterator[torch.Tensor]:
    for batch in loader:
        x = batch if isinstance(batch, torch.Tensor) else batch[0]
        yield x.to(device, non_blocking=True) if device is not None else x


@torch.no_grad()
def recalibrate_bn(
    dm: nn.Module, loader: Iterable, *, batches: int = 50, device: torch.device | str | None = None
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
        batches: how many batches to use (at most ``len(loader)``).
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
