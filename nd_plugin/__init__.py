"""nd-plugin: interpretable neural network decoupling for the PyTorch pruning ecosystem.

Example:
    >>> import torch, torchvision, nd_plugin
    >>> dm = nd_plugin.wrap(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> logits, path = dm(torch.randn(2, 3, 64, 64), return_path=True)
"""

from nd_plugin.decoupled import DecoupledModel, wrap
from nd_plugin.detect import MahalanobisDetector, PathDetector
from nd_plugin.errors import NDError
from nd_plugin.export import load
from nd_plugin.gates import ACM, GatedSite
from nd_plugin.interpret import class_paths, decision_tree, filter_states, occlusion_concepts, path_distribution
from nd_plugin.losses import DecouplingLoss, LossTerms
from nd_plugin.paths import GateRecorder, PathStats
from nd_plugin.pruning import CompactModel, DecouplingImportance, prune
from nd_plugin.run import Run, open_run
from nd_plugin.train import TrainConfig, Trainer, decouple

__version__ = "0.1.0"

__all__ = [
    "ACM",
    "CompactModel",
    "DecoupledModel",
    "DecouplingImportance",
    "DecouplingLoss",
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
    "path_distribution",
    "prune",
    "wrap",
]
