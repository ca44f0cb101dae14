"""Plots: predicted against measured expression, gene-gene correlation, metrics, training history, tumour maps.

Every function draws from tables (and the section image's coarse pyramid level) with matplotlib; none trains or
applies a model.
"""

from ._correlation import gene_correlation
from ._history import training_history
from ._metrics import metrics
from ._spatial import predicted_vs_measured, tumor_map

__all__ = ["gene_correlation", "metrics", "predicted_vs_measured", "tumor_map", "training_history"]
