"""The static compact model of a gated model's *top-1*: what a kept gate must beat (issue 23).

:func:`~nd_plugin.pruning.value.match_static` gives the static network (every gate dropped, the
most-often-on filters kept) the gated model's FLOPs, for the dynamic value. A deployment asks
another question: is skipping per input faster than the static layers that do *as well*? Where a
network needs its paths, that static model is wider than the one of the same FLOPs, or does not
exist. :func:`match_accuracy` finds it among :func:`~nd_plugin.pruning.static_record`'s models;
:func:`within` is the one comparison of top-1s with a tolerance that it and
:func:`~nd_plugin.pruning.deploy.plan_deployment`'s guard use.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nd_plugin.decoupled import DecoupledModel
from nd_plugin.errors import ConfigError
from nd_plugin.paths import PathStats
from nd_plugin.pruning.value import fixed_gates
from nd_plugin.utilities import accuracy, eval_mode

if TYPE_CHECKING:
    import torch_pruning as tp

    from nd_plugin.pruning.structural import PruneRecord

__all__ = ["AccuracyMatch", "check_match_tolerance", "match_accuracy", "within"]


def _record_masks(record: PruneRecord) -> dict[str, np.ndarray]:
    """``{layer: (C,) booleans}`` of the filters ``record`` keeps, for :func:`fixed_gates`."""
    out = {}
    for site in record.sites:
        mask = np.zeros(record.original_channels[site], dtype=bool)
        mask[list(record.kept[site])] = True
        out[site] = mask
    return out


def within(top1: float, reference: float, tolerance: float) -> bool:
    """Whether ``top1`` is at most ``tolerance`` below ``reference`` (all fractions; float noise allowed).

    Example:
        >>> within(0.897, 0.9, 0.003), within(0.896, 0.9, 0.003)
        (True, False)
    """
    return top1 >= reference - tolerance - 1e-12


def check_match_tolerance(tolerance: float) -> float:
    """Returns ``tolerance`` as a float, or raises ConfigError unless it is in ``[0, 1)``.

    Example:
        >>> check_match_tolerance(0.003)
        0.003
    """
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        raise ConfigError(f"match_tolerance must be a number in [0, 1), got {tolerance!r}.", params=("match_tolerance",)) from None
    if not 0.0 <= value < 1.0:
        raise ConfigError(
            f"match_tolerance must be in [0, 1) (top-1 the static model may lose against the gated one, "
            f"a fraction: 0.003 is 0.3 points), got {value}.",
            params=("match_tolerance",),
        )
    return value


@dataclass
class AccuracyMatch:
    """The static compact model with the gated model's top-1: what :func:`match_accuracy` found.

    Attributes:
        record: the static record (every gate dropped) of the match or, when none matches, of the
            static model with the best top-1 scanned (the highest threshold on a tie).
        threshold: on-frequency a filter must exceed to be kept
            (:func:`~nd_plugin.pruning.static_record`'s ``threshold``).
        top1: the static model's top-1 on the inputs.
        gated_top1: the gated model's top-1 on the same inputs.
        tolerance: top-1 the static model may lose and still match (a fraction).
        inputs: images both were evaluated on.
        tried: ``[threshold, top1]`` of each static model evaluated, in order.
    """

    record: PruneRecord
    threshold: float
    top1: float
    gated_top1: float
    tolerance: float
    inputs: int
    tried: list[list[float]] = field(default_factory=list)

    @property
    def matched(self) -> bool:
        """Whether the static model is within ``tolerance`` of the gated one."""
        return within(self.top1, self.gated_top1, self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dictionary (for ``prune.json``): the kept filters per layer, not the whole record."""
        return {
            "matched": self.matched,
            "threshold": self.threshold,
            "top1": self.top1,
            "gated_top1": self.gated_top1,
            "tolerance": self.tolerance,
            "inputs": self.inputs,
            "tried": self.tried,
            "kept": {site: len(k) for site, k in self.record.kept.items()},
            "channels": dict(self.record.original_channels),
        }


@torch.no_grad()
def match_accuracy(
    dm: DecoupledModel,
    stats: PathStats,
    batches: Iterable,
    *,
    match_tolerance: float = 0.003,
    round_to: int = 1,
    start: float = 0.5,
    points: int = 11,
    refine: int = 4,
    gated_top1: float | None = None,
    dg: tp.DependencyGraph | None = None,
) -> AccuracyMatch:
    """The static compact model with the fewest filters whose top-1 is within ``match_tolerance`` of the gated model's.

    :func:`match_static` gives the static network a gated model's *FLOPs*; this gives it its
    *accuracy*, the comparison a deployment needs: a gate is worth keeping only where skipping is
    faster than the static layers that do as well (issue 23). Where the network needs its paths,
    that static model keeps more filters than the one of the same FLOPs, or does not exist.

    The static models are :func:`~nd_plugin.pruning.static_record`'s: each gated layer keeps the
    filters on for more than ``threshold`` of the inputs (rounded to ``round_to``). The threshold
    is scanned down from ``start`` (0.5: the static model ``nd prune`` exports) to 0 (every filter
    that is ever on) in ``points`` even steps, stopping at the first static model within
    ``match_tolerance``; the step above it is then halved ``refine`` times, a halving that matches
    moving the answer up. A scan, not a bisection over the whole range: top-1 does not rise all
    the way as the threshold falls. Computing filters the gated model turns off for most inputs
    hurts, and on networks that route their inputs keeping every filter that is ever on was
    measured 11-41 points below the 0.5 model (docs/notes/dynamic.md). Each static model is
    evaluated as the gated network with its gates fixed (:func:`fixed_gates`: exact, no copy),
    each distinct one once.

    Args:
        dm: the decoupled model (evaluated in eval mode; left as it was).
        stats: its path statistics (rank the filters).
        batches: ``(inputs, labels)`` batches both models are evaluated on (not empty).
        match_tolerance: top-1 the static model may lose, a fraction in ``[0, 1)`` (0.003: 0.3 points).
        round_to: channel block of the static layers.
        start: the first (highest) threshold, in ``[0, 1)``.
        points: thresholds scanned from ``start`` to 0, both included (at least 2).
        refine: halvings of the step above the first match (0: none).
        gated_top1: the gated model's top-1 on ``batches``, when already measured.
        dg: torch-pruning's graph of ``dm`` (built once when omitted).

    Returns:
        The :class:`AccuracyMatch`; when no static model scanned matches, the one with the best
        top-1 (the highest threshold on a tie), with ``matched`` false.

    Raises:
        ConfigError: ``match_tolerance`` or ``start`` outside ``[0, 1)``, ``points`` below 2,
            ``refine`` below 0, a bad ``round_to``, no ``batches``.

    Example:
        >>> m = match_accuracy(dm, stats, val_loader, match_tolerance=0.5)  # any static model does
        >>> m.matched, m.threshold, len(m.tried)
        (True, 0.5, 1)
    """
    from nd_plugin.pruning.structural import check_round_to, check_stats, graph_of, static_record

    tolerance = check_match_tolerance(match_tolerance)
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start < 1.0:
        raise ConfigError(f"start must be a threshold in [0, 1), got {start!r}.", params=("start",))
    start = float(start)
    round_to = check_round_to(round_to)
    for name, value, least in (("points", points, 2), ("refine", refine, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}.", params=(name,))
    check_stats(stats, dm.site_names, [s.channels for s in dm.gate_sites])
    batches = list(batches)
    if not batches:
        raise ConfigError("batches must hold at least one (inputs, labels) batch to match the top-1 on.", params=("batches",))
    dg = graph_of(dm, dg)
    with eval_mode(dm):
        if gated_top1 is None:
            gated_top1 = accuracy(dm, batches)
        tried: list[list[float]] = []
        seen: dict[tuple, tuple[PruneRecord, float]] = {}

        def evaluate(threshold: float) -> tuple[PruneRecord, float]:
            record = static_record(dm, stats, threshold=threshold, round_to=round_to, dg=dg)
            key = tuple(tuple(record.kept[s]) for s in dm.site_names)
            if key not in seen:
                with fixed_gates(dm, _record_masks(record)):
                    seen[key] = (record, accuracy(dm, batches))
            tried.append([threshold, seen[key][1]])
            return seen[key]

        def ok(top1: float) -> bool:
            return within(top1, gated_top1, tolerance)

        found = None
        above = None  # the threshold scanned before the first match (it failed)
        for k in range(points):
            t = round(start * (1 - k / (points - 1)), 9)
            record, top1 = evaluate(t)
            if ok(top1):
                found = (t, record, top1)
                break
            above = t
        if found is not None:
            lo = found[0]
            for _ in range(refine if above is not None else 0):
                mid = (lo + above) / 2
                record, top1 = evaluate(mid)
                if ok(top1):
                    lo, found = mid, (mid, record, top1)
                else:
                    above = mid
        else:  # none matches: the best (the highest threshold on a tie)
            best = max(range(len(tried)), key=lambda i: (tried[i][1], tried[i][0]))
            t = tried[best][0]
            found = (t, *evaluate(t))
            tried.pop()
        best_t, best, best_top1 = found
    return AccuracyMatch(
        record=best,
        threshold=best_t,
        top1=best_top1,
        gated_top1=float(gated_top1),
        tolerance=tolerance,
        inputs=sum(len(y) for _, y in batches),
        tried=tried,
    )
