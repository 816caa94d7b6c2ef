"""Per-layer deployment decision: skip filters at run time only where it pays, by measured cost.

A dynamic layer's gate saves the filters it turns off, but costs its ACM, the weight gather and,
at the small inputs where PyTorch's CPU conv runs through im2col, saves less than the FLOPs say.
:func:`plan_deployment` measures, per gated layer on the engine at hand (eager torch, batch 1):

- the *dynamic* unit: the layer in the :func:`~nd_plugin.pruning.dynamic_runtime` (ACM, active
  filters only) plus the layers that read its channels (narrow inputs);
- the *static* unit: the same layers in the static compact model, where the gate is dropped and
  the filters on for more than half of the inputs stay for every input
  (:func:`~nd_plugin.pruning.static_record`), or those of a static model given, such as the one
  with the gated model's top-1 (:func:`~nd_plugin.pruning.match_accuracy`: where the network
  needs its paths, wider than the one of its FLOPs);

and keeps the gate only where the dynamic unit is faster. Coupled layers (shared channels) are
decided together. The result is a :class:`DeployPlan`: the mixed record for the eager runtime,
the static record for engines that cannot skip per input, and one :class:`LayerDecision` per
layer saying what was chosen and why.

Example:
    >>> plan = plan_deployment(dm, stats, x[:4], repeats=2)
    >>> {d.mode for d in plan.decisions} <= {"dynamic", "static"}
    True
    >>> plan.decisions[0].site
    'layer1.0.conv1'
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from nd_plugin._hooks import HookOwner
from nd_plugin.decoupled import DecoupledModel
from nd_plugin.errors import ConfigError
from nd_plugin.paths import PathStats
from nd_plugin.pruning.plan import DynamicPlan, analyse
from nd_plugin.pruning.runtime import DynamicRuntime, dynamic_runtime
from nd_plugin.pruning.static_match import check_match_tolerance, within
from nd_plugin.pruning.structural import (
    PruneRecord,
    apply_record,
    coupled_sites,
    graph_of,
    mix_records,
    plan_record,
    static_record,
)
from nd_plugin.utilities import accuracy, eval_mode

__all__ = ["DeployPlan", "LayerDecision", "UnitTimer", "plan_deployment"]


@dataclass
class LayerDecision:
    """How one gated layer is deployed in the eager runtime.

    Attributes:
        site: the gated layer.
        mode: ``"dynamic"`` (gate kept, inactive filters skipped) or ``"static"`` (gate dropped).
        dynamic_ms: median batch-1 time of its dynamic unit (None when there was no gate left to time).
        static_ms: median batch-1 time of its static unit.
        kept_dynamic: filters the dynamic layer keeps (silent ones removed).
        kept_static: filters the static layer keeps.
        reason: why, in words.
        top1: top-1 on the guard inputs of the compact model with this layer (and those made
            static before it) static, where that was measured (:func:`plan_deployment`'s ``guard``).
    """

    site: str
    mode: str
    dynamic_ms: float | None
    static_ms: float
    kept_dynamic: int
    kept_static: int
    reason: str
    top1: float | None = None


@dataclass
class DeployPlan:
    """What :func:`plan_deployment` decided.

    Attributes:
        record: the eager runtime's record (decided layers static, the others dynamic).
        static: the fully static record (ONNX, ``torch.export``: engines that cannot skip per input).
        decisions: one :class:`LayerDecision` per gated layer, in path order.
        threads: CPU threads the units were timed with.
        gated_top1: the gated model's top-1 on the guard inputs (None when no trial ran: no guard,
            or no layer whose static unit was faster).
        top1: top-1 of the decided compact model on the guard inputs (None when no trial ran).
        guard_inputs: images in the guard (0 when no trial ran).
        match_tolerance: top-1 the decided model could lose against the gated one.
    """

    record: PruneRecord
    static: PruneRecord
    decisions: list[LayerDecision] = field(default_factory=list)
    threads: int = 1
    gated_top1: float | None = None
    top1: float | None = None
    guard_inputs: int = 0
    match_tolerance: float = 0.003

    @property
    def dynamic_sites(self) -> list[str]:
        """Layers that keep their gate."""
        return [d.site for d in self.decisions if d.mode == "dynamic"]

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary (for ``prune.json``)."""
        return {
            "threads": self.threads,
            "dynamic_sites": self.dynamic_sites,
            "gated_top1": self.gated_top1,
            "top1": self.top1,
            "guard_inputs": self.guard_inputs,
            "match_tolerance": self.match_tolerance,
            "decisions": [asdict(d) for d in self.decisions],
        }


class UnitTimer(HookOwner):
    """Times groups ("units") of submodules of one model during the ``with`` block.

    Each forward call of a listed module adds its wall time to its unit's running total; call
    :meth:`lap` after each model call to close one sample. Units must not nest.

    Args:
        model: the model the module names refer to.
        units: unit name -> module names.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with UnitTimer(net, {"first": ["0"], "rest": ["1", "2"]}) as timer:
        ...     for _ in range(3):
        ...         _ = net(torch.randn(1, 4))
        ...         timer.lap()
        >>> sorted(timer.medians()), len(timer.samples["first"])
        (['first', 'rest'], 3)
    """

    def __init__(self, model: nn.Module, units: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.model = model
        self.units = {u: list(names) for u, names in units.items()}
        self.samples: dict[str, list[float]] = {u: [] for u in self.units}
        self._current: dict[str, float] = dict.fromkeys(self.units, 0.0)
        self._start: dict[int, float] = {}

    def register(self) -> None:
        for unit, names in self.units.items():
            for name in names:
                module = self.model.get_submodule(name)
                self.keep(module.register_forward_pre_hook(self._pre))
                self.keep(module.register_forward_hook(self._post(unit)))

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _post(self, unit: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._current[unit] += time.perf_counter() - self._start.pop(id(module))

        return hook

    def reset(self) -> None:
        """Drops the samples taken so far (after a warm-up)."""
        self.samples = {u: [] for u in self.units}
        self._current = dict.fromkeys(self.units, 0.0)

    def lap(self) -> None:
        """Closes one sample of every unit."""
        for unit, total in self._current.items():
            self.samples[unit].append(total)
        self._current = dict.fromkeys(self.units, 0.0)

    def medians(self) -> dict[str, float]:
        """Median seconds per unit over the samples."""
        return {u: statistics.median(s) if s else 0.0 for u, s in self.samples.items()}


def _units(runtime: DynamicRuntime, groups: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    """Each coupled group's layers plus the plain layers that read their channels."""
    sites = {s for g in groups for s in g}
    units = {}
    for group in groups:
        names = list(group)
        for site in group:
            site_plan = runtime.plan.sites.get(site)
            for consumer in site_plan.consumers if site_plan is not None else ():
                owner = consumer.name.removesuffix(".conv")
                if owner not in sites and consumer.name not in names:
                    names.append(consumer.name)
        units[group[0]] = names
    return units


@torch.no_grad()
def _time_pair(
    models: Sequence[nn.Module], units: Mapping[str, Sequence[str]], inputs: Sequence[torch.Tensor], repeats: int
) -> list[dict[str, float]]:
    with contextlib.ExitStack() as stack:
        timers = [stack.enter_context(UnitTimer(m.model, units)) for m in models]
        for x in inputs[:2]:  # warm-up: caches fill, kernels are chosen
            for m in models:
                m(x)
        for t in timers:
            t.reset()
        for i in range(repeats):
            x = inputs[i % len(inputs)]
            for m, t in zip(models, timers):
                m(x)
                t.lap()
        return [t.medians() for t in timers]


def plan_deployment(
    dm: DecoupledModel,
    stats: PathStats,
    inputs: torch.Tensor,
    *,
    tolerance: float = 0.0,
    threshold: float = 0.5,
    round_to: int = 1,
    repeats: int = 20,
    margin: float = 0.0,
    dg: tp.DependencyGraph | None = None,
    plan: DynamicPlan | None = None,
    static: PruneRecord | None = None,
    guard: Iterable | None = None,
    match_tolerance: float = 0.003,
    gated_top1: float | None = None,
) -> DeployPlan:
    """Decides, per gated layer, whether the eager runtime keeps its gate, by measured batch-1 cost.

    Args:
        dm: the decoupled model.
        stats: its path statistics.
        inputs: real inputs ``(N, C, H, W)``; each is timed at batch 1.
        tolerance: the dynamic record's tolerance (see :func:`~nd_plugin.prune`).
        threshold: on-frequency above which a static layer keeps a filter (unused with ``static``).
        round_to: channel block of the static layers (unused with ``static``).
        repeats: timed batch-1 calls per model (alternating dynamic and static).
        margin: a gate stays only when its unit is faster than the static one by this fraction.
        dg: torch-pruning's graph of ``dm`` (:meth:`~nd_plugin.DecoupledModel.dependency_graph`),
            traced when omitted; every record is planned and applied with it.
        plan: the :class:`~nd_plugin.pruning.plan.DynamicPlan` of ``dm``'s gated layers
            (:func:`~nd_plugin.pruning.plan.analyse`), traced when omitted; both runtimes use it.
        static: the static record each gated layer is timed against and the engines that cannot
            skip get (e.g. :func:`~nd_plugin.pruning.match_accuracy`'s, of the gated model's
            top-1); by default :func:`~nd_plugin.pruning.static_record` at ``threshold`` and
            ``round_to`` (about the gated model's FLOPs).
        guard: ``(inputs, labels)`` batches that keep the decision honest: the layers whose static
            unit is faster go static together if the compact model stays within
            ``match_tolerance`` of the gated model's top-1 on them (one evaluation); if not, one
            by one, each only if the model with it static (and the layers made static before it,
            the largest time saved first) stays within; otherwise it keeps its gate,
            the reason saying how many points the model would lose. A network that routes its
            inputs (issue 23) loses most of its accuracy when its gates are dropped: without a
            guard the decision looks at time alone.
        match_tolerance: top-1 the decided model may lose against the gated one, a fraction in ``[0, 1)``.
        gated_top1: the gated model's top-1 on ``guard``, when already measured.

    Returns:
        The :class:`DeployPlan`.

    Raises:
        ConfigError: ``match_tolerance`` outside ``[0, 1)``; a ``guard`` with no batch; a
            ``static`` record of other layers.
    """
    match_tolerance = check_match_tolerance(match_tolerance)
    batches = list(guard) if guard is not None else None
    if batches is not None and not batches:
        raise ConfigError("guard must hold at least one (inputs, labels) batch (None: decide by time alone).", params=("guard",))
    if static is not None and (static.sites != list(dm.site_names) or static.original_channels != {s.name: s.channels for s in dm.gate_sites}):
        raise ConfigError("static must be a record of this model's gated layers (static_record or match_accuracy of dm).", params=("static",))
    dg = graph_of(dm, dg)
    plan = plan if plan is not None else analyse(dm.model, dm.site_names, dm.input_size)
    dynamic = plan_record(dm, stats, tolerance, dg=dg)
    if static is None:
        static = static_record(dm, stats, threshold=threshold, round_to=round_to, dg=dg)
    groups = coupled_sites(dm, stats, dg=dg)
    rt_dynamic = dynamic_runtime(apply_record(dm, dynamic, dg=dg), plan=plan)
    rt_static = dynamic_runtime(apply_record(dm, static, dg=dg), plan=plan)
    gated = [g for g in groups if any(s not in set(dynamic.static) for s in g)]
    units = _units(rt_dynamic, gated)
    singles = [inputs[i : i + 1] for i in range(len(inputs))]
    t_dyn, t_stat = _time_pair([rt_dynamic, rt_static], units, singles, repeats) if units else ({}, {})
    decided: dict[str, LayerDecision] = {}
    slower: list[tuple[float, float, list[str]]] = []  # groups whose static unit is faster: (d, s, group)

    def decide(group: Sequence[str], mode: str, d: float | None, s: float, reason: str, top1: float | None = None) -> None:
        for site in group:
            n_dyn, n_stat = len(dynamic.kept[site]), len(static.kept[site])
            decided[site] = LayerDecision(site, mode, d, s, n_dyn, n_dyn if d is None else n_stat, reason, top1)

    for group in groups:
        head = group[0]
        if head not in units:
            decide(group, "static", None, 0.0, "every remaining filter energetic: no gate")
            continue
        d, s = t_dyn[head] * 1e3, t_stat[head] * 1e3
        if d < s * (1.0 - margin):
            decide(group, "dynamic", d, s, f"skipping pays: {d:.3f} ms gated vs {s:.3f} ms static")
        else:
            slower.append((d, s, list(group)))
    to_static: list[str] = []
    top1 = None
    if batches and slower:
        if gated_top1 is None:
            with eval_mode(dm):
                gated_top1 = accuracy(dm, batches)

        def top1_with(sites: list[str]) -> float:
            return accuracy(apply_record(dm, mix_records(dynamic, static, sites), dg=dg).eval(), batches)

        every = [site for _, _, group in slower for site in group]
        trial = top1_with(every)  # one evaluation where the static model keeps the accuracy (a network that does not route)
        if within(trial, gated_top1, match_tolerance):
            to_static, top1 = every, trial
            for d, s, group in slower:
                decide(group, "static", d, s, f"gate costs more than it saves: {d:.3f} ms gated vs {s:.3f} ms static; top-1 {trial:.2%}", trial)
            slower = []
        for d, s, group in sorted(slower, key=lambda t: t[1] - t[0]):  # layer by layer, the largest time saved first
            trial = top1_with(to_static + group)
            times = f"{d:.3f} ms gated vs {s:.3f} ms static"
            if within(trial, gated_top1, match_tolerance):
                to_static += group
                top1 = trial
                decide(group, "static", d, s, f"gate costs more than it saves: {times}; top-1 {trial:.2%}", trial)
            else:
                lost = 100 * (gated_top1 - trial)
                why = f"static here, the model loses {lost:.2f} points (top-1 {trial:.2%} vs gated {gated_top1:.2%}), though {times}"
                decide(group, "dynamic", d, s, why, trial)
        if top1 is None:  # every trial lost accuracy: the model with every gate kept
            top1 = accuracy(apply_record(dm, dynamic, dg=dg).eval(), batches)
    else:
        gated_top1 = None
        for d, s, group in slower:
            to_static += group
            decide(group, "static", d, s, f"gate costs more than it saves: {d:.3f} ms gated vs {s:.3f} ms static")
    return DeployPlan(
        mix_records(dynamic, static, to_static),
        static,
        [decided[site] for group in groups for site in group],
        torch.get_num_threads(),
        gated_top1=gated_top1,
        top1=top1,
        guard_inputs=sum(len(y) for _, y in batches) if gated_top1 is not None else 0,
        match_tolerance=match_tolerance,
    )
