"""`predict_expression`: apply a model to the spots of measured or H&E-only sections, into a new table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from st_from_he._logging import logger, timed
from st_from_he._sdata import (
    INSTANCE_KEY,
    PREDICTED_KEY,
    REGION_KEY,
    SAMPLE_KEY,
    SPATIAL_KEY,
    TABLE_KEY,
    check_sdata,
    find_table,
    spot_regions,
    spot_sections,
    systems_of,
    table_attrs,
)
from st_from_he._settings import settings
from st_from_he._validate import check_number


def predict_expression(
    sdata,
    model=None,
    *,
    reference=None,
    table_key: str | None = None,
    shapes_key: str | None = None,
    image_key=None,
    coordinate_system: str | None = None,
    pixel_size_um=None,
    key_added: str = PREDICTED_KEY,
    batch_size: int = 64,
    device: str | None = None,
    overwrite: bool = False,
    progress_bar: bool | None = None,
    client=None,
):
    """Predict expression from the H&E image at every spot, into a new table.

    Patches are cut at the model's physical size from each section's own resolution and streamed through the model
    in batches, so memory stays bounded on whole slides. The measured table is never modified. Each section is
    predicted as a whole: the default preset's ridge probe standardises its image features with the section's own
    statistics, which removes section-wide stain, scanner and resolution shifts.

    A list of slides is predicted slide by slide, each exactly as if passed alone, in this process or, with
    ``client``, one slide per task on a :mod:`dask.distributed` cluster.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` with one or more sections (measured, or H&E-only with a pseudo-spot grid
        from :func:`st_from_he.pp.spot_grid`), or a list of them (slides), each of which gets its own table.
    model
        A fitted :class:`~st_from_he.tl.ExpressionModel`.
    reference
        Instead of ``model``: measured sections (a SpatialData or a list) on which a ``"default"`` model over
        :func:`st_from_he.pp.select_genes` genes is trained first.
    table_key
        Table whose rows are the spots to predict (used when ``shapes_key`` is ``None``); default ``"table"``, else
        the only table. Each spot's section is its ``obs["sample"]``, else the region (circles) it annotates.
    shapes_key
        Circles element to predict at instead (e.g. ``"C6_grid"``); needed for sections without a table. With a
        list of slides, one key for all or a list of one per slide (``None`` for a slide's table).
    image_key, coordinate_system, pixel_size_um
        Which image each section's patches are cut from, where circles and image meet, and its resolution; the
        defaults find them (see :func:`st_from_he.pp.extract_patches`).
    key_added
        Key of the new table.
    batch_size
        Patches per forward pass: it bounds memory, and the predictions do not depend on it (nor on the order of
        the table's rows; the new table's rows follow them).
    device
        Torch device (``"auto"``: a GPU when available); default: the model's.
    overwrite
        Replace an existing prediction table ``key_added`` (one written by this function). Measured data are never
        replaced: ``key_added`` equal to ``table_key``, or naming any table this function did not write, is refused
        whatever ``overwrite``.
    progress_bar
        Show progress; default ``sth.settings.progress_bar``.
    client
        Where a list of slides is predicted. ``None`` (default): here, one slide after the other; a
        :class:`distributed.Client`: on its cluster, one task per slide; ``"default"``: the current default client
        (:func:`distributed.default_client`, the last one created), an error if there is none. A client is only
        ever used when passed: one that happens to exist is not picked up silently. The model is sent to the
        workers once; each slide is sent with its images as they are held (lazy readers and zarr stores travel as
        file paths, which the workers must reach; in-memory images travel whole); ``sth.settings`` travel too. The
        tables are written once every slide has succeeded: a failure (its slide's index in the message) leaves
        every slide as it was. A single SpatialData with a client runs as one task.

    Returns
    -------
    Nothing; adds ``sdata.tables[key_added]`` (to each slide of a list), annotating the same circles as the spots
    predicted:

    - ``X``: predicted log1p(CP10k) expression (float32), ``var_names`` the model's genes;
    - ``obs``: ``sample``, ``region`` (circles element) and ``spot_id`` (circle index); ``obs_names`` those of the
      measured table for measured spots, else ``f"{shapes_key}-{index}"``;
    - ``obsm["spatial"]``: spot centres in pixels; ``obsm["X_he"]``: image embeddings;
    - ``uns["predict_expression"]``: parameters, model preset, genes, patch geometry, units, and
      ``"coordinate_systems"``, each circles element's coordinate system (what squidpy calls
      ``elements_to_coordinate_systems``): its section's micrometre system in the package's layout, else the
      circles' first system (e.g. spatialdata-io's full-resolution pixels).

    The table works with squidpy as it is, e.g. ``sq.gr.spatial_neighbors(sdata.tables[key_added],
    coord_type="grid", n_neighs=4)`` (pixel coordinates, ``library_key="sample"`` for several sections) or, in
    micrometres, ``sq.gr.spatial_neighbors(sdata, table_key=key_added, elements_to_coordinate_systems=...)``.

    Examples
    --------
    >>> sth.tl.predict_expression(test, model)  # doctest: +SKIP
    >>> test.tables["predicted_expression"]  # doctest: +SKIP
    >>> sth.pp.spot_grid(he_only, "S1_image", spacing_um=100)  # doctest: +SKIP
    >>> sth.tl.predict_expression(he_only, model, shapes_key="S1_grid")  # doctest: +SKIP

    Many slides on a dask cluster (here two local worker processes), one task per slide:

    >>> from distributed import Client, LocalCluster  # doctest: +SKIP
    >>> with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as client:  # doctest: +SKIP
    ...     sth.tl.predict_expression([slide_a, slide_b], model, shapes_key=[None, "B_grid"], client=client)
    >>> slide_b.tables["predicted_expression"]  # doctest: +SKIP
    """
    if client is not None or isinstance(sdata, list | tuple):
        from ._distributed import predict_slides

        predict_slides(
            sdata,
            model,
            reference=reference,
            table_key=table_key,
            shapes_key=shapes_key,
            image_key=image_key,
            coordinate_system=coordinate_system,
            pixel_size_um=pixel_size_um,
            key_added=key_added,
            batch_size=batch_size,
            device=device,
            overwrite=overwrite,
            progress_bar=progress_bar,
            client=client,
        )
        return
    check_sdata(sdata, "sth.tl.predict_expression")
    progress_bar = settings.progress_bar if progress_bar is None else progress_bar
    batch_size = check_number(batch_size, "batch_size", integer=True, unit="patches")
    table_key = check_slide(sdata, table_key=table_key, shapes_key=shapes_key, key_added=key_added, overwrite=overwrite)
    model = check_model(model, reference)
    table = slide_table(
        sdata,
        model,
        table_key=table_key,
        shapes_key=shapes_key,
        image_key=image_key,
        coordinate_system=coordinate_system,
        pixel_size_um=pixel_size_um,
        batch_size=batch_size,
        device=device,
        progress_bar=progress_bar,
    )
    sdata.tables[key_added] = table
    logger.info("Wrote table %r (%d spots x %d genes)", key_added, table.n_obs, table.n_vars)


def check_slide(sdata, *, table_key: str | None, shapes_key: str | None, key_added, overwrite: bool) -> str | None:
    """Check one slide's spots and ``key_added`` before any work; return the table whose rows are the spots.

    ``None`` when predicting at ``shapes_key``. Raises before anything is computed or written.
    """
    if shapes_key is None:
        if not sdata.tables:
            raise KeyError(
                "The SpatialData has no table to take spots from. For an H&E-only slide make pseudo-spots with "
                "`sth.pp.spot_grid` and pass their `shapes_key`."
            )
        table_key = find_table(sdata, table_key)
        spot_sections(sdata.tables[table_key], table_key=table_key)  # each spot's section, or a clear error
    elif not isinstance(shapes_key, str) or shapes_key not in sdata.shapes:
        raise KeyError(f"No shapes element {shapes_key!r} (`shapes_key`); shapes present: {sorted(sdata.shapes)}.")
    measured_key = table_key
    if measured_key is None:  # predicting at shapes: still never replace the measured table
        try:
            measured_key = find_table(sdata) if sdata.tables else TABLE_KEY
        except KeyError:
            measured_key = TABLE_KEY
    _check_key_added(sdata, key_added, table_key=measured_key, overwrite=overwrite)
    return table_key


def check_model(model, reference):
    """The fitted model to predict with: ``model`` checked, or a default one trained on ``reference``."""
    from ._model import ExpressionModel

    if model is None:
        if reference is None:
            raise ValueError("Pass a fitted `model`, or `reference=` sections to train a default model on.")
        model = _default_model(reference)
    elif reference is not None:
        raise ValueError("Pass either `model` or `reference`, not both.")
    if not isinstance(model, ExpressionModel):
        raise TypeError(
            f"`model` must be a fitted `sth.tl.ExpressionModel` (or one from `ExpressionModel.load`), got "
            f"{type(model).__name__}."
        )
    if not model.is_fitted:
        raise RuntimeError("The model is not fitted; call `model.fit(train)` first.")
    return model


def slide_table(
    sdata,
    model,
    *,
    table_key: str | None,
    shapes_key: str | None,
    image_key,
    coordinate_system: str | None,
    pixel_size_um,
    batch_size: int,
    device: str | None,
    progress_bar: bool,
):
    """The prediction table of one checked slide (see :func:`check_slide`), parsed but not written into it.

    This is the unit of work of :func:`predict_expression`, in this process or in a dask worker.
    """
    import anndata as ad
    from spatialdata.models import TableModel

    from st_from_he.pp import extract_patches

    patches = extract_patches(
        sdata,
        size_um=model.size_um,
        size_px=model.size_px,
        context=tuple(model.context),
        shapes_key=shapes_key,
        table_key=table_key,
        image_key=image_key,
        coordinate_system=coordinate_system,
        pixel_size_um=pixel_size_um,
    )
    with timed(f"Predicting {len(model.genes)} genes at {len(patches)} spots"):
        if model.features is not None:  # [features] heads on cached embeddings: read obsm (checked), cut no patches
            expression, embeddings = model.predict_table(
                sdata, table_key=table_key, shapes_key=shapes_key, device=device, progress_bar=progress_bar
            )
        else:
            expression, embeddings = model.predict_patches(
                patches, groups=patches.samples, device=device, batch_size=batch_size, progress_bar=progress_bar
            )
    obs = _spot_obs(sdata, patches, table_key=table_key, shapes_key=shapes_key)
    table = ad.AnnData(X=expression, obs=obs, var=pd.DataFrame(index=pd.Index(model.genes, name=None)))
    table.obsm[SPATIAL_KEY] = np.asarray(patches.spatial, dtype=float)
    table.obsm["X_he"] = embeddings
    table.uns["predict_expression"] = {
        "params": {"table_key": table_key, "shapes_key": shapes_key, "batch_size": batch_size},
        "model": {
            "preset": model.preset,
            "n_genes": len(model.genes),
            "size_um": model.size_um,
            "size_px": model.size_px,
            "context": list(model.context),
            "blend": model.blend,
            "trained_on": list(model.training_info.get("samples", [])),
        },
        "units": "log1p(counts per 10,000)",
        # each circles element's micrometre coordinate system: squidpy's `elements_to_coordinate_systems`
        "coordinate_systems": _coordinate_systems(sdata, obs),
    }
    regions = list(dict.fromkeys(obs[REGION_KEY].astype(str)))
    return TableModel.parse(table, region=regions, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def _check_key_added(sdata, key_added, *, table_key: str, overwrite: bool) -> None:
    """Refuse a ``key_added`` that would replace measured data (whatever ``overwrite``) or, without it, any table.

    Only a table written by :func:`predict_expression` (it carries ``uns["predict_expression"]``) may be replaced.
    """
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty table name, got {key_added!r}.")
    if key_added == table_key:
        raise ValueError(
            f"`key_added` {key_added!r} is the measured table (`table_key`): measured data are never overwritten, "
            f"whatever `overwrite`. Choose another `key_added`, e.g. {PREDICTED_KEY!r}."
        )
    if key_added not in sdata.tables:
        return
    if "predict_expression" not in sdata.tables[key_added].uns:
        raise ValueError(
            f"Table {key_added!r} was not written by `sth.tl.predict_expression` (it may hold measured counts), so "
            f"it is never replaced, whatever `overwrite`. Choose another `key_added`, or delete that table yourself "
            f"first (`del sdata.tables[{key_added!r}]`) if you really mean to drop it."
        )
    if not overwrite:
        raise KeyError(f"Table {key_added!r} exists; pass `overwrite=True` or choose another `key_added`.")
    logger.info("Replacing the prediction table %r.", key_added)


def _spot_obs(sdata, patches, *, table_key: str | None, shapes_key: str | None) -> pd.DataFrame:
    """sample, region and instance id of every patch's spot, keyed by the patches' obs_names."""
    names = pd.Index(patches.obs_names)
    if shapes_key is None:
        # patches follow the table's rows one to one (by position: obs_names need not be unique)
        measured = sdata.tables[table_key]
        if measured.n_obs != len(names) or not np.array_equal(measured.obs_names.to_numpy(), names.to_numpy()):
            raise RuntimeError("Patches and table rows disagree; this is a bug, please report it.")
        regions = spot_regions(measured)
        _, instance_key, _ = table_attrs(measured)
        if regions is None or instance_key is None:
            raise KeyError(
                f"Table {table_key!r} annotates no circles (no spatialdata region and instance key), so the "
                f"predictions could not annotate them. Parse it with `spatialdata.models.TableModel.parse(table, "
                f"region=..., region_key=..., instance_key=...)`."
            )
        obs = pd.DataFrame(
            {
                SAMPLE_KEY: np.asarray(patches.samples).astype(str),
                REGION_KEY: regions,
                INSTANCE_KEY: measured.obs[instance_key].to_numpy(),
            },
            index=names,
        )
    else:
        obs = pd.DataFrame(
            {
                SAMPLE_KEY: np.asarray(patches.samples).astype(str),
                REGION_KEY: shapes_key,
                INSTANCE_KEY: sdata.shapes[shapes_key].index.to_numpy(),
            },
            index=names,
        )
    for key in (SAMPLE_KEY, REGION_KEY):
        obs[key] = pd.Categorical(obs[key].astype(str))
    return obs


def _coordinate_systems(sdata, obs: pd.DataFrame) -> dict[str, str]:
    """Each circles element's coordinate system for squidpy.

    Its section's own system (micrometres in the package's layout) when it has one, else the first one it has.
    """
    out = {}
    for region, sample in obs[[REGION_KEY, SAMPLE_KEY]].drop_duplicates().to_numpy():
        systems = list(systems_of(sdata, str(region))) if str(region) in sdata.shapes else []
        out[str(region)] = str(sample) if not systems or str(sample) in systems else str(systems[0])
    return out


def _default_model(reference):
    from st_from_he.pp import select_genes

    from ._data import as_list
    from ._model import ExpressionModel

    parts = as_list(reference)
    for part in parts:
        check_sdata(part, "sth.tl.predict_expression(reference=...)")
    keys = {find_table(part, None, what="measured") for part in parts}
    if len(keys) != 1:
        raise ValueError(f"The `reference` sections keep their counts in differently named tables {sorted(keys)}.")
    table_key = keys.pop()
    genes = list(dict.fromkeys(g for s in parts for g in select_genes(s, table_key=table_key)))
    shared = set.intersection(*(set(s.tables[table_key].var_names) for s in parts))
    genes = [g for g in genes if g in shared]
    logger.info("Training a default model on the reference sections (%d genes)", len(genes))
    return ExpressionModel(genes, preset="default").fit(reference, table_key=table_key)
