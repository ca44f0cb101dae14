"""Plots: predicted against measured expression, gene-gene correlation, metrics, training history, tumour maps.

Every function draws from tables (and the section image's coarse pyramid level) with matplotlib; none trains or
applies a model. Spatial plots take a SpatialData (any layout: spots are placed from the shapes the table annotates
and their transformations, in the pixels of the image drawn) or an AnnData table (spots at its ``obsm["spatial"]``,
over an image passed with ``image=``). All take ``ax=``, ``show=``, ``save=`` and ``return_fig=`` as scanpy does.
"""

from ._correlation import gene_correlation
from ._history import training_history
from ._metrics import metrics
from ._spatial import predicted_vs_measured, tumor_map

__all__ = ["gene_correlation", "metrics", "predicted_vs_measured", "tumor_map", "training_history"]
