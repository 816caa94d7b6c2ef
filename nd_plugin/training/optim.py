"""The optimiser's parameter groups: the network, and the gates with the ``L_mi`` classifiers.

:func:`param_groups` splits a wrapped model's parameters into the network's group and the gates'
group (the ACMs, found by type, and the ``L_mi`` classifiers of a :class:`~nd_plugin.DecouplingLoss`),
each with its own learning rate and weight decay, as the paper trains them. Its defaults are the
:class:`~nd_plugin.training.trainer.Trainer`'s (:class:`~nd_plugin.training.config.TrainConfig`'s), so
a loop of one's own (plain PyTorch, Lightning, timm's scripts) trains with the measured recipe.

Example:
    >>> import torch, nd_plugin
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
    ...                     nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> dm = nd_plugin.wrap(net, torch.randn(1, 3, 16, 16))
    >>> loss_fn = nd_plugin.DecouplingLoss(channels=[s.channels for s in dm.gate_sites], num_classes=4)
    >>> groups = nd_plugin.param_groups(dm, loss_fn, lr=0.05)
    >>> [(g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in groups]  # gates: 2 ACMs x 4 + 2 classifiers
    [('network', 10, 0.05, 0.0005), ('gates', 10, 0.1, 0.0)]
    >>> optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nd_plugin.errors import ConfigError
from nd_plugin.gates import ACM
from nd_plugin.training.config import TrainConfig

__all__ = ["gate_parameters", "param_groups"]


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
    acm_lr: float = TrainConfig.acm_lr,
    weight_decay: float = TrainConfig.weight_decay,
    gate_weight_decay: float = TrainConfig.gate_weight_decay,
) -> list[dict[str, Any]]:
    """The optimiser's two parameter groups: the network, and the gates with the ``L_mi`` classifiers.

    Args:
        dm: the wrapped model (a :class:`~nd_plugin.DecoupledModel`, or any module holding one).
        loss_fn: the :class:`~nd_plugin.DecouplingLoss` whose ``L_mi`` classifiers train with the
            gates; None when the loss has no parameters of its own.
        lr: learning rate of the network's weights (the Trainer's depends on the start:
            :meth:`TrainConfig.resolved <nd_plugin.training.config.TrainConfig.resolved>`).
        acm_lr: learning rate of the gates and classifiers; the Trainer's by default
            (``TrainConfig.acm_lr``: at the network's rate the gates barely move in a short run).
        weight_decay: weight decay of the network's weights; the Trainer's by default.
        gate_weight_decay: weight decay of the gates and classifiers; the Trainer's by default (0;
            the authors' release uses 1e-4).

    Returns:
        ``[{"name": "network", "params", "lr", "weight_decay"}, {"name": "gates", ...}]``, for
        any ``torch.optim`` optimiser; the network's group comes first.

    Raises:
        ConfigError: a negative learning rate or weight decay.
    """
    for name, value in (("lr", lr), ("acm_lr", acm_lr), ("weight_decay", weight_decay), ("gate_weight_decay", gate_weight_decay)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}.", params=(name,))
    gates = gate_parameters(dm)
    ids = {id(p) for p in gates}
    network = [p for p in dm.parameters() if id(p) not in ids]
    extra = [p for p in loss_fn.parameters() if id(p) not in ids] if loss_fn is not None else []
    return [
        {"name": "network", "params": network, "lr": lr, "weight_decay": weight_decay},
        {"name": "gates", "params": gates + extra, "lr": acm_lr, "weight_decay": gate_weight_decay},
    ]
