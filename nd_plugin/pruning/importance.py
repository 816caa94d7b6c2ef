"""``DecouplingImportance``: torch-pruning channel importance from calculation-path statistics."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from nd_plugin.errors import StatsMismatchError
from nd_plugin.gates import GateLinear
from nd_plugin.paths import PathStats

__all__ = ["DecouplingImportance", "node_label"]


def node_label(name: str) -> str:
    """A dependency-graph node's module name without the ``" (Conv2d(...))"`` suffix."""
    return name.split(" (")[0]


def _is_out_channel(group: tp.Group, handler: object) -> bool:
    graph = getattr(group, "_DG", None)
    if graph is not None:
        return graph.is_out_channel_pruning_fn(handler)
    return "out_channels" in getattr(handler, "__name__", type(handler).__name__)


class DecouplingImportance(tp.importance.Importance):
    """Scores a channel by how often its decoupling gate was on.

    For a torch-pruning group, each gated conv in the group contributes the on-frequency of its
    filters (from :class:`~nd_plugin.paths.PathStats`); any other conv or linear layer that
    *produces* channels of the group is ungated, so its channels count as always on (1.0). The
    group's score is the maximum over these producers, placed by the group's ``root_idxs``: a
    channel scores 0 only when it is silent in every layer of its coupled group, which is exactly
    when it can be removed without changing the model's output. Groups of the wrapped model and of
    its plain network (:meth:`~nd_plugin.DecoupledModel.unwrapped`, for pruning it statically) are
    both understood. The ACM's own layers (:class:`~nd_plugin.gates.GateLinear`)
    and the consumers of the group (input-channel pruning) carry no evidence and are skipped.

    Groups that contain no gated conv return ``None``, which torch-pruning's pruners read as
    "skip this group".

    The scores refer to the channels the statistics were collected on: score groups of the
    unpruned model (``iterative_steps=1`` in torch-pruning's pruners). A gated conv whose width no
    longer matches the statistics raises :class:`~nd_plugin.errors.StatsMismatchError`.

    Args:
        stats: path statistics of the decoupled model (``DecoupledModel.paths``).
        prefix: module-name prefix of the gated layers in the graph the groups come from, when the
            graph was built on something other than ``DecoupledModel.model``; ``"model."`` when it
            was built on the :class:`~nd_plugin.DecoupledModel` itself is detected automatically.

    Example:
        >>> import torch_pruning as tp
        >>> imp = DecouplingImportance(dm.paths(val_loader))
        >>> plain = dm.unwrapped().eval()  # the network without gates, for static pruning
        >>> dg = tp.DependencyGraph().build_dependency(plain, example_inputs=x[:1])
        >>> group = dg.get_pruning_group(plain.layer1[0].conv1, tp.prune_conv_out_channels, idxs=range(16))
        >>> sorted(set(imp(group).tolist()))[:1]  # silent filters score 0
        [0.0]
        >>> convs = [m for n, m in plain.named_modules() if isinstance(m, nn.Conv2d) and not n.endswith("conv1")]
        >>> pruner = tp.pruner.MetaPruner(plain, x[:1], importance=imp, pruning_ratio=0.3,
        ...                               ignored_layers=[plain.linear, *convs])
        >>> pruner.step()
        >>> plain.layer1[0].conv1.out_channels < 16
        True
    """

    def __init__(self, stats: PathStats, *, prefix: str = "") -> None:
        self.stats = stats
        self.prefix = prefix
        freq = stats.frequency().astype(np.float32)
        self._freq: dict[str, torch.Tensor] = {
            name: torch.from_numpy(freq[stats.layer_slice(i)].copy()) for i, name in enumerate(stats.site_names)
        }

    @property
    def frequencies(self) -> Mapping[str, torch.Tensor]:
        """On-frequency per gated layer (layer name -> ``(C,)`` tensor)."""
        return self._freq

    def _site_of(self, label: str) -> str | None:
        """The gated layer whose conv is the graph node ``label``, if any.

        In a wrapped model the conv is ``<site>.conv``; in the plain network
        (:meth:`~nd_plugin.DecoupledModel.unwrapped`) it has the site's own name.
        """
        names = [label.removesuffix(".conv")] if label.endswith(".conv") else [label]
        for site in names:
            for candidate in (site, site.removeprefix(self.prefix), site.removeprefix("model.")):
                if candidate in self._freq:
                    return candidate
        return None

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        """Returns the ``(len(root idxs),)`` score of a group's channels, or ``None`` (no gate in it)."""
        n = len(group[0].idxs)
        score = torch.zeros(n)
        gated = False
        for i, (dep, idxs) in enumerate(group):
            if not _is_out_channel(group, dep.handler):
                continue
            module = dep.target.module
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            label = node_label(dep.target.name)
            if isinstance(module, GateLinear):  # the ACM's own layers: no evidence about the channels
                continue
            root_idxs = torch.as_tensor(group[i].root_idxs, dtype=torch.long)
            site = self._site_of(label)
            if site is None:
                local = torch.ones(len(idxs))
            else:
                freq = self._freq[site]
                if module.out_channels != freq.numel():
                    raise StatsMismatchError(
                        f"{site} has {module.out_channels} filters but the path statistics have {freq.numel()}: "
                        "score the unpruned model (iterative_steps=1), with statistics collected on it."
                    )
                local = freq[torch.as_tensor(list(idxs), dtype=torch.long)]
                gated = True
            score.scatter_reduce_(0, root_idxs, local, reduce="amax")
        return score if gated else None
