"""torch-pruning plugin: path-statistics importance, permanent removal, dynamic runtime.

- :class:`DecouplingImportance` ranks channels by how often their gate was on, for any
  torch-pruning pruner.
- :func:`prune` removes the filters that are silent in every layer of their coupled group, drops
  the gates of layers whose remaining filters are all energetic and keeps the others: a
  :class:`CompactModel`.
- :func:`dynamic_runtime` turns a compact model into a batch-1 runtime that computes only the
  active filters of each dynamic layer and feeds only those channels to their consumers.
"""

from nd_plugin.pruning.importance import DecouplingImportance
from nd_plugin.pruning.runtime import DynamicRuntime, dynamic_runtime, fold_batchnorm
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

__all__ = [
    "CompactModel",
    "DecouplingImportance",
    "DynamicRuntime",
    "dynamic_runtime",
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
