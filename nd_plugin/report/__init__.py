"""The report: the analyses of one set of path statistics, their figures and the offline HTML page.

- :mod:`~nd_plugin.report.analysis`: :func:`analyze_paths` returns an :class:`Analysis`, every
  number of every analysis; :func:`load_images` reads images for occlusion;
- :mod:`~nd_plugin.report.path_figures` (filter states, class paths, path distribution) and
  :mod:`~nd_plugin.report.concept_figures` (decision tree, occlusion concepts): plot functions
  that take an analysis result and return a :class:`matplotlib.figure.Figure`, drawn with the
  pyplot-free helpers of :mod:`~nd_plugin.report.plotting`;
- :mod:`~nd_plugin.report.page`: :func:`write_report`, the PNGs, ``analysis.json`` and ``index.html``;
- :mod:`~nd_plugin.report.summary`: :func:`summarize`, the ``summary.json`` of a trained run.

matplotlib is imported when a figure is drawn, not by importing this package.
"""

from nd_plugin.report.analysis import Analysis, analyze_paths, load_images
from nd_plugin.report.concept_figures import plot_decision_tree, plot_occlusion
from nd_plugin.report.page import write_report
from nd_plugin.report.path_figures import (
    plot_class_paths,
    plot_class_stats,
    plot_filter_states,
    plot_layer_histograms,
    plot_path_distribution,
)
from nd_plugin.report.summary import summarize

__all__ = [
    "Analysis",
    "analyze_paths",
    "load_images",
    "plot_class_paths",
    "plot_class_stats",
    "plot_decision_tree",
    "plot_filter_states",
    "plot_layer_histograms",
    "plot_occlusion",
    "plot_path_distribution",
    "summarize",
    "write_report",
]
