"""Objects the docstring examples share, so that they run as doctests without a page of setup.

A docstring example may use, without building them:

- ``dm``: a wrapped CIFAR ResNet-20 in eval mode whose gates are synthetic (a third of each layer's
  filters silent, energetic and dynamic; ``nd_plugin.pruning.synthetic.synthetic_gates``);
- ``x``: 32 random ``(3, 32, 32)`` inputs; ``y``: their labels; ``loader`` / ``val_loader``: one
  batch ``[(x, y)]``;
- ``stats``: ``dm.paths(loader, raw=True)``; ``compact``: ``nd_plugin.prune(dm, stats)``;
- ``tmp``: the example's own temporary folder (pytest's ``tmp_path``);
- the modules ``torch``, ``nn``, ``np``, ``nd_plugin``.

They are built only for doctests, once per session (``tmp`` once per example).
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def _doctest_objects() -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn

    import nd_plugin
    from nd_plugin.adapters import create_model
    from nd_plugin.pruning.synthetic import synthetic_gates

    torch.manual_seed(0)
    dm = nd_plugin.wrap(create_model("cifar:resnet20", num_classes=10), torch.zeros(1, 3, 32, 32)).eval()
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    synthetic_gates(dm, x)
    loader = [(x, y)]
    stats = dm.paths(loader, raw=True, num_classes=10)
    return {
        "torch": torch,
        "nn": nn,
        "np": np,
        "nd_plugin": nd_plugin,
        "dm": dm,
        "x": x,
        "y": y,
        "loader": loader,
        "val_loader": loader,
        "stats": stats,
        "compact": nd_plugin.prune(dm, stats),
    }


@pytest.fixture(autouse=True)
def _doctest_setup(request: pytest.FixtureRequest) -> None:
    if not isinstance(request.node, pytest.DoctestItem):
        return
    namespace = request.getfixturevalue("doctest_namespace")
    namespace.update(request.getfixturevalue("_doctest_objects"))
    namespace["tmp"] = request.getfixturevalue("tmp_path")
