"""Figures of this package's results (plotly). Plotting reads result fields; it never runs a model.

Every function returns a ``plotly.graph_objects.Figure``; :func:`save_figure` writes one to
``.html`` (self-contained), ``.png``, ``.svg`` or ``.pdf``.
"""

from tl_logitlens.plotting.attribution import (
    component_bars_figure,
    component_lens_figure,
    head_grid_figure,
    head_source_figure,
)
from tl_logitlens.plotting.comparison import logit_diff_figure
from tl_logitlens.plotting.export import save_figure, save_figures, show
from tl_logitlens.plotting.lens import lens_heatmap, target_trajectory, top_token_evolution
from tl_logitlens.plotting.masked import profile_figure, profile_heatmaps, sliding_text_heatmap, vocab_figure
from tl_logitlens.plotting.style import cell_text
from tl_logitlens.plotting.text import text_heatmap

__all__ = [
    "cell_text",
    "component_bars_figure",
    "component_lens_figure",
    "head_grid_figure",
    "head_source_figure",
    "lens_heatmap",
    "logit_diff_figure",
    "profile_figure",
    "profile_heatmaps",
    "save_figure",
    "save_figures",
    "show",
    "sliding_text_heatmap",
    "target_trajectory",
    "text_heatmap",
    "top_token_evolution",
    "vocab_figure",
]
