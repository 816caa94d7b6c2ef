"""Permanent removal of silent filters; energetic gates dropped, dynamic gates kept.

:func:`prune` turns a decoupled model and its path statistics into a :class:`CompactModel`:

- a channel is removed when its gate was off for every input in *every* gated layer of its
  coupled group (torch-pruning DependencyGraph group: the conv, its norm, the ACM's ``fc2`` row,
  the consumers' input channels and the consumers' ACM ``fc1`` columns all go together);
- a gated layer whose remaining filters were all on for every input loses its gate
  (:class:`FixedSite`: conv then norm, nothing else);
- every other gated layer keeps its ACM over the remaining filters and stays a
  :class:`~nd_plugin.gates.GatedSite`.

On the inputs the statistics were collected on, the compact model computes the same function as
the gated model (only exact zeros are removed and only exact ones are dropped).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from nd_plugin.decoupled import DecoupledModel
from nd_plugin.errors import ConfigError, StatsMismatchError
from nd_plugin.gates import GatedSite
from nd_plugin.paths import PathStats, check_tolerance
from nd_plugin.pruning.importance import DecouplingImportance
from nd_plugin.tracing import SiteInfo, build_graph
from nd_plugin.utilities import eval_mode

__all__ = [
    "CompactModel",
    "FixedSite",
    "PruneRecord",
    "apply_record",
    "check_round_to",
    "check_tolerance",
    "coupled_sites",
    "keep_count",
    "mix_records",
    "plan_record",
    "prune",
    "static_record",
]


class FixedSite(nn.Module):
    """A former gated site whose gate was dropped: ``norm(conv(x))``.

    It keeps the ``conv`` / ``norm`` attribute names of :class:`~nd_plugin.gates.GatedSite`, so the
    state-dict keys of the conv and norm do not change when a gate is dropped.

    Args:
        conv: the convolution.
        norm: the normalisation after it (``nn.Identity`` when there is none).

    Example:
        >>> site = FixedSite(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> site(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 8, 6, 6])
    """

    def __init__(self, conv: nn.Conv2d, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm if norm is not None else nn.Identity()

    @property
    def out_channels(self) -> int:
        """Number of filters."""
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


@dataclass
class PruneRecord:
    """What :func:`prune` did, in plain JSON-able types (the export manifest stores it).

    Attributes:
        tolerance: frequencies ``<= tolerance`` counted as silent, ``>= 1 - tolerance`` as energetic.
        sites: every gated layer of the decoupled model, in path order.
        original_channels: filters per gated layer before pruning.
        kept: per gated layer, the original indices of the filters that remain (sorted).
        static: gated layers whose gate was dropped (all remaining filters energetic).
        reduction: the ACM reduction of the decoupled model (needed to rebuild it).
    """

    tolerance: float
    sites: list[str]
    original_channels: dict[str, int]
    kept: dict[str, list[int]]
    static: list[str] = field(default_factory=list)
    reduction: int = 4

    @property
    def dynamic(self) -> list[str]:
        """Gated layers that keep their gate, in path order."""
        static = set(self.static)
        return [s for s in self.sites if s not in static]

    def removed(self, site: str) -> list[int]:
        """Original indices of the filters removed from ``site``."""
        kept = set(self.kept[site])
        return [i for i in range(self.original_channels[site]) if i not in kept]

    def summary(self) -> dict[str, Any]:
        """Counts of removed / static / dynamic filters."""
        total = sum(self.original_channels.values())
        kept = sum(len(v) for v in self.kept.values())
        static = sum(len(self.kept[s]) for s in self.static)
        return {
            "filters": total,
            "removed": total - kept,
            "static": static,
            "dynamic": kept - static,
            "sites_static": len(self.static),
            "sites_dynamic": len(self.sites) - len(self.static),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary (for JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tolerance=float(data["tolerance"]),
            sites=[str(s) for s in data["sites"]],
            original_channels={str(k): int(v) for k, v in data["original_channels"].items()},
            kept={str(k): [int(i) for i in v] for k, v in data["kept"].items()},
            static=[str(s) for s in data.get("static", [])],
            reduction=int(data.get("reduction", 4)),
        )


class CompactModel(DecoupledModel):
    """A pruned decoupled model: silent filters gone, energetic gates dropped, dynamic gates kept.

    It is a :class:`~nd_plugin.DecoupledModel` whose ``gate_sites`` are the dynamic layers (with
    their new widths), so ``model(x, return_path=True)`` and ``.paths(loader)`` work as before.

    Attributes:
        record: the :class:`PruneRecord` that maps compact channels to original ones.
    """

    def __init__(
        self,
        model: nn.Module,
        gate_sites: Sequence[SiteInfo],
        input_size: tuple[int, int, int],
        record: PruneRecord,
    ) -> None:
        super().__init__(model, gate_sites, input_size)
        self.record = record

    def compact_stats(self, stats: PathStats) -> PathStats:
        """Restricts statistics of the decoupled model to this model's dynamic gates.

        Args:
            stats: statistics over the original gated layers (as given to :func:`prune`).

        Returns:
            Statistics whose layers are this model's ``gate_sites`` and whose filters are the kept ones.
        """
        check_stats(stats, self.record.sites, self.record.original_channels)
        cols = np.concatenate(
            [np.asarray(self.record.kept[s], dtype=np.int64) + stats.layer_slice(s).start for s in self.record.dynamic]
            or [np.zeros(0, dtype=np.int64)]
        )
        return PathStats(
            site_names=list(self.record.dynamic),
            site_channels=[len(self.record.kept[s]) for s in self.record.dynamic],
            n=stats.n,
            counts=stats.counts[cols],
            class_counts=stats.class_counts[:, cols],
            class_n=stats.class_n,
            correct=stats.correct,
            classes=stats.classes,
            paths=stats.paths[:, cols] if stats.paths is not None else None,
            labels=stats.labels,
            preds=stats.preds,
        )


def check_stats(stats: PathStats, sites: Sequence[str], channels: Mapping[str, int] | Sequence[int]) -> None:
    """Raises StatsMismatchError unless ``stats`` describe exactly these gated layers and widths."""
    widths = [channels[s] for s in sites] if isinstance(channels, Mapping) else list(channels)
    if list(stats.site_names) != list(sites) or list(stats.site_channels) != widths:
        raise StatsMismatchError(
            f"the path statistics cover {len(stats.site_names)} gated layers ({sum(stats.site_channels)} filters) "
            f"but the model has {len(sites)} ({sum(widths)} filters); collect them on this model with "
            "`DecoupledModel.paths(loader)` (or `nd analyze RUN`)."
        )


def _infer_reduction(dm: DecoupledModel) -> int:
    """The smallest ACM reduction consistent with every site's hidden width (4 in the paper)."""
    sites = dm.sites()
    for r in range(1, 1025):
        if all(max(s.conv.in_channels // r, 1) == s.acm.fc1.out_features for s in sites):
            return r
    return 4


def _gated_convs(model: nn.Module, sites: Sequence[str]) -> dict[nn.Module, str]:
    return {model.get_submodule(s).conv: s for s in sites}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _graph(dm: DecoupledModel) -> tp.DependencyGraph:
    device = next(dm.parameters()).device
    dm.eval()
    with torch.enable_grad():  # the gate's straight-through term links the ACM to its conv
        return build_graph(dm.model, torch.randn(1, *dm.input_size, device=device))


def _removal(dm: DecoupledModel, removed: Mapping[str, Sequence[int]], dg: tp.DependencyGraph) -> list[_Step]:
    """What removing the given original filter indices of each gated layer does to each module.

    The groups are read from ``dg`` (built on ``dm.model``, which is not changed); every index is
    an original one, so the removals of all groups can be applied at once, to ``dm`` or to any
    copy of it (:func:`_apply_removal`): one trace serves every record of the network.
    """
    convs = _gated_convs(dm.model, dm.site_names)
    names = {m: n for n, m in dm.model.named_modules()}
    params = {p: n for n, p in dm.model.named_parameters()}
    steps: dict[tuple[str, Any], _Step] = {}
    done: set[str] = set()
    for name in dm.site_names:
        idxs = sorted(int(i) for i in removed.get(name, ()))
        if name in done or not idxs:
            continue
        conv = dm.model.get_submodule(name).conv
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
        for dep, dep_idxs in group:
            target = dep.target.module
            other = convs.get(target)
            if other is not None and dg.is_out_channel_pruning_fn(dep.handler):
                if other != name and sorted(int(i) for i in dep_idxs) != sorted(int(i) for i in removed.get(other, ())):
                    raise StatsMismatchError(
                        f"{name} and {other} share channels but the record removes different ones from them."
                    )
                done.add(other)
            where = names.get(target) if isinstance(target, nn.Module) else params.get(target)
            if where is None:  # an op of the trace (reshape, concat, ...): nothing of the model to change
                continue
            step = steps.setdefault((where, dep.handler), _Step(where, dep.handler, dep.target.pruning_dim, isinstance(target, nn.Parameter)))
            step.idxs.update(_plain_idxs(dep_idxs))
        done.add(name)
    return list(steps.values())


@dataclass
class _Step:
    """One torch-pruning handler on one module (or unwrapped parameter) of the model, by name."""

    name: str
    handler: Any
    dim: int
    parameter: bool
    idxs: set[int] = field(default_factory=set)


def _plain_idxs(idxs: Sequence[Any]) -> list[int]:
    # torch-pruning's hybrid indices carry the root index beside the plain one
    return [int(getattr(i, "idx", i)) for i in idxs]


def _apply_removal(model: nn.Module, steps: Sequence[_Step]) -> None:
    """Applies :func:`_removal`'s steps to ``model`` (``dm.model`` or a deep copy of it), in place."""
    for step in steps:
        step.handler.__self__.pruning_dim = step.dim  # as torch-pruning's Dependency.__call__ does
        idxs = sorted(step.idxs)
        if step.parameter:
            parent, _, leaf = step.name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, step.handler(getattr(owner, leaf), idxs))
        else:
            step.handler(model.get_submodule(step.name), idxs)


def apply_record(
    dm: DecoupledModel, record: PruneRecord, *, inplace: bool = False, dg: tp.DependencyGraph | None = None
) -> CompactModel:
    """Applies a :class:`PruneRecord` to a decoupled model of the same architecture.

    This is the structural half of :func:`prune` (and what :func:`nd_plugin.load` uses to rebuild
    an exported model before loading its weights).

    Args:
        dm: the decoupled model (unpruned).
        record: which filters to keep and which gates to drop.
        inplace: modify ``dm`` rather than a copy.
        dg: torch-pruning's graph of ``dm`` (:meth:`~nd_plugin.DecoupledModel.dependency_graph`,
            eval mode), traced when omitted. ``dm`` is not traced again: the removal read from its
            graph is applied to the copy, so one graph serves every record of ``dm``.

    Returns:
        The compact model, in eval mode.

    Example:
        >>> import copy
        >>> record = PruneRecord.from_dict(nd_plugin.prune(dm, stats).record.to_dict())  # as a manifest stores it
        >>> again = apply_record(copy.deepcopy(dm), record)
        >>> torch.allclose(again(x), compact(x), atol=1e-5)
        True
    """
    if dm.site_names != record.sites or any(s.channels != record.original_channels[s.name] for s in dm.gate_sites):
        raise StatsMismatchError(
            "the prune record was made for other gated layers than this model has; rebuild the model "
            "with the same architecture and `sites` as the run."
        )
    steps = _removal(dm, {s: record.removed(s) for s in record.sites}, graph_of(dm, dg))
    dm = dm if inplace else copy.deepcopy(dm)
    was_grad = [p.requires_grad for p in dm.parameters()]
    _apply_removal(dm.model, steps)
    for p, g in zip(dm.parameters(), was_grad):
        p.requires_grad_(g)
    static = set(record.static)
    for name in static:
        site: GatedSite = dm.model.get_submodule(name)
        _set_submodule(dm.model, name, FixedSite(site.conv, site.norm))
    infos = [
        dataclasses.replace(info, channels=len(record.kept[info.name]))
        for info in dm.gate_sites
        if info.name not in static
    ]
    compact = CompactModel(dm.model, infos, dm.input_size, record)
    return compact.eval()


def prune(
    dm: DecoupledModel,
    stats: PathStats,
    tolerance: float = 0.0,
    *,
    inplace: bool = False,
    dg: tp.DependencyGraph | None = None,
) -> CompactModel:
    """Removes silent filters for good, drops energetic gates, keeps dynamic gates.

    Channels are scored with :class:`DecouplingImportance` on torch-pruning DependencyGraph groups
    (so a channel shared by several layers goes only when it is silent in all of them) and removed
    group by group with ``Group.prune``, which also trims the gate's ``fc2`` rows and, where a gated
    conv's input shrinks, its ACM's ``fc1`` columns. A layer never loses all its filters: when a
    whole group is silent its most frequent channel stays (its gate stays, and stays off).

    Args:
        dm: the decoupled model (left untouched unless ``inplace``).
        stats: its path statistics (``dm.paths(val_loader)``; the run's ``paths.npz``).
        tolerance: a filter on for at most this fraction of inputs counts as silent, one on for at
            least ``1 - tolerance`` as energetic. 0 (the default) keeps the function exact on the
            inputs of ``stats``.
        inplace: modify ``dm`` instead of a deep copy.
        dg: torch-pruning's graph of ``dm`` (traced when omitted); one trace serves both the
            decision and the removal.

    Returns:
        The :class:`CompactModel` (eval mode); ``.record`` says what was removed.

    Raises:
        ConfigError: ``tolerance`` outside ``[0, 1)``.
        StatsMismatchError: ``stats`` were collected on another model.

    Example:
        >>> stats = dm.paths(val_loader)
        >>> compact = nd_plugin.prune(dm, stats)
        >>> summary = compact.record.summary()
        >>> summary["filters"], summary["removed"] > 0, summary["dynamic"] > 0
        (336, True, True)
    """
    tolerance = check_tolerance(tolerance)
    check_stats(stats, dm.site_names, [s.channels for s in dm.gate_sites])
    dg = graph_of(dm, dg)
    record = plan_record(dm, stats, tolerance, dg=dg)
    return apply_record(dm, record, inplace=inplace, dg=dg)


def _group_removal(
    dm: DecoupledModel, stats: PathStats, dg: tp.DependencyGraph, choose: Callable[[torch.Tensor], set[int]]
) -> tuple[dict[str, list[int]], list[list[str]]]:
    """Original filter indices to remove per gated layer, decided group by group.

    ``choose`` maps a group's :class:`DecouplingImportance` score (on-frequency per root channel)
    to the root channels to remove; every gated conv of the group loses the matching channels.
    Also returns the gated layers of each coupled group (a layer alone unless channels are shared).
    """
    imp = DecouplingImportance(stats)
    convs = _gated_convs(dm.model, dm.site_names)
    removed: dict[str, list[int]] = {}
    groups: list[list[str]] = []
    for name in dm.site_names:
        if name in removed:
            continue
        conv = dm.model.get_submodule(name).conv
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        drop = choose(imp(group))
        members = []
        for i, (dep, dep_idxs) in enumerate(group):
            other = convs.get(dep.target.module)
            if other is None or not dg.is_out_channel_pruning_fn(dep.handler):
                continue
            roots = group[i].root_idxs
            removed[other] = sorted(int(d) for d, r in zip(dep_idxs, roots) if int(r) in drop)
            members.append(other)
        groups.append(sorted(set(members) | {name}, key=dm.site_names.index))
    return removed, groups


def check_round_to(round_to: int) -> int:
    """Returns ``round_to`` as an int, or raises ConfigError unless it is a positive integer."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to must be a positive integer (channel block, e.g. 8 or 16), got {round_to!r}.", params=("round_to",))
    return round_to


def keep_count(frequency: torch.Tensor, threshold: float, round_to: int = 1) -> int:
    """How many channels a static layer keeps: those on more often than ``threshold``, rounded.

    The count is rounded to the nearest multiple of ``round_to`` (halves up), never below one block
    (or one channel) and never above the layer's width.

    Example:
        >>> keep_count(torch.tensor([0.0, 0.2, 0.6, 0.9, 1.0]), 0.5)
        3
        >>> keep_count(torch.tensor([0.9] * 13 + [0.1] * 3), 0.5, round_to=8)
        16
        >>> keep_count(torch.tensor([0.9] * 11 + [0.1] * 5), 0.5, round_to=8)
        8
    """
    width = frequency.numel()
    n = int((frequency > threshold).sum())
    if round_to > 1:
        n = int((n + round_to // 2) // round_to * round_to)
        n = max(n, min(round_to, width))
    return min(max(n, 1), width)


def static_record(
    dm: DecoupledModel,
    stats: PathStats,
    *,
    threshold: float = 0.5,
    round_to: int = 1,
    dg: tp.DependencyGraph | None = None,
) -> PruneRecord:
    """A record with every gate dropped: the static compact model for engines that cannot skip.

    Each gated layer keeps its filters that were on for more than ``threshold`` of the inputs (the
    most frequently on first, rounded to ``round_to`` channels, e.g. 8 or 16 for the engine's
    blocks) and computes them for every input. With ``threshold=0.5`` each kept or removed filter
    agrees with the gated model on most inputs; silent filters always go, energetic ones always stay.

    Args:
        dm: the decoupled model.
        stats: its path statistics.
        threshold: on-frequency a filter must exceed to be kept, in ``[0, 1)``.
        round_to: channel block of the kept counts.
        dg: a dependency graph already built on ``dm.model``.

    Returns:
        A :class:`PruneRecord` whose ``static`` lists every gated layer (``tolerance`` holds the threshold).

    Example:
        >>> record = static_record(dm, stats, round_to=8)
        >>> record.dynamic, sorted({len(k) % 8 for k in record.kept.values()})
        ([], [0])
    """
    threshold = check_tolerance(threshold, upper=1.0)
    round_to = check_round_to(round_to)
    check_stats(stats, dm.site_names, [s.channels for s in dm.gate_sites])
    dg = graph_of(dm, dg)

    def weakest(score: torch.Tensor) -> set[int]:
        order = sorted(range(score.numel()), key=lambda i: (-float(score[i]), i))
        return set(order[keep_count(score, threshold, round_to) :])

    removed, _ = _group_removal(dm, stats, dg, weakest)
    return PruneRecord(
        tolerance=threshold,
        sites=list(dm.site_names),
        original_channels={s.name: s.channels for s in dm.gate_sites},
        kept={name: [i for i in range(dm.gate_sites[k].channels) if i not in set(removed.get(name, ()))] for k, name in enumerate(dm.site_names)},
        static=list(dm.site_names),
        reduction=_infer_reduction(dm),
    )


def coupled_sites(dm: DecoupledModel, stats: PathStats, *, dg: tp.DependencyGraph | None = None) -> list[list[str]]:
    """Gated layers that share channels (torch-pruning groups), each list in path order.

    A per-layer deployment decision must treat each list as one unit.
    """
    _, groups = _group_removal(dm, stats, graph_of(dm, dg), lambda score: set())
    return groups


def mix_records(dynamic: PruneRecord, static: PruneRecord, static_sites: Sequence[str]) -> PruneRecord:
    """Takes the ``static_sites`` from ``static`` and every other gated layer from ``dynamic``.

    Both records must be of the same model; a coupled group must be wholly in ``static_sites`` or
    wholly out of it (see :func:`coupled_sites`).
    """
    if dynamic.sites != static.sites or dynamic.original_channels != static.original_channels:
        raise StatsMismatchError("the two prune records describe different gated layers; make both from one model.")
    chosen = set(static_sites)
    unknown = chosen - set(dynamic.sites)
    if unknown:
        raise ConfigError(f"static_sites names layers the model does not gate: {sorted(unknown)}.")
    kept = {s: list(static.kept[s] if s in chosen else dynamic.kept[s]) for s in dynamic.sites}
    statics = [s for s in dynamic.sites if s in chosen or s in set(dynamic.static)]
    return dataclasses.replace(dynamic, kept=kept, static=statics)


def graph_of(dm: DecoupledModel, dg: tp.DependencyGraph | None = None) -> tp.DependencyGraph:
    """torch-pruning's graph of ``dm``: ``dg`` when given, otherwise traced (``dm``'s train/eval mode kept)."""
    if dg is not None:
        return dg
    with eval_mode(dm):
        return _graph(dm)


def plan_record(
    dm: DecoupledModel, stats: PathStats, tolerance: float = 0.0, *, dg: tp.DependencyGraph | None = None
) -> PruneRecord:
    """Decides, without changing ``dm``, which filters :func:`prune` removes and which gates it drops.

    Args:
        dm: the decoupled model.
        stats: its path statistics.
        tolerance: see :func:`prune`.
        dg: a dependency graph already built on ``dm.model``.

    Returns:
        The :class:`PruneRecord`.
    """
    tolerance = check_tolerance(tolerance)
    check_stats(stats, dm.site_names, [s.channels for s in dm.gate_sites])
    dg = graph_of(dm, dg)
    def silent(score: torch.Tensor) -> set[int]:
        drop = (score <= tolerance).nonzero().flatten()
        if drop.numel() == score.numel():  # a layer keeps at least one filter
            drop = drop[drop != int(torch.argmax(score))]
        return set(drop.tolist())

    removed, _ = _group_removal(dm, stats, dg, silent)
    counts = {name: stats.counts[stats.layer_slice(name)] for name in dm.site_names}
    kept = {name: [i for i in range(len(counts[name])) if i not in set(removed.get(name, ()))] for name in dm.site_names}
    energetic_at = (1.0 - tolerance) * stats.n
    static = [name for name in dm.site_names if bool(np.all(counts[name][kept[name]] >= energetic_at))]
    return PruneRecord(
        tolerance=tolerance,
        sites=list(dm.site_names),
        original_channels={s.name: s.channels for s in dm.gate_sites},
        kept=kept,
        static=static,
        reduction=_infer_reduction(dm),
    )
