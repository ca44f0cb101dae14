"""The data model shared by readers, preprocessing and tools.

A section (sample) ``S`` in a :class:`~spatialdata.SpatialData` is:

- an image element ``f"{S}_image"`` (multiscale, dask-backed, ``c, y, x``);
- a circles element ``f"{S}_spots"`` (spot centres and radius, in pixels of that image);
- rows of the table ``"table"`` annotating those circles: ``obs["region"]`` names the circles element,
  ``obs["spot_id"]`` is the circle's index, ``obs["sample"]`` is ``S``, ``X`` holds raw counts and
  ``obsm["spatial"]`` the spot centres in pixels (x = column, y = row).

Both elements carry a :class:`~spatialdata.transformations.Scale` to the coordinate system named ``S``, whose unit
is the micrometre: this transformation is where the package keeps each image's resolution, and it travels with the
elements through zarr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

TABLE_KEY = "table"
PREDICTED_KEY = "predicted_expression"
SAMPLE_KEY = "sample"
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
SPATIAL_KEY = "spatial"
UNS_KEY = "st_from_he"
"""``table.uns[UNS_KEY]`` holds the package's notes on a table, e.g. ``{"raw_counts": False}`` when ``X`` is not raw."""


def image_key(sample: str) -> str:
    """Key of the image element of ``sample``."""
    return f"{sample}_image"


def spots_key(sample: str) -> str:
    """Key of the circles element of ``sample``'s measured spots."""
    return f"{sample}_spots"


def micrometre_transform(pixel_size_um: float):
    """Transformation from an element's pixels to its section's micrometre coordinate system."""
    from spatialdata.transformations import Scale

    return Scale([pixel_size_um, pixel_size_um], axes=("y", "x"))


@dataclass(frozen=True)
class Section:
    """Where one section's pieces live in a :class:`~spatialdata.SpatialData`."""

    sample: str
    image_key: str
    pixel_size_um: float
    shapes_key: str | None = None


def pixel_size_um(sdata: SpatialData, element_key: str, sample: str) -> float:
    """Micrometres per pixel of an image or shapes element, read from its transformation to ``sample``."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(sdata[element_key], get_all=True)
    if sample not in transforms:
        raise ValueError(
            f"Element {element_key!r} has no transformation to the micrometre coordinate system {sample!r}, so its "
            f"resolution is unknown. Read it with an `sth.io` reader or `sth.pp.attach_histology(..., "
            f"pixel_size_um=...)`, which record it."
        )
    matrix = transforms[sample].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    sx, sy = float(np.hypot(*matrix[:2, 0])), float(np.hypot(*matrix[:2, 1]))
    if not np.isclose(sx, sy, rtol=1e-3):
        raise ValueError(
            f"Element {element_key!r} has non-square pixels ({sx:.4g} x {sy:.4g} um); this is not supported."
        )
    return sx


def samples(sdata: SpatialData, table_key: str | None = TABLE_KEY) -> list[str]:
    """Sample ids of ``sdata``: those of the table's ``obs["sample"]`` if it exists, else those of its images."""
    if table_key is not None and table_key in sdata.tables:
        table = sdata.tables[table_key]
        if SAMPLE_KEY not in table.obs:
            raise KeyError(f"Table {table_key!r} has no obs[{SAMPLE_KEY!r}] column naming each spot's section.")
        return list(dict.fromkeys(table.obs[SAMPLE_KEY].astype(str)))
    suffix = image_key("")
    return [key.removesuffix(suffix) for key in sdata.images if key.endswith(suffix)]


def get_section(sdata: SpatialData, sample: str, *, shapes_key: str | None = None) -> Section:
    """Look up the image, its resolution and the spots of ``sample``; clear errors for what is missing."""
    img = image_key(sample)
    if img not in sdata.images:
        raise KeyError(
            f"No image {img!r} for sample {sample!r}; images present: {sorted(sdata.images)}. Every section needs its "
            f"H&E image."
        )
    shapes = spots_key(sample) if shapes_key is None else shapes_key
    if shapes not in sdata.shapes:
        if shapes_key is not None:
            raise KeyError(f"No shapes element {shapes_key!r}; shapes present: {sorted(sdata.shapes)}.")
        shapes = None
    return Section(sample, img, pixel_size_um(sdata, img, sample), shapes)


def table_rows(table: AnnData, sample: str) -> np.ndarray:
    """Integer positions of the table rows of ``sample``."""
    return np.flatnonzero(table.obs[SAMPLE_KEY].astype(str).to_numpy() == sample)
