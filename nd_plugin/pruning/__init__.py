"""torch-pruning plugin: path-statistics importance, permanent removal, dynamic runtime.

- :class:`DecouplingImportance` ranks channels by how often their gate was on, for any
  torch-pruning pruner.
- :func:`prune` removes the filters that are silent in every layer of their coupled group, drops
  the gates of layers whose remaining filters are all energetic and keeps the others: a
  :class:`CompactModel`.
- :func:`dynamic_runtime` turns a compact model into a batch-1 runtime that computes only the
  active filters of each dynamic layer and feeds only those channels to their consumers.
- :func:`dynamic_value` compares the gated model with the static network of the same FLOPs
  (every gate dropped, the most-often-on filters kept): a :class:`DynamicValue`;
  :func:`match_accuracy` finds the static compact model of the gated model's top-1.
"""

from nd_plugin.pruning.importance import DecouplingImportance
from nd_plugin.pruning.runtime import DynamicRuntime, dynamic_runtime, fold_batchnorm
from nd_plugin.pruning.static_match import AccuracyMatch, match_accuracy
from nd_plugin.pruning.structural import (
    CompactModel,
    FixedSite,
    PruneRecord,
    apply_record,
    check_round_to,
    check_tolerance,
    coupled_sites,
    keep_count,
    mix_records,
    plan_record,
    prune,
    static_record,
)
from nd_plugin.pruning.value import DynamicValue, StaticFlops, dynamic_value, fixed_gates, match_static

__all__ = [
    "AccuracyMatch",
    "CompactModel",
    "DecouplingImportance",
    "DynamicRuntime",
    "DynamicValue",
    "StaticFlops",
    "dynamic_runtime",
    "dynamic_value",
    "fixed_gates",
    "match_accuracy",
    "match_static",
    "fold_batchnorm",
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
