"""Assemble one section's image, spots and table into a SpatialData following the package's data model."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from .._sdata import INSTANCE_KEY, REGION_KEY, SAMPLE_KEY, SPATIAL_KEY, TABLE_KEY, image_key, micrometre_transform, spots_key
from .._validate import check_raw_counts, check_spots_in_image
from ._image import image_element


def spots_element(spatial_px: np.ndarray, radius_px: float, sample: str, pixel_size_um: float):
    """Circles of ``radius_px`` at the spot centres, indexed ``0..n-1``, in the sample's micrometre system."""
    from spatialdata.models import ShapesModel

    return ShapesModel.parse(
        np.asarray(spatial_px, dtype=float),
        geometry=0,
        radius=np.full(len(spatial_px), float(radius_px)),
        index=np.arange(len(spatial_px)),
        transformations={sample: micrometre_transform(pixel_size_um)},
    )


def build_section(
    sample: str,
    *,
    counts: pd.DataFrame | None = None,
    x=None,
    var: pd.DataFrame | None = None,
    obs: pd.DataFrame,
    spatial_px: np.ndarray,
    levels: list,
    pixel_size_um: float,
    spot_diameter_um: float,
    obsm: dict | None = None,
    require_counts: bool = True,
):
    """One section as a :class:`~spatialdata.SpatialData`: image, circles and a table of raw counts.

    Give either ``counts`` (spots x genes DataFrame) or ``x`` with ``var``. ``obs`` rows match the spots.
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise ValueError(f"Sample {sample!r}: pixel size must be a positive number of micrometres, got {pixel_size_um}.")
    _, height, width = levels[0].shape
    check_spots_in_image(spatial_px, height, width, sample=sample)
    if counts is not None:
        x = counts.to_numpy()
        var = pd.DataFrame(index=counts.columns.astype(str))
    if require_counts:
        check_raw_counts(x, where=f"Counts of sample {sample!r}")
    x = sparse.csr_matrix(x)
    if np.issubdtype(x.dtype, np.floating) and require_counts:
        x = x.astype(np.int32)
    elif np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.int32)

    region = spots_key(sample)
    obs = obs.copy()
    obs[SAMPLE_KEY] = pd.Categorical([sample] * len(obs))
    obs[REGION_KEY] = pd.Categorical([region] * len(obs))
    obs[INSTANCE_KEY] = np.arange(len(obs))
    table = ad.AnnData(X=x, obs=obs, var=var.copy())
    table.obsm[SPATIAL_KEY] = np.asarray(spatial_px, dtype=float)
    for key, value in (obsm or {}).items():
        table.obsm[key] = value
    if not table.var_names.is_unique:
        table.var_names_make_unique()
    table = TableModel.parse(table, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)

    radius_px = spot_diameter_um / 2 / pixel_size_um
    return SpatialData(
        images={image_key(sample): image_element(levels, pixel_size_um, sample)},
        shapes={region: spots_element(spatial_px, radius_px, sample, pixel_size_um)},
        tables={TABLE_KEY: table},
    )


def concatenate(sdatas: list, *, join: str = "inner"):
    """Several sections in one :class:`~spatialdata.SpatialData`; tables joined on genes (``"inner"``: shared only).

    Raises on duplicate sample ids.
    """
    import spatialdata as sd

    from .._logging import logger
    from .._sdata import samples

    seen: list[str] = []
    for s in sdatas:
        for sample in samples(s):
            if sample in seen:
                raise ValueError(f"Sample id {sample!r} occurs twice; give every section a unique `sample_id`.")
            seen.append(sample)
    if len(sdatas) == 1:
        return sdatas[0]
    n_genes = [s.tables[TABLE_KEY].n_vars for s in sdatas if TABLE_KEY in s.tables]
    merged = sd.concatenate(sdatas, concatenate_tables=True, join=join)
    if TABLE_KEY in merged.tables and join == "inner" and n_genes and merged.tables[TABLE_KEY].n_vars < max(n_genes):
        logger.info(
            "Kept the %d genes measured in all %d sections (sections had %d-%d genes).",
            merged.tables[TABLE_KEY].n_vars, len(sdatas), min(n_genes), max(n_genes),
        )
    return merged
