"""A dynamic runtime that skips inactive filters, for batch size 1.

:func:`dynamic_runtime` turns a :class:`~nd_plugin.pruning.CompactModel` into an inference module in
which each dynamic layer

1. runs its ACM on its input (pooled over space: a few hundred multiply-adds),
2. computes only its active filters (``conv2d`` with the active rows of its weight), and
3. hands the narrow result on; each consumer convolves with the matching *input* channels of its
   weight only (see :mod:`nd_plugin.pruning.plan` for when a layer can stay narrow).

Batches of more than one input compute the filters active for any of their inputs, with the
gates as masks (different inputs take different paths). Every norm that follows a conv is folded into it first. Weight slices are cached
per on/off pattern of the gates (an LRU of ``cache_size`` entries per layer, keyed by the pattern's
bytes, so a hit needs no ``nonzero`` either): paths recur, so most calls skip the gather;
``cache_size=0`` gathers on every call. At batch size 1 the ACM is a spatial sum and two ``addmm``.

Example:
    >>> rt = dynamic_runtime(compact)
    >>> rt(x[:1]).shape  # only the active filters of this input run
    torch.Size([1, 10])
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nd_plugin.gates import GatedSite
from nd_plugin.pruning.plan import DynamicPlan, analyse, fusable_norms
from nd_plugin.tracing import build_graph

__all__ = ["DynamicRuntime", "dynamic_runtime", "fold_batchnorm", "fold_pairs"]


def _fold_into(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Folds an eval-mode BatchNorm into the conv before it (in place)."""
    with torch.no_grad():
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.ndim - 1))))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def fold_pairs(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> nn.Module:
    """Folds each ``(conv, norm)`` pair of ``model`` (in place) and replaces the norm by Identity."""
    for conv_name, bn_name in pairs:
        _fold_into(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())
    return model


def fold_batchnorm(
    model: nn.Module, example_inputs: torch.Tensor, *, inplace: bool = False, norms: Sequence[tuple[str, str]] | None = None
) -> nn.Module:
    """Folds every BatchNorm that reads only one conv's output into that conv (eval only).

    This is the fair baseline for latency: the compact runtime folds its norms too.

    Args:
        model: a CNN (ungated: gated sites' norms are folded by :func:`dynamic_runtime`).
        example_inputs: one input batch for tracing.
        inplace: modify ``model`` instead of a deep copy.
        norms: the ``(conv, norm)`` name pairs to fold when already known (``DynamicPlan.norms`` of
            the network ``model`` is a gate-free copy of); traced when omitted.

    Returns:
        The folded model, in eval mode.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18().eval()
        >>> folded = fold_batchnorm(model, torch.randn(1, 3, 64, 64))
        >>> sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        0
        >>> torch.allclose(folded(x[:2]), model(x[:2]), atol=1e-4)
        True
    """
    model = (model if inplace else copy.deepcopy(model)).eval()
    if norms is None:
        for p in model.parameters():
            p.requires_grad_(True)  # tracing follows autograd
        with torch.enable_grad():
            dg = build_graph(model, example_inputs)
        norms = fusable_norms(dg, {m: n for n, m in model.named_modules()})
    model = fold_pairs(model, norms)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# PyTorch runs batch-1 3x3 convs on larger inputs through oneDNN, which is faster for multiples of 8
# filters; smaller ones go through im2col, where the count does not matter.
_ONEDNN_MIN_NUMEL = 20480
_ONEDNN_BLOCK = 8


class _ActiveSets:
    """Active channels of each narrow layer during one forward pass (owned by the runtime).

    ``sets[name]`` is ``(key, index)``: the layer's on/off pattern as bytes (one per filter) and
    the active channel indices; ``None`` when the layer ran full width.
    """

    def __init__(self) -> None:
        self.sets: dict[str, tuple[bytes, torch.Tensor] | None] = {}


class _LRU:
    """A small least-recently-used cache from active-set keys to weight slices."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: OrderedDict[object, tuple] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: object, make: Callable[[], tuple]) -> tuple:
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
            self.hits += 1
            return value
        self.misses += 1
        value = make()
        if self.capacity > 0:
            self.data[key] = value
            if len(self.data) > self.capacity:
                self.data.popitem(last=False)
        return value


def _pattern_key(on: torch.Tensor) -> bytes:
    """One byte per channel of a boolean vector (``on`` is on the CPU)."""
    return on.numpy().tobytes() if on.device.type == "cpu" else bytes(on.tolist())


class DynamicConv(nn.Module):
    """A dynamic layer at run time: ACM, then only the active filters (norm folded).

    At batch size 1 the on/off pattern of the gates (as bytes) keys a per-layer cache of
    ``(weight, bias, index, full)`` slices, so a recurring pattern costs the ACM and one lookup.

    Args:
        name: the layer's name (key of its active set).
        site: the compact model's :class:`~nd_plugin.gates.GatedSite` (norm already folded).
        state: the runtime's active sets.
        narrow: hand on only the active channels (else scatter them into a full-width tensor).
        source: the narrow layer whose output this layer reads, if any.
        cache_size: weight slices kept per layer.
    """

    def __init__(
        self,
        name: str,
        site: GatedSite,
        state: _ActiveSets,
        *,
        narrow: bool,
        source: str | None,
        cache_size: int,
    ) -> None:
        super().__init__()
        conv = site.conv
        self.name, self.state, self.narrow, self.source = name, state, narrow, source
        self.weight = nn.Parameter(conv.weight.detach().contiguous(), requires_grad=False)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        self.fc1_weight = nn.Parameter(site.acm.fc1.weight.detach().contiguous(), requires_grad=False)
        self.fc1_bias = nn.Parameter(site.acm.fc1.bias.detach(), requires_grad=False)
        self.fc2_weight = nn.Parameter(site.acm.fc2.weight.detach(), requires_grad=False)
        self.fc2_bias = nn.Parameter(site.acm.fc2.bias.detach(), requires_grad=False)
        self.register_buffer("fc1_t", self.fc1_weight.t().contiguous(), persistent=False)
        self.register_buffer("fc2_t", self.fc2_weight.t().contiguous(), persistent=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.out_channels = conv.out_channels
        self.cache = _LRU(cache_size)
        self.fc1_cache = _LRU(cache_size)

    def _slice(self, in_index: torch.Tensor | None, on: torch.Tensor, multiple: int) -> tuple:
        index = on.nonzero().flatten()
        if index.numel() == 0:  # one zero filter keeps shapes valid
            index = torch.zeros(1, dtype=torch.long, device=on.device)
            weight = self.weight.new_zeros(1, *self.weight.shape[1:])
            if in_index is not None:
                weight = weight.index_select(1, in_index)
            return weight, self.bias.new_zeros(1), index, False
        active = index.numel()
        padded = min(-(-active // multiple) * multiple, self.out_channels)
        if padded > active:  # oneDNN prefers blocks of 8: extra filters with zero weights, outputs stay 0
            index = torch.cat([index, (~on).nonzero().flatten()[: padded - active]])
        weight = self.weight.index_select(0, index)
        bias = self.bias.index_select(0, index)
        weight[active:] = 0
        bias[active:] = 0
        if in_index is not None:
            weight = weight.index_select(1, in_index)
        return weight.contiguous(), bias, index, active == self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.state.sets.get(self.source) if self.source is not None else None
        if x.shape[0] != 1:
            return self._batched(x, None if src is None else src[1])
        if src is None:
            in_key, in_index, fc1_t = b"", None, self.fc1_t
        else:
            in_key, in_index = src
            fc1_t = self.fc1_cache.get(in_key, lambda: (self.fc1_t.index_select(0, in_index),))[0]
        spatial = x.numel() // x.shape[1]
        pooled = x.reshape(1, x.shape[1], spatial).sum(2)
        hidden = torch.addmm(self.fc1_bias, pooled, fc1_t, alpha=1.0 / spatial).relu_()
        on = torch.addmm(self.fc2_bias, hidden, self.fc2_t)[0] > 0
        out_key = _pattern_key(on)
        multiple = _ONEDNN_BLOCK if x.numel() > _ONEDNN_MIN_NUMEL else 1
        weight, bias, index, full = self.cache.get(in_key + out_key, lambda: self._slice(in_index, on, multiple))
        out = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.narrow:
            self.state.sets[self.name] = (out_key, index)
            return out
        self.state.sets[self.name] = None
        if full:
            return out
        return out.new_zeros(1, self.out_channels, *out.shape[2:]).index_copy_(1, index, out)

    def _batched(self, x: torch.Tensor, in_index: torch.Tensor | None) -> torch.Tensor:
        """Batches of several inputs: the filters active for any input of the batch, gates as masks."""
        fc1 = self.fc1_weight if in_index is None else self.fc1_weight.index_select(1, in_index)
        z = F.linear(F.relu(F.linear(x.mean(dim=(2, 3)), fc1, self.fc1_bias)), self.fc2_weight, self.fc2_bias)
        on = z > 0
        union = on.any(0)
        weight = self.weight if in_index is None else self.weight.index_select(1, in_index)
        if bool(union.all()):
            out = F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            self.state.sets[self.name] = None
            return out * on.to(out.dtype)[:, :, None, None]
        index = union.nonzero().flatten()
        if index.numel() == 0:  # no filter on anywhere: one (masked) filter keeps shapes valid
            index = torch.zeros(1, dtype=torch.long, device=x.device)
        out = F.conv2d(x, weight.index_select(0, index), self.bias.index_select(0, index), self.stride, self.padding, self.dilation, self.groups)
        out = out * on.index_select(1, index).to(out.dtype)[:, :, None, None]
        if self.narrow:
            self.state.sets[self.name] = (_pattern_key(union), index)
            return out
        self.state.sets[self.name] = None
        return out.new_zeros(out.shape[0], self.out_channels, *out.shape[2:]).index_copy_(1, index, out)


class NarrowInputConv(nn.Module):
    """A conv that reads a narrow layer's output: it uses only the matching input channels."""

    def __init__(self, conv: nn.Conv2d, state: _ActiveSets, source: str, cache_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach(), requires_grad=False) if conv.bias is not None else None
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.state, self.source = state, source
        self.cache = _LRU(cache_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.state.sets.get(self.source)
        if src is None or x.shape[0] != 1:
            weight = self.weight if src is None else self.weight.index_select(1, src[1])
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        index = src[1]
        weight = self.cache.get(src[0], lambda: (self.weight.index_select(1, index).contiguous(),))[0]
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NarrowInputLinear(nn.Module):
    """A linear layer that reads a narrow layer's (flattened) output."""

    def __init__(self, linear: nn.Linear, state: _ActiveSets, source: str, repeat: int, cache_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False) if linear.bias is not None else None
        self.state, self.source, self.repeat = state, source, repeat
        self.cache = _LRU(cache_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.state.sets.get(self.source)
        weight = self.weight
        if src is not None:
            index = src[1]

            def make() -> tuple:
                cols = (index[:, None] * self.repeat + torch.arange(self.repeat, device=index.device)).flatten()
                return (self.weight.index_select(1, cols).contiguous(),)

            weight = self.cache.get(src[0], make)[0]
        return F.linear(x, weight, self.bias)


class DynamicRuntime(nn.Module):
    """Inference module of a compact model that computes only active filters at batch size 1.

    Build it with :func:`dynamic_runtime`. Outputs equal the compact model's (up to float
    rounding from the folded norms).

    Attributes:
        model: the rewritten network.
        plan: the :class:`~nd_plugin.pruning.plan.DynamicPlan` it follows.
    """

    def __init__(self, model: nn.Module, state: _ActiveSets, plan: DynamicPlan, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.channels_last = channels_last
        self._state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._state.sets.clear()
        try:
            return self.model(x)
        finally:
            self._state.sets.clear()

    def cache_stats(self) -> dict[str, int]:
        """Weight-slice cache hits and misses summed over layers."""
        caches = [m.cache for m in self.model.modules() if isinstance(getattr(m, "cache", None), _LRU)]
        return {"hits": sum(c.hits for c in caches), "misses": sum(c.misses for c in caches)}


@torch.no_grad()
def dynamic_runtime(
    compact, *, cache_size: int = 64, channels_last: bool = False, plan: DynamicPlan | None = None
) -> DynamicRuntime:
    """Builds the batch-1 dynamic runtime of a compact model.

    Args:
        compact: a :class:`~nd_plugin.pruning.CompactModel` (left untouched).
        cache_size: weight slices cached per layer and active set (0: gather on every call).
        channels_last: run convolutions in channels-last memory format.
        plan: the :class:`~nd_plugin.pruning.plan.DynamicPlan` of ``compact`` or of the decoupled
            model it was pruned from (:func:`~nd_plugin.pruning.plan.analyse`); traced when omitted.

    Returns:
        The :class:`DynamicRuntime` (eval mode, no gradients).

    Example:
        >>> rt = dynamic_runtime(nd_plugin.prune(dm, stats))
        >>> torch.allclose(rt(x[:1]), compact(x[:1]), rtol=1e-4, atol=1e-5)
        True
    """
    dynamic = [s.name for s in compact.gate_sites]
    plan = plan.restricted(dynamic) if plan is not None else analyse(compact.model, dynamic, compact.input_size)
    model = copy.deepcopy(compact.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fold_pairs(model, plan.norms)
    state = _ActiveSets()
    sources = {c.name: (p.name, c) for p in plan.sites.values() if p.narrow for c in p.consumers}
    for name in dynamic:
        site = model.get_submodule(name)
        source = sources.get(f"{name}.conv")
        _set_submodule(
            model,
            name,
            DynamicConv(
                name,
                site,
                state,
                narrow=plan.sites[name].narrow,
                source=source[0] if source else None,
                cache_size=cache_size,
            ),
        )
    dynamic_convs = {f"{n}.conv" for n in dynamic}
    for consumer, (source, info) in sources.items():
        if consumer in dynamic_convs:
            continue
        module = model.get_submodule(consumer)
        if info.kind == "conv":
            _set_submodule(model, consumer, NarrowInputConv(module, state, source, cache_size))
        else:
            _set_submodule(model, consumer, NarrowInputLinear(module, state, source, info.repeat, cache_size))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return DynamicRuntime(model, state, plan, channels_last).eval()
