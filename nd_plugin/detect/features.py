"""One forward pass over some inputs: prediction, calculation path, gate logits, features.

:func:`collect_probe` returns a :class:`Probe`, the one object every detector scores from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nd_plugin._hooks import ForwardHooks, HookOwner
from nd_plugin.errors import DetectionError
from nd_plugin.gates import ACM

__all__ = ["Probe", "collect_probe", "find_feature_layer"]


@dataclass
class Probe:
    """What one forward pass over some inputs shows.

    Attributes:
        logits: ``(N, K)``.
        labels: ``(N,)`` true labels (-1 when unknown).
        gates: per gated layer, ``(N, C_l)`` binary gates (the calculation path).
        z: per gated layer, ``(N, C_l)`` gate logits before binarisation (``α = 1[z > 0]``).
        features: ``(N, D)`` inputs of the final linear layer, or ``None``.
        gate_inputs: per gated layer, ``(N, C_in)`` global average pool of what the layer's gate
            reads, when asked for (a diagnostic: features, not the path).
    """

    logits: np.ndarray
    labels: np.ndarray
    gates: list[np.ndarray]
    z: list[np.ndarray]
    features: np.ndarray | None = None
    gate_inputs: list[np.ndarray] | None = None

    @property
    def preds(self) -> np.ndarray:
        """``(N,)`` predicted classes."""
        return self.logits.argmax(1)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def select(self, index: np.ndarray) -> Probe:
        """The probe restricted to some inputs (boolean mask or indices)."""
        return Probe(
            self.logits[index],
            self.labels[index],
            [g[index] for g in self.gates],
            [z[index] for z in self.z],
            None if self.features is None else self.features[index],
            None if self.gate_inputs is None else [g[index] for g in self.gate_inputs],
        )

    @staticmethod
    def concat(parts: Sequence[Probe]) -> Probe:
        """Concatenates probes of the same model along the input axis."""
        if not parts:
            raise ValueError("no probes to concatenate")
        feats = None if any(p.features is None for p in parts) else np.concatenate([p.features for p in parts])
        gin = None
        if all(p.gate_inputs is not None for p in parts):
            gin = [np.concatenate(g) for g in zip(*(p.gate_inputs for p in parts))]
        return Probe(
            np.concatenate([p.logits for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [np.concatenate(g) for g in zip(*(p.gates for p in parts))],
            [np.concatenate(z) for z in zip(*(p.z for p in parts))],
            feats,
            gin,
        )


def _outside_acm_linears(model: nn.Module) -> dict[str, nn.Linear]:
    inside = {id(m) for acm in model.modules() if isinstance(acm, ACM) for m in acm.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside}


def find_feature_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Finds the classifier layer: the last ``nn.Linear`` (outside the gates' ACMs) that runs.

    One forward pass on ``example`` with hooks that record execution order; the hooks are removed
    before returning, also on error.

    Args:
        model: the network (for a DecoupledModel pass ``dm.model``).
        example: a small input batch.

    Returns:
        The qualified name of the layer whose *input* are the penultimate features.

    Raises:
        DetectionError: the model runs no ``nn.Linear``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> find_feature_layer(net, torch.randn(1, 4))
        '3'
    """
    order: list[str] = []
    linears = _outside_acm_linears(model)
    names = {mod: name for name, mod in linears.items()}
    with ForwardHooks(linears.values(), lambda m, _i, _o: order.append(names[m])), torch.no_grad():
        model(example)
    if not order:
        raise DetectionError(
            f"{type(model).__name__} runs no nn.Linear layer: the Mahalanobis baseline needs the classifier's input features."
        )
    return order[-1]


class _ProbeHooks(HookOwner):
    """Owns the hooks that read gate logits (ACM outputs) and penultimate features; removed on exit."""

    def __init__(self, sites: Sequence[nn.Module], feature_module: nn.Module | None, gate_inputs: bool = False) -> None:
        super().__init__()
        self.sites = list(sites)
        self.feature_module = feature_module
        self.gate_inputs_enabled = gate_inputs
        self.gate_inputs: list[torch.Tensor | None] = [None] * len(self.sites)
        self.z: list[torch.Tensor | None] = [None] * len(self.sites)
        self.features: torch.Tensor | None = None

    def register(self) -> None:
        for i, site in enumerate(self.sites):
            self.keep(site.acm.register_forward_hook(self._z_hook(i)))
            if self.gate_inputs_enabled:
                self.keep(site.acm.register_forward_pre_hook(self._input_hook(i)))
        if self.feature_module is not None:
            self.keep(self.feature_module.register_forward_hook(self._feature_hook))

    def _z_hook(self, i: int) -> Callable:
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            self.z[i] = out.detach()

        return hook

    def _input_hook(self, i: int) -> Callable:
        def hook(_m: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            self.gate_inputs[i] = x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x

        return hook

    def _feature_hook(self, _m: nn.Module, inputs: tuple, _out: object) -> None:
        self.features = inputs[0].detach().flatten(1)


def _batches(data: torch.Tensor | Iterable, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            xb = data[i : i + batch_size]
            yield xb, torch.full((xb.shape[0],), -1, dtype=torch.long)
    else:
        for batch in data:
            if isinstance(batch, (tuple, list)):
                yield batch[0], batch[1]
            else:
                yield batch, torch.full((batch.shape[0],), -1, dtype=torch.long)


@torch.no_grad()
def collect_probe(
    dm: nn.Module,
    data: torch.Tensor | Iterable,
    *,
    feature_layer: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    gate_inputs: bool = False,
) -> Probe:
    """Runs the decoupled model once over ``data`` and keeps prediction, path, gate logits, features.

    Args:
        dm: a :class:`~nd_plugin.decoupled.DecoupledModel`.
        data: a tensor of normalised inputs, or a loader of ``(inputs, labels)``.
        feature_layer: name (in ``dm.model``) of the layer whose input to keep as features;
            ``None`` keeps none.
        max_samples: stop after this many inputs.
        batch_size: batch size when ``data`` is a tensor.
        device: where to run (default: the model's device).
        gate_inputs: also keep the pooled input of every gate (a diagnostic).

    Returns:
        The :class:`Probe` (numpy arrays on the CPU).
    """
    device = torch.device(device) if device is not None else next(dm.parameters()).device
    was_training = dm.training
    dm.eval()
    feature_module = dm.model.get_submodule(feature_layer) if feature_layer else None
    parts: list[Probe] = []
    seen = 0
    try:
        with _ProbeHooks(dm.sites(), feature_module, gate_inputs) as hooks:
            for xb, yb in _batches(data, batch_size):
                if max_samples is not None and seen >= max_samples:
                    break
                if max_samples is not None:
                    xb, yb = xb[: max_samples - seen], yb[: max_samples - seen]
                logits, path = dm(xb.to(device), return_path=True)
                gates = [path[name].detach().cpu().numpy() > 0.5 for name in dm.site_names]
                z = [
                    (t if t is not None else torch.full_like(path[name], 1e3)).float().cpu().numpy()
                    for t, name in zip(hooks.z, dm.site_names)
                ]
                feats = hooks.features.float().cpu().numpy() if feature_module is not None else None
                gin = [t.float().cpu().numpy() for t in hooks.gate_inputs] if gate_inputs else None
                parts.append(Probe(logits.float().cpu().numpy(), np.asarray(yb.cpu().numpy(), dtype=np.int64), gates, z, feats, gin))
                seen += xb.shape[0]
                hooks.z = [None] * len(hooks.z)
    finally:
        dm.train(was_training)
    if not parts:
        raise DetectionError("no inputs to score: the data yielded no batches.")
    return Probe.concat(parts)




def _first_batch(loader: Iterable) -> torch.Tensor:
    for xb, _ in _batches(loader, 2):
        return xb[:2]
    raise DetectionError("the loader yielded no batches.")


