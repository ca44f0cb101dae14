"""Assemble one section's image, spots and table into a SpatialData following the package's data model."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from st_from_he._logging import logger
from st_from_he._sdata import (
    INSTANCE_KEY,
    REGION_KEY,
    SAMPLE_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    UNS_KEY,
    image_key,
    micrometre_transform,
    spots_key,
)
from st_from_he._validate import check_raw_counts, check_spots_in_image, counts_dtype, is_raw_counts

from ._image import image_element

PATIENT_KEY = "patient"
"""``obs`` column naming each spot's patient (the unit of leave-one-patient-out evaluation)."""


def spots_element(spatial_px: np.ndarray, radius_px: float, sample: str, pixel_size_um: float, index=None):
    """Circles of ``radius_px`` at the spot centres in the sample's micrometre system.

    ``index`` names the circles (the spots' instance ids, strings); ``None`` numbers them ``0..n-1``.
    """
    from spatialdata.models import ShapesModel

    index = np.arange(len(spatial_px)) if index is None else pd.Index(np.asarray(index, dtype=object), dtype=object)
    return ShapesModel.parse(
        np.asarray(spatial_px, dtype=float),
        geometry=0,
        radius=np.full(len(spatial_px), float(radius_px)),
        index=index,
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
    instance_ids=None,
    patient: str | None = None,
    where: str | None = None,
):
    """One section as a :class:`~spatialdata.SpatialData`: image, circles and a table of raw counts.

    Give either ``counts`` (spots x genes DataFrame) or ``x`` with ``var``. ``obs`` rows match the spots, and so do
    the rows of ``spatial_px`` (x = column, y = row, in pixels of ``levels[0]``). ``x`` is copied, never shared.

    Spot identity: ``instance_ids`` (strings, unique within the section) name the circles (the shapes index) and fill
    ``obs["spot_id"]``, the table's instance key; ``None`` takes ``obs.index``. Readers pass an id that survives
    re-reading the same data with other spots left out (legacy ST ``"{x}x{y}"``, Visium and HEST the barcode), so
    predictions and measurements are matched by (region, spot id), never by row position.

    ``obs["patient"]`` is ``patient``; with ``None`` an existing ``obs["patient"]`` is kept, else the sample id is used.
    ``where`` names the data for messages (e.g. the counts file).

    With ``require_counts=True`` (readers of raw data) ``x`` must hold raw counts. With ``require_counts=False``
    (:func:`~st_from_he.io.attach_histology`, whose users may hold normalised data) ``x`` is kept as given and
    ``table.uns["st_from_he"]["raw_counts"]`` records whether it holds raw counts, so that training can refuse it with
    a clear message (:func:`st_from_he._validate.check_table_raw_counts`).
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise ValueError(
            f"Sample {sample!r}: pixel size must be a positive number of micrometres, got {pixel_size_um}."
        )
    _, height, width = levels[0].shape
    check_spots_in_image(spatial_px, height, width, sample=sample)
    if counts is not None:
        x = counts.to_numpy()
        var = pd.DataFrame(index=counts.columns.astype(str))
    if x is None or var is None:
        raise TypeError("Give either `counts` or both `x` and `var`.")
    if x.shape != (len(obs), len(var)):
        raise ValueError(
            f"Sample {sample!r}: the expression matrix has shape {x.shape}, but there are {len(obs)} spots and "
            f"{len(var)} genes."
        )
    if len(spatial_px) != len(obs):
        raise ValueError(f"Sample {sample!r}: {len(spatial_px)} spot centres for {len(obs)} expression rows.")
    where = where or f"Counts of sample {sample!r}"
    ids = _instance_ids(obs.index if instance_ids is None else instance_ids, len(obs), sample)
    # Validate before any cast: a cast first would wrap counts beyond int32 into negative numbers.
    genes, spots = var.index, obs.index
    if require_counts:
        check_raw_counts(x, where=where, genes=genes, spots=spots)
        raw = True
    else:
        raw = is_raw_counts(x)
    x = sparse.csr_matrix(x, copy=True)
    if raw and (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        dtype = counts_dtype(x, where=where)
        if dtype is not np.int32:
            logger.info("%s: counts exceed the int32 range; kept as int64.", sample)
        x = x.astype(dtype)

    region = spots_key(sample)
    obs = obs.copy()
    obs[SAMPLE_KEY] = pd.Categorical([sample] * len(obs))
    obs[REGION_KEY] = pd.Categorical([region] * len(obs))
    obs[INSTANCE_KEY] = pd.Series(ids, index=obs.index, dtype=object)
    if patient is not None or PATIENT_KEY not in obs:
        obs[PATIENT_KEY] = pd.Categorical([sample if patient is None else patient] * len(obs))
    table = ad.AnnData(X=x, obs=obs, var=var.copy())
    table.obsm[SPATIAL_KEY] = np.asarray(spatial_px, dtype=float)
    for key, value in (obsm or {}).items():
        table.obsm[key] = value
    if not table.var_names.is_unique:
        logger.info("%s: repeated gene names are made unique ('GENE', 'GENE-1').", sample)
        table.var_names_make_unique()
    table = TableModel.parse(table, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    table.uns[UNS_KEY] = {"raw_counts": bool(raw)}

    radius_px = spot_diameter_um / 2 / pixel_size_um
    return SpatialData(
        images={image_key(sample): image_element(levels, pixel_size_um, sample)},
        shapes={region: spots_element(spatial_px, radius_px, sample, pixel_size_um, index=ids)},
        tables={TABLE_KEY: table},
    )


def _instance_ids(ids, n: int, sample: str) -> np.ndarray:
    """Instance ids as an object array of strings, checked to be unique (spatialdata needs str or int ids)."""
    ids = pd.Index(ids).astype(str)
    if len(ids) != n:
        raise ValueError(f"Sample {sample!r}: {len(ids)} spot ids for {n} spots.")
    if ids.has_duplicates:
        raise ValueError(
            f"Sample {sample!r}: spot ids repeat ({list(ids[ids.duplicated()].unique()[:5])}); every spot needs its "
            f"own id, so that predictions and measurements are matched by spot and never by row position."
        )
    return np.asarray(ids, dtype=object)


def concatenate(sdatas, *, join: str = "inner"):
    """Put several sections into one :class:`~spatialdata.SpatialData`.

    Images and circles keep their keys (``f"{sample}_image"``, ``f"{sample}_spots"``), each in its own micrometre
    coordinate system; the tables ``"table"`` are stacked into one whose ``obs["sample"]`` tells the sections apart.

    Parameters
    ----------
    sdatas
        Sections as returned by the :mod:`st_from_he.io` readers, :func:`st_from_he.datasets.her2st` or
        :func:`~st_from_he.io.attach_histology`; each may itself hold several sections.
    join
        ``"inner"`` keeps the genes measured in every section (logged when genes are dropped); ``"outer"`` keeps all,
        filling missing genes with 0.

    Returns
    -------
    One :class:`~spatialdata.SpatialData`. ``table.uns["st_from_he"]["raw_counts"]`` is ``False`` if any section's
    ``X`` does not hold raw counts.

    Raises
    ------
    ValueError
        If a sample id occurs in more than one input (give every section a unique ``sample_id``).

    Examples
    --------
    >>> import st_from_he as sth
    >>> d = "../shared/data/her2st"
    >>> parts = [sth.io.read_st(f"{d}/{s}/{s}_counts.tsv.gz", f"{d}/{s}/{s}_spots.tsv", f"{d}/{s}/{s}_HE.jpg",
    ...                         sample_id=s) for s in ("C5", "C6")]
    >>> sdata = sth.io.concatenate(parts)
    >>> sorted(sdata.tables["table"].obs["sample"].unique())
    ['C5', 'C6']
    """
    import spatialdata as sd
    from spatialdata import SpatialData

    from st_from_he._sdata import samples

    if isinstance(sdatas, SpatialData):
        sdatas = [sdatas]
    sdatas = list(sdatas)
    if not sdatas:
        raise ValueError("Nothing to concatenate: pass at least one SpatialData.")
    for s in sdatas:
        if not isinstance(s, SpatialData):
            hint = " (turn an AnnData into one with `sth.pp.attach_histology`)" if type(s).__name__ == "AnnData" else ""
            raise TypeError(f"Expected SpatialData objects, got {type(s).__name__}{hint}.")
    if join not in ("inner", "outer"):
        raise ValueError(f"`join` must be 'inner' or 'outer', got {join!r}.")
    seen: list[str] = []
    for s in sdatas:
        for sample in samples(s):
            if sample in seen:
                raise ValueError(f"Sample id {sample!r} occurs twice; give every section a unique `sample_id`.")
            seen.append(sample)
    if len(sdatas) == 1:
        return sdatas[0]
    sdatas = _prefix_colliding_obs_names(sdatas)
    tables = [s.tables[TABLE_KEY] for s in sdatas if TABLE_KEY in s.tables]
    n_genes = [t.n_vars for t in tables]
    raw = all(_holds_raw_counts(t) for t in tables)
    merged = sd.concatenate(sdatas, concatenate_tables=True, join=join, merge="same")
    if TABLE_KEY in merged.tables:
        merged.tables[TABLE_KEY].uns[UNS_KEY] = {"raw_counts": bool(raw)}
    if TABLE_KEY in merged.tables and join == "inner" and n_genes and merged.tables[TABLE_KEY].n_vars < max(n_genes):
        logger.info(
            "Kept the %d genes measured in all %d sections (sections had %d-%d genes).",
            merged.tables[TABLE_KEY].n_vars,
            len(sdatas),
            min(n_genes),
            max(n_genes),
        )
    return merged


def _holds_raw_counts(table) -> bool:
    flag = table.uns.get(UNS_KEY, {}).get("raw_counts")
    return bool(flag) if flag is not None else is_raw_counts(table.X)


def _prefix_colliding_obs_names(sdatas: list) -> list:
    """If spot names repeat across sections, name every spot ``f"{sample}_{name}"`` (inputs are not modified)."""
    from spatialdata import SpatialData

    names = [s.tables[TABLE_KEY].obs_names for s in sdatas if TABLE_KEY in s.tables]
    if not names or sum(len(n) for n in names) == len(pd.Index([]).append(names).unique()):
        return sdatas
    logger.info("Spot names repeat across sections; they are prefixed with the sample id (e.g. 'C6_AAAC...').")
    out = []
    for s in sdatas:
        if TABLE_KEY not in s.tables:
            out.append(s)
            continue
        table = s.tables[TABLE_KEY].copy()
        table.obs_names = table.obs[SAMPLE_KEY].astype(str).to_numpy() + "_" + table.obs_names.to_numpy().astype(str)
        out.append(
            SpatialData(
                images=dict(s.images),
                labels=dict(s.labels),
                points=dict(s.points),
                shapes=dict(s.shapes),
                tables={**s.tables, TABLE_KEY: table},
                attrs=dict(s.attrs),
            )
        )
    return out
