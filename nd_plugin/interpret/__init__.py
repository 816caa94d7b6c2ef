"""Reading a decoupled network through its calculation paths (METHOD.md §3, seed §A).

Every analysis is a pure function of path statistics (or of a model and images, for occlusion)
returning a small dataclass with ``to_dict()`` for JSON; figures live in :mod:`nd_plugin.report`.

Example:
    >>> from nd_plugin.interpret import filter_states
    >>> stats = dm.paths(val_loader, raw=True)
    >>> shares = filter_states(stats).shares
    >>> all(0.2 < shares[s] < 0.45 for s in ("silent", "dynamic", "energetic"))
    True
"""

from .classes import ClassPaths, class_paths, eta_squared
from .cluster_test import ClusterTest, cluster_test
from .distribution import PathDistribution, path_distribution
from .hopkins import hopkins
from .occlusion import ConceptConsistency, OcclusionConcepts, concept_consistency, grid_boxes, occlusion_concepts
from .states import DYNAMIC, ENERGETIC, SILENT, FilterStates, LayerStates, filter_states
from .tree import DecisionTree, TreeNode, decision_tree

__all__ = [
    "ClassPaths",
    "ClusterTest",
    "ConceptConsistency",
    "DecisionTree",
    "DYNAMIC",
    "ENERGETIC",
    "FilterStates",
    "LayerStates",
    "OcclusionConcepts",
    "PathDistribution",
    "SILENT",
    "TreeNode",
    "class_paths",
    "cluster_test",
    "concept_consistency",
    "decision_tree",
    "eta_squared",
    "filter_states",
    "grid_boxes",
    "hopkins",
    "occlusion_concepts",
    "path_distribution",
]
