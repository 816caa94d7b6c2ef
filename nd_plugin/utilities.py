"""Small helpers that several packages share (one implementation each).

- :func:`auroc`: the area under the ROC curve of two score sets (negatives, positives);
- :func:`subset_loader`: a loader over a seeded random subset of a dataset;
- :func:`accuracy`: top-1 accuracy of a model over ready batches;
- :func:`eval_mode`: a block run with a module in eval mode, its train/eval mode restored after.

scikit-learn is imported inside :func:`auroc`, so importing this module stays light.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

__all__ = ["accuracy", "auroc", "eval_mode", "subset_loader"]

M = TypeVar("M", bound=nn.Module)


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Area under the ROC curve that separates ``pos`` (label 1) from ``neg`` (label 0) by score.

    Args:
        neg: scores of the negatives.
        pos: scores of the positives (higher should mean positive).

    Returns:
        The AUROC; 0.5 (chance) when either set is empty. NaN scores count as 0, +inf as a large score.

    Example:
        >>> auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
        1.0
        >>> auroc(np.array([]), np.array([1.0]))
        0.5
    """
    from sklearn.metrics import roc_auc_score

    neg, pos = np.asarray(neg), np.asarray(pos)
    if neg.size == 0 or pos.size == 0:
        return 0.5
    s = np.nan_to_num(np.r_[neg, pos], posinf=1e300)
    return float(roc_auc_score(np.r_[np.zeros(neg.size), np.ones(pos.size)], s))


def subset_loader(dataset: Any, n: int | None, batch_size: int, seed: int) -> DataLoader:
    """A loader over ``n`` items of ``dataset`` drawn at random with ``seed`` (all when ``n`` is None), unshuffled.

    Args:
        dataset: a map-style dataset.
        n: how many items (capped at the dataset's size); None for all of them, in a seeded order.
        batch_size: the loader's batch size.
        seed: seeds the draw, so the same arguments give the same items.

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.arange(10))
        >>> [len(b[0]) for b in subset_loader(data, 5, batch_size=2, seed=0)]
        [2, 2, 1]
    """
    total = len(dataset)
    idx = np.random.default_rng(seed).permutation(total)[: (total if n is None else min(n, total))]
    return DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False)


def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` over ``(inputs, labels)`` batches (without gradients; 0 on no data).

    The model is called as it is (set ``eval()`` first where that matters).

    Example:
        >>> x = torch.eye(3)
        >>> accuracy(nn.Identity(), [(x, torch.tensor([0, 1, 0]))])
        0.6666666666666666
    """
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


@contextlib.contextmanager
def eval_mode(module: M) -> Iterator[M]:
    """Runs the block with ``module`` in eval mode and gives it back its train/eval mode after, on error too.

    The mode restored is the module's own ``training`` flag, applied to every submodule (as
    ``module.train(flag)`` does), which is what a caller that set ``train()`` or ``eval()`` on the
    whole model expects.

    Args:
        module: any module.

    Yields:
        ``module``, in eval mode.

    Example:
        >>> bn = nn.BatchNorm1d(2).train()
        >>> with eval_mode(bn) as m:
        ...     m.training
        False
        >>> bn.training
        True
    """
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
