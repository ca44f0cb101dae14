"""Leave-one-section (or patient) out cross-validation and few-shot learning curves of several presets."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from st_from_he._logging import logger, timed
from st_from_he._sdata import (
    SAMPLE_KEY,
    TABLE_KEY,
    as_names,
    check_sdata,
    check_table_key,
    samples,
    spot_sections,
)
from st_from_he._settings import settings
from st_from_he._validate import check_number

from ._gene_sets import BREAST_MARKERS, _check_gene_sets
from ._presets import check_preset

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ._model import ExpressionModel

GeneSets = Sequence[str] | Mapping[str, Sequence[str] | None]

# fit() arguments that cross_validate and few_shot set themselves
_RESERVED_FIT_KWARGS = frozenset({"table_key", "max_epochs", "seed", "spots", "progress_bar"})


# --------------------------------------------------------------------------------------------------------------------
# cross_validate
# --------------------------------------------------------------------------------------------------------------------
def cross_validate(
    sdata: SpatialData,
    *,
    groups: str | Mapping[str, Hashable] | Callable[[str], Hashable] = SAMPLE_KEY,
    presets: Sequence[str] | Mapping[str, str] = ("default", "cmrc", "ridge"),
    genes: Sequence[str] | None = None,
    n_top: int = 1000,
    markers: Sequence[str] | None = BREAST_MARKERS,
    test_groups: Sequence[Hashable] | None = None,
    table_key: str = TABLE_KEY,
    max_epochs: int | None = None,
    seed: int = 0,
    gene_sets: GeneSets = ("heg", "hvg", "markers", "all"),
    n_genes: int = 50,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    fit_kwargs: Mapping[str, Any] | None = None,
    return_per_gene: bool = False,
    progress_bar: bool | None = None,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Leave-one-group-out cross-validation of several presets on the same folds and with the same budget.

    Each group of sections (a section, or a patient's sections) is held out in turn. For every fold the genes are
    chosen on the training sections only, every preset is fitted on the training sections with the same budget
    (``max_epochs``, ``seed``), predicts the held-out sections and is scored with :func:`~st_from_he.tl.evaluate`.
    The work happens on copies of the tables (:func:`~st_from_he.pp.split_sections`): ``sdata`` is not modified.

    Parameters
    ----------
    sdata
        Sections with measured raw counts, following the package's data model.
    groups
        What is held out together: the name of an obs column of the table that is constant within each section
        (``"sample"``, the default, holds out one section at a time; e.g. ``"patient"``), a mapping from sample id
        to group, or a function of the sample id (her2st patients: ``groups=lambda sample: sample[0]``).
    presets
        Presets of :class:`~st_from_he.tl.ExpressionModel` to compare; their names are the ``method`` column. A
        mapping from method name to preset compares one preset under several settings (with ``model_kwargs``), e.g.
        ``{"default": "default", "resnet": "default"}``.
    genes
        Genes to predict in every fold; default: per fold, :func:`~st_from_he.pp.select_genes` on the training
        sections (``n_top`` per section plus the measured ``markers``), keeping those with counts in the held-out
        sections.
    n_top
        Genes per training section when ``genes`` is ``None``.
    markers
        Marker genes added to the selected genes and scored as the ``"markers"`` set (default: the breast-cancer
        list of the protocol, :data:`~st_from_he.tl.BREAST_MARKERS`); ``None`` adds none and leaves the
        ``"markers"`` set empty (drop it from ``gene_sets``).
    test_groups
        Hold out only these groups (default: every group in turn); all other groups always train.
    table_key
        Table holding the measured raw counts and ``obs["sample"]``.
    max_epochs
        Training epochs of the neural presets (default: each preset's); the closed-form baselines ignore it.
    seed
        Seeds each fit (the same in every fold, so that presets and folds are reproducible).
    gene_sets
        Gene sets to score, as in :func:`~st_from_he.tl.evaluate` (chosen on each held-out section's measured data).
    n_genes
        Size of the HEG and HVG sets.
    model_kwargs
        Per method: keyword arguments of :class:`~st_from_he.tl.ExpressionModel`, e.g.
        ``{"default": {"encoder": "resnet18"}, "ridge": {"img_size": 64}}``.
    fit_kwargs
        Keyword arguments of :meth:`~st_from_he.tl.ExpressionModel.fit` for every method (e.g. ``batch_size``,
        ``accelerator``, ``patience``); ``max_epochs`` and ``seed`` are this function's own arguments.
    return_per_gene
        Also return the per-gene scores.
    progress_bar
        Show progress over folds x methods; default ``sth.settings.progress_bar``. The fits' own progress bars are
        off.

    Returns
    -------
    A tidy :class:`~pandas.DataFrame`, one row per fold, method, held-out section and gene set, ready for
    :func:`st_from_he.pl.metrics`:

    - ``fold`` (0, 1, ...), ``group`` (the held-out group), ``sample`` (the held-out section), ``method``, ``preset``;
    - ``gene_set``, ``pearson`` (mean PCC of the set's genes in the section; NaN for an empty set), ``n_genes`` (genes
      in the set), ``n_constant`` (of which constant in the prediction or the measurement, scored 0);
    - ``preservation`` (gene-gene correlation preservation on the section's HEG, see
      :func:`~st_from_he.tl.evaluate`), ``n_spots`` (spots of the held-out section), ``n_train_spots`` (spots handed
      to ``fit``, validation spots included), ``train_samples`` (training sections, comma-separated),
      ``fit_seconds``, ``predict_seconds``.

    With ``return_per_gene=True``, ``(summary, per_gene)`` where ``per_gene`` is the ``"per_gene"`` table of
    :func:`~st_from_he.tl.evaluate` for every fold and method, with ``fold``, ``group`` and ``method`` columns
    (also plottable: ``sth.pl.metrics(per_gene, kind="box")``). ``summary.attrs["cross_validate"]`` records the
    parameters.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C5", "C6"], path="../shared/data/her2st")
    >>> scores = sth.tl.cross_validate(sdata, presets=["ridge", "mean"], n_top=100)  # doctest: +SKIP
    >>> scores.groupby(["method", "gene_set"])["pearson"].mean()  # doctest: +SKIP
    >>> sth.pl.metrics(scores)  # doctest: +SKIP
    >>> by_patient = sth.tl.cross_validate(sdata, groups=lambda sample: sample[0])  # doctest: +SKIP
    """
    check_sdata(sdata, "sth.tl.cross_validate")
    _check_common(sdata, table_key, n_top, n_genes)
    methods = _methods(presets, model_kwargs)
    fit_kwargs = _check_fit_kwargs(fit_kwargs)
    sets = _check_gene_sets(gene_sets)
    progress_bar = settings.progress_bar if progress_bar is None else progress_bar
    present = samples(sdata, table_key)
    group_of = _group_of_samples(sdata, groups, present, table_key)
    folds = _folds(group_of, test_groups)
    if genes is not None:
        genes = _check_genes(sdata, genes, table_key)

    from tqdm.auto import tqdm

    from st_from_he.pp import select_genes, split_sections

    summaries, per_genes = [], []
    bar = tqdm(total=len(folds) * len(methods), desc="Cross-validation", unit="fit", disable=not progress_bar)
    with timed(f"Cross-validating {list(methods)} over {len(folds)} fold(s) of {len(present)} sections"), bar:
        for fold, (group, test_samples) in enumerate(folds):
            train, test = split_sections(sdata, test=test_samples, table_key=table_key)
            train_samples = samples(train, table_key)
            if genes is None:
                selected = select_genes(train, n_top=n_top, markers=markers, table_key=table_key)
                fold_genes = _measured_in(test, selected, table_key)
            else:
                fold_genes = list(genes)
            logger.info(
                "Fold %d: holding out %s %s, training on %s, %d genes",
                fold,
                group,
                test_samples,
                train_samples,
                len(fold_genes),
            )
            for name, (preset, kwargs) in methods.items():
                bar.set_postfix_str(f"held out {group}, {name}")
                summary, per_gene = _fit_and_score(
                    train,
                    test,
                    name,
                    preset,
                    kwargs,
                    fold_genes,
                    table_key=table_key,
                    max_epochs=max_epochs,
                    seed=seed,
                    fit_kwargs=fit_kwargs,
                    sets=sets,
                    n_genes=n_genes,
                    markers=markers,
                )
                labels = {"fold": fold, "group": group}
                summaries.append(summary.assign(**labels))
                per_genes.append(per_gene.assign(**labels))
                bar.update()
    columns = [
        "fold",
        "group",
        "sample",
        "method",
        "preset",
        "gene_set",
        "pearson",
        "n_genes",
        "n_constant",
        "preservation",
        "n_spots",
        "n_train_spots",
        "train_samples",
        "fit_seconds",
        "predict_seconds",
    ]
    params = {"groups": groups if isinstance(groups, str) else "custom", "n_top": n_top}
    return _results(
        summaries,
        per_genes,
        columns,
        ["fold", "group", "method"],
        return_per_gene,
        "cross_validate",
        params | _shared_params(methods, max_epochs, seed, n_genes),
    )


# --------------------------------------------------------------------------------------------------------------------
# few_shot
# --------------------------------------------------------------------------------------------------------------------
def few_shot(
    sdata: SpatialData,
    *,
    test: Sequence[str] | str,
    train: Sequence[str] | str | None = None,
    n_train_spots: Sequence[int] | int = (50, 100, 200, 400, 800),
    presets: Sequence[str] | Mapping[str, str] = ("default", "ridge"),
    n_repeats: int = 1,
    genes: Sequence[str] | None = None,
    n_top: int = 1000,
    markers: Sequence[str] | None = BREAST_MARKERS,
    table_key: str = TABLE_KEY,
    max_epochs: int | None = None,
    seed: int = 0,
    gene_sets: GeneSets = ("heg", "hvg", "markers", "all"),
    n_genes: int = 50,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    fit_kwargs: Mapping[str, Any] | None = None,
    return_per_gene: bool = False,
    progress_bar: bool | None = None,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Learning curve: train on random subsets of spots of the training sections, score on held-out sections.

    For each repeat the training spots (pooled over the training sections) are shuffled once, and a model of each
    preset is fitted on the first ``n`` of them for every ``n`` in ``n_train_spots``: the subsets are nested, so the
    curve shows the effect of more data rather than of another draw. The genes are chosen once, on all spots of the
    training sections, so every point of the curve predicts the same genes. ``sdata`` is not modified.

    Parameters
    ----------
    sdata
        Sections with measured raw counts, following the package's data model.
    test
        Sample id(s) of the held-out sections.
    train
        Sample id(s) whose spots are drawn from; default: every section not in ``test``.
    n_train_spots
        Numbers of training spots (each at least 2). A number above the spots available uses them all, once, with a
        warning.
    presets
        Presets of :class:`~st_from_he.tl.ExpressionModel` to compare (the ``method`` column), or a mapping from
        method name to preset (see :func:`cross_validate`).
    n_repeats
        Independent draws of the subsets (repeat ``r`` draws with ``seed + r`` and fits with seed ``seed + r``).
    genes
        Genes to predict; default: :func:`~st_from_he.pp.select_genes` on the training sections (``n_top`` per
        section plus the measured ``markers``), keeping those with counts in the test sections.
    n_top
        Genes per training section when ``genes`` is ``None``.
    markers
        Marker genes added to the selected genes and scored as the ``"markers"`` set (``None``: none).
    table_key
        Table holding the measured raw counts and ``obs["sample"]``.
    max_epochs
        Training epochs of the neural presets (default: each preset's).
    seed
        Seeds the draws of spots and the fits.
    gene_sets
        Gene sets to score, as in :func:`~st_from_he.tl.evaluate`.
    n_genes
        Size of the HEG and HVG sets.
    model_kwargs
        Per method: keyword arguments of :class:`~st_from_he.tl.ExpressionModel`.
    fit_kwargs
        Keyword arguments of :meth:`~st_from_he.tl.ExpressionModel.fit` for every method (not ``max_epochs``,
        ``seed``, ``spots``).
    return_per_gene
        Also return the per-gene scores.
    progress_bar
        Show progress over repeats x sizes x methods; default ``sth.settings.progress_bar``.

    Returns
    -------
    A tidy :class:`~pandas.DataFrame`, one row per method, number of spots, repeat, test section and gene set:
    ``method``, ``preset``, ``n_train_spots`` (spots handed to ``fit``, validation spots included), ``repeat``,
    ``sample``, ``gene_set``, ``pearson``, ``n_genes``, ``n_constant``, ``preservation``, ``n_spots``,
    ``train_samples``, ``fit_seconds``, ``predict_seconds`` (as in :func:`cross_validate`). With
    ``return_per_gene=True``, ``(summary, per_gene)``, ``per_gene`` with ``method``, ``n_train_spots`` and ``repeat``
    columns.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C5", "C6"], path="../shared/data/her2st")
    >>> curve = sth.tl.few_shot(sdata, test="C6", n_train_spots=[25, 50, 100], presets=["ridge"])  # doctest: +SKIP
    >>> curve.pivot_table(index="n_train_spots", columns="gene_set", values="pearson")  # doctest: +SKIP
    """
    check_sdata(sdata, "sth.tl.few_shot")
    _check_common(sdata, table_key, n_top, n_genes)
    methods = _methods(presets, model_kwargs)
    fit_kwargs = _check_fit_kwargs(fit_kwargs)
    sets = _check_gene_sets(gene_sets)
    sizes = _check_sizes(n_train_spots)
    n_repeats = check_number(n_repeats, "n_repeats", integer=True, unit="draws")
    progress_bar = settings.progress_bar if progress_bar is None else progress_bar
    if genes is not None:
        genes = _check_genes(sdata, genes, table_key)

    from tqdm.auto import tqdm

    from st_from_he.pp import select_genes

    train_sd, test_sd = _few_shot_split(sdata, test, train, table_key)
    if genes is None:
        genes = _measured_in(
            test_sd, select_genes(train_sd, n_top=n_top, markers=markers, table_key=table_key), table_key
        )
    pool = train_sd.tables[table_key].obs_names
    clipped = [n for n in sizes if n >= len(pool)]
    if any(n > len(pool) for n in clipped):
        logger.warning(
            "The training sections have %d spots; n_train_spots %s use them all (once).",
            len(pool),
            [n for n in clipped if n > len(pool)],
        )
    sizes = [n for n in sizes if n < len(pool)] + ([len(pool)] if clipped else [])

    summaries, per_genes = [], []
    bar = tqdm(total=n_repeats * len(sizes) * len(methods), desc="Few-shot", unit="fit", disable=not progress_bar)
    with timed(f"Few-shot curve of {list(methods)} on {sizes} spots x {n_repeats} repeat(s)"), bar:
        for repeat in range(int(n_repeats)):
            order = np.random.default_rng(seed + repeat).permutation(len(pool))
            for n in sizes:
                spots = list(pool[np.sort(order[:n])])  # in table order
                for name, (preset, kwargs) in methods.items():
                    bar.set_postfix_str(f"{n} spots, {name}")
                    summary, per_gene = _fit_and_score(
                        train_sd,
                        test_sd,
                        name,
                        preset,
                        kwargs,
                        genes,
                        table_key=table_key,
                        max_epochs=max_epochs,
                        seed=seed + repeat,
                        fit_kwargs=fit_kwargs | {"spots": spots},
                        sets=sets,
                        n_genes=n_genes,
                        markers=markers,
                    )
                    labels = {"n_train_spots": n, "repeat": repeat}
                    summaries.append(summary.drop(columns="n_train_spots").assign(**labels))
                    per_genes.append(per_gene.assign(**labels))
                    bar.update()
    columns = [
        "method",
        "preset",
        "n_train_spots",
        "repeat",
        "sample",
        "gene_set",
        "pearson",
        "n_genes",
        "n_constant",
        "preservation",
        "n_spots",
        "train_samples",
        "fit_seconds",
        "predict_seconds",
    ]
    params = {"n_train_spots": sizes, "n_repeats": int(n_repeats)}
    return _results(
        summaries,
        per_genes,
        columns,
        ["method", "n_train_spots", "repeat"],
        return_per_gene,
        "few_shot",
        params | _shared_params(methods, max_epochs, seed, n_genes),
    )


# --------------------------------------------------------------------------------------------------------------------
# shared work
# --------------------------------------------------------------------------------------------------------------------
def _shared_params(methods, max_epochs, seed, n_genes) -> dict[str, Any]:
    methods = {name: preset for name, (preset, _) in methods.items()}
    return {"methods": methods, "max_epochs": max_epochs, "seed": seed, "n_genes": n_genes}


def _results(summaries, per_genes, columns, first, return_per_gene, name, params):
    """The tidy summary (call parameters in ``attrs[name]``), and the per-gene table with ``first`` columns first."""
    summary = pd.concat(summaries, ignore_index=True)[columns]
    summary.attrs[name] = params
    if not return_per_gene:
        return summary
    per_gene = pd.concat(per_genes, ignore_index=True)
    return summary, per_gene[first + [c for c in per_gene.columns if c not in first]]


def _fit_and_score(
    train: SpatialData,
    test: SpatialData,
    name: str,
    preset: str,
    kwargs: Mapping[str, Any],
    genes: list[str],
    *,
    table_key: str,
    max_epochs: int | None,
    seed: int,
    fit_kwargs: Mapping[str, Any],
    sets: Mapping[str, Sequence[str] | None],
    n_genes: int,
    markers: Sequence[str] | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit one method on ``train``, predict and score ``test`` (a copy: its tables may be written)."""
    from ._evaluate import evaluate
    from ._model import ExpressionModel
    from ._predict import predict_expression

    model = ExpressionModel(genes, preset=preset, **kwargs)
    start = time.perf_counter()
    model.fit(train, table_key=table_key, max_epochs=max_epochs, seed=seed, progress_bar=False, **fit_kwargs)
    fit_seconds = time.perf_counter() - start
    key = f"predicted_{name}"
    start = time.perf_counter()
    predict_expression(test, model, table_key=table_key, key_added=key, overwrite=True, progress_bar=False)
    predict_seconds = time.perf_counter() - start
    result = evaluate(
        test,
        predicted_key=key,
        measured_key=table_key,
        gene_sets=dict(sets),
        n_genes=n_genes,
        markers=() if markers is None else markers,
    )
    del test.tables[key]  # the copy's prediction is scored; keep memory flat over folds
    per_gene = result["per_gene"].assign(method=name)
    info = model.training_info
    rows = []
    for sample, section in result["summary"].iterrows():
        scores = per_gene[per_gene["sample"] == sample]
        for gene_set in sets:
            members = scores[scores[gene_set].to_numpy(dtype=bool)]
            rows.append(
                {
                    "sample": str(sample),
                    "method": name,
                    "preset": preset,
                    "gene_set": gene_set,
                    "pearson": float(members["pearson"].mean()) if len(members) else float("nan"),
                    "n_genes": len(members),
                    "n_constant": int(members["constant"].sum()),
                    "preservation": float(section["preservation"]),
                    "n_spots": int(section["n_spots"]),
                    "n_train_spots": int(info.get("n_train_spots", 0) + info.get("n_val_spots", 0)),
                    "train_samples": ",".join(map(str, info.get("samples", []))),
                    "fit_seconds": fit_seconds,
                    "predict_seconds": predict_seconds,
                }
            )
    return pd.DataFrame(rows), per_gene


def _methods(presets, model_kwargs) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{method name: (preset, ExpressionModel kwargs)}``, checked before any work starts."""
    if isinstance(presets, str):
        presets = [presets]
    if isinstance(presets, Mapping):
        pairs = [(str(name), str(preset)) for name, preset in presets.items()]
    else:
        pairs = [(str(preset), str(preset)) for preset in presets]
    if not pairs:
        raise ValueError("`presets` is empty; name at least one preset, e.g. ('default', 'ridge').")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"`presets` repeats a method: {names}. To compare settings of one preset, pass a mapping "
            f"from method name to preset with `model_kwargs` per method."
        )
    for _, preset in pairs:
        check_preset(preset)
    model_kwargs = dict(model_kwargs or {})
    unknown = [k for k in model_kwargs if k not in names]
    if unknown:
        raise ValueError(f"`model_kwargs` names method(s) {unknown} that are not in `presets` {names}.")
    methods = {}
    for name, preset in pairs:
        kwargs = dict(model_kwargs.get(name) or {})
        if "preset" in kwargs or "genes" in kwargs:
            raise TypeError(f"`model_kwargs[{name!r}]` must not set 'preset' or 'genes'; they are chosen here.")
        _try_model(preset, kwargs, name)
        methods[name] = (preset, kwargs)
    return methods


def _try_model(preset: str, kwargs: Mapping[str, Any], name: str) -> ExpressionModel:
    """Build a throwaway model so that a bad option fails now rather than after the first fold's training."""
    from ._model import ExpressionModel

    try:
        return ExpressionModel(["_"], preset=preset, **kwargs)
    except TypeError as err:
        raise TypeError(f"Method {name!r} (preset {preset!r}): {err}") from err


def _check_common(sdata: SpatialData, table_key: str, n_top, n_genes) -> None:
    """The measured table exists, and the gene counts are positive integers (checked before any fit)."""
    check_table_key(sdata, table_key, what="measured")
    check_number(n_top, "n_top", integer=True, unit="genes")
    check_number(n_genes, "n_genes", integer=True, unit="genes")


def _check_fit_kwargs(fit_kwargs) -> dict[str, Any]:
    fit_kwargs = dict(fit_kwargs or {})
    reserved = sorted(_RESERVED_FIT_KWARGS & set(fit_kwargs))
    if reserved:
        raise TypeError(
            f"`fit_kwargs` must not set {reserved}: pass `max_epochs`, `seed` and `table_key` to this "
            f"function directly; spots and progress bars are set per fit."
        )
    return fit_kwargs


def _check_genes(sdata: SpatialData, genes, table_key: str) -> list[str]:
    genes = list(dict.fromkeys(as_names(genes, "genes")))
    if not genes:
        raise ValueError("`genes` is empty.")
    var_names = sdata.tables[table_key].var_names
    missing = [g for g in genes if g not in var_names]
    if missing:
        raise KeyError(
            f"{len(missing)} of {len(genes)} gene(s) are not measured in table {table_key!r}: "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}."
        )
    return genes


def _measured_in(test: SpatialData, genes: Sequence[str], table_key: str) -> list[str]:
    """``genes`` that have counts in the held-out sections (the protocol scores genes shared by all sections)."""
    table = test.tables[table_key]
    cols = table.var_names.get_indexer(list(genes))
    present = [g for g, c in zip(genes, cols, strict=True) if c >= 0]
    x = table.X[:, cols[cols >= 0]]
    counts = np.asarray(x.sum(axis=0)).ravel()
    kept = [g for g, c in zip(present, counts, strict=True) if c > 0]
    if len(kept) < len(genes):
        logger.info(
            "%d of %d selected genes have no count in the held-out section(s) and are left out.",
            len(genes) - len(kept),
            len(genes),
        )
    if not kept:
        raise ValueError("None of the selected genes has a count in the held-out section(s).")
    return kept


def _group_of_samples(sdata: SpatialData, groups, present: list[str], table_key: str) -> dict[str, str]:
    """``{sample: group label}`` for every section, checking that no group splits a section."""
    if groups == SAMPLE_KEY:
        return {s: s for s in present}
    if isinstance(groups, str):
        obs = sdata.tables[table_key].obs
        if groups not in obs:
            raise KeyError(
                f"`groups`: table {table_key!r} has no obs column {groups!r}; columns: {list(obs.columns)}. "
                f"Pass a mapping from sample id to group, or a function of the sample id, instead."
            )
        section = spot_sections(sdata.tables[table_key], table_key=table_key)  # obs["sample"], else the region
        pairs = pd.DataFrame({SAMPLE_KEY: section, groups: obs[groups].astype(str).to_numpy()}).drop_duplicates()
        split = pairs[SAMPLE_KEY][pairs[SAMPLE_KEY].duplicated()].unique().tolist()
        if split:
            raise ValueError(
                f"obs[{groups!r}] takes several values within section(s) {split}; a group must hold whole "
                f"sections (never train and test on the same section)."
            )
        return dict(zip(pairs[SAMPLE_KEY], pairs[groups], strict=True))
    if isinstance(groups, Mapping):
        missing = [s for s in present if s not in groups]
        if missing:
            raise KeyError(f"`groups` gives no group for section(s) {missing}.")
        return {s: str(groups[s]) for s in present}
    if callable(groups):
        return {s: str(groups(s)) for s in present}
    raise TypeError(f"`groups` must be an obs column name, a mapping or a function, got {type(groups).__name__}.")


def _folds(group_of: dict[str, str], test_groups) -> list[tuple[str, list[str]]]:
    """``[(group, its samples)]`` for the groups held out in turn."""
    members: dict[str, list[str]] = {}
    for sample, group in group_of.items():
        members.setdefault(group, []).append(sample)
    if len(members) < 2:
        raise ValueError(
            f"All sections {list(group_of)} are in one group {list(members)}: holding it out leaves no "
            f"training data. Cross-validation needs at least two groups."
        )
    if test_groups is None:
        chosen = list(members)
    else:
        chosen = [str(g) for g in ([test_groups] if isinstance(test_groups, str) else test_groups)]
        unknown = [g for g in chosen if g not in members]
        if unknown:
            raise ValueError(f"`test_groups` {unknown} are not groups of these sections; groups: {list(members)}.")
        if not chosen:
            raise ValueError("`test_groups` is empty.")
    return [(g, members[g]) for g in dict.fromkeys(chosen)]


def _check_sizes(n_train_spots) -> list[int]:
    sizes = [n_train_spots] if np.isscalar(n_train_spots) or n_train_spots is None else list(n_train_spots)
    if not sizes:
        raise ValueError("`n_train_spots` is empty.")
    sizes = [check_number(n, "n_train_spots", integer=True, unit="spots") for n in sizes]
    bad = [n for n in sizes if n < 2]
    if bad:
        raise ValueError(f"`n_train_spots` must be integers of at least 2, got {bad}.")
    return sorted(set(sizes))


def _few_shot_split(sdata: SpatialData, test, train, table_key: str) -> tuple[SpatialData, SpatialData]:
    from st_from_he.pp import split_sections

    rest, test_sd = split_sections(sdata, test=test, table_key=table_key)
    if train is None:
        return rest, test_sd
    train = [train] if isinstance(train, str) else [str(s) for s in train]
    available = samples(rest, table_key)
    bad = [s for s in train if s not in available]
    if bad:
        raise ValueError(f"`train` section(s) {bad} are not among the non-test sections {available}.")
    if set(train) == set(available):
        return rest, test_sd
    _, train_sd = split_sections(rest, test=train, table_key=table_key)  # "test" here: the part kept
    return train_sd, test_sd
