"""How one training step runs: eagerly, compiled with ``torch.compile``, or replayed as a CUDA graph.

:class:`~nd_plugin.training.trainer.Trainer` picks one per phase; benchmarks time them side by side.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from nd_plugin.errors import TrainingError

__all__ = ["eager_step"]


def eager_step(
    compute: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *, set_to_none: bool = True
) -> Any:
    """Forward, loss and backward of one batch, op by op: ``compute(x, y)`` returns ``(terms, ...)``.

    The caller runs ``optimizer.step()``. ``set_to_none=False`` zeroes the old gradients in place
    (a CUDA graph's gradient buffers must survive an eager step).
    """
    out = compute(x, y)
    optimizer.zero_grad(set_to_none=set_to_none)
    out[0].total.backward()
    return out


def _compiled(fn: Any) -> Any:
    """``torch.compile(fn)``; a failed compilation becomes a :class:`TrainingError` saying what to do."""
    compiled = torch.compile(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingError(
                f"torch.compile could not compile the training step ({reason}); "
                "rerun without compile (and with resume=True to keep the finished epochs).",
                params=("compile", "resume"),
            ) from exc

    return call


class _GraphedStep:
    """Forward, losses and backward of a decoupling step, captured once as a CUDA graph.

    The first ``warmup`` calls run eagerly on a side stream (as CUDA-graph capture requires); the
    next call captures the step on static input buffers, and every later call copies its batch in
    and replays the graph. The gradients land in the same ``.grad`` tensors every time, so the
    caller runs ``optimizer.step()`` eagerly after each call (the learning rate may change). A batch
    of another shape runs eagerly; a failed capture raises :class:`TrainingError`.
    """

    def __init__(self, compute: Any, optimizer: torch.optim.Optimizer, warmup: int = 3) -> None:
        self.compute = compute
        self.optimizer = optimizer
        self.warmup = warmup
        self.side = torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: Any = None

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static = (x.clone(), y.clone())
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread-local: the data loader's pin-memory thread keeps calling CUDA during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = self.compute(*self.static)
            self.outputs[0].total.backward()
        self.graph = graph

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        if self.static is not None and (x.shape, y.shape) != (self.static[0].shape, self.static[1].shape):
            return eager_step(self.compute, self.optimizer, x, y, set_to_none=False)
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = eager_step(self.compute, self.optimizer, x, y)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            try:
                self._capture(x, y)
            except Exception as exc:  # a failed capture leaves the CUDA RNG unusable: stop cleanly
                raise TrainingError(
                    f"CUDA-graph capture of the training step failed ({str(exc).splitlines()[0]}); "
                    "rerun with cuda_graphs=False (and resume=True to keep the finished epochs).",
                    params=("cuda_graphs", "resume"),
                ) from exc
        assert self.static is not None and self.graph is not None
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        self.graph.replay()
        return self.outputs
