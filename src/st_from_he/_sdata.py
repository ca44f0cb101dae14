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

import numbers
from collections.abc import Iterable, Mapping
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


# --------------------------------------------------------------------------------------------------------------------
# Checks of the arguments of the public pp and tl functions: clear errors naming the function and the fix
# --------------------------------------------------------------------------------------------------------------------
def check_sdata(sdata, function: str, *, needs_image: bool = True) -> None:
    """Raise a :class:`TypeError` naming ``function`` unless ``sdata`` is a :class:`~spatialdata.SpatialData`.

    Parameters
    ----------
    sdata
        What the user passed.
    function
        The public function, as users call it (e.g. ``"sth.tl.evaluate"``).
    needs_image
        Whether the function reads the H&E image; the message then points to ``attach_histology`` first.
    """
    from anndata import AnnData
    from spatialdata import SpatialData

    if isinstance(sdata, SpatialData):
        return
    if isinstance(sdata, AnnData):
        wrap_image = "`sth.pp.attach_histology(adata, image, pixel_size_um=...)` pairs its spots with their H&E image"
        wrap_table = "`spatialdata.SpatialData(tables={'table': adata})` holds a table alone"
        hint = f"{wrap_image}." if needs_image else f"{wrap_image}, or {wrap_table}."
        raise TypeError(f"`{function}` takes a SpatialData, got an AnnData. Wrap it first: {hint}")
    if isinstance(sdata, list | tuple) and sdata and all(isinstance(s, SpatialData) for s in sdata):
        raise TypeError(
            f"`{function}` takes one SpatialData, got a {type(sdata).__name__} of {len(sdata)}. Put the sections "
            f"together with `sth.io.concatenate(...)`, or call it once per SpatialData."
        )
    raise TypeError(f"`{function}` takes a SpatialData, got {type(sdata).__name__}.")


def check_number(value, name: str, *, positive: bool = True, integer: bool = False, unit: str = "") -> float | int:
    """``value`` as a float (or int), with a clear error for strings, ``None``, booleans, NaN and non-positive values.

    Parameters
    ----------
    value
        What the user passed.
    name
        The argument's name, for the message.
    positive
        Require ``value > 0`` (else ``value >= 0``).
    integer
        Require a whole number, returned as :class:`int`.
    unit
        What the number counts, for the message (e.g. ``"micrometres"``).
    """
    kind = ("a positive " if positive else "a non-negative ") + ("integer" if integer else "number")
    what = f"{kind}{f' of {unit}' if unit else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {what}, got {type(value).__name__} {value!r}.")
    if not np.isfinite(value) or (value <= 0 if positive else value < 0) or (integer and int(value) != value):
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")
    return int(value) if integer else float(value)


def check_table_key(sdata: SpatialData, key, *, what: str = "", argument: str = "table_key") -> None:
    """Raise a :class:`KeyError` listing the tables present unless ``sdata.tables`` holds ``key``."""
    if not isinstance(key, str):
        raise TypeError(f"`{argument}` must be the name of a table, got {type(key).__name__} {key!r}.")
    if key not in sdata.tables:
        raise KeyError(
            f"No {what + ' ' if what else ''}table {key!r} (`{argument}`); tables present: {sorted(sdata.tables)}."
        )


def as_names(value, name: str) -> list[str]:
    """A gene or sample list from a string (one name) or a sequence of names; ``None`` and numbers are refused."""
    if isinstance(value, str):
        return [value]
    if value is None or not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a name or a list of names, got {type(value).__name__} {value!r}.")
    return [str(v) for v in value]
