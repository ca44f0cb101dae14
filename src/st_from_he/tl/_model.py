"""`ExpressionModel`: train an image-to-expression model on measured sections, save it, load it, apply it."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from st_from_he._logging import logger, timed
from st_from_he._sdata import SPATIAL_KEY, TABLE_KEY
from st_from_he._settings import settings

from ._baselines import MIN_SECTION_SPOTS, MIN_TRAINING_SECTION_SPOTS, is_embedding_key
from ._data import TARGET_SUM, LazyPatches, SpotArrays, as_list, concat_arrays, spot_arrays
from ._presets import BASELINE_PRESETS, NEURAL_PRESETS, RIDGE_BLEND_PRESETS, check_preset
from ._training import check_device, check_strategy

_FORMAT = 1
_PACKAGE = "st_from_he"  # the marker in model.json of a model directory written by this package
_CONFIG_FILE, _WEIGHTS_FILE, _ARRAYS_FILE = "model.json", "weights.safetensors", "arrays.npz"
_MODEL_FILES = frozenset({_CONFIG_FILE, _WEIGHTS_FILE, _ARRAYS_FILE})
_BACKUP_TAG = ".old-"  # `.{name}.old-<hex>`: the previous model, kept while an overwrite swaps the new one in
_RIDGE_OPTIONS = frozenset(
    {
        "features",
        "context_scales",
        "img_size",
        "encoder",
        "encoder_weights",
        "encoder_kwargs",
        "lowres",
        "per_section",
        "rank",
        "white_balance",
        "neighbour_smoothing",
    }
)
# The default preset's ridge probe: hand-crafted and blob features of white-balanced patches, colour and composition
# centred per section (z-scoring them squeezes a new patient's different tissue mix), texture and blobs z-scored per
# section (their spread follows the image's resolution): cross-patient HVG PCC 0.117 / 0.113 at full / 4.6x lower
# resolution, against 0.058 / 0.053 all z-scored and 0.113 / 0.041 all centred (benchmarks/results/probe_variants.md);
# reduced-rank (30 axes: 20 to 50 measure the same on the benchmark, 5 is too few).
_BLEND_PROBE = {"features": "handcrafted+blobs", "per_section": "hybrid", "rank": 30, "white_balance": True}
_RIDGE_PREFIX = "ridge_"  # arrays of a neural model's ridge probe, beside its retrieval bank
# Fewest validation spots to choose blend weights on; with fewer, the components are weighed equally (on 5 spots of a
# 50-spot few-shot fit, the choice went all to retrieval, whose top 50 of a 50-spot bank is one constant profile)
MIN_BLEND_SPOTS = 10
# The components a neural model's prediction may blend, in the order they are summed.
_COMPONENTS = ("regression", "retrieval", "ridge")
# Spots per in-place step when a component is added into the blended predictions (bounds the temporaries).
_BLEND_CHUNK = 4096
_GENES_KEY = "model_genes"  # the genes, also in arrays.npz: a model.json whose genes were edited is refused
# `fit(stream="auto")` holds the training patches in memory when they take at most this fraction of the memory
# available (the rest is left for the network, the probe's features and the decoded images), else streams them
IN_MEMORY_FRACTION = 0.25


class ExpressionModel:
    """Predict gene expression from H&E patches of fixed physical size.

    A model is a preset (an architecture and its training recipe) plus the genes it predicts:

    - ``"default"``: a small CNN over the spot patch and a 3x context patch, trained with the soft-target
      contrastive loss, masked cross-modal reconstruction and a regression head, with colour, stain, zoom and blur
      (lower resolution) augmentation; predictions blend retrieval, regression and a ridge probe on hand-crafted
      features (of patches white-balanced by their slide's glass colour; colour centred and texture z-scored within
      each section; also fitted on blurred patches) with weights chosen on validation spots (their informative genes, correlated within each
      section), and are smoothed over each spot's grid neighbours (``neighbour_smoothing=0.5``).
    - ``"cmrc"``: the faithful reference method (ViT tokens, soft-target contrastive loss with tau = 1, masked
      cross-modal reconstruction, ``log(1 + L)`` losses, AdamW 1e-4 / 1e-3, cosine schedule, flips and 90-degree
      rotations, retrieval of the top 50 training spots).
    - ``"ridge"``: ridge regression on hand-crafted colour, stain and texture features (spot and 3x context).
    - ``"ridge_encoder"``: ridge regression on pooled features of a frozen resnet18 (or any ``encoder=``), by
      default randomly initialised from :meth:`fit`'s ``seed``; a saved model rebuilds the same encoder and checks
      its fingerprint.
    - ``"mean"``: the mean training expression everywhere.

    With ``features="X_<name>"`` (any preset but ``"mean"``), the model is trained on the cached embeddings in
    ``table.obsm["X_<name>"]`` that :func:`st_from_he.tl.embed` wrote (e.g. of UNI or EfficientNet-Lite0) instead of
    on image patches: the ridge presets fit ridge on the embedding vectors, the neural presets train their heads on
    them (no image encoder, no image augmentation; seconds on a CPU). The sections to predict need the same
    embedding, made by the same encoder with the same weights and patch size (``uns["X_<name>"]["params"]`` is
    checked; a mismatch is refused).

    A spot's prediction depends on its own patches only, never on the batch size or the order of the spots, with
    documented exceptions: ridge probes standardised per section (the default preset's, or ``per_section``)
    centre (or z-score) the image features of each section with the statistics of that section's spots predicted
    in the same call (at least 30 of them; fewer fall back to the training statistics); white balance uses the
    glass colour of the spot's whole slide; and ``neighbour_smoothing`` blends in the predictions of the spot's grid
    neighbours. Predict whole sections at once.

    Parameters
    ----------
    genes
        Genes to predict (e.g. from :func:`st_from_he.pp.select_genes`).
    preset
        One of ``"default"``, ``"cmrc"``, ``"ridge"``, ``"ridge_encoder"``, ``"mean"``.
    size_um
        Physical side of the spot patch in micrometres (reference 112).
    blend_ridge
        Neural presets: also fit ridge regression on hand-crafted colour, stain, texture and nucleus-blob features
        of the same patches (standardised within each section, reduced-rank), and blend it with the network's
        predictions (weights chosen on validation spots). Default: on for ``"default"``, off for the reference
        ``"cmrc"``.
    **config
        Overrides of the preset's hyperparameters: any field of :class:`st_from_he.models.ModelConfig` for neural
        presets (e.g. ``encoder="resnet18"``, ``encoder_weights="uni.safetensors"``, ``img_size=224``,
        ``context_scales=(1, 3)``, ``top_k=50``), or, for the ridge presets, ``context_scales``, ``img_size``,
        ``encoder``, ``encoder_weights``, ``encoder_kwargs``, ``features`` (``"handcrafted"``, or ``"handcrafted+blobs"`` to add
        haematoxylin and eosin blob responses at three sizes), ``lowres`` (also fit on copies of the patches
        blurred up to that many times coarser, e.g. ``lowres=4``), ``per_section`` (standardise the features and
        the expression within each section) and ``rank`` (reduced-rank ridge on that many principal axes of the
        expression, e.g. ``rank=30``); the last three are off by default and on in the default preset's probe
        (``per_section="hybrid"``: colour and composition centred, texture z-scored), as is ``white_balance`` (scale each slide's colours so its glass is
        grey 242 before the hand-crafted features). ``neighbour_smoothing`` (every preset; 0.5 in the default): the
        weight of the grid neighbours' mean in each prediction.
        ``features="X_<name>"`` (every preset but ``"mean"``): train on the cached embeddings of
        ``obsm["X_<name>"]`` (see above); a neural preset's blended ridge probe is then fitted on the same
        embeddings, and a registry encoder name (``encoder="uni2-h"``) sets ``img_size``, ``image_mean`` and
        ``image_std`` to the model's published values unless given.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C5", "C6"], path="../shared/data/her2st")
    >>> train, test = sth.pp.split_sections(sdata, test=["C6"])
    >>> model = sth.tl.ExpressionModel(sth.pp.select_genes(train, n_top=200), preset="ridge")
    >>> model.fit(train)  # doctest: +ELLIPSIS
    ExpressionModel(preset='ridge', ...)
    >>> sth.tl.predict_expression(test, model)  # doctest: +SKIP
    """

    def __init__(
        self,
        genes: Sequence[str],
        *,
        preset: str = "default",
        size_um: float | None = None,
        blend_ridge: bool | None = None,
        **config: Any,
    ):
        self.genes = _check_genes(genes)
        self.preset = check_preset(preset)
        if size_um is not None:
            size_um = _check_number(size_um, "size_um", "a patch side in micrometres, e.g. 112")
        if blend_ridge is not None and not isinstance(blend_ridge, bool | np.bool_):
            raise TypeError(f"`blend_ridge` must be True, False or None (the preset's choice), got {blend_ridge!r}.")
        if preset in NEURAL_PRESETS:
            from st_from_he.models import ModelConfig
            from st_from_he.models._encoders import _registry_spec

            params = NEURAL_PRESETS[preset] | config
            spec = _registry_spec(params.get("encoder", ModelConfig.encoder))
            if spec is not None:  # a foundation model's own input size and normalisation, unless given
                published = {"img_size": spec.img_size, "image_mean": spec.mean, "image_std": spec.std}
                params = NEURAL_PRESETS[preset] | published | config
            if params.get("features") is not None and "context_scales" not in config:
                params["context_scales"] = (1.0,)  # one embedding per spot
            if size_um is not None:
                params["patch_um"] = size_um
            self.config = ModelConfig(**params)
            self.size_um, self.size_px, self.context = (
                self.config.patch_um,
                self.config.img_size,
                self.config.context_scales,
            )
        else:
            unknown = set(config) - _RIDGE_OPTIONS
            if unknown:
                raise TypeError(f"Preset {preset!r} does not take {sorted(unknown)}.")
            self.config = BASELINE_PRESETS[preset] | config
            if is_embedding_key(self.config["features"]) and "context_scales" not in config:
                self.config["context_scales"] = (1.0,)  # one embedding per spot
            _check_ridge_options(self.config)
            self.size_um = 112.0 if size_um is None else float(size_um)
            self.size_px = int(self.config["img_size"])
            self.context = tuple(float(c) for c in self.config["context_scales"])
        self.blend_ridge = bool(self.preset in RIDGE_BLEND_PRESETS if blend_ridge is None else blend_ridge)
        if self.blend_ridge and not self.is_neural:
            raise ValueError(f"`blend_ridge` applies to neural presets, not to {preset!r}.")
        self.history: pd.DataFrame | None = None
        self.blend: dict[str, float] | None = None  # weights of the prediction components, chosen on validation
        self.training_info: dict[str, Any] = {}
        self._module = None
        self._bank: dict[str, np.ndarray] | None = None
        self._probe = None
        self.feature_params: dict[str, Any] | None = None  # how the training embeddings were made (features="X_...")
        self.device = "auto"

    @property
    def is_neural(self) -> bool:
        """Whether the preset is a neural network trained by gradient descent (else a closed-form baseline)."""
        return self.preset in NEURAL_PRESETS

    @property
    def features(self) -> str | None:
        """The ``obsm`` key of the cached embeddings the model is trained on (``"X_<name>"``), else ``None``."""
        features = self.config.features if self.is_neural else self.config["features"]
        return features if is_embedding_key(features) else None

    @property
    def target_sum(self) -> float | str:
        """The spot total the model's training targets were scaled to before log1p: 10,000, or ``"median"``."""
        return self.config.target_sum if self.is_neural else TARGET_SUM

    @property
    def units(self) -> str:
        """The scale of the predictions."""
        if self.target_sum == "median":
            return "log1p(counts scaled to each training section's median total)"
        return f"log1p(counts per {self.target_sum:,.0f})"

    @property
    def neighbour_smoothing(self) -> float:
        """Weight of the neighbours' mean in each prediction (see :meth:`predict_patches`); 0: no smoothing."""
        if self.is_neural:
            return self.config.neighbour_smoothing
        return float(self.config.get("neighbour_smoothing", 0.0))

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load`) has run."""
        return self._module is not None if self.is_neural else self._probe is not None

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "not fitted"
        return (
            f"ExpressionModel(preset={self.preset!r}, n_genes={len(self.genes)}, size_um={self.size_um:g}, "
            f"size_px={self.size_px}, context={self.context}, {state})"
        )

    # -- training --------------------------------------------------------------------------------------------------

    def _arrays(self, sdata, *, table_key, fill_missing_genes=False, spots=None) -> SpotArrays:
        """Targets and obs of the training spots, with their patches as :class:`LazyPatches` (nothing read yet)."""
        from st_from_he._sdata import check_sdata, find_table

        sections = as_list(sdata)
        if not sections:
            raise ValueError("`sdata` is an empty list; pass a SpatialData (or a list of them) with measured counts.")
        parts = []
        for s in sections:
            check_sdata(s, "ExpressionModel.fit")
            table_key = find_table(s, table_key, what="measured")  # None: the obvious table; table_0, ... refused
            names = s.tables[table_key].obs_names
            chosen = None if spots is None else names[names.isin(spots)]
            parts.append(
                spot_arrays(
                    s,
                    self.genes,
                    size_um=self.size_um,
                    size_px=self.size_px,
                    context=self.context,
                    table_key=table_key,
                    fill_missing_genes=fill_missing_genes,
                    spots=chosen,
                    target_sum=self.target_sum,
                    lazy=True,
                )
            )
        data = concat_arrays(parts)
        if spots is not None:
            unknown = pd.Index(spots).difference(data.obs.index)
            if len(unknown):
                raise KeyError(f"{len(unknown)} of `spots` are not in the training tables: {list(unknown[:10])}.")
        return data

    def _feature_arrays(self, sdata, *, table_key, fill_missing_genes=False, spots=None) -> SpotArrays:
        """Cached embeddings ``obsm[self.features]`` (as the "patches"), targets and obs of the training spots.

        Records how the embeddings were made (:attr:`feature_params`); every training table must agree on it.
        """
        from st_from_he._sdata import SAMPLE_KEY, check_sdata, find_table, spot_sections

        from ._data import measured_targets

        sections = as_list(sdata)
        if not sections:
            raise ValueError("`sdata` is an empty list; pass a SpatialData (or a list of them) with measured counts.")
        parts, expected = [], None
        for s in sections:
            check_sdata(s, "ExpressionModel.fit")
            table_key = find_table(s, table_key, what="measured")  # None: the obvious table; table_0, ... refused
            table = s.tables[table_key]
            where = f"training table {table_key!r}"
            values, params = table_embeddings(table, self.features, where=where, hint=self._embed_hint())
            if parts and (params is None) != (expected is None):
                raise ValueError(
                    f"obsm[{self.features!r}] of some training tables records how it was made "
                    f"(uns[{self.features!r}]['params']) and of others not; embed every section with `sth.tl.embed`."
                )
            if parts and expected is not None:
                check_embedding_params(expected, params, self.features, where=where, hint=self._embed_hint())
            if parts and values.shape[1] != parts[0].patches.shape[1]:
                raise ValueError(
                    f"obsm[{self.features!r}] has {values.shape[1]} dimensions in one training table and "
                    f"{parts[0].patches.shape[1]} in another; embed every section with the same encoder."
                )
            expected = params if not parts else expected
            sections_of = spot_sections(table, table_key=table_key)  # obs["sample"], else the annotated region
            obs = pd.DataFrame({SAMPLE_KEY: sections_of}, index=table.obs_names)
            targets = measured_targets(
                table,
                self.genes,
                fill_missing_genes=fill_missing_genes,
                where=f" {table_key!r}",
                target_sum=self.target_sum,
            )
            idx = np.arange(table.n_obs)
            if spots is not None:
                if not obs.index.is_unique:
                    raise ValueError(
                        f"Table {table_key!r} has repeated obs_names, so `spots` cannot name its spots; make them "
                        f"unique first (`table.obs_names_make_unique()`)."
                    )
                idx = np.flatnonzero(obs.index.isin(list(spots)))
            parts.append(SpotArrays(values[idx], obs.iloc[idx], targets[idx]))
        data = concat_arrays(parts)
        if spots is not None:
            unknown = pd.Index(spots).difference(data.obs.index)
            if len(unknown):
                raise KeyError(f"{len(unknown)} of `spots` are not in the training tables: {list(unknown[:10])}.")
        if expected is None:
            logger.warning(
                "obsm[%r] of the training tables does not record the encoder that made it (no uns[%r]['params'], "
                "which `sth.tl.embed` writes): the model cannot check that the sections it predicts were embedded "
                "the same way.",
                self.features,
                self.features,
            )
        self.feature_params = None if expected is None else _jsonable(dict(expected))
        if expected is not None and expected.get("size_um") is not None:  # the patch geometry is the embedding's
            self.size_um = float(expected["size_um"])
            self.size_px = int(expected.get("size_px", expected.get("img_size", self.size_px)))
            if self.is_neural:
                self.config.patch_um, self.config.img_size = self.size_um, self.size_px
            else:
                self.config["img_size"] = self.size_px
        return data

    def fit(
        self,
        sdata,
        *,
        table_key: str | None = None,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        val_fraction: float | None = None,
        val_sections: Sequence[str] | None = None,
        spots: Sequence[str] | None = None,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        strategy: Any = "auto",
        stream: bool | str = "auto",
        seed: int = 0,
        patience: int | None | str = "preset",
        max_time: float | None = None,
        progress_bar: bool | None = None,
        fill_missing_genes: bool = False,
    ) -> ExpressionModel:
        """Train on measured sections.

        Parameters
        ----------
        sdata
            One :class:`~spatialdata.SpatialData` or a list of them, each with a table of raw counts.
        table_key
            Table holding the measured raw counts; ``None``: ``"table"``, else the only table of counts
            (``spatialdata.concatenate`` without ``concatenate_tables=True`` leaves one table per section, which is
            refused with a message saying how to join them).
        max_epochs
            Training epochs (neural presets, at least 1); default: the preset's.
        batch_size
            Spots per batch (the contrastive loss's negatives, so at least 2 for contrastive presets); default: the
            preset's (64).
        lr
            Learning rate; default: the preset's.
        val_fraction
            Fraction of spots held out at random for validation (early stopping, best weights, blend weights);
            default: the preset's (``ModelConfig.val_fraction``: 0.1, for ``"cmrc"`` 0.2 of each section).
        val_sections
            Sample ids held out for validation instead of a random fraction of spots.
        spots
            Train on these obs_names only (few-shot learning).
        accelerator, devices
            Passed to :class:`lightning.pytorch.Trainer`; ``"auto"`` uses a GPU with bf16 mixed precision when one
            is available. ``devices=2`` (or more) trains data-parallel over that many GPUs, or CPU processes with
            ``accelerator="cpu"``; see ``strategy``.
        strategy
            How Lightning spreads training over several ``devices`` (neural presets): ``"auto"`` (DDP when there are
            several), a strategy name Lightning knows (e.g. ``"ddp"``, ``"ddp_spawn"``, ``"ddp_notebook"``) or a
            :class:`lightning.pytorch.strategies.Strategy`. With ``"ddp"`` Lightning runs the calling script again
            in one process per further device, so call ``fit`` under ``if __name__ == "__main__":`` and let only
            rank 0 write results; in Jupyter use ``"ddp_notebook"``. The validation losses are averaged over all
            processes; the history and the best weights are rank 0's. Each process keeps its own copy of the
            training patches (or streams them).
        stream
            ``False``: read every training patch into memory once, before training; ``True``: read the patches of
            each batch from the images when it is needed (the training data need not fit in memory; slower, since
            every epoch reads them again); ``"auto"``: in memory when the patches take at most a quarter
            (``IN_MEMORY_FRACTION``) of the memory available, else streamed (logged at INFO level). Both give the same
            model at equal ``seed``. Models on cached embeddings (``features="X_..."``) always hold them in memory.
        seed
            Seeds the split, the initialisation (also of the ``"ridge_encoder"`` preset's random-init encoder), the
            augmentations and the batch order; on CPU a fixed seed gives identical models.
        patience
            Stop after this many epochs (at least 1) without a lower validation loss (``None``: never); default
            ``"preset"``: the preset's (``ModelConfig.patience``: 5, for ``"cmrc"`` never).
        max_time
            Stop training after this many seconds (a compute budget), keeping the best weights so far.
        progress_bar
            Show progress; default ``sth.settings.progress_bar``.
        fill_missing_genes
            Treat model genes absent from a section as zero counts instead of raising.

        Returns
        -------
        The fitted model itself; :attr:`history` holds per-epoch losses (neural presets).
        """
        if isinstance(val_sections, str):
            raise ValueError(f"`val_sections` must be a list of sample ids, got the string {val_sections!r}.")
        if isinstance(spots, str):
            raise ValueError(f"`spots` must be a list of obs_names, got the string {spots!r}.")
        max_epochs = _check_int(max_epochs, "max_epochs", 1, "a number of epochs, e.g. 20", none=True)
        smallest = 2 if self.is_neural and self.config.contrastive else 1  # a contrastive batch needs negatives
        batch_size = _check_int(batch_size, "batch_size", smallest, "spots per batch, e.g. 64", none=True)
        seed = _check_int(seed, "seed", None, "an integer, e.g. 0")
        if isinstance(patience, str) and patience == "preset":
            patience = self.config.patience if self.is_neural else None
        patience = _check_int(patience, "patience", 1, "epochs without improvement, e.g. 5, or None", none=True)
        per_section = self.is_neural and self.config.val_per_section
        if val_fraction is None:
            val_fraction = self.config.val_fraction if self.is_neural else 0.1
        if lr is not None:
            lr = _check_number(lr, "lr", "a learning rate, e.g. 1e-3")
        if max_time is not None:
            max_time = _check_number(max_time, "max_time", "a number of seconds, e.g. 3600")
        progress_bar = settings.progress_bar if progress_bar is None else progress_bar
        stream = _check_stream(stream)
        strategy = check_strategy(strategy)
        streamed = False
        if self.features is not None:
            if stream is True:
                raise ValueError(
                    f"`stream=True` reads image patches lazily; this model trains on the cached embeddings "
                    f"{self.features!r}, which are held in memory. Leave `stream` at 'auto' (or False)."
                )
            data = self._feature_arrays(sdata, table_key=table_key, fill_missing_genes=fill_missing_genes, spots=spots)
        else:
            data = self._arrays(sdata, table_key=table_key, fill_missing_genes=fill_missing_genes, spots=spots)
            streamed = _streams(stream, data.patches.nbytes)
            if not streamed:
                cut = f"Cutting training patches ({self.size_um:g} um, {self.size_px} px, context {self.context})"
                with timed(cut):
                    data = data.in_memory()
        if len(data.patches) < 2:
            raise ValueError(f"Need at least 2 training spots, got {len(data.patches)}.")
        train_idx, val_idx = _split(data, val_fraction, val_sections, seed, per_section=per_section)
        self.training_info = {
            "samples": sorted(set(data.sections)),
            "n_train_spots": int(len(train_idx)),
            "n_val_spots": int(len(val_idx)),
            "val_sections": None if val_sections is None else list(val_sections),
            "seed": seed,
        }
        if self.features is None:
            self.training_info["streamed"] = streamed
        if self.features is not None:
            self.training_info["features"] = self.features
        if not self.is_neural:
            from ._baselines import RidgeProbe

            # closed form: every spot is used (no early stopping to validate)
            self.training_info |= {"n_train_spots": len(data.patches), "n_val_spots": 0}
            with timed(f"Fitting the {self.preset!r} baseline on {len(data.patches)} spots"):
                self._probe = RidgeProbe(
                    self.config["features"],
                    self.config.get("encoder", "resnet18"),
                    self.config.get("encoder_weights"),
                    img_size=self.size_px,
                    encoder_kwargs=self.config.get("encoder_kwargs"),
                    lowres=self.config.get("lowres", 0.0),
                    seed=seed,
                    per_section=self.config.get("per_section", False),
                    rank=self.config.get("rank"),
                    white_balance=self.config.get("white_balance", False),
                )
                _fit_probe(self._probe, data, accelerator)
            return self
        self._fit_neural(
            data,
            train_idx,
            val_idx,
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            seed=seed,
            patience=patience,
            max_time=max_time,
            progress_bar=progress_bar,
        )
        return self

    def _fit_neural(
        self,
        data: SpotArrays,
        train_idx,
        val_idx,
        *,
        max_epochs,
        batch_size,
        lr,
        accelerator,
        devices,
        strategy,
        seed,
        patience,
        max_time,
        progress_bar,
    ) -> None:
        import lightning as L

        from st_from_he.models import ExpressionModule

        from ._training import train

        L.seed_everything(seed, workers=True, verbose=False)
        if lr is not None:
            self.config.lr = lr
        if batch_size is not None:
            self.config.batch_size = batch_size
        if max_epochs is not None:
            self.config.max_epochs = max_epochs
        if self.features is not None:
            self.config.feature_dim = int(data.patches.shape[1])
        module = ExpressionModule(self.config, n_genes=len(self.genes))
        if self.features is not None:  # the embeddings standardised with the training spots' statistics
            module.encoder.set_statistics(data.patches[train_idx])
        neighbours = None
        if self.config.neighbour_attention:  # any training spot's patch may be a neighbour (images only)
            from ._training import neighbour_rows

            index = neighbour_rows(
                data.positions_um, data.sections, self.config, n=len(data.patches), what="training spots"
            )
            neighbours = (data.patches, index[train_idx], index[val_idx])
        train_set, val_set = data.subset(train_idx), data.subset(val_idx)  # lazy patches stay lazy
        with timed(f"Training the {self.preset!r} model on {len(train_idx)} spots ({len(val_idx)} validation)"):
            self.history, best_epoch = train(
                module,
                (train_set.patches, train_set.targets),
                (val_set.patches, val_set.targets),
                max_epochs=self.config.max_epochs,
                batch_size=self.config.batch_size,
                accelerator=accelerator,
                devices=devices,
                strategy=strategy,
                seed=seed,
                progress_bar=progress_bar,
                patience=patience,
                max_time=max_time,
                neighbours=neighbours,
            )
        module = module.cpu()
        self.training_info["best_epoch"] = best_epoch
        self._module = module
        self._bank = None
        bank = None
        if self.config.contrastive:
            bank = {"expression": data.targets, "embedding": self._embed_expression(data.targets)}
            # validation spots must not retrieve their own expression while the blend is chosen
            self._bank = {name: values[train_idx] for name, values in bank.items()}
        if self.blend_ridge:
            from ._baselines import RidgeProbe

            # cached embeddings: centred per section (z-scoring their many weak dimensions is unstable), no colours
            embedded = {"features": self.features, "white_balance": False, "per_section": "centre"}
            probe = _BLEND_PROBE | (embedded if self.features else {})
            lowres = self.config.augment_lowres if self.features is None else 0.0  # embeddings cannot be blurred
            with timed(f"Fitting the {probe['features']!r} ridge probe on {len(train_idx)} spots"):
                self._probe = RidgeProbe(lowres=lowres, seed=seed, **probe)
                # the probe reads the patches batch by batch (slices), so lazy patches are never all in memory
                _fit_probe(self._probe, train_set, accelerator)
        self.blend = self._choose_blend(data, val_idx)
        self._bank = bank  # predictions retrieve from every measured spot
        if self._probe is not None and len(val_idx) and self.blend.get("ridge", 0) > 0:
            # and the probe is refitted on every measured spot, its weight chosen: a closed form with its penalty
            # chosen on its own training spots needs no held-out spots (on the cross-patient fold, 10% fewer
            # training spots cost 0.01-0.04 HVG PCC: benchmarks/results/probe_variants.md)
            with timed(f"Refitting the ridge probe on all {len(data.patches)} spots"):
                _fit_probe(self._probe, data, accelerator)
            self.training_info["probe_spots"] = len(data.patches)

    def _embed_expression(self, expression: np.ndarray, batch_size: int = 256) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return np.concatenate(
                [
                    self._module.embed_expression(torch.from_numpy(expression[i : i + batch_size])).numpy()
                    for i in range(0, len(expression), batch_size)
                ]
            )

    def _choose_blend(self, data: SpotArrays, val_idx: np.ndarray) -> dict[str, float]:
        """Weights of the prediction components (on a 0.1 simplex grid) maximising mean PCC on validation spots.

        The PCC is averaged over the validation spots' informative genes (the :data:`BLEND_GENES` most variable and
        the :data:`BLEND_GENES` most expressed), as evaluation scores HVG and HEG: over all genes, the mostly sparse,
        barely expressed ones would reward components that only fit the noise of the training sections. Predictions
        and measurements are centred within each section first, since evaluation correlates within a section: a
        component must not score by telling the training sections apart. Every spot is predicted, so that the probe
        standardises each section with the statistics of all its spots.
        """
        # the training sections, standardised as in the probe's fit
        parts, _ = self._predict_parts(
            data.patches,
            groups=data.sections,
            glass=data.glass,
            positions_um=data.positions_um,
            min_section_spots=MIN_TRAINING_SECTION_SPOTS,
            device="cpu",
            progress_bar=False,
        )
        names = list(parts)
        if len(names) == 1 or len(val_idx) < MIN_BLEND_SPOTS:
            return {name: 1 / len(names) for name in names}
        val = data.subset(val_idx)
        genes = informative_genes(val.targets, BLEND_GENES)
        targets = _centre_groups(val.targets[:, genes], val.sections)
        parts = {name: _centre_groups(values[val_idx][:, genes], val.sections) for name, values in parts.items()}
        grid = [w for w in itertools.product(range(11), repeat=len(names)) if sum(w) == 10]
        scores = [_mean_pcc(sum(wi / 10 * parts[n] for wi, n in zip(w, names, strict=True)), targets) for w in grid]
        best = grid[int(np.nanargmax(scores))]
        blend = {n: wi / 10 for n, wi in zip(names, best, strict=True)}
        alone = {n: round(_mean_pcc(parts[n], targets), 4) for n in names}
        self.training_info["validation_pcc"] = alone | {"blend": round(float(np.nanmax(scores)), 4)}
        self.training_info["blend_genes"] = len(genes)
        logger.info(
            "Blend chosen on %d validation spots and their %d informative genes: %s (mean PCC %.3f; alone: %s)",
            len(val.patches),
            len(genes),
            ", ".join(f"{n} {w:.1f}" for n, w in blend.items()),
            np.nanmax(scores),
            ", ".join(f"{n} {v:.3f}" for n, v in alone.items()),
        )
        return blend

    # -- prediction ------------------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("The model is not fitted; call `model.fit(sdata)` or `ExpressionModel.load(path)`.")

    def _predict_parts(
        self,
        patches,
        *,
        groups=None,
        glass=None,
        positions_um=None,
        min_section_spots: int = MIN_SECTION_SPOTS,
        device: str,
        batch_size: int = 64,
        progress_bar: bool = False,
        blend: dict[str, float] | None = None,
    ):
        """Each component's prediction (regression head, retrieval, ridge probe) and the image embeddings.

        With ``blend`` (weights by component) the components are summed batch by batch into one array instead,
        returned as ``{"blend": sum}``: on a whole slide the predictions then take one ``(n, genes)`` array, whatever
        the number of components, and components of weight 0 are not computed.

        A model with neighbour attention encodes every patch once, then lets each spot attend over the features of
        its neighbours among these patches (centres ``positions_um``, same group), so the output does not depend
        on batching or order.
        """
        import torch

        from st_from_he.models import retrieve

        from ._training import neighbour_rows, normalise_images, resolve_device, set_threads

        set_threads()
        index = None
        if self._module.neighbour_attention is not None:
            index = neighbour_rows(positions_um, groups, self.config, n=len(patches), what="spots to predict")
        device = resolve_device(device)
        module = self._module.to(device).eval()
        bank = None
        if self._bank is not None:
            bank = {k: torch.from_numpy(v).to(device) for k, v in self._bank.items()}
        wanted = {"regression", "retrieval", "ridge"} if blend is None else {k for k, w in blend.items() if w}
        parts = _Parts(len(patches), len(self.genes), blend)
        ridge, embeddings, features = [], [], []
        starts = range(0, len(patches), batch_size)

        def heads(emb, start):
            embeddings.append(emb.float().cpu().numpy())
            if module.regression is not None and "regression" in wanted:
                parts.add("regression", start, module.regression(emb).float().cpu().numpy())
            if bank is not None and "retrieval" in wanted:
                retrieved = retrieve(emb, bank["embedding"], bank["expression"], k=self.config.top_k)
                parts.add("retrieval", start, retrieved.float().cpu().numpy())

        with torch.inference_mode():
            for start in tqdm(starts, disable=not progress_bar, desc="Predicting", unit="batch"):
                batch = self._stack(patches, start, min(start + batch_size, len(patches)))
                if self._probe is not None and "ridge" in wanted:
                    ridge.append(self._probe.featurize(batch, _rows(glass, start, len(batch)), device=device))
                x = torch.from_numpy(batch).to(device)
                if self.features is None:  # embeddings are standardised by the module itself
                    x = normalise_images(x, self.config.image_mean, self.config.image_std)
                if index is not None:  # heads once every neighbour is encoded (below)
                    features.append(module.encode_features(x))
                    continue
                heads(module.embed_images(x), start)
            if index is not None:
                features = torch.cat(features)
                nb = torch.from_numpy(index).to(device)
                for start in starts:
                    rows = nb[start : start + batch_size]
                    heads(
                        module.embed_features(
                            features[start : start + batch_size], features[rows.clamp_min(0)], rows < 0
                        ),
                        start,
                    )
        module.cpu()
        if ridge:  # standardised per section, so predicted once all features are in
            parts.add(
                "ridge",
                0,
                self._probe.predict_features(np.concatenate(ridge), groups, min_section_spots=min_section_spots)[0],
            )
        return parts.result(), np.concatenate(embeddings).astype(np.float32)

    def predict_patches(
        self,
        patches,
        *,
        groups=None,
        glass=None,
        positions=None,
        positions_um=None,
        device: str | None = None,
        batch_size: int = 64,
        progress_bar: bool | None = None,
    ):
        """Predicted log1p(CP10k) expression and image embeddings of patches.

        Parameters
        ----------
        patches
            Indexable uint8 patches, item ``(s, 3, h, w)`` or ``(3, h, w)``, e.g. the
            :class:`~st_from_he.pp.PatchDataset` of :func:`st_from_he.pp.extract_patches` with this model's
            ``size_um``, ``size_px`` and ``context`` (which also gives ``groups``, ``glass``, ``positions`` and
            ``positions_um``).
        groups
            Section (sample) of each patch; ``None``: a PatchDataset's ``samples``, else all patches come from one
            section. The default preset's ridge probe (and any ridge with ``per_section``) standardises its features
            within each section, with the mean (and standard deviation) of that section's patches in this call, so
            pass whole sections (at least 30 spots each; smaller groups fall back to the training statistics), and
            smoothing never crosses sections. Every other part of a prediction depends on the spot's own patch only
            (with ``neighbour_attention``, also on the patches of its neighbours in this call);
            ``batch_size`` and the order of the patches never change a prediction.
        glass
            Glass colour of each patch's slide ``(n, 3)`` (or one ``(3,)``), for models that white-balance
            (the default preset's ridge probe); ``None``: a PatchDataset's :meth:`~st_from_he.pp.PatchDataset.glass_per_spot`.
        positions
            Spot centres ``(n, 2)`` (any unit; the same within a section), for models that smooth their predictions
            over neighbouring spots (``neighbour_smoothing``, the default preset's); ``None``: a PatchDataset's
            ``spatial``, else no smoothing.
        positions_um
            Spot centres ``(n, 2)`` in micrometres, for models with ``neighbour_attention`` (required for them
            unless ``patches`` is a PatchDataset): each spot attends over the patches of this call within
            ``neighbour_radius_um`` in its section, so pass whole sections. ``None``: a PatchDataset's ``spatial``
            times its ``pixel_size_um``.
        device
            Torch device; ``"auto"`` picks a GPU when available; ``None`` uses :attr:`device`.
        batch_size
            Patches per forward pass; memory stays bounded by it, and the predictions do not depend on it.
        progress_bar
            Show progress; default ``sth.settings.progress_bar``.

        Returns
        -------
        ``(expression, embeddings)``: float32 arrays ``(n, n_genes)`` and ``(n, d)``.
        """
        self._check_fitted()
        if self.features is not None:
            raise ValueError(
                f"This model predicts from the cached embeddings {self.features!r}, not from image patches: run "
                f"`sth.tl.embed` on the sections, then `sth.tl.predict_expression(sdata, model)` (or pass the "
                f"embedding vectors to `model.predict_features`)."
            )
        from st_from_he.pp import PatchDataset

        if isinstance(patches, PatchDataset):
            groups = patches.samples if groups is None else groups
            positions = patches.spatial if positions is None else positions
            positions_um = patches.spatial_um() if positions_um is None else positions_um
            if glass is None and self._probe is not None and self._probe.white_balance:
                glass = patches.glass_per_spot()
        return self._predict(
            patches,
            groups,
            glass=glass,
            positions=positions,
            positions_um=positions_um,
            device=device,
            batch_size=batch_size,
            progress_bar=progress_bar,
        )

    def predict_features(
        self,
        features: np.ndarray,
        *,
        groups=None,
        positions=None,
        device: str | None = None,
        batch_size: int = 256,
        progress_bar: bool | None = None,
    ):
        """Predicted log1p(CP10k) expression and embeddings of spots from their cached embedding vectors.

        For models trained with ``features="X_<name>"``. :func:`st_from_he.tl.predict_expression` reads the
        vectors from ``obsm`` and checks that they were made as the training ones (:meth:`check_embeddings`);
        this method trusts the caller on that.

        Parameters
        ----------
        features
            Embeddings ``(n, d)`` of the spots, e.g. ``table.obsm["X_uni"]``, made by the encoder the model was
            trained on.
        groups
            Section (sample) of each spot, for ridge probes standardised per section (see :meth:`predict_patches`);
            ``None``: one section.
        positions
            Spot centres ``(n, 2)``, for models that smooth over neighbouring spots (see :meth:`predict_patches`);
            ``None``: no smoothing.
        device, batch_size, progress_bar
            As for :meth:`predict_patches`.

        Returns
        -------
        ``(expression, embeddings)``: float32 arrays ``(n, n_genes)`` and ``(n, d')`` (for ridge models, the
        standardised features; for neural ones, the projected image embeddings).

        Examples
        --------
        >>> sth.tl.embed(test, "uni", weights="UNI/pytorch_model.bin", key_added="X_uni")  # doctest: +SKIP
        >>> table = test.tables["table"]  # doctest: +SKIP
        >>> expression, _ = model.predict_features(table.obsm["X_uni"], groups=table.obs["sample"])  # doctest: +SKIP
        """
        self._check_fitted()
        if self.features is None:
            raise ValueError("This model predicts from image patches; use `predict_patches` or `predict_expression`.")
        features = np.asarray(features)
        dim = self._feature_dim()
        if features.ndim != 2 or features.shape[1] != dim or not np.issubdtype(features.dtype, np.number):
            raise ValueError(
                f"`features` must be numeric embeddings (spots, {dim}) of {self.features!r}, got an array of shape "
                f"{features.shape} ({features.dtype})."
            )
        return self._predict(
            features, groups, positions=positions, device=device, batch_size=batch_size, progress_bar=progress_bar
        )

    def _feature_dim(self) -> int:
        """Dimension of the embeddings a model on cached embeddings takes."""
        if self.is_neural:
            return int(self.config.feature_dim)
        return int(self._probe.state["coef"].shape[0]) if "coef" in self._probe.state else -1

    def check_embeddings(self, table, *, table_key: str = TABLE_KEY) -> np.ndarray:
        """The embeddings of ``table`` this model predicts from, checked to be made as its training embeddings.

        Parameters
        ----------
        table
            AnnData of the spots to predict, with ``obsm[self.features]`` and ``uns[self.features]["params"]``
            from :func:`st_from_he.tl.embed`.
        table_key
            The table's name, for messages.

        Returns
        -------
        float32 array ``(n_spots, d)``.

        Raises
        ------
        KeyError
            If the table has no such embedding (the message says which :func:`~st_from_he.tl.embed` call makes it).
        ValueError
            If it was made by another encoder, other weights, input size, normalisation, pooling or patch size than
            the training embedding, or has another dimension or non-finite values.
        """
        self._check_fitted()
        if self.features is None:
            raise ValueError("This model predicts from image patches, not from cached embeddings.")
        values, params = table_embeddings(table, self.features, where=f"table {table_key!r}", hint=self._embed_hint())
        if self.feature_params is not None:
            check_embedding_params(
                self.feature_params, params, self.features, where=f"table {table_key!r}", hint=self._embed_hint()
            )
        dim = self._feature_dim()
        if values.shape[1] != dim:
            raise ValueError(
                f"obsm[{self.features!r}] of table {table_key!r} has {values.shape[1]} dimensions; the model was "
                f"trained on {dim}. {self._embed_hint()}"
            )
        return values

    def _embed_hint(self) -> str:
        """The call that makes the embedding this model takes, for error messages."""
        p = self.feature_params or {}
        args = [repr(p.get("encoder", "<encoder>"))]
        if p.get("weights") not in (None, "random"):
            args.append(f"weights={p['weights']!r}")
        args.append(f"key_added={self.features!r}")
        if p.get("size_um") is not None:
            args.append(f"size_um={p['size_um']:g}")
        return f"Run `sth.tl.embed(sdata, {', '.join(args)})` on it first, as for the training sections."

    def predict_table(self, sdata, *, table_key: str = TABLE_KEY, shapes_key=None, **kwargs):
        """Predictions at the rows of ``sdata.tables[table_key]`` from their checked cached embeddings.

        See :meth:`check_embeddings`; ``kwargs`` go to :meth:`predict_features`. Used by
        :func:`~st_from_he.tl.predict_expression` for models with ``features="X_<name>"``.
        """
        from st_from_he._sdata import spot_sections

        if shapes_key is not None:
            raise ValueError(
                f"This model predicts from the embeddings {self.features!r} in a table's obsm, so it predicts at the "
                f"rows of a table (`table_key`), not at a shapes element ({shapes_key!r}). Make a table of those "
                f"spots and embed it with `sth.tl.embed`, or use a model trained on image patches."
            )
        if table_key not in sdata.tables:
            raise KeyError(f"No table {table_key!r} to predict (`table_key`); tables: {sorted(sdata.tables)}.")
        table = sdata.tables[table_key]
        features = self.check_embeddings(table, table_key=table_key)
        groups = spot_sections(table, table_key=table_key)
        positions = table.obsm.get(SPATIAL_KEY) if self.neighbour_smoothing else None
        return self.predict_features(features, groups=kwargs.pop("groups", groups), positions=positions, **kwargs)

    def _predict(
        self, inputs, groups, *, glass=None, positions=None, positions_um=None, device, batch_size, progress_bar
    ):
        """Predictions of patches or embedding vectors (``inputs``), whichever the model takes."""
        patches = inputs
        batch_size = _check_int(batch_size, "batch_size", 1, "patches per forward pass, e.g. 64")
        device = check_device(self.device if device is None else device)
        if groups is not None:
            if isinstance(groups, str):
                raise TypeError(f"`groups` must give the section of each patch, got the string {groups!r}.")
            if len(groups) != len(patches):
                raise ValueError(f"`groups` has {len(groups)} entries for {len(patches)} patches; give one per patch.")
        progress_bar = settings.progress_bar if progress_bar is None else progress_bar
        if not len(patches):
            raise ValueError("`patches` is empty: there is nothing to predict.")
        if glass is not None:  # one colour for all, or one per patch (sliced per batch below)
            from st_from_he.models._white_balance import glass_per_patch

            glass = glass_per_patch(glass, len(patches))
        if not self.is_neural:
            from ._training import resolve_device

            feature_device = resolve_device(device)  # hand-crafted features in torch, on the GPU when there is one
            features = [
                self._probe.featurize(
                    self._stack(patches, i, min(i + batch_size, len(patches))),
                    _rows(glass, i, batch_size),
                    device=feature_device,
                )
                for i in tqdm(range(0, len(patches), batch_size), disable=not progress_bar, desc="Predicting")
            ]
            expression, embeddings = self._probe.predict_features(np.concatenate(features), groups)
        else:
            parts, embeddings = self._predict_parts(
                patches,
                groups=groups,
                glass=glass,
                positions_um=positions_um,
                device=device,
                batch_size=batch_size,
                progress_bar=progress_bar,
                blend=self.blend,
            )
            expression = parts["blend"]
        if self.neighbour_smoothing and positions is not None:
            from st_from_he.models import smooth_neighbours

            expression = smooth_neighbours(expression, positions, groups, weight=self.neighbour_smoothing)
        return expression, embeddings

    def _stack(self, patches, start: int, stop: int) -> np.ndarray:
        """Patches ``start:stop`` as one uint8 array ``(b, s, 3, h, w)``, checked against the model's geometry."""
        if self.features is not None:  # embedding vectors, float32 (b, d)
            return np.ascontiguousarray(patches[start:stop], dtype=np.float32)
        from st_from_he.pp import PatchDataset

        if isinstance(patches, np.ndarray | LazyPatches | PatchDataset):  # one read per batch
            batch = np.ascontiguousarray(patches[start:stop])  # views with negative strides cannot go to torch
        else:
            batch = np.stack([np.asarray(patches[i]) for i in range(start, stop)])
        batch = batch[:, None] if batch.ndim == 4 else batch
        expected = (len(self.context), 3, self.size_px, self.size_px)
        if batch.shape[1:] != expected or batch.dtype != np.uint8:
            # features of patches of another size or scale mean something else: refuse rather than predict
            raise ValueError(
                f"Patches of shape {batch.shape[1:]} ({batch.dtype}) do not fit this model, which takes uint8 "
                f"patches {expected} (context {self.context}, {self.size_px} px for {self.size_um:g} um); cut them "
                f"with `sth.pp.extract_patches(sdata, size_um={self.size_um:g}, size_px={self.size_px}, "
                f"context={self.context})`."
            )
        return batch

    # -- persistence -----------------------------------------------------------------------------------------------

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to a directory: complete or absent, never half-written.

        The directory holds ``model.json`` (preset, genes, patch geometry, normalisation, hyperparameters, blend
        weights, history, package version, and the size and sha256 checksum of every other file), the weights
        (``weights.safetensors``) and the retrieval bank or ridge coefficients (``arrays.npz``). It is written to a
        temporary sibling and renamed into place.

        Parameters
        ----------
        path
            Target directory.
        overwrite
            Replace an existing model directory written by this package (and only such a directory: anything else
            at ``path`` is refused, never deleted). The previous model is renamed to a hidden backup
            ``.{name}.old-<id>`` beside it until the new one is in place, and put back if the swap fails.

        Returns
        -------
        The path written.
        """
        from st_from_he import __version__

        self._check_fitted()
        path = _check_path(path)
        if not isinstance(overwrite, bool | np.bool_):
            raise TypeError(f"`overwrite` must be True or False, got {overwrite!r}.")
        replace = path.exists() or path.is_symlink()
        if replace:
            if not overwrite:
                raise FileExistsError(f"{str(path)!r} exists; pass `overwrite=True` to replace it.")
            _check_replaceable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = []
            if self.is_neural:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in self._module.state_dict().items()}, tmp / _WEIGHTS_FILE)
                files.append(_WEIGHTS_FILE)
                arrays = dict(self._bank or {})
                if self._probe is not None:
                    arrays |= {_RIDGE_PREFIX + k: v for k, v in self._probe.get_state().items()}
            else:
                arrays = self._probe.get_state()
            arrays[_GENES_KEY] = np.array(self.genes, dtype=str)
            np.savez(tmp / _ARRAYS_FILE, **arrays)
            files.append(_ARRAYS_FILE)
            meta = {
                "package": _PACKAGE,
                "format": _FORMAT,
                "package_version": __version__,
                "preset": self.preset,
                "genes": self.genes,
                "size_um": self.size_um,
                "size_px": self.size_px,
                "context": list(self.context),
                "normalisation": {"target_sum": 1e4, "log1p": True},
                "config": self.config.to_dict() if self.is_neural else _jsonable(self.config),
                "blend": self.blend,
                "blend_ridge": self.blend_ridge,
                "training": _jsonable(self.training_info),
                # how the embeddings it takes were made (features="X_..."): prediction refuses other ones
                "feature_params": _jsonable(self.feature_params),
                "history": None if self.history is None else self.history.to_dict(orient="list"),
                # ties every file to this model.json: a file of another model (or a damaged one) is refused by load
                "files": {name: _file_record(tmp / name) for name in files},
                "arrays": {name: list(np.shape(value)) for name, value in arrays.items()},
            }
            (tmp / _CONFIG_FILE).write_text(json.dumps(meta, indent=1))
            for name in (*files, _CONFIG_FILE):
                _fsync(tmp / name)
            if replace:
                _swap_in(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Saved the %r model (%d genes) to %s", self.preset, len(self.genes), path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> ExpressionModel:
        """Load a model written by :meth:`save`, checking that it is complete and that its files belong together.

        Every file is checked against the size and sha256 checksum recorded in ``model.json``, and every array
        against the model's genes and configuration; a missing, damaged or foreign file raises an error naming it.
        Models saved by older versions without checksums load with a warning, after the same shape checks.

        Parameters
        ----------
        path
            Model directory.
        device
            Where prediction runs by default (:attr:`device`); weights are kept on the CPU between calls.

        Returns
        -------
        The fitted model.

        Examples
        --------
        >>> model = sth.tl.ExpressionModel.load("her2st_model")  # doctest: +SKIP
        """
        path = _check_path(path)
        device = check_device(device)
        if not path.is_dir():
            if path.exists():
                raise NotADirectoryError(f"{str(path)!r} is a file, not a model directory written by `save`.")
            raise FileNotFoundError(f"No model directory at {str(path)!r}.{_backup_hint(path)}")
        meta = _read_meta(path / _CONFIG_FILE)
        expected_files = [_WEIGHTS_FILE, _ARRAYS_FILE] if meta["preset"] in NEURAL_PRESETS else [_ARRAYS_FILE]
        _verify_files(path, meta, expected_files)
        config = dict(meta["config"])
        if meta["preset"] in NEURAL_PRESETS:
            config["encoder_weights"] = None  # the trained weights below replace any initial weights
        try:
            model = cls(
                meta["genes"],
                preset=meta["preset"],
                size_um=meta["size_um"],
                blend_ridge=meta.get("blend_ridge", False) if meta["preset"] in NEURAL_PRESETS else None,
                **{k: v for k, v in config.items() if k != "patch_um"},  # size_um carries the patch size
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{str(path / _CONFIG_FILE)!r} does not describe a valid model: {err}") from err
        model.blend = _blend_weights(meta.get("blend"), model)
        model.training_info = meta.get("training", {})
        model.feature_params = meta.get("feature_params")
        if model.features is None and model.feature_params is not None:
            raise ValueError(f"{str(path / _CONFIG_FILE)!r} records embedding parameters for a model without features.")
        model.history = None if meta.get("history") is None else pd.DataFrame(meta["history"])
        arrays = _read_arrays(path / _ARRAYS_FILE)
        from ._baselines import RidgeProbe

        try:
            saved_genes = arrays.pop(_GENES_KEY, None)  # models saved before it was recorded have none
            if saved_genes is not None and saved_genes.tolist() != model.genes:
                raise ValueError(f"its genes differ from the {len(model.genes)} genes of {_CONFIG_FILE}.")
            if model.is_neural:
                model._module = _read_weights(path / _WEIGHTS_FILE, model)
                ridge = {k.removeprefix(_RIDGE_PREFIX): v for k, v in arrays.items() if k.startswith(_RIDGE_PREFIX)}
                if ridge or model.blend_ridge:
                    model._probe = RidgeProbe("handcrafted").set_state(ridge, n_genes=len(model.genes))
                    if model._probe.features is None:
                        raise ValueError("the blended ridge probe has no features.")
                model._bank = {k: v for k, v in arrays.items() if not k.startswith(_RIDGE_PREFIX)} or None
                model._check_bank()
            else:
                model._probe = RidgeProbe(
                    model.config["features"],
                    model.config.get("encoder", "resnet18"),
                    model.config.get("encoder_weights"),
                    img_size=model.size_px,
                    encoder_kwargs=model.config.get("encoder_kwargs"),
                ).set_state(arrays, n_genes=len(model.genes))
                if model._probe.features != model.config["features"]:
                    raise ValueError(
                        f"it holds a {model._probe.features!r} ridge probe, but the model's features are "
                        f"{model.config['features']!r}."
                    )
                model._probe.check_encoder()
        except ValueError as err:
            raise ValueError(f"{str(path / _ARRAYS_FILE)!r} and {_CONFIG_FILE} do not fit together: {err}") from err
        model.device = device
        return model

    def _check_bank(self) -> None:
        """Raise if the retrieval bank and the blend do not match the network (shapes, components)."""
        bank = self._bank
        if self.config.contrastive:
            if bank is None or set(bank) != {"expression", "embedding"}:
                raise ValueError(
                    f"the retrieval bank needs arrays 'expression' and 'embedding', got {sorted(bank or {})}."
                )
            n, genes, dim = len(bank["expression"]), len(self.genes), self.config.proj_dim
            if bank["expression"].shape != (n, genes) or bank["embedding"].shape != (n, dim):
                raise ValueError(
                    f"the retrieval bank has shapes {bank['expression'].shape} and {bank['embedding'].shape}, "
                    f"expected (spots, {genes}) and (spots, {dim})."
                )
        elif bank:
            raise ValueError(f"the model has no retrieval, but the arrays {sorted(bank)} are a retrieval bank.")
        parts = {"regression"} if self.config.regression_head else set()
        parts |= {"retrieval"} if self.config.contrastive else set()
        parts |= {"ridge"} if self._probe is not None else set()
        if self.blend is None or set(self.blend) != parts:
            raise ValueError(f"the blend weights {self.blend} do not cover the model's components {sorted(parts)}.")


# What makes two embeddings the same features; "weights" and "fingerprint" are compared apart (see below).
_EMBEDDING_IDENTITY = ("encoder", "architecture", "img_size", "mean", "std", "pooling", "num_features", "size_um")


def table_embeddings(table, key: str, *, where: str, hint: str) -> tuple[np.ndarray, dict | None]:
    """``table.obsm[key]`` as float32 ``(n, d)`` (finite) and ``uns[key]["params"]`` (``None`` if absent)."""
    if key not in table.obsm:
        raise KeyError(
            f"The model is trained on the cached embeddings obsm[{key!r}], which {where} does not have (obsm keys: "
            f"{sorted(table.obsm)}). {hint}"
        )
    values = np.asarray(table.obsm[key])
    if values.ndim != 2 or len(values) != table.n_obs or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"obsm[{key!r}] of {where} is not a numeric array (spots, dimensions): {values.shape}.")
    values = values.astype(np.float32, copy=False)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise ValueError(f"obsm[{key!r}] of {where} has non-finite values at {int(bad.sum())} spots. {hint}")
    record = table.uns.get(key)
    params = record.get("params") if isinstance(record, Mapping) else None
    return values, (dict(params) if isinstance(params, Mapping) else None)


def _same_value(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    try:
        x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    except (TypeError, ValueError):
        return str(a) == str(b)
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=1e-6, atol=0))


def _weights_id(weights) -> str:
    """A weights source as comparable across machines: the file name of a local file, else the hub id/'random'."""
    weights = str(weights)
    if weights == "random" or weights.startswith(("hf-hub:", "timm/")):
        return weights
    return Path(weights).name


def check_embedding_params(expected: Mapping, got: Mapping | None, key: str, *, where: str, hint: str) -> None:
    """Raise unless the embedding ``got`` (``uns[key]["params"]``) was made as ``expected`` (the training one's).

    The encoder name, architecture, input size, normalisation, pooling, dimension and patch size must agree; the
    weights must be the same file (by name: a copy elsewhere is the same checkpoint) or hub id, and, where both
    embeddings record the encoder's fingerprint, the same fingerprint. Embeddings of randomly initialised encoders
    without a fingerprint cannot be told apart: a warning says so.
    """
    if got is None:
        raise ValueError(
            f"obsm[{key!r}] of {where} does not record how it was made (no uns[{key!r}]['params'], which "
            f"`sth.tl.embed` writes), so it cannot be checked to match the training embeddings. {hint}"
        )
    differ = [k for k in _EMBEDDING_IDENTITY if k in expected and not _same_value(expected.get(k), got.get(k))]
    if "fingerprint" in expected and "fingerprint" in got:
        if str(expected["fingerprint"]) != str(got["fingerprint"]):
            differ.append("fingerprint")
    elif _weights_id(expected.get("weights")) != _weights_id(got.get("weights")):
        differ.append("weights")
    elif str(expected.get("weights")) == "random":
        logger.warning(
            "obsm[%r] of %s and the training embeddings both come from a randomly initialised encoder, whose "
            "weights are not recorded: they may be different encoders. Embed with a saved weights file to be sure.",
            key,
            where,
        )
    if differ:
        detail = "; ".join(f"{k}: {got.get(k)!r} here, {expected.get(k)!r} in training" for k in differ)
        raise ValueError(
            f"obsm[{key!r}] of {where} was not made as the embeddings the model was trained on ({detail}): "
            f"predictions from other features would be meaningless. {hint}"
        )


BLEND_GENES = 50
"""Per criterion, the number of informative validation genes the blend weights are chosen on."""


def informative_genes(targets: np.ndarray, n: int = BLEND_GENES) -> np.ndarray:
    """Column indices of the ``n`` most variable and the ``n`` most expressed genes of ``targets`` (spots, genes)."""
    from ._gene_sets import _top_genes

    columns, n = range(targets.shape[1]), min(n, targets.shape[1])
    # the same ranking as evaluation's HVG and HEG
    return np.union1d(*(np.asarray(_top_genes(targets, columns, n, by=by), dtype=int) for by in ("var", "mean")))


class _Parts:
    """The components' predictions, batch by batch: kept apart, or (``blend``) summed into one array as they come."""

    def __init__(self, n: int, n_genes: int, blend: dict[str, float] | None):
        self.blend = blend
        self.chunks: dict[str, list[np.ndarray]] = {}
        # summed in the order regression, retrieval, ridge, as before whole-array blending
        self.total = None if blend is None else np.zeros((n, n_genes), np.float32)

    def add(self, name: str, start: int, values: np.ndarray) -> None:
        if self.blend is None:
            self.chunks.setdefault(name, []).append(values)
            return
        rows = slice(start, start + len(values))
        for chunk in range(rows.start, rows.stop, _BLEND_CHUNK):  # bounded temporaries for the ridge's whole array
            part = slice(chunk, min(chunk + _BLEND_CHUNK, rows.stop))
            self.total[part] += self.blend[name] * values[part.start - start : part.stop - start]

    def result(self) -> dict[str, np.ndarray]:
        if self.blend is None:
            return {
                name: np.concatenate(self.chunks[name]).astype(np.float32)
                for name in _COMPONENTS
                if name in self.chunks
            }
        return {"blend": self.total}


def _fit_probe(probe, data: SpotArrays, accelerator) -> None:
    """Fit a ridge probe on the spots' patches and targets (its features on the training GPU, if there is one)."""
    probe.fit(data.patches, data.targets, groups=data.sections, glass=data.glass, device=_feature_device(accelerator))


def _feature_device(accelerator) -> str:
    """Where a probe's hand-crafted features are computed while fitting: the GPU the training may use, else the CPU."""
    from ._training import resolve_device

    if accelerator in ("auto", "gpu", "cuda"):
        device = resolve_device("auto")
        return device if device.startswith("cuda") else "cpu"
    return "cpu"


def _rows(values, start: int, n: int):
    """Rows ``start:start + n`` of ``values`` (e.g. each patch's glass colour), or ``None`` when there are none."""
    return None if values is None else np.asarray(values)[start : start + n]


def _centre_groups(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``x`` (spots, genes) minus the mean of its group (section) of spots."""
    out = np.asarray(x, dtype=np.float64).copy()
    for group in np.unique(groups):
        rows = groups == group
        out[rows] -= out[rows].mean(0)
    return out


def _mean_pcc(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over genes of the Pearson correlation across spots (constant genes count as 0)."""
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    denom = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    r = np.divide((p * t).sum(0), denom, out=np.zeros(p.shape[1]), where=denom > 0)
    return float(r.mean())


def _check_stream(stream) -> bool | str:
    """``stream`` if it is True, False or ``"auto"``, else raise naming the choices."""
    if isinstance(stream, bool | np.bool_):
        return bool(stream)
    if isinstance(stream, str) and stream == "auto":
        return stream
    raise ValueError(
        f"`stream` must be True (read training patches batch by batch), False (read them all into memory first) "
        f"or 'auto' (in memory when they fit, else streamed); got {stream!r}."
    )


def _streams(stream: bool | str, n_bytes: int) -> bool:
    """Whether training patches of ``n_bytes`` are streamed: as asked, or for ``"auto"`` as the memory allows."""
    from st_from_he._memory import available_bytes

    if stream != "auto":
        return bool(stream)
    free = available_bytes()
    budget = None if free is None else IN_MEMORY_FRACTION * free
    streamed = budget is not None and n_bytes > budget
    logger.info(
        "Training patches: %.2f GB; %s",
        n_bytes / 1e9,
        f"more than {IN_MEMORY_FRACTION:.0%} of the {free / 1e9:.1f} GB available: streamed from the images batch by "
        f"batch (`stream=False` to read them into memory)"
        if streamed
        else "read into memory (`stream=True` to stream them batch by batch instead)",
    )
    return streamed


def _split(
    data: SpotArrays, val_fraction: float, val_sections, seed: int, *, per_section: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    n = len(data.patches)
    if val_sections is not None:
        samples = data.sections
        unknown = set(val_sections) - set(samples)
        if unknown:
            raise ValueError(
                f"`val_sections` {sorted(unknown)} are not among the training samples {sorted(set(samples))}."
            )
        is_val = np.isin(samples, list(val_sections))
        if is_val.all():
            raise ValueError("`val_sections` covers every training section; keep at least one for training.")
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if not 0 < val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
    rng = np.random.default_rng(seed)
    if per_section:  # the authors' split: the same fraction of every section's spots
        val = [
            rows[rng.permutation(len(rows))[: max(1, int(round(val_fraction * len(rows))))]]
            for rows in (np.flatnonzero(data.sections == s) for s in pd.unique(data.sections))
            if len(rows) > 1
        ]
        is_val = np.zeros(n, dtype=bool)
        is_val[np.concatenate(val) if val else []] = True
        if is_val.sum() < 1 or is_val.all():
            raise ValueError(f"`val_fraction` {val_fraction} per section leaves no training or validation spots.")
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)
    order = rng.permutation(n)
    n_val = max(2, int(round(val_fraction * n))) if n >= 10 else 1
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _blend_weights(blend, model: ExpressionModel) -> dict[str, float] | None:
    """The saved blend as component weights; the first saved models kept one weight of regression vs retrieval."""
    if not model.is_neural or isinstance(blend, dict):
        return blend
    regression, retrieval = model.config.regression_head, model.config.contrastive
    if blend is None or not (regression and retrieval):  # a single component was predicted alone
        return {"regression": 1.0} if regression and not retrieval else {"retrieval": 1.0}
    return {"regression": float(blend), "retrieval": 1.0 - float(blend)}


def _check_ridge_options(config: dict[str, Any]) -> None:
    """Raise naming the option if a ridge preset's options are out of range (before any patch is cut)."""
    from ._baselines import check_probe_options

    _check_int(config["img_size"], "img_size", 8, "the patch side in pixels, e.g. 112")
    scales = config["context_scales"]
    if isinstance(scales, str) or not isinstance(scales, Iterable):
        raise TypeError("`context_scales` must be a sequence of patch sides relative to the spot, e.g. (1, 3).")
    for scale in scales:
        _check_number(scale, "context_scales", "patch sides relative to the spot, e.g. (1, 3)")
    if not len(tuple(scales)):
        raise ValueError("`context_scales` is empty; give at least the spot scale, e.g. (1,).")
    _check_int(config.get("rank"), "rank", 1, "a number of principal axes, e.g. 30, or None", none=True)
    lowres = config.get("lowres", 0.0)
    if isinstance(lowres, bool) or not isinstance(lowres, int | float | np.integer | np.floating) or not lowres >= 0:
        raise ValueError(f"`lowres` must be a blur factor >= 0 (e.g. 4; 0 or 1: off), got {lowres!r}.")
    if not isinstance(config.get("white_balance", False), bool | np.bool_):
        raise TypeError(f"`white_balance` must be True or False, got {config['white_balance']!r}.")
    check_probe_options(
        config["features"],
        lowres=lowres,
        per_section=config.get("per_section", False),
        white_balance=config.get("white_balance", False),
    )
    smoothing = config.get("neighbour_smoothing", 0.0)
    if isinstance(smoothing, bool) or not isinstance(smoothing, int | float | np.integer | np.floating):
        raise TypeError(f"`neighbour_smoothing` must be a weight in [0, 1], got {smoothing!r}.")
    if not 0 <= smoothing <= 1:
        raise ValueError(f"`neighbour_smoothing` must be a weight in [0, 1], got {smoothing!r}.")


def _check_genes(genes) -> list[str]:
    """``genes`` as a list of distinct non-empty strings (one string: one gene), else raise naming the fix."""
    fix = "pass a list of gene names, e.g. `sth.pp.select_genes(sdata)`"
    if isinstance(genes, str):
        genes = [genes]
    if genes is None or isinstance(genes, bytes | Mapping) or not isinstance(genes, Iterable):
        raise TypeError(f"`genes` must be a list of gene names (str); {fix}. Got {genes!r}.")
    genes = list(genes)
    bad = [g for g in genes if not isinstance(g, str) or not g.strip()]
    if bad:
        raise TypeError(f"`genes` must hold gene names as non-empty strings; {fix}. Not names: {bad[:5]!r}.")
    if not genes:
        raise ValueError(f"`genes` is empty; {fix}.")
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"`genes` lists these genes more than once: {duplicated[:10]}; give each gene once.")
    return [str(g) for g in genes]


def _check_int(value, name: str, minimum: int | None, example: str, *, none: bool = False) -> int | None:
    """``value`` as an int (at least ``minimum``), else raise naming ``name`` and an ``example`` of a valid value."""
    if value is None and none:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an integer ({example}), got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum} ({example}), got {value}.")
    return int(value)


def _check_number(value, name: str, example: str) -> float:
    """``value`` as a positive finite float, else raise naming ``name``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a positive number ({example}), got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive number ({example}), got {value}.")
    return float(value)


def _check_path(path) -> Path:
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise TypeError(f"`path` must be a directory path (str or pathlib.Path), got {path!r}.")
    return Path(path)


def _sha256(path: Path) -> str:
    import pooch  # the same file hashing that checks downloaded datasets

    return pooch.file_hash(str(path), alg="sha256")


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _fsync(path: Path) -> None:
    """Flush a written file to the disk, so that a crash after the rename cannot leave it half-written."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _read_meta(file: Path) -> dict[str, Any]:
    """``model.json`` of a model directory, checked for the keys and format this version reads."""
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{str(file.parent)!r} is not an st_from_he model: it has no {_CONFIG_FILE}.") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(file)!r} is corrupt (not readable JSON: {err}); save the model again.") from err
    required = {"format", "preset", "genes", "size_um", "config", "context"}
    if not isinstance(meta, dict) or not required <= set(meta) or meta["format"] != _FORMAT:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(
            f"{str(file)!r} is not a model of a format this version reads (keys {keys}, format "
            f"{meta.get('format') if isinstance(meta, dict) else None}, expected {_FORMAT}); re-save it with this "
            "version."
        )
    if meta.get("package", _PACKAGE) != _PACKAGE:
        raise ValueError(f"{str(file)!r} was written by {meta['package']!r}, not by st_from_he.")
    return meta


def _verify_files(path: Path, meta: dict[str, Any], expected: list[str]) -> None:
    """Check that each file ``expected`` of the model is there and is the one ``model.json`` records."""
    for name in expected:
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{str(path / name)!r} is missing: the model is incomplete. Restore the file or save the model again."
            )
    records = meta.get("files")
    if records is None:
        logger.warning(
            "%s was saved by an older st_from_he version without checksums: its files cannot be checked to belong "
            "to it (only their shapes are). Save it again to record them.",
            path,
        )
        return
    for name in expected:
        record = records.get(name) if isinstance(records, dict) else None
        if not isinstance(record, dict) or "sha256" not in record:
            raise ValueError(f"{str(path / _CONFIG_FILE)!r} records no checksum of {name}; save the model again.")
        file = path / name
        if file.stat().st_size != record.get("bytes", file.stat().st_size) or _sha256(file) != record["sha256"]:
            raise ValueError(
                f"{str(file)!r} does not belong to this model: its size or sha256 differs from the one recorded in "
                f"{_CONFIG_FILE} (a damaged file, or one copied from another model). Restore the model's own file "
                "or save the model again."
            )


def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as err:  # zip, zlib, npy-header and OS readers raise unrelated types on a damaged file
        raise ValueError(
            f"{str(file)!r} is missing or corrupt ({type(err).__name__}: {err}); restore it or save the model again."
        ) from err


def _read_weights(file: Path, model: ExpressionModel):
    from safetensors.torch import load_file

    from st_from_he.models import ExpressionModule

    module = ExpressionModule(model.config, n_genes=len(model.genes))
    try:
        state = load_file(file)
    except Exception as err:  # safetensors raises its own error types on a damaged file
        raise ValueError(f"{str(file)!r} is corrupt ({type(err).__name__}: {err}); restore it or save again.") from err
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{str(file)!r}: the weights do not fit the configuration in {_CONFIG_FILE} ({str(err)[:300]})."
        ) from err
    return module.eval()


def _check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is a model directory written by this package, holding nothing but its files."""
    refuse = "`overwrite=True` replaces only a model directory written by st_from_he"
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(
            f"{str(path)!r} is not a model directory; {refuse}. Remove it yourself or choose another path."
        )
    try:
        meta = json.loads((path / _CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    # models saved before the package marker was written carry format and package_version
    ours = isinstance(meta, dict) and (
        meta.get("package") == _PACKAGE
        or ("package" not in meta and {"format", "package_version", "preset"} <= set(meta))
    )
    if not ours:
        raise FileExistsError(
            f"{str(path)!r} is not a model saved by st_from_he (no readable {_CONFIG_FILE} of this package); "
            f"{refuse}. Remove it yourself or choose another path."
        )
    others = sorted(p.name for p in path.iterdir() if p.name not in _MODEL_FILES)
    if others:
        raise FileExistsError(
            f"{str(path)!r} holds files that are not part of the model ({others[:10]}), which overwriting would "
            f"delete; move them away or choose another path."
        )


def _swap_in(new: Path, path: Path) -> None:
    """Replace the model directory ``path`` by ``new``, keeping the old one until the new one is in place."""
    backup = path.parent / f".{path.name}{_BACKUP_TAG}{uuid.uuid4().hex[:8]}"
    os.replace(path, backup)
    try:
        os.replace(new, path)
    except BaseException as err:
        try:
            os.replace(backup, path)
        except OSError as restore_err:
            raise OSError(
                f"Replacing {str(path)!r} failed ({err}), and so did restoring the previous model ({restore_err}): it "
                f"is kept at {str(backup)!r}; rename it to {path.name!r}."
            ) from err
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _backup_hint(path: Path) -> str:
    """Where an interrupted overwrite of ``path`` left the previous model, if it did."""
    parent = path.parent
    if not parent.is_dir():
        return ""
    prefix = f".{path.name}{_BACKUP_TAG}"
    backups = sorted(b for b in parent.iterdir() if b.name.startswith(prefix) and (b / _CONFIG_FILE).is_file())
    if not backups:
        return ""
    return (
        f" An interrupted overwrite left the previous model at {str(backups[-1])!r}: rename it to {path.name!r} to "
        "restore it."
    )
