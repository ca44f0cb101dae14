"""Split a SpatialData by section, so that no model is trained and tested on the same section."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._sdata import (
    SAMPLE_KEY,
    as_names,
    check_sdata,
    find_table,
    samples,
    spot_regions,
    spot_sections,
    systems_of,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def split_sections(
    sdata: SpatialData,
    *,
    test: Sequence[str] | str,
    val: Sequence[str] | str | None = None,
    table_key: str | None = None,
) -> tuple[SpatialData, ...]:
    """Split sections into training and test (and validation) sets by sample id.

    A spot's section is ``obs["sample"]`` when the table has it, else the region (shapes element) it annotates, as
    spatialdata-io writes. Every element (image, labels, shapes, points) goes with the section whose coordinate
    systems it is in: the section's id and the systems of the circles its spots annotate (e.g. spatialdata-io's
    ``"C6"``, ``"C6_downscaled_hires"``); where several sections share a system (e.g. ``"global"``), an element goes
    with the section it is named after (``f"{S}_..."``) or whose spots it holds. Every table keeps the rows of its
    set's sections, re-annotating only the regions that remain.

    Parameters
    ----------
    sdata
        Several sections following the package's data model.
    test
        Sample id(s) of the test set.
    val
        Sample id(s) of a validation set, if wanted.
    table_key
        Table whose spots list the sections; default ``"table"``, else the only table. It must exist unless ``sdata``
        holds no table at all (an H&E-only SpatialData, whose sections are those of its images ``f"{S}_image"``).

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
        table_key = find_table(sdata, table_key)
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


def _section_systems(sdata: SpatialData, table_key: str | None, present: list[str]) -> dict[str, set[str]]:
    """The coordinate systems that belong to one section only: its id and those of the circles its spots annotate."""
    systems = {sample: {sample} for sample in present}
    if table_key is not None and table_key in sdata.tables:
        table = sdata.tables[table_key]
        regions = spot_regions(table)
        if regions is not None:
            sample_of = spot_sections(table, table_key=table_key)
            for sample in present:
                for region in dict.fromkeys(regions[sample_of == sample]):
                    if region in sdata.shapes:
                        systems[sample] |= set(systems_of(sdata, region))
    claims = [cs for found in systems.values() for cs in found]
    return {sample: {cs for cs in found if claims.count(cs) == 1} for sample, found in systems.items()}


def _subset(sdata: SpatialData, keep: list[str], table_key: str | None) -> SpatialData:
    """The elements of sections ``keep`` and the matching table rows, as a new SpatialData."""
    from spatialdata import SpatialData

    present = samples(sdata, table_key)
    own = _section_systems(sdata, table_key, present)
    mine = set().union(*(own[s] for s in keep))
    anyone = set().union(*own.values())
    regions_kept = set()
    if table_key is not None and table_key in sdata.tables:
        table = sdata.tables[table_key]
        regions = spot_regions(table)
        if regions is not None:
            regions_kept = set(regions[np.isin(spot_sections(table, table_key=table_key), keep)])
    kinds = {"images": {}, "labels": {}, "points": {}, "shapes": {}}
    orphans = []
    for kind in kinds:
        for name, element in getattr(sdata, kind).items():
            systems = set(systems_of(sdata, name))
            if systems & mine or name in regions_kept:
                kinds[kind][name] = element
            elif systems & anyone:
                continue  # another section's
            elif any(name.startswith(f"{s}_") for s in keep):  # in a system shared by sections: named after one
                kinds[kind][name] = element
            elif not any(name.startswith(f"{s}_") for s in present):
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
    return SpatialData(**kinds, tables=tables, attrs=dict(sdata.attrs))


def _filter_table(table: AnnData, keep: list[str], kept_elements: set[str]) -> AnnData | None:
    """Rows of ``table`` for sections ``keep`` annotating kept elements, re-parsed with the remaining regions."""
    from spatialdata.models import TableModel

    attrs = table.uns.get(TableModel.ATTRS_KEY)
    mask = np.ones(table.n_obs, dtype=bool)
    if SAMPLE_KEY in table.obs:
        mask &= table.obs[SAMPLE_KEY].astype(str).isin(keep).to_numpy()
    elif not attrs:
        logger.info("A table annotates no element and has no obs[%r]; it is kept whole in every split.", SAMPLE_KEY)
        return table.copy()
    if attrs:  # rows annotating elements of the kept sections (without obs["sample"], the region is the section)
        mask &= table.obs[attrs[TableModel.REGION_KEY_KEY]].astype(str).isin(kept_elements).to_numpy()
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
