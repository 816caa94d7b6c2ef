"""Where a dynamic layer's active channels go: producers, consumers, and what lies between.

A dynamic layer can hand a *narrow* tensor (only its active channels) to the layers that consume
it when everything between the two acts channel by channel and keeps zeros at zero (ReLU, pooling,
...). Then the consumer slices its weight's input channels to the same set. An addition, a
concatenation, a norm that is not folded into the producer or a grouped consumer breaks that: the
layer then computes only its active filters but scatters them back into a full-width tensor.

The analysis runs torch-pruning's DependencyGraph on a gate-free copy of the compact model (every
gated site replaced by its conv and norm), so the groups contain only the network's own layers.
Removing filters changes none of this, so the plan of the decoupled model (every gated layer)
serves every compact model pruned from it (:meth:`DynamicPlan.restricted`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nd_plugin.gates import GatedSite
from nd_plugin.pruning.importance import node_label
from nd_plugin.tracing import build_graph

__all__ = ["Consumer", "SitePlan", "DynamicPlan", "analyse", "fusable_norms", "plain_copy"]

# grad_fn names (prefixes) of element-wise ops that act per channel and map 0 to 0
_CHANNEL_LOCAL = (
    "Relu",
    "Relu6",
    "Hardtanh",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "Silu",
    "Mish",
    "Hardswish",
    "Clamp",
    "MaxPool",
    "AvgPool",
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "Max2D",
    "Avg2D",
    "Mean",
    "Clone",
    "Contiguous",
    "Dropout",
    "NativeDropout",
    "TBackward",  # the transpose of a linear layer's weight (traced with it)
    "ViewBackward",
    "UnsafeViewBackward",
)


@dataclass(frozen=True)
class Consumer:
    """A layer whose input channels are a dynamic layer's output.

    Attributes:
        name: module name in the compact model (``"layer1.0.conv2"``, ``"features.10.conv"``).
        kind: ``"conv"`` or ``"linear"``.
        repeat: input features per channel (``H·W`` of a flattened map feeding a linear layer).
    """

    name: str
    kind: str
    repeat: int = 1


@dataclass
class SitePlan:
    """How one dynamic layer runs.

    Attributes:
        name: the gated layer.
        narrow: whether its output can stay narrow (only active channels) up to its consumers.
        consumers: the layers that read its channels.
        reason: why it cannot stay narrow, when it cannot.
    """

    name: str
    narrow: bool
    consumers: list[Consumer] = field(default_factory=list)
    reason: str = ""


@dataclass
class DynamicPlan:
    """The plan of every dynamic layer, plus the conv -> norm pairs that can be folded."""

    sites: dict[str, SitePlan]
    norms: list[tuple[str, str]]

    def restricted(self, dynamic: Sequence[str]) -> DynamicPlan:
        """The plan of a compact model pruned from this plan's network, whose dynamic layers are ``dynamic``.

        Removing filters changes no layer's producers or consumers, and every gate is replaced by its
        conv and norm before the analysis, so the plan of the gated network (all its gated layers)
        serves each compact model pruned from it: one trace for all of them.

        Raises:
            KeyError: ``dynamic`` names a layer this plan does not hold.
        """
        return DynamicPlan({s: self.sites[s] for s in dynamic}, list(self.norms))

    def producer_of(self, consumer: str) -> str | None:
        """The narrow dynamic layer whose channels ``consumer`` reads, if any."""
        for plan in self.sites.values():
            if plan.narrow and any(c.name == consumer for c in plan.consumers):
                return plan.name
        return None


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`GatedSite` replaced by ``Sequential``-free conv+norm."""
    from nd_plugin.pruning.structural import FixedSite, _set_submodule

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, GatedSite):
            _set_submodule(plain, name, FixedSite(module.conv, module.norm))
    return plain.eval()


def fusable_norms(dg: tp.DependencyGraph, names: dict[nn.Module, str]) -> list[tuple[str, str]]:
    """``(conv, norm)`` name pairs where the norm is a BatchNorm that reads only that conv's output."""
    pairs = []
    for module, node in dg.module2node.items():
        if not isinstance(module, nn.Conv2d) or len(node.outputs) != 1:
            continue
        nxt = node.outputs[0]
        if isinstance(nxt.module, _BatchNorm) and len(nxt.inputs) == 1 and nxt.inputs[0] is node:
            if module in names and nxt.module in names:
                pairs.append((names[module], names[nxt.module]))
    return pairs


def _op_name(module: nn.Module) -> str:
    fn = getattr(module, "_grad_fn", None)
    if fn is None:
        return type(module).__name__
    return fn if isinstance(fn, str) else type(fn).__name__


def _plan_site(
    dg: tp.DependencyGraph,
    plain: nn.Module,
    site: str,
    names: dict[nn.Module, str],
    folded: set[str],
) -> SitePlan:
    conv = plain.get_submodule(site).conv
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    consumers: list[Consumer] = []
    reasons: list[str] = []
    for dep, _idxs in group:
        module = dep.target.module
        label = names.get(module, node_label(dep.target.name))
        if module is conv:
            continue
        out = dg.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, _BatchNorm):
            if label not in folded:
                reasons.append(f"unfolded norm {label}")
            continue
        if isinstance(module, nn.Conv2d):
            if out:
                reasons.append(f"shares channels with {label}")
            elif module.groups != 1:
                reasons.append(f"grouped consumer {label}")
            else:
                consumers.append(Consumer(label, "conv"))
            continue
        if isinstance(module, nn.Linear):
            if out:
                reasons.append(f"shares channels with {label}")
            elif module.in_features % conv.out_channels:
                reasons.append(f"linear consumer {label} of odd width")
            else:
                consumers.append(Consumer(label, "linear", module.in_features // conv.out_channels))
            continue
        if isinstance(module, (tp.ops._ReshapeOp,)):
            continue
        if isinstance(module, tp.ops._ElementWiseOp):
            op = _op_name(module)
            if op.startswith(_CHANNEL_LOCAL):
                continue
            reasons.append(f"op {op}")
            continue
        if isinstance(module, (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)):
            continue
        reasons.append(f"{type(module).__name__} {label}")
    if not consumers:
        reasons.append("no consumer found")
    narrow = not reasons
    return SitePlan(site, narrow, consumers if narrow else [], "; ".join(dict.fromkeys(reasons)))


def analyse(model: nn.Module, dynamic: Sequence[str], input_size: Sequence[int]) -> DynamicPlan:
    """Plans the dynamic runtime of a compact model.

    Args:
        model: the compact model's network (``CompactModel.model``).
        dynamic: names of its dynamic (still gated) layers.
        input_size: ``(C, H, W)``.

    Returns:
        The :class:`DynamicPlan`.
    """
    plain = plain_copy(model)
    for p in plain.parameters():
        p.requires_grad_(True)  # tracing follows autograd
    device = next(plain.parameters()).device
    with torch.enable_grad():
        dg = build_graph(plain, torch.randn(1, *input_size, device=device))
    names = {m: n for n, m in plain.named_modules()}
    norms = fusable_norms(dg, names)
    folded = {bn for _, bn in norms}
    return DynamicPlan({s: _plan_site(dg, plain, s, names, folded) for s in dynamic}, norms)
