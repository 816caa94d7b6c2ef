"""DistributedDataParallel for every phase of a decoupling run (``torchrun``; gloo on CPU, nccl on GPU).

The two training phases use different parameters: the warm-up trains the plain model with every
gate forced open, so the ACMs and the ``L_mi`` classifiers take no part in the loss; decoupling
trains everything. DDP without unused-parameter search needs every parameter it holds to get a
gradient in every step, so each phase gets its own DDP wrapper (built when the phase first runs)
that holds exactly the parameters of that phase. That costs nothing per step, where
``find_unused_parameters=True`` walks the autograd graph after every forward and all-reduces
zero gradients for the ACMs in every warm-up step.

The decoupling wrapper also holds the loss's ``L_mi`` classifiers, so that their gradients are
averaged across ranks like the network's (they live outside the model). BN recalibration and
path collection run on each rank's shard and are combined here: running statistics averaged,
path counts summed, raw paths gathered back into the order one process would have seen.

Example:
    >>> d = Dist()
    >>> d.enabled, d.main
    (False, True)
    >>> interleave([np.array([0, 2, 4]), np.array([1, 3])]).tolist()
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nd_plugin.paths import PathStats
from nd_plugin.training.optim import gate_parameters

__all__ = ["Dist", "PhaseDDP", "distributed_cleanup", "init_distributed", "interleave", "reduce_path_stats"]


@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` across ranks in place (no-op on one process); returns it."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Averages each tensor across ranks in place."""
        for t in tensors:
            self.all_reduce(t)
            t /= self.world


def init_distributed(device: torch.device) -> Dist:
    """Joins the ``torchrun`` process group (``WORLD_SIZE`` > 1), else returns a one-process :class:`Dist`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def distributed_cleanup() -> Iterator[None]:
    """Destroys the process group on the way out, also after an error."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class _Phase(nn.Module):
    """The model and the loss under one module, so that one DDP wrapper can hold both."""

    def __init__(self, dm: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.dm = dm
        self.loss = loss

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - the model's own signature
        return self.dm(*args, **kwargs)


class PhaseDDP:
    """One DDP wrapper per training phase, each holding only the parameters that phase trains.

    Args:
        dm: the decoupled model.
        loss: the :class:`~nd_plugin.losses.DecouplingLoss` (its ``L_mi`` classifiers train too).
        dist: this process's :class:`Dist`; on one process :meth:`module` returns ``dm`` itself.
        device: the training device.
        lambda_m: weight of ``L_mi``; at 0 the classifiers get no gradient and are left out.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> PhaseDDP(m, nn.Identity(), Dist(), torch.device("cpu")).module(warmup=True) is m
        True
    """

    def __init__(self, dm: nn.Module, loss: nn.Module, dist: Dist, device: torch.device, lambda_m: float = 1.0) -> None:
        self.dm, self.loss, self.dist, self.device, self.lambda_m = dm, loss, dist, device, lambda_m
        self._wrappers: dict[bool, nn.Module] = {}

    def ignored(self, warmup: bool) -> list[str]:
        """Names (in the wrapper) of the parameters a phase leaves without gradient."""
        gates = {id(p) for p in gate_parameters(self.dm)} if warmup else set()
        names = [f"dm.{n}" for n, p in self.dm.named_parameters() if id(p) in gates]
        if warmup or self.lambda_m <= 0:
            names += [f"loss.{n}" for n, _ in self.loss.named_parameters()]
        return names

    def module(self, warmup: bool) -> nn.Module:
        """The module to call in a step of the phase: ``dm`` on one process, else its DDP wrapper."""
        if not self.dist.enabled:
            return self.dm
        if warmup not in self._wrappers:
            phase = _Phase(self.dm, self.loss)
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(phase, self.ignored(warmup))
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrappers[warmup] = nn.parallel.DistributedDataParallel(phase, device_ids=ids)
        return self._wrappers[warmup]


def interleave(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Undoes the strided sharding ``range(rank, N, world)``: row ``j`` of part ``r`` is row ``r + world * j``."""
    world = len(parts)
    total = sum(len(p) for p in parts)
    out = np.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def _gather_rows(array: np.ndarray, d: Dist, device: torch.device) -> np.ndarray:
    """Every rank's rows of ``array`` (different lengths allowed), in single-process order."""
    t = torch.as_tensor(np.ascontiguousarray(array)).to(device)
    n = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    return interleave([p[: int(s.item())].cpu().numpy() for p, s in zip(parts, sizes)])


def reduce_path_stats(stats: PathStats, d: Dist, device: torch.device) -> PathStats:
    """Combines each rank's path statistics of its validation shard into those of the whole split.

    Counts are summed; raw paths, labels and predictions (when recorded) are gathered in the order
    of the unsharded split, so ``paths.npz`` is the same as one process writes.
    """
    if not d.enabled:
        return stats
    for name in ("counts", "class_counts", "class_n"):
        t = torch.as_tensor(getattr(stats, name), device=device)
        setattr(stats, name, d.all_reduce(t).cpu().numpy())
    t = torch.tensor([stats.n, stats.correct], device=device)
    stats.n, stats.correct = (int(v) for v in d.all_reduce(t).tolist())
    if stats.paths is not None:
        stats.paths = _gather_rows(stats.paths.astype(np.uint8), d, device).astype(bool)
        stats.labels = _gather_rows(stats.labels, d, device)
        stats.preds = _gather_rows(stats.preds, d, device)
    return stats
