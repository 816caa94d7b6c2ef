"""The *dynamic value*: what input-dependent gating buys over a static network of the same FLOPs.

For a decoupled model and its path statistics,

    dynamic value = top-1(gated model) − top-1(static network of the same FLOPs)

where the static network drops every gate and keeps, in each gated layer, its most-often-on
filters for every input, as many as make its FLOPs equal the gated model's *expected* FLOPs per
input. A positive value says the per-input choice of filters is worth something; a value near 0
says a static pruning of the same cost does as well (METHOD.md §4).

How the static network is chosen (:func:`match_static`):

- every gated filter is ranked by its on-frequency in ``stats`` (the most often on first; ties by
  layer, then filter index); each layer's most frequent filter is always kept, so no layer goes
  empty;
- the number ``k`` of filters kept from the top of that ranking is bisected until the static FLOPs
  are closest to the target (the gated model's expected FLOPs): one filter is the step, so the
  two match to a fraction of one filter's cost. Keeping the top ``k`` is the same as a global
  on-frequency threshold, with ties split.

:func:`~nd_plugin.pruning.static_match.match_accuracy` gives the static network the gated model's
*top-1* instead: the fewest filters (by on-frequency) that do as well, the model a deployment must
beat to keep a gate.

How it is evaluated (:func:`fixed_gates`): the static network *is* the gated network with every
gate fixed to 1 for a kept filter and 0 for a removed one. The gate multiplies the output of the
layer's norm, so a fixed 1 is the filter computed for every input (its BatchNorm as trained) and a
fixed 0 is the filter not computed at all: hooking the gates gives the static network's outputs
exactly, without torch-pruning. Its FLOPs are the fvcore counts of the network without ACMs, each
gated conv (and norm) scaled by its kept share of filters and each conv that reads a gated layer's
channels directly (a *narrow* consumer, :mod:`nd_plugin.pruning.plan`) by the kept share of its
input channels — the same counting :func:`nd_plugin.flops.expected_flops` does for the gated
model, here with one fixed path. That is what fvcore counts on the structurally pruned model but
for one thing: fvcore's one FLOP per element of a global average pool, which is not scaled (the
pool over a removed channel's zeros stays counted: 0.15-0.35% of the FLOPs on the small test nets).

The gated model's expected FLOPs are those of the exact compact model (silent filters removed,
all-energetic layers without gate, ACMs of the other layers included): ``compact_expected`` of
``summary.json``. The static network gets that whole budget, ACM cost included.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nd_plugin._hooks import HookOwner
from nd_plugin.decoupled import DecoupledModel
from nd_plugin.paths import PathStats
from nd_plugin.utilities import eval_mode

if TYPE_CHECKING:
    from nd_plugin.pruning.plan import DynamicPlan

__all__ = ["DynamicValue", "StaticFlops", "dynamic_value", "fixed_gates", "match_static", "static_ranking"]

_ACM = re.compile(r"(^|\.)acm(\.|$)")


class _FixedGates(HookOwner):
    def __init__(self, dm: DecoupledModel, keep: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.targets = [(site.gate, keep[name]) for name, site in zip(dm.site_names, dm.sites())]

    def register(self) -> None:
        for module, mask in self.targets:
            self.keep(module.register_forward_hook(_replace_with(mask)))


def _replace_with(mask: torch.Tensor):
    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return mask.to(device=output.device, dtype=output.dtype).expand_as(output)

    return hook


def _split_keep(dm: DecoupledModel, keep: np.ndarray | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if isinstance(keep, Mapping):
        missing, unknown = sorted(set(dm.site_names) - set(keep)), sorted(set(keep) - set(dm.site_names))
        if missing or unknown:
            raise ValueError(f"keep must name every gated layer and no other: missing {missing}, not gated {unknown}")
        out = {name: torch.as_tensor(np.asarray(keep[name], dtype=np.float32)) for name in dm.site_names}
    else:
        flat = np.asarray(keep, dtype=np.float32)
        if flat.shape != (dm.num_filters,):
            raise ValueError(f"keep must have one entry per gated filter ({dm.num_filters}), got shape {flat.shape}")
        bounds = np.cumsum([0] + [s.channels for s in dm.gate_sites])
        out = {name: torch.from_numpy(flat[bounds[i] : bounds[i + 1]].copy()) for i, name in enumerate(dm.site_names)}
    for info in dm.gate_sites:
        if out[info.name].shape != (info.channels,):
            raise ValueError(f"keep[{info.name!r}] must have {info.channels} entries, got {tuple(out[info.name].shape)}")
    return out


@contextlib.contextmanager
def fixed_gates(dm: DecoupledModel, keep: np.ndarray | Mapping[str, Any]) -> Iterator[DecoupledModel]:
    """Context in which every gate of ``dm`` is a fixed 0/1 vector: ``dm`` is a static network.

    Args:
        dm: the decoupled model.
        keep: ``(F,)`` booleans over the whole path (layers in path order), or ``{layer: (C,)}``;
            1 keeps a filter for every input, 0 removes it.

    Example:
        >>> keep = np.ones(dm.num_filters, dtype=bool)
        >>> with fixed_gates(dm, keep), torch.no_grad():
        ...     static = dm(x)
        >>> with dm.gates_open(), torch.no_grad():
        ...     torch.equal(static, dm(x))
        True
    """
    with _FixedGates(dm, _split_keep(dm, keep)):
        yield dm


def static_ranking(stats: PathStats) -> tuple[np.ndarray, np.ndarray]:
    """The order in which a static network of growing FLOPs keeps the gated filters.

    Returns:
        ``(always, order)``: flat indices of each layer's most often on filter (kept whatever the
        budget), and every other filter, the most often on first (ties: layer order, then index).

    Example:
        >>> always, order = static_ranking(stats)
        >>> len(always) + len(order) == stats.num_filters
        True
    """
    freq = np.asarray(stats.frequency(), dtype=np.float64)
    layer = np.concatenate([np.full(c, i) for i, c in enumerate(stats.site_channels)] or [np.zeros(0, int)])
    always = np.array([stats.layer_slice(i).start + int(np.argmax(freq[stats.layer_slice(i)])) for i in range(len(stats.site_names))], dtype=np.int64)
    rest = np.setdiff1d(np.arange(stats.num_filters), always)
    rest = rest[np.lexsort((rest, layer[rest], -freq[rest]))]
    return always, rest


class StaticFlops:
    """FLOPs per input of ``dm`` as a static network with a fixed set of kept filters.

    fvcore counts the model once (without its ACMs) and the plan of which convs read which gated
    layer's channels is traced once; each call then only rescales, so a bisection is cheap.

    Args:
        dm: the decoupled model.
        plan: the :class:`~nd_plugin.pruning.plan.DynamicPlan` of ``dm``'s gated layers
            (``analyse(dm.model, dm.site_names, dm.input_size)``), traced when omitted.

    Example:
        >>> counter = StaticFlops(dm)
        >>> counter(np.ones(dm.num_filters, dtype=bool)) == counter.dense
        True
    """

    def __init__(self, dm: DecoupledModel, plan: DynamicPlan | None = None) -> None:
        from nd_plugin.flops import flops_by_module
        from nd_plugin.pruning.plan import analyse

        self.dm = dm
        counts = dict(flops_by_module(dm, dm.input_size))
        acm = sum(v for k, v in counts.items() if k.endswith(".acm"))
        self.counts = {k: (0 if _ACM.search(k) else v) for k, v in counts.items()}
        self.counts[""] = counts[""] - acm
        self.dense = int(self.counts[""])  #: every filter kept, no ACM: the original network
        self.plan = plan.restricted(dm.site_names) if plan is not None else analyse(dm.model, dm.site_names, dm.input_size)

    def __call__(self, keep: np.ndarray) -> float:
        """FLOPs of the static network that keeps the filters where ``keep`` (``(F,)``) is true."""
        from nd_plugin.flops import expected_flops

        keep = np.asarray(keep, dtype=bool)
        path = PathStats(
            site_names=list(self.dm.site_names),
            site_channels=[s.channels for s in self.dm.gate_sites],
            n=1,
            counts=keep.astype(np.int64),
            class_counts=keep.astype(np.int64)[None],
            class_n=np.ones(1, dtype=np.int64),
            paths=keep[None],
        )
        return expected_flops(self.dm, path, by_module=self.counts, plan=self.plan).total


def match_static(
    dm: DecoupledModel, stats: PathStats, target: float, *, counter: StaticFlops | None = None
) -> tuple[np.ndarray, float]:
    """The static network whose FLOPs are closest to ``target``: its kept filters and its FLOPs.

    Args:
        dm: the decoupled model.
        stats: path statistics that rank the filters (:func:`static_ranking`).
        target: FLOPs per input to match (the gated model's expected FLOPs).
        counter: a :class:`StaticFlops` of ``dm`` already built.

    Returns:
        ``(keep, flops)``: ``(F,)`` booleans over the path and the static network's FLOPs. When the
        target is below the smallest static network (one filter per layer) or above the dense
        one, the nearest end is returned.
    """
    counter = counter if counter is not None else StaticFlops(dm)
    always, order = static_ranking(stats)

    def keep_top(k: int) -> np.ndarray:
        keep = np.zeros(stats.num_filters, dtype=bool)
        keep[always] = True
        keep[order[:k]] = True
        return keep

    cache: dict[int, float] = {}

    def flops(k: int) -> float:
        if k not in cache:
            cache[k] = counter(keep_top(k))
        return cache[k]

    lo, hi = 0, len(order)  # smallest k with flops(k) >= target lies in [lo, hi]
    if flops(hi) < target:
        return keep_top(hi), flops(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if flops(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    k = lo
    if k > 0 and abs(flops(k - 1) - target) <= abs(flops(k) - target):
        k -= 1
    return keep_top(k), flops(k)


@dataclass
class DynamicValue:
    """The gated model against the static network of the same FLOPs, on one data set.

    Attributes:
        gated_top1: top-1 of the gated model.
        static_top1: top-1 of the static network (every gate dropped, most-often-on filters kept).
        inputs: inputs both were evaluated on.
        dynamic_share: fraction of the gated filters that are dynamic in ``stats`` (on for some
            inputs, off for others).
        gated_flops: expected FLOPs per input of the gated model (the exact compact model).
        static_flops: FLOPs per input of the static network.
        dense_flops: FLOPs of the original network (every filter, no gate).
        threshold: on-frequency of the least often on filter the static network keeps (not counting
            each layer's most frequent filter, kept whatever its frequency; None when only those are kept).
        kept: per gated layer, filters the static network keeps.
        channels: per gated layer, its filters.
        stats_inputs: inputs the ranking statistics were collected on.
        agreement: share of the inputs on which both predict the same class (a value of 0 from
            identical predictions reads differently from one where errors cancel).
    """

    gated_top1: float
    static_top1: float
    inputs: int
    dynamic_share: float
    gated_flops: float
    static_flops: float
    dense_flops: int
    threshold: float | None
    kept: dict[str, int] = field(default_factory=dict)
    channels: dict[str, int] = field(default_factory=dict)
    stats_inputs: int = 0
    agreement: float | None = None

    @property
    def value(self) -> float:
        """``gated_top1 − static_top1`` (a fraction; ×100 for points)."""
        return self.gated_top1 - self.static_top1

    @property
    def flops_mismatch(self) -> float:
        """``static_flops / gated_flops − 1``: how far the match is from exact."""
        return self.static_flops / max(self.gated_flops, 1e-12) - 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary (for ``prune.json`` and ``summary.json``), ``value`` included."""
        return {"value": self.value, "flops_mismatch": self.flops_mismatch, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DynamicValue:
        """Inverse of :meth:`to_dict` (the derived ``value`` and ``flops_mismatch`` are recomputed)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def __str__(self) -> str:
        return describe(self.to_dict())


def describe(d: Mapping[str, Any]) -> str:
    """One line for a :meth:`DynamicValue.to_dict`: value in points, both top-1s, FLOPs, agreement, dynamic share.

    Example:
        >>> describe({"value": 0.0125, "gated_top1": 0.9, "static_top1": 0.8875, "inputs": 400,
        ...           "gated_flops": 2e6, "static_flops": 2.01e6, "dynamic_share": 0.2})
        '+1.25 points (gated 90.00% vs static 88.75% at 2.00M vs 2.01M FLOPs, 400 inputs); dynamic share 20.0%'
    """
    from nd_plugin.flops import format_si as si

    same = f", same prediction on {d['agreement']:.1%}" if d.get("agreement") is not None else ""
    return (
        f"{100 * d['value']:+.2f} points (gated {d['gated_top1']:.2%} vs static {d['static_top1']:.2%} at "
        f"{si(d['gated_flops'])} vs {si(d['static_flops'])} FLOPs, {d['inputs']} inputs{same}); "
        f"dynamic share {d['dynamic_share']:.1%}"
    )


def dynamic_share(stats: PathStats) -> float:
    """Fraction of the gated filters that are on for some inputs of ``stats`` and off for others
    (:func:`nd_plugin.interpret.filter_states`' dynamic share, the paper's definition)."""
    from nd_plugin.interpret.states import filter_states

    return filter_states(stats).shares["dynamic"]


@torch.no_grad()
def dynamic_value(
    dm: DecoupledModel,
    stats: PathStats,
    loader: Iterable,
    *,
    gated_flops: float | None = None,
    counter: StaticFlops | None = None,
) -> DynamicValue:
    """Top-1 of the gated model minus top-1 of the static network with the same FLOPs.

    Args:
        dm: the decoupled model (evaluated in eval mode, on its own device; left as it was).
        stats: its path statistics: they rank the filters and give the dynamic share (a run's
            ``paths.npz``: the validation split).
        loader: ``(inputs, labels)`` batches both networks are evaluated on (the whole validation
            split for the number the commands record).
        gated_flops: the gated model's expected FLOPs per input (``compact_expected``), when
            already counted; otherwise ``expected_flops(prune(dm, stats), stats)`` is computed.
        counter: a :class:`StaticFlops` of ``dm`` already built.

    Returns:
        The :class:`DynamicValue`; nothing is written.

    Example:
        >>> dv = dynamic_value(dm, stats, val_loader)
        >>> round(dv.value, 4) == round(dv.gated_top1 - dv.static_top1, 4), abs(dv.flops_mismatch) < 0.01
        (True, True)
    """
    from nd_plugin.pruning.structural import check_stats

    check_stats(stats, dm.site_names, [s.channels for s in dm.gate_sites])
    if gated_flops is None:
        from nd_plugin.flops import expected_flops
        from nd_plugin.pruning.structural import prune

        gated_flops = expected_flops(prune(dm, stats), stats).total
    counter = counter if counter is not None else StaticFlops(dm)
    keep, static_flops = match_static(dm, stats, float(gated_flops), counter=counter)
    masks = _split_keep(dm, keep)
    device = next(dm.parameters()).device
    gated = static = same = total = 0
    with eval_mode(dm):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            pred = dm(x).argmax(1)
            with _FixedGates(dm, masks):
                pred_static = dm(x).argmax(1)
            gated += int((pred == y).sum())
            static += int((pred_static == y).sum())
            same += int((pred == pred_static).sum())
            total += len(y)
    freq = stats.frequency()
    ranked = keep.copy()
    ranked[static_ranking(stats)[0]] = False  # the one filter per layer kept whatever its frequency
    return DynamicValue(
        gated_top1=gated / max(total, 1),
        static_top1=static / max(total, 1),
        inputs=total,
        dynamic_share=dynamic_share(stats),
        gated_flops=float(gated_flops),
        static_flops=float(static_flops),
        dense_flops=counter.dense,
        threshold=float(freq[ranked].min()) if ranked.any() else None,
        kept={name: int(m.sum()) for name, m in masks.items()},
        channels={s.name: s.channels for s in dm.gate_sites},
        stats_inputs=int(stats.n),
        agreement=same / max(total, 1),
    )
