"""Assemble one section of cells (Xenium) or bins (Visium HD): H&E image, circles and a table of raw counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from st_from_he._sdata import (
    INSTANCE_KEY,
    REGION_KEY,
    SAMPLE_KEY,
    SPATIAL_KEY,
    UNS_KEY,
    image_key,
    micrometre_transform,
)
from st_from_he._validate import check_raw_counts, counts_dtype

from ._image import image_element

PATIENT_KEY = "patient"


def cells_section(
    sample: str,
    *,
    x,
    var: pd.DataFrame,
    obs: pd.DataFrame,
    ids,
    xy_px: np.ndarray,
    radius_px,
    pixel_size_um: float,
    levels: list | None,
    shapes_key: str,
    table_key: str,
    patient: str | None,
    where: str,
):
    """A :class:`~spatialdata.SpatialData` of one section's cells or bins.

    ``xy_px`` (x = column, y = row) and ``radius_px`` are in pixels of ``levels[0]`` (the H&E image) or, without an
    image, of a frame of ``pixel_size_um`` micrometres per pixel. ``ids`` (unique strings) name the circles and fill
    ``obs["spot_id"]``; ``obs_names`` become ``f"{sample}_{id}"``. ``x`` must hold raw counts; it is copied.
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    ids = pd.Index(np.asarray(ids).astype(str), dtype=object)
    if ids.has_duplicates:
        raise ValueError(
            f"{where}: ids repeat ({list(ids[ids.duplicated()][:5])}); every cell or bin needs its own id."
        )
    check_raw_counts(x, where=where, genes=var.index, spots=ids)
    x = sparse.csr_matrix(x, copy=True)
    x = x.astype(counts_dtype(x, where=where))
    obs = obs.copy()
    obs.index = pd.Index([f"{sample}_{i}" for i in ids])
    obs[SAMPLE_KEY] = pd.Categorical([sample] * len(obs))
    obs[PATIENT_KEY] = pd.Categorical([sample if patient is None else patient] * len(obs))
    obs[REGION_KEY] = pd.Categorical([shapes_key] * len(obs))
    obs[INSTANCE_KEY] = np.asarray(ids, dtype=object)
    table = ad.AnnData(X=x, obs=obs, var=var.copy())
    table.obsm[SPATIAL_KEY] = np.asarray(xy_px, dtype=float)
    if not table.var_names.is_unique:
        table.var_names_make_unique()
    table = TableModel.parse(table, region=shapes_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    table.uns[UNS_KEY] = {"raw_counts": True}

    transform = micrometre_transform(pixel_size_um)
    circles = ShapesModel.parse(
        np.asarray(xy_px, dtype=float),
        geometry=0,
        radius=np.broadcast_to(np.asarray(radius_px, dtype=float), (len(ids),)).copy(),
        index=ids,
        transformations={sample: transform},
    )
    images = {} if levels is None else {image_key(sample): image_element(levels, pixel_size_um, sample)}
    return SpatialData(images=images, shapes={shapes_key: circles}, tables={table_key: table})
