"""Publication figures for oodlens results, in one style.

Every plotting function takes the DataFrames that the result objects' ``to_dataframe()`` (or the named
:class:`~oodlens.capture.Diagnosis` methods) return, or the result objects themselves: an argument with the
named method is asked for its frame. Several runs (before/after, or several methods) go in as a dict
``{label: frame_or_result}`` or a list, and are overlaid, each in its method's fixed colour. ``train_length``
marks the pretraining length with a dashed vertical line and a label.

Each function returns the matplotlib Figure; single-axes plots draw into ``ax`` when given one.
:func:`save_figure` writes the vector PDF and a 300-dpi PNG; :func:`show` displays a figure in a notebook
(and saves it when asked).
"""

from .diagnosis import (
    plot_entropy_by_position,
    plot_hidden_norm,
    plot_hidden_pca,
    plot_logits_by_distance,
    plot_max_logit_by_position,
    plot_sink_mass,
)
from .evaluation import (
    plot_efficiency,
    plot_generation_quality,
    plot_method_comparison,
    plot_passkey,
    plot_perplexity_by_position,
    plot_repair_map,
    plot_streaming,
)
from .style import (
    LN_N_GID,
    METHOD_COLORS,
    METHOD_STYLES,
    OKABE_ITO,
    TRAIN_LENGTH_GID,
    method_color,
    method_hatch,
    method_style,
    save_figure,
    show,
    style,
    use_style,
)

__all__ = [
    "LN_N_GID",
    "OKABE_ITO",
    "TRAIN_LENGTH_GID",
    "METHOD_COLORS",
    "METHOD_STYLES",
    "method_color",
    "method_hatch",
    "method_style",
    "plot_efficiency",
    "plot_entropy_by_position",
    "plot_generation_quality",
    "plot_hidden_norm",
    "plot_hidden_pca",
    "plot_logits_by_distance",
    "plot_max_logit_by_position",
    "plot_method_comparison",
    "plot_passkey",
    "plot_perplexity_by_position",
    "plot_repair_map",
    "plot_sink_mass",
    "plot_streaming",
    "save_figure",
    "show",
    "style",
    "use_style",
]
