"""Plain AnnData (scanpy Visium layout, or spot centres plus an image) -> SpatialData following the data model."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._sdata import INSTANCE_KEY, REGION_KEY, SAMPLE_KEY, SPATIAL_KEY, TABLE_KEY
from st_from_he._validate import check_id, check_number

from ._image import _check_sample_id, array_levels, log_pixel_size, read_image_levels
from ._resolution import (
    GRID_PITCH_UM,
    SPOT_DIAMETER_UM,
    check_pixel_size,
    grid_pitch_px,
    implied_pixel_size,
    infer_pixel_size,
    technology_from_diameter,
    technology_from_pitch,
)
from ._section import PATIENT_KEY, build_section

_TECHNOLOGY_NAMES = {"visium": "Visium", "st": "legacy Spatial Transcriptomics"}


def attach_histology(
    adata,
    image=None,
    *,
    pixel_size_um: float | None = None,
    spot_diameter_um: float | None = None,
    sample_id: str | None = None,
    technology: str | None = None,
    patient_id: str | None = None,
):
    """Pair an :class:`~anndata.AnnData` of spots with its H&E image as a new :class:`~spatialdata.SpatialData`.

    Two inputs are understood:

    - spot centres in ``adata.obsm["spatial"]`` (x = column, y = row, in pixels of ``image``) plus ``image``, an
      image file or an array;
    - the scanpy Visium layout (``adata.uns["spatial"][library_id]`` with ``"images"`` and ``"scalefactors"``, as
      :func:`scanpy.read_visium` writes it): with ``image=None`` its ``"hires"`` image is used (``"lowres"`` if there
      is no hires), and the full-resolution ``obsm["spatial"]`` is mapped onto it with ``tissue_hires_scalef``
      (``tissue_lowres_scalef``). ``image="hires"`` or ``"lowres"`` chooses one explicitly.

    ``adata`` itself is never modified: the table of the result holds copies.

    Parameters
    ----------
    adata
        Spots x genes. ``obsm["spatial"]`` holds the spot centres in pixels. ``X`` should hold raw counts, which
        training needs; normalised data are accepted here (kept as given and flagged, see **Returns**).
    image
        The H&E image of the same section: a JPEG, PNG or (OME-)TIFF file, an array of shape ``(y, x, 3)`` (uint8, or
        float in ``[0, 1]``), ``"hires"``/``"lowres"`` for an image of ``uns["spatial"]``, or ``None`` for the hires
        image of ``uns["spatial"]``.
    pixel_size_um
        Micrometres per pixel of the image in whose pixels ``obsm["spatial"]`` is given (for the scanpy layout, the
        full-resolution image; the hires thumbnail then has ``pixel_size_um / tissue_hires_scalef``). ``None`` reads
        it from the image file's metadata, else infers it from the spot grid pitch of ``technology`` (logged).
    spot_diameter_um
        Spot diameter in micrometres; ``None`` takes the technology's (Visium 55 um, legacy ST 100 um).
    sample_id
        Section id naming the elements (``f"{sample_id}_image"``, ``f"{sample_id}_spots"``) and the coordinate
        system; ``None`` takes the library id of ``uns["spatial"]``.
    technology
        ``"visium"`` (100 um grid) or ``"st"`` (legacy ST, 200 um grid). ``None``: ``"visium"`` if ``uns["spatial"]``
        exists, else the technology whose spot size ``spot_diameter_um`` matches, else the one whose grid pitch
        matches the given ``pixel_size_um``. Needed to infer the resolution when no file or argument gives it.
    patient_id
        The patient the section comes from, written to ``obs["patient"]``. ``None`` keeps an existing
        ``adata.obs["patient"]``, else takes ``sample_id``.

    Returns
    -------
    A new :class:`~spatialdata.SpatialData` with

    - ``images[f"{sample_id}_image"]``: the image (multiscale, ``c, y, x``), scaled to micrometres in the
      coordinate system ``sample_id``;
    - ``shapes[f"{sample_id}_spots"]``: one circle per spot (centre, radius = half the spot diameter);
    - ``tables["table"]``: a copy of ``adata`` (``X``, ``obs``, ``var``, ``obsm``, ``layers``) with ``obs["sample"]``,
      ``obs["region"]``, ``obs["spot_id"]`` (the spot's identity: ``adata.obs_names``, also the circles' index),
      ``obs["patient"]`` and ``obsm["spatial"]`` in pixels of the attached image;
      ``uns["st_from_he"]["raw_counts"]`` says whether ``X`` holds raw counts. When it does not (e.g. log-normalised
      data), ``X`` is kept as given with a logged warning, and functions that need raw counts (training, gene
      selection) raise a clear error later.

    Where the grid is known (``technology``, or the scanpy layout), a given or file resolution more than 25 % away
    from the one the spot grid implies is used with a ``UserWarning``; ``obs["array_col"]``/``obs["array_row"]``, if
    present, give the grid's pixels per array step.

    Raises
    ------
    TypeError
        If ``adata`` is not an :class:`~anndata.AnnData` (e.g. a :class:`~spatialdata.SpatialData`), or a number or id
        argument has the wrong type.
    ValueError
        If ``adata.obs_names`` repeat (call ``adata.obs_names_make_unique()`` first: names are the spots' identity),
        or ``adata.obs`` holds a ``sample``, ``region`` or ``spot_id`` column with other values than this function
        would write (rename it).

    Examples
    --------
    >>> import anndata as ad
    >>> import st_from_he as sth
    >>> d = "../shared/data/visium_mouse_brain_crop"
    >>> adata = ad.read_h5ad(f"{d}/adata.h5ad")
    >>> sdata = sth.io.attach_histology(adata, f"{d}/image.jpg", sample_id="brain")
    >>> list(sdata.images), list(sdata.shapes)
    (['brain_image'], ['brain_spots'])
    >>> sdata.tables["table"].uns["st_from_he"]
    {'raw_counts': False}
    """
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        hint = " (a SpatialData needs no attaching: pass it to `sth.pp`/`sth.tl` directly)"
        raise TypeError(
            f"`adata` must be an AnnData, got {type(adata).__name__}"
            f"{hint if type(adata).__name__ == 'SpatialData' else ''}."
        )
    pixel_size_um = check_number(pixel_size_um, "pixel_size_um", allow_none=True)
    spot_diameter_um = check_number(spot_diameter_um, "spot_diameter_um", allow_none=True)
    check_id(sample_id, "sample_id", allow_none=True)
    check_id(patient_id, "patient_id", allow_none=True)
    if technology is not None and not isinstance(technology, str):
        raise TypeError(f"`technology` must be 'visium', 'st' or None, got {type(technology).__name__}.")
    if not adata.obs_names.is_unique:
        repeated = list(adata.obs_names[adata.obs_names.duplicated()].unique()[:5])
        raise ValueError(
            f"adata.obs_names repeat (e.g. {repeated}): they are the spots' identity, by which predictions and "
            f"measurements are matched. Call `adata.obs_names_make_unique()` (or give each spot its own name) first."
        )
    if SPATIAL_KEY not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{SPATIAL_KEY!r}] is missing: put the spot centres there (x = column, y = row, in pixels of "
            f"the image)."
        )
    if adata.X is None:
        raise ValueError("adata.X is empty; the table needs the expression (raw counts) of every spot.")
    spatial = adata.obsm[SPATIAL_KEY]
    spatial = np.asarray(spatial.to_numpy() if isinstance(spatial, pd.DataFrame) else spatial, dtype=float)
    if spatial.ndim != 2 or spatial.shape[1] < 2:
        raise ValueError(f"adata.obsm[{SPATIAL_KEY!r}] must have shape (n_spots, 2), got {spatial.shape}.")
    spatial = spatial[:, :2]
    if technology is not None and technology not in GRID_PITCH_UM:
        raise ValueError(f"Unknown technology {technology!r}; expected one of {sorted(GRID_PITCH_UM)} or None.")

    library, entry = _scanpy_library(adata, sample_id)
    sample_id = sample_id if sample_id is not None else library
    if sample_id is None:
        raise ValueError("Pass `sample_id=`: it names the section, and adata.uns['spatial'] gives no library id.")
    _check_sample_id(sample_id)

    # The image, and the factor from obsm["spatial"] pixels to its pixels.
    scale, file_pixel_size, source_image = 1.0, None, "image"
    if image is None or (isinstance(image, str) and image in ("hires", "lowres") and not Path(image).exists()):
        if entry is None:
            raise ValueError(
                "No image: pass `image=` (an image file or a (y, x, 3) array), or an AnnData in the scanpy Visium "
                "layout (uns['spatial'][library_id]['images'])."
            )
        name, picture, scale = _scanpy_image(entry, library, None if image is None else image)
        source_image = f"the {name} image of uns['spatial'][{library!r}]"
        levels = array_levels(picture, what=source_image)
    elif isinstance(image, str | Path):
        levels, file_pixel_size = read_image_levels(image)
    elif isinstance(image, np.ndarray):
        levels = array_levels(image, what="the image array")
    else:
        raise TypeError(
            f"`image` must be a file path, a (y, x, 3) array, 'hires'/'lowres' or None, got {type(image).__name__}."
        )
    spatial_px = spatial * scale

    if technology is None:
        if entry is not None:
            technology = "visium"
        elif spot_diameter_um is not None:
            technology = technology_from_diameter(spot_diameter_um)
    # Resolution of the attached image, and the one the spot grid implies where the technology is known.
    implied, grid = _grid_pixel_size(adata, spatial_px, technology)
    if pixel_size_um is not None:
        pixel_size, source = float(pixel_size_um) / scale, "given"
        check_pixel_size(pixel_size, implied, sample=sample_id, source="given as `pixel_size_um`", grid=grid)
    elif file_pixel_size is not None:
        pixel_size, source = file_pixel_size, "read from the image file"
        check_pixel_size(pixel_size, implied, sample=sample_id, source=source, grid=grid)
    elif implied is not None:
        pixel_size, source = implied, f"inferred from the spot grid, {grid}"
    elif technology is not None:
        pixel_size = infer_pixel_size(spatial_px, technology)
        source = f"inferred from the {GRID_PITCH_UM[technology]:.0f} um {_TECHNOLOGY_NAMES[technology]} spot grid"
    else:
        raise ValueError(
            f"The resolution of the image of sample {sample_id!r} is unknown: the image does not record it, and "
            f"without a known technology the spot grid cannot tell it. Pass `pixel_size_um=` (micrometres per pixel), "
            f"or `technology='visium'` / `'st'` to infer it from the spot grid."
        )
    if technology is None and len(spatial_px) >= 3:
        technology = technology_from_pitch(grid_pitch_px(spatial_px) * pixel_size)
    if spot_diameter_um is None:
        if technology is None:
            raise ValueError(
                f"Sample {sample_id!r}: the spot diameter is unknown. Pass `spot_diameter_um=` (e.g. 55 for Visium) or "
                f"`technology=`."
            )
        spot_diameter_um = SPOT_DIAMETER_UM[technology]
    log_pixel_size(sample_id, pixel_size, f"{source}; {source_image}" if scale != 1.0 else source)
    _check_reserved_columns(adata.obs, sample_id)
    if patient_id is not None and PATIENT_KEY in adata.obs and (adata.obs[PATIENT_KEY].astype(str) != patient_id).any():
        logger.info("%s: obs[%r] is set to the given patient_id %r.", sample_id, PATIENT_KEY, patient_id)

    sdata = build_section(
        sample_id,
        x=adata.X,
        var=adata.var.copy(),
        obs=adata.obs.copy(),
        instance_ids=adata.obs_names,
        patient=patient_id,
        spatial_px=spatial_px,
        levels=levels,
        pixel_size_um=pixel_size,
        spot_diameter_um=float(spot_diameter_um),
        obsm={k: copy.deepcopy(v) for k, v in adata.obsm.items() if k != SPATIAL_KEY},
        require_counts=False,
    )
    table = sdata.tables[TABLE_KEY]
    for key, layer in adata.layers.items():
        table.layers[key] = layer.copy()
    if not table.uns["st_from_he"]["raw_counts"]:
        logger.warning(
            "%s: adata.X does not hold raw counts (normalised or log-transformed?); it is kept as given, but training "
            "needs raw counts: attach an AnnData whose X holds them.",
            sample_id,
        )
    return sdata


def _grid_pixel_size(adata, spatial_px: np.ndarray, technology: str | None) -> tuple[float | None, str]:
    """Pixel size the spot grid implies (array coordinates if ``obs`` has them, else spot distances), and its name."""
    if technology is None:
        return None, ""
    has_array = {"array_col", "array_row"} <= set(adata.obs.columns)
    col, row = (adata.obs["array_col"], adata.obs["array_row"]) if has_array else (None, None)
    return implied_pixel_size(spatial_px, technology, col, row)


def _check_reserved_columns(obs: pd.DataFrame, sample: str) -> None:
    """Refuse ``obs`` columns the table's keys would overwrite with other values (never drop user data silently)."""
    region = f"{sample}_spots"
    expected = {SAMPLE_KEY: sample, REGION_KEY: region, INSTANCE_KEY: None}
    for column, value in expected.items():
        if column not in obs:
            continue
        values = obs[column].astype(str).to_numpy()
        same = (values == obs.index.astype(str).to_numpy()) if value is None else (values == value)
        if not same.all():
            raise ValueError(
                f"adata.obs[{column!r}] exists and differs from what the table needs there "
                f"({'the obs_names' if value is None else repr(value)}); rename it (e.g. "
                f"`adata.obs = adata.obs.rename(columns={{{column!r}: {column + '_original'!r}}})`) so it is kept."
            )
    if PATIENT_KEY in obs and obs[PATIENT_KEY].isna().any():
        raise ValueError(f"adata.obs[{PATIENT_KEY!r}] has missing values; fill them or pass `patient_id=`.")


def _scanpy_library(adata, sample_id: str | None) -> tuple[str | None, dict | None]:
    """The library id and entry of ``uns["spatial"]`` (scanpy Visium layout), or ``(None, None)``."""
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or not spatial:
        return None, None
    libraries = [k for k, v in spatial.items() if isinstance(v, dict)]
    if not libraries:
        return None, None
    if len(libraries) == 1:
        return libraries[0], spatial[libraries[0]]
    if sample_id in libraries:
        return sample_id, spatial[sample_id]
    raise ValueError(
        f"adata.uns['spatial'] holds several libraries {libraries}; pass `sample_id=` naming one of them, or subset "
        f"adata to one section first."
    )


def _scanpy_image(entry: dict, library: str, name: str | None) -> tuple[str, np.ndarray, float]:
    """The ``hires`` (or ``lowres``) image of a scanpy library entry and its scale factor from full resolution."""
    images = entry.get("images") or {}
    scalefactors = entry.get("scalefactors") or {}
    candidates = [name] if name is not None else ["hires", "lowres"]
    for candidate in candidates:
        if candidate in images:
            key = f"tissue_{candidate}_scalef"
            if key not in scalefactors:
                raise KeyError(f"uns['spatial'][{library!r}]['scalefactors'] lacks {key!r} for its {candidate} image.")
            return candidate, np.asarray(images[candidate]), float(scalefactors[key])
    raise KeyError(
        f"uns['spatial'][{library!r}]['images'] has no {' or '.join(candidates)} image (found {sorted(images)}); "
        f"pass `image=` (an image file or array)."
    )
