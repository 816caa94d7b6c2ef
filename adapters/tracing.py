"""Moved to :mod:`nd_plugin.tracing` (finding gate sites is part of the method, not a model source).

Kept so that ``from nd_plugin.adapters.tracing import find_sites`` goes on working.
"""

from nd_plugin.tracing import SiteInfo, build_graph, find_sites, group_layers

__all__ = ["SiteInfo", "build_graph", "find_sites", "group_layers"]
