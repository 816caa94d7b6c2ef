"""nd-plugin: interpretable neural network decoupling for the PyTorch pruning ecosystem.

Example:
    >>> import torch, torchvision, nd_plugin
    >>> dm = nd_plugin.wrap(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> logits, path = dm(torch.randn(2, 3, 64, 64), return_path=True)
"""

from __future__ import annotations

import importlib
from typing import Any

from nd_plugin.decoupled import DecoupledModel, ForwardOutput, wrap
from nd_plugin.errors import NDError
from nd_plugin.gates import ACM, GatedSite
from nd_plugin.losses import DecouplingLoss, LossTerms
from nd_plugin.paths import GateRecorder, PathStats
from nd_plugin.run import Run, open_run

# The package's public face, loaded on first use from each name's one home: these pull in
# torch-pruning (which imports timm and torchvision), fvcore, scikit-learn or matplotlib, which
# ``import nd_plugin`` should not pay for; ``decouple`` is the commands layer's workflow. This is
# the package's only module-level ``__getattr__`` (tests/test_layout.py).
_LAZY = {
    "MahalanobisDetector": "nd_plugin.detect",
    "PathDetector": "nd_plugin.detect",
    "load": "nd_plugin.pruning.export",
    "class_paths": "nd_plugin.interpret",
    "decision_tree": "nd_plugin.interpret",
    "filter_states": "nd_plugin.interpret",
    "occlusion_concepts": "nd_plugin.interpret",
    "path_distribution": "nd_plugin.interpret",
    "CompactModel": "nd_plugin.pruning",
    "DecouplingImportance": "nd_plugin.pruning",
    "prune": "nd_plugin.pruning",
    "param_groups": "nd_plugin.training.optim",
    "recalibrate_bn": "nd_plugin.training.bn",
    "TrainConfig": "nd_plugin.training.config",
    "Trainer": "nd_plugin.training.trainer",
    "decouple": "nd_plugin.commands.decoupling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nd_plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "ACM",
    "CompactModel",
    "DecoupledModel",
    "DecouplingImportance",
    "DecouplingLoss",
    "ForwardOutput",
    "GateRecorder",
    "GatedSite",
    "LossTerms",
    "MahalanobisDetector",
    "NDError",
    "PathDetector",
    "PathStats",
    "Run",
    "TrainConfig",
    "Trainer",
    "class_paths",
    "decision_tree",
    "decouple",
    "filter_states",
    "load",
    "occlusion_concepts",
    "open_run",
    "param_groups",
    "path_distribution",
    "prune",
    "recalibrate_bn",
    "wrap",
]
