"""The ``summary.json`` of a run: accuracy, gate density, filter states and FLOPs."""

from __future__ import annotations

from typing import Any

from nd_plugin.decoupled import DecoupledModel
from nd_plugin.interpret import filter_states
from nd_plugin.paths import PathStats

__all__ = ["summarize"]


def summarize(dm: DecoupledModel, stats: PathStats, data: Any = None) -> dict[str, Any]:
    """Summarises a trained decoupled model from its validation path statistics.

    FLOPs (fvcore, per input): ``original`` (gates open, no ACMs), ``decoupled`` (with ACMs),
    ``compact_static`` (silent filters removed) and ``compact_expected`` (dynamic filters counted
    with how often they run).
    """
    summary: dict[str, Any] = {
        "top1": stats.accuracy,
        "n_val": stats.n,
        "density": stats.density,
        "gated_layers": len(stats.site_names),
        "gated_filters": stats.num_filters,
        "filter_states": filter_states(stats).shares,
    }
    from nd_plugin.flops import flops_summary
    from nd_plugin.pruning import prune

    summary["flops"] = flops_summary(dm, prune(dm, stats), stats)
    return summary
