"""One forward pass over some inputs: prediction, calculation path, gate logits, features.

:func:`collect_probe` returns a :class:`Probe`, the one object every detector scores from.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from nd_plugin._hooks import ForwardHooks, HookOwner
from nd_plugin.errors import DetectionError
from nd_plugin.gates import ACM
from nd_plugin.utilities import eval_mode

__all__ = ["PooledHooks", "Probe", "collect_probe", "find_feature_layer", "find_stage_layers"]

#: Prefix of a feature site that reads a module's *input* (the stem: what enters the first stage).
INPUT = "input:"


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
        stages: per feature site of :func:`find_stage_layers` (stem and every stage), ``(N, C)``
            globally average-pooled activations, when asked for (Lee et al.'s feature ensemble).

    Example:
        >>> p = Probe(np.eye(3), np.arange(3), [np.ones((3, 2), bool)], [np.ones((3, 2))])
        >>> p.preds.tolist(), len(Probe.concat([p, p.select(np.array([0]))]))
        ([0, 1, 2], 4)
    """

    logits: np.ndarray
    labels: np.ndarray
    gates: list[np.ndarray]
    z: list[np.ndarray]
    features: np.ndarray | None = None
    gate_inputs: list[np.ndarray] | None = None
    stages: list[np.ndarray] | None = None

    @property
    def preds(self) -> np.ndarray:
        """``(N,)`` predicted classes."""
        return self.logits.argmax(1)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def select(self, index: np.ndarray) -> Probe:
        """The probe restricted to some inputs (boolean mask or indices)."""
        def pick(v: object) -> object:
            if v is None:
                return None
            return [a[index] for a in v] if isinstance(v, list) else v[index]

        return Probe(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def concat(parts: Sequence[Probe]) -> Probe:
        """Concatenates probes of the same model along the input axis."""
        if not parts:
            raise ValueError("no probes to concatenate")

        def join(values: list) -> object:
            if any(v is None for v in values):
                return None
            if isinstance(values[0], list):
                return [np.concatenate(a) for a in zip(*values)]
            return np.concatenate(values)

        return Probe(**{f.name: join([getattr(p, f.name) for p in parts]) for f in fields(Probe)})


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


def find_stage_layers(model: nn.Module) -> list[str]:
    """Lee et al.'s feature sites: the stem (what enters the first stage) and every stage's output.

    Stages are the children named ``layer1``, ``layer2``, ... (CIFAR, torchvision and timm ResNets);
    a model without them gets the outputs of its max-pooling layers (VGG stages).

    Args:
        model: the network (for a DecoupledModel pass ``dm.model``).

    Returns:
        Site names for :class:`PooledHooks`; ``"input:layer1"`` reads the input of ``layer1``.

    Raises:
        DetectionError: neither stages nor pooling layers are found.

    Example:
        >>> from nd_plugin.adapters.cifar import resnet20
        >>> find_stage_layers(resnet20())
        ['input:layer1', 'layer1', 'layer2', 'layer3']
    """
    stages = [n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)]
    if stages:
        return [INPUT + stages[0], *stages]
    pools = [n for n, m in model.named_modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    if pools:
        return pools
    raise DetectionError(
        f"{type(model).__name__} has no children named layer1, layer2, ... and no pooling layers: "
        "pass the feature sites explicitly (layers=[...])."
    )


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the last feature needed has been read."""


class PooledHooks(HookOwner):
    """Reads the global average pool ``(N, C)`` of each feature site during forward passes.

    Args:
        model: the network holding the sites (``dm.model`` for a DecoupledModel).
        layers: site names (:func:`find_stage_layers`); ``"input:NAME"`` reads NAME's input.
        keep_grad: keep the autograd graph (for input preprocessing); detached otherwise.
        stop_at: end the forward pass (:func:`run_pooled`) after this site has been read.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> with PooledHooks(net, ["input:1", "2"]) as hooks:
        ...     _ = net(torch.ones(5, 3, 4, 4))
        >>> [tuple(f.shape) for f in hooks.features]
        [(5, 4), (5, 2)]
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, keep_grad: bool = False, stop_at: int | None = None) -> None:
        super().__init__()
        self.model, self.layers, self.keep_grad, self.stop_at = model, list(layers), keep_grad, stop_at
        self.features: list[torch.Tensor | None] = [None] * len(self.layers)

    def register(self) -> None:
        for i, name in enumerate(self.layers):
            module = self.model.get_submodule(name.removeprefix(INPUT))
            if name.startswith(INPUT):
                self.keep(module.register_forward_pre_hook(lambda _m, inp, i=i: self._store(i, inp[0])))
            else:
                self.keep(module.register_forward_hook(lambda _m, _inp, out, i=i: self._store(i, out)))

    def _store(self, i: int, x: torch.Tensor) -> None:
        x = x if self.keep_grad else x.detach()
        self.features[i] = x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x.flatten(1)
        if self.stop_at is not None and i == self.stop_at:
            raise _Stop


def run_pooled(model: nn.Module, x: torch.Tensor, layers: Sequence[str], *, keep_grad: bool = False, stop_at: int | None = None) -> list[torch.Tensor]:
    """Pooled features of ``layers`` for inputs ``x`` (up to ``stop_at`` when given: a truncated pass).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> [tuple(f.shape) for f in run_pooled(net, torch.ones(5, 3, 4, 4), ["0", "2"], stop_at=0)]
        [(5, 4)]
    """
    with PooledHooks(model, layers, keep_grad=keep_grad, stop_at=stop_at) as hooks:
        try:
            model(x)
        except _Stop:
            pass
    last = len(layers) if stop_at is None else stop_at + 1
    return list(hooks.features[:last])


class _ProbeHooks(HookOwner):
    """Owns the hooks that read gate logits (ACM outputs) and penultimate features; removed on exit."""

    def __init__(
        self, sites: Sequence[nn.Module], feature_module: nn.Module | None, gate_inputs: bool = False, *, keep_grad: bool = False
    ) -> None:
        super().__init__()
        self.keep_grad = keep_grad
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
            self.z[i] = out if self.keep_grad else out.detach()

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
    stages: Sequence[str] | None = None,
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
        stages: feature sites (:func:`find_stage_layers`) whose pooled activations to keep.

    Returns:
        The :class:`Probe` (numpy arrays on the CPU).

    Example:
        >>> import nd_plugin
        >>> from nd_plugin.adapters.cifar import CifarResNet
        >>> dm = nd_plugin.wrap(CifarResNet(8, num_classes=3).eval(), torch.randn(1, 3, 16, 16)).eval()
        >>> probe = collect_probe(dm, torch.randn(5, 3, 16, 16), feature_layer="linear", stages=["layer2"])
        >>> len(probe), probe.features.shape, probe.stages[0].shape, [z.shape[1] for z in probe.z]
        (5, (5, 64), (5, 32), [16, 32, 64])
    """
    device = torch.device(device) if device is not None else next(dm.parameters()).device
    feature_module = dm.model.get_submodule(feature_layer) if feature_layer else None
    parts: list[Probe] = []
    seen = 0
    with eval_mode(dm):
        with _ProbeHooks(dm.sites(), feature_module, gate_inputs) as hooks, PooledHooks(dm.model, stages or []) as pooled:
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
                st = [t.float().cpu().numpy() for t in pooled.features] if stages else None
                parts.append(
                    Probe(logits.float().cpu().numpy(), np.asarray(yb.cpu().numpy(), dtype=np.int64), gates, z, feats, gin, st)
                )
                seen += xb.shape[0]
                hooks.z = [None] * len(hooks.z)
    if not parts:
        raise DetectionError("no inputs to score: the data yielded no batches.")
    return Probe.concat(parts)


def _first_batch(loader: Iterable) -> torch.Tensor:
    for xb, _ in _batches(loader, 2):
        return xb[:2]
    raise DetectionError("the loader yielded no batches.")


