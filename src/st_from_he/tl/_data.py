"""SpatialData -> arrays for the models: patches (in memory, or read lazily), log-normalised targets, spot identities."""

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

    patches: np.ndarray | LazyPatches  # uint8 (n, s, 3, h, w), in memory or read on demand
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
        return SpotArrays(take_rows(self.patches, idx), self.obs.iloc[idx], self.targets[idx], glass, positions_um)

    @property
    def is_lazy(self) -> bool:
        """Whether the patches are read on demand (:class:`LazyPatches`) rather than held in memory."""
        return isinstance(self.patches, LazyPatches)

    def in_memory(self) -> SpotArrays:
        """The same spots with their patches read into one in-memory array (itself if they already are)."""
        if not self.is_lazy:
            return self
        return SpotArrays(self.patches.to_numpy(), self.obs, self.targets, self.glass, self.positions_um)


class LazyPatches:
    """The uint8 patches ``(n, s, 3, h, w)`` of some spots of one or more PatchDatasets, read when indexed.

    An array-like for training data that need not fit in memory: ``len``, ``shape``, ``dtype``, ``ndim`` and
    ``nbytes`` (of the whole array, were it read), and indexing with an int (one ``(s, 3, h, w)`` patch), a slice,
    or an array of ints or bools (the stacked patches, in that order) return exactly what indexing the in-memory
    array would. :meth:`take` and :func:`concat_patches` stay lazy. Each batch is read through
    :class:`~st_from_he.pp.PatchDataset`, which shares decoded image data between calls (its cache).

    Parameters
    ----------
    datasets
        The PatchDatasets the patches come from.
    source
        For each item, the position of its dataset in ``datasets``.
    rows
        For each item, its row in that dataset.
    """

    dtype = np.dtype(np.uint8)
    ndim = 5

    def __init__(self, datasets: Sequence, source: np.ndarray, rows: np.ndarray):
        self.datasets = list(datasets)
        self.source = np.asarray(source, dtype=np.intp)
        self.rows = np.asarray(rows, dtype=np.intp)
        if self.source.shape != self.rows.shape or self.source.ndim != 1:
            raise ValueError("`source` and `rows` must be 1D arrays of the same length, one entry per patch.")
        shapes = {(ds.n_scales, 3, ds.size_px, ds.size_px) for ds in self.datasets}
        if len(shapes) > 1:
            raise ValueError(f"The PatchDatasets cut patches of different shapes {sorted(shapes)}; they cannot stack.")
        self._item_shape = shapes.pop() if shapes else (1, 3, 0, 0)

    @classmethod
    def of(cls, dataset, rows: np.ndarray | None = None) -> LazyPatches:
        """The patches at ``rows`` (default: all) of one :class:`~st_from_he.pp.PatchDataset`."""
        rows = np.arange(len(dataset)) if rows is None else np.asarray(rows, dtype=np.intp)
        return cls([dataset], np.zeros(len(rows), dtype=np.intp), rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(n, s, 3, h, w)``."""
        return (len(self), *self._item_shape)

    @property
    def nbytes(self) -> int:
        """Bytes the patches would take in memory."""
        return int(np.prod(self.shape, dtype=np.int64))

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, int | np.integer):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"Index {i} is out of range for {len(self)} patches.")
            return self._read(np.array([i % len(self)]))[0]
        return self._read(self._positions(index))

    def take(self, index) -> LazyPatches:
        """The patches at ``index`` (a slice, or an array of ints or bools), still lazy."""
        idx = self._positions(index)
        return LazyPatches(self.datasets, self.source[idx], self.rows[idx])

    def to_numpy(self) -> np.ndarray:
        """All patches read into one array."""
        return self._read(np.arange(len(self)))

    def __array__(self, dtype=None, copy=None):
        out = self.to_numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyPatches of {len(self)} patches {self._item_shape} from {len(self.datasets)} PatchDataset(s)"

    def _positions(self, index) -> np.ndarray:
        from st_from_he.pp._patches import index_positions

        return index_positions(index, len(self))

    def _read(self, idx: np.ndarray) -> np.ndarray:
        """Patches at positions ``idx``: one read per dataset, written into their places of one array."""
        from st_from_he._memory import empty_uint8

        out = empty_uint8((len(idx), *self._item_shape))
        source = self.source[idx]
        for s in dict.fromkeys(source.tolist()):  # each dataset once, in order of first appearance
            pos = np.flatnonzero(source == s)
            patches = self.datasets[s][self.rows[idx[pos]]]
            out[pos] = patches[:, None] if patches.ndim == 4 else patches  # one context scale: add its axis
        return out


def take_rows(patches, idx):
    """Rows ``idx`` of in-memory patches (a copy) or of :class:`LazyPatches` (still lazy)."""
    return patches.take(idx) if isinstance(patches, LazyPatches) else patches[idx]


def concat_patches(parts: Sequence) -> np.ndarray | LazyPatches:
    """Row-wise concatenation of patches: lazy if every part is :class:`LazyPatches`, else read into one array."""
    if parts and all(isinstance(p, LazyPatches) for p in parts):
        datasets, source, rows = [], [], []
        for p in parts:
            source.append(p.source + len(datasets))
            rows.append(p.rows)
            datasets.extend(p.datasets)
        return LazyPatches(datasets, np.concatenate(source), np.concatenate(rows))
    return np.concatenate([np.asarray(p) for p in parts])


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
    lazy: bool = False,
) -> SpotArrays:
    """Patches and log-normalised targets of the measured spots (rows of ``table_key``) of one SpatialData.

    ``spots`` restricts to these obs_names (few-shot training). ``table_key=None`` takes the obvious table
    (:func:`st_from_he._sdata.find_table`); ``image_key``, ``coordinate_system`` and ``pixel_size_um`` are passed
    to :func:`st_from_he.pp.extract_patches`; ``target_sum`` to :func:`measured_targets`. ``lazy``: the patches as
    :class:`LazyPatches`, read when indexed, instead of read now into memory.
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
    if lazy:
        patches = LazyPatches.of(dataset, idx)
    else:
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
    """Row-wise concatenation of several SpotArrays (lazy patches stay lazy)."""
    glass = None if any(p.glass is None for p in parts) else np.concatenate([p.glass for p in parts])
    positions = None if any(p.positions_um is None for p in parts) else np.concatenate([p.positions_um for p in parts])
    return SpotArrays(
        concat_patches([p.patches for p in parts]),
        pd.concat([p.obs for p in parts]),
        np.concatenate([p.targets for p in parts]),
        glass,
        positions,
    )
