"""nd-plugin: interpretable neural network decoupling for the PyTorch pruning ecosystem.

Example:
    >>> import torch, torchvision, nd_plugin
    >>> dm = nd_plugin.wrap(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> logits, path = dm(torch.randn(2, 3, 64, 64), return_path=True)
"""

from nd_plugin.decoupled import DecoupledModel, wrap
from nd_plugin.errors import NDError
from nd_plugin.gates import ACM, GatedSite
from nd_plugin.paths import GateRecorder, PathStats

__version__ = "0.1.0"

__all__ = [
    "ACM",
    "DecoupledModel",
    "GateRecorder",
    "GatedSite",
    "NDError",
    "PathStats",
    "wrap",
]
