"""The ``summary.json`` of a run: accuracy, gate density, filter states, FLOPs and the dynamic value."""

from __future__ import annotations

from typing import Any

from nd_plugin.decoupled import DecoupledModel
from nd_plugin.interpret import filter_states
from nd_plugin.paths import PathStats

__all__ = ["summarize"]


def summarize(dm: DecoupledModel, stats: PathStats, data: Any = None, *, batch_size: int = 256) -> dict[str, Any]:
    """Summarises a trained decoupled model from its validation path statistics.

    FLOPs (fvcore, per input): ``original`` (gates open, no ACMs), ``decoupled`` (with ACMs),
    ``compact_static`` (silent filters removed) and ``compact_expected`` (dynamic filters counted
    with how often they run).

    With ``data`` (the run's :class:`~nd_plugin.data.DataBundle`), ``dynamic_value`` is the gated
    model's top-1 minus that of the static network of the same FLOPs (``compact_expected``), both on
    the whole validation split, with the share of dynamic filters beside it
    (:func:`nd_plugin.pruning.dynamic_value`; ``stats`` rank the filters).
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
    from nd_plugin.pruning import dynamic_value, prune

    summary["flops"] = flops_summary(dm, prune(dm, stats), stats)
    if data is not None and getattr(data, "val", None) is not None:
        loader = data.loader("val", batch_size=batch_size, shuffle=False)
        summary["dynamic_value"] = dynamic_value(dm, stats, loader, gated_flops=summary["flops"]["compact_expected"]).to_dict()
    return summary
