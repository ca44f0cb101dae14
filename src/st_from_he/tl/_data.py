"""SpatialData -> arrays for the models: patches, log-normalised targets and spot identities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from st_from_he._sdata import SAMPLE_KEY, TABLE_KEY
from st_from_he.pp._normalize import TARGET_SUM  # the evaluation protocol: normalize_total(1e4) then log1p


@dataclass
class SpotArrays:
    """Patches and measured targets of a set of spots, row-aligned."""

    patches: np.ndarray  # uint8 (n, s, 3, h, w)
    obs: pd.DataFrame  # obs of the spots (index: obs_names), with a "sample" column
    targets: np.ndarray  # float32 (n, genes) log1p CP10k
    glass: np.ndarray | None = None  # (n, 3) glass colour of each spot's slide, for white balance (patches only)
    positions_um: np.ndarray | None = None  # (n, 2) spot centres in micrometres, for neighbours (patches only)

    @property
    def sections(self) -> np.ndarray:
        """The sample (section) of each spot."""
        return self.obs[SAMPLE_KEY].to_numpy()

    def subset(self, idx: np.ndarray) -> SpotArrays:
        """The spots at positions ``idx``."""
        glass = None if self.glass is None else self.glass[idx]
        positions_um = None if self.positions_um is None else self.positions_um[idx]
        return SpotArrays(self.patches[idx], self.obs.iloc[idx], self.targets[idx], glass, positions_um)


def as_list(sdata) -> list:
    """One SpatialData or a sequence of them, as a list."""
    return list(sdata) if isinstance(sdata, Sequence) else [sdata]


def measured_targets(
    table,
    genes: Sequence[str],
    *,
    fill_missing_genes: bool = False,
    where: str = "",
    target_sum: float | str = TARGET_SUM,
) -> np.ndarray:
    """log1p(CP10k) of the model genes, normalised over ALL measured genes of each spot (the library size).

    ``target_sum="median"``: each spot scaled to the median total of its section's spots instead of 10,000 (the
    reference authors' ``normalize_total`` per section, zero-count spots left out of the median).
    """
    from st_from_he._validate import check_raw_counts
    from st_from_he.pp._normalize import log_normalize

    if table.uns.get("st_from_he", {}).get("raw_counts") is False:
        raise ValueError(
            f"Table{where} holds normalised values, not raw counts (recorded by `attach_histology`). Training and "
            f"evaluation need raw counts: attach an AnnData whose X (or a layer you copy to X) holds raw counts."
        )
    check_raw_counts(table.X, where=f"Table{where} X")
    genes = list(genes)
    index = table.var_names.get_indexer(genes)
    missing = [g for g, i in zip(genes, index, strict=True) if i < 0]
    if missing and not fill_missing_genes:
        raise ValueError(
            f"{len(missing)} model gene(s) are not measured in table{where}: {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}. Choose genes shared by all sections (`sth.pp.select_genes`) or "
            f"pass `fill_missing_genes=True` to treat them as zero."
        )
    lognorm = log_normalize(table.X, target_sum=section_medians(table) if target_sum == "median" else target_sum)
    out = np.zeros((table.n_obs, len(genes)), dtype=np.float32)
    present = index >= 0
    out[:, present] = lognorm[:, index[present]]
    return out


def section_medians(table) -> np.ndarray:
    """The median total count of each spot's section, per spot (spots without counts left out of the median)."""
    from st_from_he._sdata import spot_sections

    totals = np.asarray(table.X.sum(axis=1), dtype=np.float64).ravel()
    sections = spot_sections(table)
    out = np.empty(len(totals))
    for section in np.unique(sections):
        rows = sections == section
        counted = totals[rows][totals[rows] > 0]
        out[rows] = np.median(counted) if len(counted) else 1.0  # a section without counts: all zeros anyway
    return out


def spot_arrays(
    sdata,
    genes: Sequence[str],
    *,
    size_um: float,
    size_px: int,
    context: Sequence[float],
    table_key: str | None = TABLE_KEY,
    fill_missing_genes: bool = False,
    spots: Sequence[str] | None = None,
    image_key=None,
    coordinate_system: str | None = None,
    pixel_size_um=None,
    target_sum: float | str = TARGET_SUM,
) -> SpotArrays:
    """Patches and log-normalised targets of the measured spots (rows of ``table_key``) of one SpatialData.

    ``spots`` restricts to these obs_names (few-shot training). ``table_key=None`` takes the obvious table
    (:func:`st_from_he._sdata.find_table`); ``image_key``, ``coordinate_system`` and ``pixel_size_um`` are passed
    to :func:`st_from_he.pp.extract_patches`; ``target_sum`` to :func:`measured_targets`.
    """
    from st_from_he._sdata import find_table
    from st_from_he.pp import extract_patches

    table_key = find_table(sdata, table_key, what="measured")
    dataset = extract_patches(
        sdata,
        size_um=size_um,
        size_px=size_px,
        context=tuple(context),
        table_key=table_key,
        image_key=image_key,
        coordinate_system=coordinate_system,
        pixel_size_um=pixel_size_um,
    )
    obs = pd.DataFrame({SAMPLE_KEY: np.asarray(dataset.samples).astype(str)}, index=dataset.obs_names)
    idx = np.arange(len(dataset))  # the dataset's items are the table's rows, in order
    if spots is not None:
        if not obs.index.is_unique:
            raise ValueError(
                f"Table {table_key!r} has repeated obs_names, so `spots` cannot name its spots; make them unique "
                f"first (`table.obs_names_make_unique()`)."
            )
        idx = obs.index.get_indexer(list(spots))
        if (idx < 0).any():
            raise KeyError(f"Spots not found in the table: {list(np.asarray(spots)[idx < 0][:10])}.")
    patches = dataset[idx] if len(idx) else np.zeros((0, len(context), 3, size_px, size_px), np.uint8)
    if patches.ndim == 4:  # one context scale: give every spot its scale axis
        patches = patches[:, None]
    table = sdata.tables[table_key]
    targets = measured_targets(
        table, genes, fill_missing_genes=fill_missing_genes, where=f" {table_key!r}", target_sum=target_sum
    )[idx]
    positions_um = dataset.spatial_um()
    return SpotArrays(patches, obs.iloc[idx], targets, dataset.glass_per_spot()[idx], positions_um[idx])


def concat_arrays(parts: list[SpotArrays]) -> SpotArrays:
    """Row-wise concatenation of several SpotArrays."""
    glass = None if any(p.glass is None for p in parts) else np.concatenate([p.glass for p in parts])
    positions = None if any(p.positions_um is None for p in parts) else np.concatenate([p.positions_um for p in parts])
    return SpotArrays(
        np.concatenate([p.patches for p in parts]),
        pd.concat([p.obs for p in parts]),
        np.concatenate([p.targets for p in parts]),
        glass,
        positions,
    )
