"""Reader for the HEST-1k layout: ``st/{id}.h5ad``, ``wsis/{id}.tif``, ``metadata/{id}.json``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from st_from_he._sdata import SPATIAL_KEY
from st_from_he._validate import check_id, check_number

from ._image import _check_sample_id, log_pixel_size, read_image_levels
from ._resolution import GRID_PITCH_UM, SPOT_DIAMETER_UM, check_pixel_size, implied_pixel_size, infer_pixel_size
from ._section import build_section, concatenate

# HEST's `st_technology` -> the package's technology key (grid pitch and spot size known).
_TECHNOLOGIES = {"visium": "visium", "spatial transcriptomics": "st", "st": "st"}
_COORD_COLUMNS = ("pxl_col_in_fullres", "pxl_row_in_fullres")


def read_hest(
    hest_dir: str | Path,
    ids: str | Sequence[str],
    *,
    pixel_size_um: float | Mapping[str, float] | None = None,
    spot_diameter_um: float | Mapping[str, float] | None = None,
    patient_id: str | Mapping[str, str] | None = None,
):
    """Read samples of a HEST-1k download into one :class:`~spatialdata.SpatialData`.

    Per sample id, the HEST layout holds ``st/{id}.h5ad`` (raw counts; spot centres in ``obs["pxl_col_in_fullres"]``
    and ``obs["pxl_row_in_fullres"]``, full-resolution pixels), ``wsis/{id}.tif`` (a pyramidal TIFF, read lazily tile
    by tile) and ``metadata/{id}.json``.

    Parameters
    ----------
    hest_dir
        The HEST folder holding ``st/``, ``wsis/`` and ``metadata/``.
    ids
        One sample id or several (e.g. ``["TENX95", "NCBI783"]``); each becomes a section of that id.
    pixel_size_um
        Micrometres per pixel of the full-resolution image, one number for all samples or a mapping id -> number.
        ``None`` takes the metadata's ``pixel_size_um_embedded``, else its ``pixel_size_um_estimated``, else the TIFF's
        resolution tags, else infers it from the spot grid of the metadata's ``st_technology`` (logged).
    spot_diameter_um
        Spot diameter in micrometres (one number or a mapping id -> number). ``None`` takes the metadata's
        ``spot_diameter``, else the technology's (Visium 55 um, legacy ST 100 um).
    patient_id
        The patient of each sample (one id for all, or a mapping id -> patient), written to ``obs["patient"]``.
        ``None`` (or a sample missing from the mapping) takes the metadata's ``patient`` if it has one, else the
        sample id.

    Where the grid is known (``st_technology``), a resolution from an argument, the metadata or the TIFF that is more
    than 25 % away from the one the spot grid implies is used with a ``UserWarning``.

    Returns
    -------
    One :class:`~spatialdata.SpatialData` with, per id ``S``, image ``f"{S}_image"`` (the file's own pyramid),
    circles ``f"{S}_spots"`` and rows of table ``"table"`` (raw counts in ``X``, ``obs["sample"]``,
    ``obs["patient"]``, ``obs["barcode"]``, the h5ad's other ``obs`` columns, ``obsm["spatial"]`` in full-resolution
    pixels), restricted to the genes measured in every sample. Each spot's identity is its barcode (the h5ad's
    ``obs_names``): ``obs["spot_id"]`` and the circles' index are the barcode, ``obs_names`` ``f"{S}_{barcode}"``.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.io.read_hest("hest_data", ["TENX95", "TENX99"])  # doctest: +SKIP
    >>> sorted(sdata.images)  # doctest: +SKIP
    ['TENX95_image', 'TENX99_image']
    """
    if not isinstance(hest_dir, str | os.PathLike):
        raise TypeError(f"`hest_dir` must be a folder path, got {type(hest_dir).__name__}.")
    hest_dir = Path(hest_dir)
    if not hest_dir.is_dir():
        raise FileNotFoundError(f"HEST folder {str(hest_dir)!r} does not exist.")
    ids = [ids] if isinstance(ids, str) else list(ids)
    if not ids:
        raise ValueError("Pass at least one HEST sample id.")
    for sample in ids:
        _check_sample_id(sample)
    if len(set(ids)) != len(ids):
        raise ValueError(f"Sample ids repeat in {ids}.")
    return concatenate(
        [
            _read_one(
                hest_dir,
                sample,
                _per_sample(pixel_size_um, sample, "pixel_size_um"),
                _per_sample(spot_diameter_um, sample, "spot_diameter_um"),
                _patient(patient_id, sample),
            )
            for sample in ids
        ]
    )


def _per_sample(value, sample: str, name: str) -> float | None:
    if isinstance(value, Mapping):
        return check_number(value.get(sample), f"{name}[{sample!r}]", allow_none=True)
    return check_number(value, name, allow_none=True)


def _patient(value, sample: str) -> str | None:
    if isinstance(value, Mapping):
        return check_id(value.get(sample), f"patient_id[{sample!r}]", allow_none=True)
    return check_id(value, "patient_id", allow_none=True)


def _number(metadata: dict, key: str) -> float | None:
    value = metadata.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _read_one(
    hest_dir: Path, sample: str, pixel_size_um: float | None, spot_diameter_um: float | None, patient: str | None
):
    import anndata as ad

    st_file = hest_dir / "st" / f"{sample}.h5ad"
    if not st_file.is_file():
        known = sorted(p.stem for p in (hest_dir / "st").glob("*.h5ad"))
        raise FileNotFoundError(
            f"No expression file {str(st_file)!r} for HEST sample {sample!r}; samples present: "
            f"{known[:20]}{' ...' if len(known) > 20 else ''}."
        )
    wsi = next(
        (
            hest_dir / "wsis" / f"{sample}{ext}"
            for ext in (".tif", ".tiff")
            if (hest_dir / "wsis" / f"{sample}{ext}").is_file()
        ),
        None,
    )
    if wsi is None:
        raise FileNotFoundError(f"No image {str(hest_dir / 'wsis' / f'{sample}.tif')!r} for HEST sample {sample!r}.")
    meta_file = hest_dir / "metadata" / f"{sample}.json"
    metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}

    adata = ad.read_h5ad(st_file)
    if all(c in adata.obs for c in _COORD_COLUMNS):
        spatial = adata.obs[list(_COORD_COLUMNS)].to_numpy(dtype=float)
    elif SPATIAL_KEY in adata.obsm:
        spatial = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)[:, :2]
    else:
        raise KeyError(
            f"{str(st_file)!r} has no spot centres: expected obs columns {list(_COORD_COLUMNS)} or "
            f"obsm[{SPATIAL_KEY!r}]."
        )
    levels, file_pixel_size = read_image_levels(wsi)
    technology = _TECHNOLOGIES.get(str(metadata.get("st_technology", "")).strip().lower())

    implied, grid = _grid_pixel_size(adata.obs, spatial, technology)
    if pixel_size_um is not None:
        pixel_size, source = pixel_size_um, "given as `pixel_size_um`"
    elif _number(metadata, "pixel_size_um_embedded") is not None:
        pixel_size, source = _number(metadata, "pixel_size_um_embedded"), "metadata: pixel_size_um_embedded"
    elif _number(metadata, "pixel_size_um_estimated") is not None:
        pixel_size, source = _number(metadata, "pixel_size_um_estimated"), "metadata: pixel_size_um_estimated"
    elif file_pixel_size is not None:
        pixel_size, source = file_pixel_size, "read from the image file"
    elif implied is not None:
        pixel_size, source = implied, f"inferred from the spot grid, {grid}"
    elif technology is not None:
        pixel_size = infer_pixel_size(spatial, technology)
        source = f"inferred from the {GRID_PITCH_UM[technology]:.0f} um spot grid"
    else:
        raise ValueError(
            f"HEST sample {sample!r}: the image resolution is unknown (no pixel size in {str(meta_file)!r} or the "
            f"TIFF, and st_technology {metadata.get('st_technology')!r} gives no known grid). Pass `pixel_size_um=`."
        )
    if not source.startswith("inferred"):
        check_pixel_size(pixel_size, implied, sample=sample, source=source, grid=grid)
    log_pixel_size(sample, pixel_size, source)
    if patient is None:
        found = metadata.get("patient")
        patient = found.strip() if isinstance(found, str) and found.strip() else None

    if spot_diameter_um is None:
        spot_diameter_um = _number(metadata, "spot_diameter")
    if spot_diameter_um is None:
        if technology is None:
            raise ValueError(
                f"HEST sample {sample!r}: the spot diameter is unknown (no 'spot_diameter' in the metadata, "
                f"st_technology {metadata.get('st_technology')!r}). Pass `spot_diameter_um=`."
            )
        spot_diameter_um = SPOT_DIAMETER_UM[technology]

    obs = adata.obs.drop(columns=[c for c in _COORD_COLUMNS if c in adata.obs]).copy()
    obs.insert(0, "barcode", adata.obs_names.to_numpy())
    obs.index = pd.Index([f"{sample}_{b}" for b in adata.obs_names])
    return build_section(
        sample,
        x=adata.X,
        var=adata.var.copy(),
        obs=obs,
        spatial_px=spatial,
        levels=levels,
        pixel_size_um=pixel_size,
        spot_diameter_um=spot_diameter_um,
        instance_ids=adata.obs_names,
        patient=patient,
    )


def _grid_pixel_size(obs: pd.DataFrame, spatial: np.ndarray, technology: str | None) -> tuple[float | None, str]:
    """Pixel size the spot grid implies (array coordinates if ``obs`` has them, else spot distances), and its name."""
    if technology is None:
        return None, ""
    has_array = {"array_col", "array_row"} <= set(obs.columns)
    col, row = (obs["array_col"], obs["array_row"]) if has_array else (None, None)
    return implied_pixel_size(spatial, technology, col, row)
