"""Split a SpatialData by section, so that no model is trained and tested on the same section."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._sdata import SAMPLE_KEY, TABLE_KEY, as_names, check_sdata, check_table_key, samples

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def split_sections(
    sdata: SpatialData,
    *,
    test: Sequence[str] | str,
    val: Sequence[str] | str | None = None,
    table_key: str = TABLE_KEY,
) -> tuple[SpatialData, ...]:
    """Split sections into training and test (and validation) sets by sample id.

    Every element (image, labels, shapes, points) goes with the sample whose coordinate system it belongs to; every
    table keeps the rows of its set's samples, re-annotating only the regions that remain.

    Parameters
    ----------
    sdata
        Several sections following the package's data model.
    test
        Sample id(s) of the test set.
    val
        Sample id(s) of a validation set, if wanted.
    table_key
        Table whose ``obs["sample"]`` lists the samples; it must exist unless ``sdata`` holds no table at all (an
        H&E-only SpatialData, whose samples are those of its images).

    Returns
    -------
    ``(train, test)``, or ``(train, val, test)`` when ``val`` is given: new :class:`~spatialdata.SpatialData` objects.
    Their tables are filtered copies; their images and shapes are the same (lazy) objects as in ``sdata``, not
    copies. ``sdata`` is not modified.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C5", "C6"], path="../shared/data/her2st")
    >>> train, test = sth.pp.split_sections(sdata, test="C6")
    >>> sorted(test.tables["table"].obs["sample"].unique())
    ['C6']
    """
    check_sdata(sdata, "sth.pp.split_sections", needs_image=False)
    if sdata.tables:  # without any table (H&E only) the sections are those of the images
        check_table_key(sdata, table_key)
    present = samples(sdata, table_key)
    test = _as_list(test, "test")
    val = _as_list(val, "val") if val is not None else []
    unknown = [s for s in test + val if s not in present]
    if unknown:
        raise ValueError(f"Unknown sample id(s) {unknown}; the sections are {present}.")
    overlap = sorted(set(test) & set(val))
    if overlap:
        raise ValueError(f"Sample(s) {overlap} are in both `test` and `val`.")
    train = [s for s in present if s not in test and s not in val]
    if not train:
        raise ValueError(f"No section is left for training: {present} are all in `test` or `val`.")
    parts = [train, *([val] if val else []), test]
    result = tuple(_subset(sdata, part, table_key) for part in parts)
    logger.info("Split %d sections: train %s%s, test %s", len(present), train, f", val {val}" if val else "", test)
    return result


def _as_list(ids, name: str) -> list[str]:
    ids = as_names(ids, name)
    if not ids:
        raise ValueError(f"`{name}` names no section.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"`{name}` repeats sample ids: {ids}.")
    return [str(s) for s in ids]


def _subset(sdata: SpatialData, keep: list[str], table_key: str) -> SpatialData:
    """The elements of samples ``keep`` and the matching table rows, as a new SpatialData."""
    from spatialdata import SpatialData
    from spatialdata.transformations import get_transformation

    kinds = {"images": {}, "labels": {}, "points": {}, "shapes": {}}
    orphans = []
    for kind in kinds:
        for name, element in getattr(sdata, kind).items():
            systems = set(get_transformation(element, get_all=True))
            if systems & set(keep):
                kinds[kind][name] = element
            elif not systems & set(samples(sdata, table_key)):
                orphans.append(name)
    if orphans:
        logger.info("Element(s) %s belong to no section's coordinate system and are left out.", orphans)
    kept = {name for elements in kinds.values() for name in elements}
    tables = {}
    for name, table in sdata.tables.items():
        sub = _filter_table(table, keep, kept)
        if sub is not None and sub.n_obs:
            tables[name] = sub
        elif name == table_key:
            raise ValueError(f"Table {table_key!r} has no rows for samples {keep}.")
    return SpatialData(**kinds, tables=tables)


def _filter_table(table: AnnData, keep: list[str], kept_elements: set[str]) -> AnnData | None:
    """Rows of ``table`` for samples ``keep`` annotating kept elements, re-parsed with the remaining regions."""
    from spatialdata.models import TableModel

    attrs = table.uns.get(TableModel.ATTRS_KEY)
    mask = np.ones(table.n_obs, dtype=bool)
    if SAMPLE_KEY in table.obs:
        mask &= table.obs[SAMPLE_KEY].astype(str).isin(keep).to_numpy()
    if attrs:
        mask &= table.obs[attrs[TableModel.REGION_KEY_KEY]].astype(str).isin(kept_elements).to_numpy()
    elif SAMPLE_KEY not in table.obs:
        logger.info("A table annotates no element and has no obs[%r]; it is kept whole in every split.", SAMPLE_KEY)
        return table.copy()
    sub = table[mask].copy()
    for col in sub.obs.columns:
        if isinstance(sub.obs[col].dtype, pd.CategoricalDtype):
            sub.obs[col] = sub.obs[col].cat.remove_unused_categories()
    if not attrs:
        return sub
    region_key, instance_key = attrs[TableModel.REGION_KEY_KEY], attrs[TableModel.INSTANCE_KEY]
    regions = list(dict.fromkeys(sub.obs[region_key].astype(str)))
    del sub.uns[TableModel.ATTRS_KEY]
    if not regions:
        return sub
    return TableModel.parse(sub, region=regions, region_key=region_key, instance_key=instance_key)
