"""Graph tracing: where gates can go, found with torch-pruning's DependencyGraph.

Nothing here looks at class names or knows an architecture. A conv is a *candidate* site when

- it is a 2-D convolution that is not a stem conv (no conv or linear layer runs before it),
- it is not depthwise (its filters map one-to-one onto its input channels, so its channels belong
  to the layer that produces its input, which is where the gate goes), and
- its output is spatial (a conv on pooled features, as in squeeze-and-excitation, gains nothing).

A candidate is *internal* when its dependency group (the channels that must be removed together
with its filters) goes through no addition: its filters are not tied to a residual stream, so
they can be both skipped at run time and removed for good. The norm layer that directly and
exclusively consumes a conv's output is fused into the site, so the gate multiplies ``norm(conv(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nd_plugin._hooks import ForwardHooks
from nd_plugin.errors import UntraceableModelError
from nd_plugin.utilities import eval_mode

if TYPE_CHECKING:  # torch-pruning imports timm and torchvision: load it when a graph is built
    import torch_pruning as tp

__all__ = ["SiteInfo", "build_graph", "find_sites", "group_layers"]


@dataclass(frozen=True)
class SiteInfo:
    """A place for a gate, as tracing found it.

    Attributes:
        name: qualified name of the conv in the (unwrapped) model.
        norm: name of the norm layer fused into the site, or ``None``.
        channels: number of filters (gates).
        internal: whether the conv's dependency group avoids residual additions.
        group: names of the layers whose channels are coupled with these filters.
        spatial: the conv's output spatial size seen while tracing.
        activation: ``"relu"`` when the site's output (after its norm) goes only into a ReLU.
    """

    name: str
    norm: str | None
    channels: int
    internal: bool
    group: tuple[str, ...]
    spatial: tuple[int, ...]
    activation: str | None = None


def build_graph(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tp.DependencyGraph:
    """Builds torch-pruning's dependency graph, turning tracing failures into one clear error.

    torch-pruning leaves the model in eval mode; the caller's mode is restored here.
    """
    import torch_pruning as tp

    try:
        # tracing follows autograd: it must work when called under no_grad / inference_mode too
        with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
            if isinstance(example_inputs, torch.Tensor):
                example_inputs = example_inputs.clone()
            else:
                example_inputs = [t.clone() for t in example_inputs]
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
        raise UntraceableModelError(
            f"torch-pruning cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Gate sites are found by tracing; make the model traceable (plain tensor in, tensor out)."
        ) from exc


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _node_label(node: tp.Node) -> str:
    return node.name.split(" (")[0]


def _is_add(module: nn.Module) -> bool:
    import torch_pruning as tp

    return isinstance(module, tp.ops._ElementWiseOp) and str(module._grad_fn).startswith("Add")


def group_layers(dg: tp.DependencyGraph, conv: nn.Conv2d) -> list[tuple[nn.Module, object]]:
    """Lists ``(module, pruning_fn)`` for every member of the group of ``conv``'s filters."""
    import torch_pruning as tp

    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    return [(dep.target.module, dep.handler) for dep, _ in group]


def _stem_convs(dg: tp.DependencyGraph) -> set[nn.Module]:
    """Convs with no conv or linear layer upstream (one memoised pass over the graph)."""
    weighted_upstream: dict[tp.Node, bool] = {}
    for start in dg.module2node.values():
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in weighted_upstream:
                continue
            if not expanded:
                stack.append((node, True))
                stack.extend((i, False) for i in node.inputs if i not in weighted_upstream)
                continue
            weighted_upstream[node] = any(
                isinstance(i.module, (nn.Conv2d, nn.Linear)) or weighted_upstream.get(i, False) for i in node.inputs
            )
    return {m for m, node in dg.module2node.items() if isinstance(m, nn.Conv2d) and not weighted_upstream[node]}


def _output_shapes(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> dict[nn.Module, tuple[int, ...]]:
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(module: nn.Module, _inp: object, out: torch.Tensor) -> None:
        shapes[module] = tuple(out.shape[2:])

    inputs = example_inputs if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    with ForwardHooks((m for m in model.modules() if isinstance(m, nn.Conv2d)), record), torch.no_grad():
        model(*inputs)
    return shapes


def _fusable_norm(dg: tp.DependencyGraph, conv: nn.Conv2d) -> nn.Module | None:
    node = dg.module2node[conv]
    if len(node.outputs) != 1:
        return None
    nxt = node.outputs[0]
    if isinstance(nxt.module, _BatchNorm) and len(nxt.inputs) == 1 and nxt.inputs[0] is node:
        return nxt.module
    return None


def _activation(dg: tp.DependencyGraph, last: nn.Module) -> str | None:
    """``"relu"`` when the only consumer of ``last``'s output is a ReLU, else ``None``."""
    import torch_pruning as tp

    node = dg.module2node[last]
    if len(node.outputs) != 1:
        return None
    consumer = node.outputs[0].module
    fn = str(getattr(consumer, "_grad_fn", "")) if isinstance(consumer, tp.ops._ElementWiseOp) else ""
    return "relu" if fn.startswith("Relu") or isinstance(consumer, nn.ReLU) else None


def find_sites(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    dg: tp.DependencyGraph | None = None,
) -> list[SiteInfo]:
    """Finds every candidate gate site of ``model``, in execution order.

    Args:
        model: the unwrapped model.
        example_inputs: inputs for one traced forward pass.
        dg: a dependency graph already built on ``model`` with these inputs.

    Returns:
        One :class:`SiteInfo` per candidate conv; filter on ``internal`` for ``sites="internal"``.
    """
    names = {m: n for n, m in model.named_modules()}
    shapes = _output_shapes(model, example_inputs)  # dict order = execution order
    uses: dict[nn.Module, int] = {}
    for _name, module in model.named_modules(remove_duplicate=False):
        uses[module] = uses.get(module, 0) + 1
    dg = dg or build_graph(model, example_inputs)
    stems = _stem_convs(dg)
    sites = []
    groups: dict[nn.Module, list[tuple[nn.Module, object]]] = {}  # convs of one coupled group share it
    for conv, spatial in shapes.items():
        if conv not in dg.module2node:
            raise UntraceableModelError(
                f"tracing cannot follow layer {names.get(conv, type(conv).__name__)!r}: its output leaves autograd "
                "(.detach(), no_grad, numpy or a non-tensor op) before the model's output, so its channels "
                "cannot be coupled with their consumers. Keep the forward pass differentiable."
            )
        if conv in stems or _is_depthwise(conv):
            continue
        if all(s == 1 for s in spatial) or uses.get(conv, 1) > 1:
            continue
        members = groups.get(conv)
        if members is None:
            members = group_layers(dg, conv)
            for module, fn in members:
                if isinstance(module, nn.Conv2d) and dg.is_out_channel_pruning_fn(fn):
                    groups[module] = members
        internal = not any(_is_add(m) for m, _ in members)
        norm = _fusable_norm(dg, conv)
        if norm is not None and uses.get(norm, 1) > 1:
            norm = None
        coupled = tuple(dict.fromkeys(names[m] for m, _ in members if m in names and m is not conv))
        sites.append(
            SiteInfo(
                name=names[conv],
                norm=names[norm] if norm is not None else None,
                channels=conv.out_channels,
                internal=internal,
                group=coupled,
                spatial=spatial,
                activation=_activation(dg, norm if norm is not None else conv),
            )
        )
    return sites
