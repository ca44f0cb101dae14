"""Closed-form baselines: ridge on fixed image features, and the training mean."""

from __future__ import annotations

from typing import Any

import numpy as np

from st_from_he._logging import logger

_ALPHAS = np.logspace(-1, 5, 13)
FEATURE_SETS = ("handcrafted", "handcrafted+blobs", "encoder", None)
BLOB_FILTERS = ("pyramid", "full")
"""``models._handcrafted.BLOB_FILTERS``, named here too: importing the models package loads torch."""
EMBEDDING_PREFIX = "X_"
"""Features named ``"X_<name>"`` are cached embeddings in ``table.obsm["X_<name>"]`` (see :func:`~st_from_he.tl.embed`)."""
_TARGET_EPS = 0.1  # added to each gene's within-section std (log-normalised units): rare genes are not blown up
MIN_SECTION_SPOTS = 30
"""Fewest spots of a section to predict whose own feature statistics standardise it (``per_section=True``);
smaller groups are standardised with the statistics pooled over the training spots. Also the fewest spots every
training section needs for the expression to be standardised within sections."""
MIN_TRAINING_SECTION_SPOTS = 5
"""The same for the training sections: there, even the statistics of a few spots per section (few-shot training)
fit better than pooled ones (held-out HVG PCC 0.135 against 0.081 with 5 spots per section)."""


class RidgeProbe:
    """Standardised features -> expression by ridge regression, its penalty chosen by leave-one-out on training spots.

    Parameters
    ----------
    features
        ``"handcrafted"`` (colour, stain and texture statistics), ``"handcrafted+blobs"`` (those plus the
        haematoxylin and eosin Laplacian-of-Gaussian responses at three blob sizes of ``stain_blob_features``),
        ``"encoder"`` (pooled tokens of a frozen encoder), ``"X_<name>"`` (cached embeddings: :meth:`fit` and
        :meth:`featurize` then take the embedding vectors ``(n, d)`` instead of patches) or ``None`` (no features:
        predicts the training mean).
    encoder
        Frozen encoder for ``features="encoder"``: a timm name (ImageNet normalisation, mean token), or a
        foundation-model name of :data:`~st_from_he.models.FOUNDATION_ENCODERS` (its own input normalisation and
        pooling, through :class:`~st_from_he.models.FoundationEncoder`).
    encoder_weights
        Weights of that encoder (``None``: random initialisation, drawn from ``seed``, so that a saved probe
        rebuilds the same encoder).
    img_size
        Input side in pixels of that encoder, for encoders with a fixed input size (ViTs); ``None``: the side of
        the patches.
    encoder_kwargs
        Further :func:`timm.create_model` arguments of that encoder (e.g. ``{"depth": 1}`` for a small test model).
    lowres
        If above 1, also fit on a copy of every training patch blurred as if scanned up to ``lowres`` times coarser
        (:func:`~st_from_he.models.lower_resolution`), so that the probe holds up on lower-resolution images.
    seed
        Seed of the blur factors and of a random-init encoder.
    per_section
        ``"zscore"`` (or ``True``): standardise the features of each section (each group of :meth:`fit` and
        :meth:`predict_features`) with that section's own mean and standard deviation before the ridge, and fit each
        gene's expression z-scored within its training section. ``"centre"``: subtract each section's own feature
        mean but divide by the standard deviation pooled over the training spots (the expression is z-scored within
        sections as with ``"zscore"``). ``"hybrid"`` (hand-crafted features only): centre the colour and composition
        features, z-score the texture and blob features, whose spread the image's resolution and focus scale (see
        :func:`~st_from_he.models._handcrafted.structure_columns`). ``False``: the features and expression as they
        are. A spot's prediction then depends on the other spots of its section given in the same
        call (their feature statistics), never on the batching or the order of the spots. Per-gene correlations within a section are blind to section-wide shifts: this removes
        the ones that stain, scanner and resolution put into the features, and weighs every training section
        equally for every gene. Z-scoring also assumes every section holds the same mix of tissue: true of serial
        sections of one patient, false across patients (a fatty section's wider spread of features is squeezed onto
        a tumour-dense one's), which centring keeps (cross-patient HVG PCC 0.07 z-scored, 0.11 centred, the same
        within a patient). Centring keeps, however, the narrower spread of texture features that a blurrier or
        coarser image gives; ``"hybrid"`` z-scores those alone (cross-patient HVG PCC at 4.6x lower resolution 0.04
        centred, 0.11 hybrid; ``benchmarks/results/probe_variants.md``). Sections to predict with fewer than :data:`MIN_SECTION_SPOTS` spots (training
        sections: fewer than :data:`MIN_TRAINING_SECTION_SPOTS`) fall back to the statistics pooled over the
        training spots; the expression is standardised only if every training section has
        :data:`MIN_SECTION_SPOTS` spots (with fewer, the noisy per-section scales cost more than they give:
        held-out HVG PCC 0.136 against 0.157 from 50 training spots, 0.193 against 0.235 on another section).
    rank
        If given, project the fitted coefficients onto the ``rank`` leading principal axes of the training
        expression (reduced-rank ridge): each gene's prediction borrows strength from the genes it co-varies with,
        which denoises the genes a thousand spots cannot fit on their own.
    white_balance
        Hand-crafted features only: scale each patch's channels so that the glass of its slide comes out at one grey
        (:func:`~st_from_he.models.white_balance`) before the features are read; :meth:`fit` and :meth:`featurize`
        then need each patch's ``glass`` colour (:attr:`~st_from_he.pp.PatchDataset.glass`). Removes the scanner's
        colour cast, which the features would otherwise read as tissue.
    blob_filters
        ``"handcrafted+blobs"`` only: ``"pyramid"`` filters the wider blob widths on block-averaged stain images,
        ``"full"`` on the patch's own pixels (see :func:`~st_from_he.models._handcrafted.stain_blob_features`).
        Probes saved before this choice existed load as ``"full"``, so their features stay what they were fitted on.
    """

    def __init__(
        self,
        features: str | None = "handcrafted",
        encoder: str = "resnet18",
        encoder_weights=None,
        *,
        img_size: int | None = None,
        encoder_kwargs: dict | None = None,
        lowres: float = 0.0,
        seed: int = 0,
        per_section: bool | str = False,
        rank: int | None = None,
        white_balance: bool = False,
        blob_filters: str = "pyramid",
    ):
        check_probe_options(features, lowres=lowres, per_section=per_section, white_balance=white_balance)
        if blob_filters not in BLOB_FILTERS:
            raise ValueError(f"`blob_filters` must be one of {BLOB_FILTERS}, got {blob_filters!r}.")
        if rank is not None and rank < 1:
            raise ValueError(f"`rank` must be a positive number of principal axes or None, got {rank}.")
        self.features = features
        self.encoder = encoder
        self.encoder_weights = encoder_weights
        self.img_size = img_size
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.lowres = lowres
        self.seed = seed
        self.per_section = section_mode(per_section)
        self.rank = rank
        self.white_balance = bool(white_balance)
        self.blob_filters = blob_filters
        self.state: dict[str, np.ndarray] = {}
        self._encoder_module = None

    def _features(self, patches: np.ndarray, glass=None, batch_size: int = 64, device="cpu") -> np.ndarray:
        # every feature of a spot is computed from its own patch (and its slide's glass): batching never changes it
        if self.features in ("handcrafted", "handcrafted+blobs"):
            glass = self._check_glass(glass, len(patches))
            features = self._torch_features(device) if device is not None else self._numpy_features
            return np.concatenate(
                [
                    features(patches[i : i + batch_size], None if glass is None else glass[i : i + batch_size])
                    for i in range(0, len(patches), batch_size)
                ]
            )
        if self.features == "encoder":
            return self._encoder_features(patches, batch_size)
        if is_embedding_key(self.features):  # the "patches" are the spots' embedding vectors
            x = np.asarray(patches, dtype=np.float32)
            if x.ndim != 2:
                raise ValueError(
                    f"A ridge probe on embeddings {self.features!r} takes vectors (n, d), got an array {x.shape}."
                )
            return x
        return np.zeros((len(patches), 0), dtype=np.float32)

    def _numpy_features(self, batch: np.ndarray, glass: np.ndarray | None) -> np.ndarray:
        """Hand-crafted features of a batch by the NumPy/SciPy reference implementation."""
        from st_from_he.models import white_balance
        from st_from_he.models._handcrafted import handcrafted_features, stain_blob_features

        if glass is not None:
            batch = white_balance(batch, glass)
        if self.features == "handcrafted":
            return handcrafted_features(batch)
        return np.concatenate([handcrafted_features(batch), stain_blob_features(batch, self.blob_filters)], axis=1)

    def _torch_features(self, device):
        """A function of ``(batch, glass)`` computing the hand-crafted features with torch on ``device``."""
        import torch

        from st_from_he.models._handcrafted_torch import probe_features_torch, white_balance_torch

        device = torch.device(device)

        def features(batch: np.ndarray, glass: np.ndarray | None) -> np.ndarray:
            with torch.inference_mode():
                x = _as_uint8_tensor(batch).to(device)
                if glass is not None:
                    x = white_balance_torch(x, glass)
                blobs = self.features == "handcrafted+blobs"
                return probe_features_torch(x, blobs=blobs, blob_filters=self.blob_filters).cpu().numpy()

        return features

    def _check_glass(self, glass, n: int) -> np.ndarray | None:
        """Each patch's glass colour ``(n, 3)`` when the probe white-balances, else ``None``."""
        if not self.white_balance:
            return None
        if glass is None:
            raise ValueError(
                "This ridge probe white-balances each slide before reading its features, so it needs the glass "
                "colour of each patch's slide (`glass`): cut the patches with `sth.pp.extract_patches` and pass its "
                "PatchDataset (which knows each slide's glass), or `glass=patches.glass_per_spot()`."
            )
        from st_from_he.models._white_balance import glass_per_patch

        return glass_per_patch(glass, n)

    def _encoder_features(self, patches: np.ndarray, batch_size: int) -> np.ndarray:
        import torch

        from st_from_he.models import FoundationEncoder

        if self._encoder_module is None:
            self._encoder_module = self._build_encoder(patches.shape[-1])
        encoder = self._encoder_module
        if isinstance(encoder, FoundationEncoder):  # its own resampling, normalisation and pooling
            scales = patches.shape[1] if patches.ndim == 5 else 1
            out = []
            for i in range(0, len(patches), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch_size]))
                pooled = encoder.embed(x.reshape(-1, 3, *x.shape[-2:]))
                out.append(pooled.reshape(len(pooled) // scales, -1).numpy())
            return np.concatenate(out).astype(np.float32)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        scales = patches.shape[1] if patches.ndim == 5 else 1
        out = []
        with torch.inference_mode():
            for i in range(0, len(patches), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch_size]))
                x = x.reshape(-1, 3, *x.shape[-2:]).float().div(255).sub(mean).div(std)
                pooled = self._encoder_module.pool(self._encoder_module(x))
                out.append(pooled.reshape(len(pooled) // scales, -1).numpy())
        return np.concatenate(out).astype(np.float32)

    def _build_encoder(self, side: int):
        """The frozen encoder (eval mode), its random initialisation drawn from :attr:`seed`.

        A fitted probe records the encoder's :meth:`~st_from_he.models.ImageEncoder.fingerprint`: an encoder
        rebuilt otherwise (another torch or timm version, another weights file) is refused, not silently used.
        """
        import torch

        from st_from_he.models import FoundationEncoder, ImageEncoder
        from st_from_he.models._encoders import _registry_spec

        img_size = int(self.state.get("img_size", self.img_size or side))
        with torch.random.fork_rng(devices=[]):  # seeds the initialisation without touching the caller's stream
            torch.manual_seed(int(self.state.get("seed", self.seed)))
            if _registry_spec(self.encoder) is not None:
                weights = "random" if self.encoder_weights is None else self.encoder_weights
                encoder = FoundationEncoder(self.encoder, weights=weights, img_size=img_size, **self.encoder_kwargs)
            else:
                encoder = ImageEncoder(
                    self.encoder, weights=self.encoder_weights, img_size=img_size, **self.encoder_kwargs
                )
            encoder = encoder.eval()
        expected = self.state.get("encoder_sha256")
        if expected is not None and _fingerprint(encoder) != str(expected):
            raise ValueError(
                f"The encoder {self.encoder!r} rebuilt for this ridge probe differs from the one it was fitted with "
                f"(another torch or timm version, or another `encoder_weights` file {self.encoder_weights!r}): its "
                f"features would not match the coefficients. Refit the model with this setup."
            )
        return encoder

    def check_encoder(self) -> None:
        """Rebuild the encoder of a fitted ``features="encoder"`` probe now, raising if it is not the fitted one."""
        if self.features != "encoder":
            return
        if "encoder_sha256" not in self.state and self.encoder_weights is None:
            raise ValueError(
                "This ridge probe was saved by an older version that did not record its random encoder, which "
                "cannot be rebuilt: refit the model and save it again."
            )
        if "img_size" not in self.state and self.img_size is None:
            raise ValueError("This ridge probe does not record its encoder's input size; pass `img_size`.")
        self._encoder_module = self._build_encoder(int(self.state.get("img_size", self.img_size or 0)))

    def fit(self, patches: np.ndarray, targets: np.ndarray, groups=None, glass=None, *, device="cpu") -> RidgeProbe:
        """Fit on uint8 patches ``(n, [s,] 3, h, w)`` and log-normalised targets ``(n, genes)``.

        ``groups`` (length ``n``, e.g. the sample of each spot) names the section of each spot, for ``per_section``;
        ``None``: one section. ``glass``: the glass colour of each patch's slide ``(n, 3)``, for ``white_balance``.
        ``device``: where the hand-crafted features are computed (see :meth:`featurize`).
        """
        from sklearn.linear_model import RidgeCV

        targets = np.asarray(targets, dtype=np.float64)
        groups = _groups(groups, len(targets))
        self.state, self._encoder_module = {}, None  # a refit builds its encoder afresh from the seed
        glass = self._check_glass(glass, len(targets))
        x = self._features(patches, glass, device=device)
        state: dict[str, np.ndarray] = {
            "features": np.array(self.features or ""),
            "per_section": np.array(self.per_section or ""),
            "white_balance": np.array(self.white_balance),
            "blob_filters": np.array(self.blob_filters),
            "target_mean": targets.mean(0).astype(np.float32),
            "seed": np.array(self.seed),
        }
        if self.features == "encoder":
            # what rebuilds the same frozen encoder when the probe is loaded, and its fingerprint to check it
            state |= {
                "img_size": np.array(self.img_size or patches.shape[-1]),
                "encoder_sha256": np.array(_fingerprint(self._encoder_module)),
            }
        if not x.shape[1]:
            self.state = state
            return self
        scale = np.ones(targets.shape[1])
        if self.per_section:
            state |= {"pooled_mean": x.mean(0), "pooled_std": x.std(0) + 1e-6, "centred": self._centred(x.shape[1])}
            x = self._standardise(x, groups, MIN_TRAINING_SECTION_SPOTS, state)
            if min(np.unique(groups, return_counts=True)[1]) >= MIN_SECTION_SPOTS:
                # the probe learns each section's z-scores; predictions go back on the typical within-section scale
                # (every section is large enough here, so the pooled statistics are never used)
                pooled = targets.mean(0), targets.std(0) + _TARGET_EPS
                targets, scale = _standardise_sections(
                    targets, groups, MIN_SECTION_SPOTS, *pooled, eps=_TARGET_EPS, scales=True
                )
            else:
                logger.info(
                    "A training section has fewer than %d spots: the expression is not standardised per section.",
                    MIN_SECTION_SPOTS,
                )
        axes = None
        if self.rank is not None and self.rank < min(targets.shape):
            axes = np.linalg.svd(targets - targets.mean(0), full_matrices=False)[2][: self.rank]
        if self.lowres > 1:
            blurred = self._blurred_features(patches, glass, device=device)
            if self.per_section:
                blurred = self._standardise(blurred, groups, MIN_TRAINING_SECTION_SPOTS, state)
            x = np.concatenate([x, blurred])
            targets = np.concatenate([targets, targets])
        mean = targets.mean(0)
        f_mean, f_std = x.mean(0), x.std(0) + 1e-6
        ridge = RidgeCV(alphas=_ALPHAS).fit((x - f_mean) / f_std, targets - mean)
        coef = ridge.coef_.T if axes is None else ridge.coef_.T @ axes.T @ axes
        state |= {
            "feature_mean": f_mean,
            "feature_std": f_std,
            "coef": (coef * scale).astype(np.float32),
            "alpha": np.array(ridge.alpha_),
        }
        self.state = state
        return self

    def _centred(self, n_columns: int) -> np.ndarray:
        """Which feature columns are centred (not z-scored) within sections, as :attr:`per_section` says."""
        if self.per_section == "hybrid":
            from st_from_he.models._handcrafted import structure_columns

            return ~structure_columns(n_columns, blobs=self.features == "handcrafted+blobs")
        return np.full(n_columns, self.per_section == "centre")

    def _standardise(self, x: np.ndarray, groups: np.ndarray, min_spots: int, state) -> np.ndarray:
        """Features standardised within each section as :attr:`per_section` says (z-scored, centred or both)."""
        pooled = state["pooled_mean"], state["pooled_std"]
        centred = state.get("centred")
        centred = self._centred(x.shape[1]) if centred is None else np.asarray(centred, bool)  # older saves: z-scored
        return _standardise_sections(x, groups, min_spots, *pooled, centre_only=centred)

    def _blurred_features(self, patches: np.ndarray, glass=None, batch_size: int = 256, device="cpu") -> np.ndarray:
        """Features of uint8 patches ``(n, [s,] 3, h, w)``, each blurred by a factor log-uniform in ``[1, lowres]``.

        Batch by batch, so that no blurred copy of all the patches is held in memory.
        """
        import torch

        from st_from_he.models import lower_resolution

        factors = np.exp(np.random.default_rng(self.seed).uniform(0, np.log(self.lowres), len(patches)))
        features = []
        for i in range(0, len(patches), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch_size])).float()
            shape = x.shape
            y = lower_resolution(
                x.reshape(len(x), -1, *shape[-3:]), torch.from_numpy(factors[i : i + batch_size]).float()
            )
            blurred = y.reshape(shape).round().clamp(0, 255).to(torch.uint8).numpy()
            features.append(
                self._features(blurred, None if glass is None else glass[i : i + batch_size], device=device)
            )
        return np.concatenate(features)

    def featurize(self, patches: np.ndarray, glass=None, *, device="cpu") -> np.ndarray:
        """The probe's raw features of uint8 patches ``(n, [s,] 3, h, w)``, for :meth:`predict_features`.

        ``glass``: the glass colour of each patch's slide ``(n, 3)`` (or one ``(3,)``), for ``white_balance``.
        ``device``: the torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a :class:`torch.device`) on which
        hand-crafted features are computed, e.g. the model's; ``None``: by the NumPy/SciPy reference implementation
        (:mod:`st_from_he.models._handcrafted`), which the torch one equals within float32 rounding and is several
        times slower. Other feature sets ignore it.
        """
        return self._features(patches, glass, device=device)

    def predict_features(
        self, features: np.ndarray, groups=None, *, min_section_spots: int = MIN_SECTION_SPOTS
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predictions from :meth:`featurize` of spots; ``groups`` names their sections (``None``: one section).

        ``min_section_spots``: fewest spots of a section standardised with its own statistics.
        """
        if not self.state:
            raise RuntimeError("The ridge probe is not fitted; call `fit` first.")
        mean = self.state["target_mean"]
        if "coef" not in self.state:
            if self.features is not None:  # a damaged state must not quietly predict the training mean
                raise ValueError(
                    f"The {self.features!r} ridge probe has no coefficients (`coef`): its state is incomplete. "
                    "Refit it, or reload the model from an intact save."
                )
            return np.tile(mean, (len(features), 1)), np.zeros((len(features), 0), dtype=np.float32)
        x = np.asarray(features, dtype=np.float64)
        if self.per_section:
            x = self._standardise(x, _groups(groups, len(x)), min_section_spots, self.state)
        x = (x - self.state["feature_mean"]) / self.state["feature_std"]
        return (x @ self.state["coef"] + mean).astype(np.float32), x.astype(np.float32)

    def get_state(self) -> dict[str, Any]:
        """Arrays that define the fitted probe (saved by :meth:`ExpressionModel.save`)."""
        return dict(self.state)

    def set_state(self, state: dict[str, np.ndarray], n_genes: int | None = None) -> RidgeProbe:
        """Restore a fitted probe from :meth:`get_state`.

        Raises a :class:`ValueError` naming the array if the state is incomplete or its shapes disagree (with each
        other, or with ``n_genes`` when given).
        """
        self.state = {k: np.asarray(v) for k, v in state.items()}
        self._encoder_module = None
        self.per_section = section_mode(self.state.get("per_section", False))
        self.white_balance = bool(self.state.get("white_balance", False))
        self.blob_filters = str(self.state.get("blob_filters", "full"))  # saved before the pyramid: full filters
        if self.blob_filters not in BLOB_FILTERS:
            raise ValueError(
                f"This probe's state names unknown blob filters {self.blob_filters!r}: not {BLOB_FILTERS}."
            )
        if "features" in self.state:  # probes saved before the feature set was recorded keep the constructor's
            self.features = str(self.state["features"]) or None
        if "seed" in self.state:
            self.seed = int(self.state["seed"])
        self._check_state(n_genes)
        return self

    def _check_state(self, n_genes: int | None) -> None:
        state = self.state
        required = ["target_mean"]
        if self.features is not None:
            required += ["feature_mean", "feature_std", "coef"]
        if self.per_section and self.features is not None:
            required += ["pooled_mean", "pooled_std"]
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"the {self.features!r} ridge probe lacks the arrays {missing}.")
        mean = state["target_mean"]
        genes = len(mean) if n_genes is None else n_genes
        if mean.shape != (genes,):
            raise ValueError(f"`target_mean` has shape {mean.shape}, expected ({genes},) for {genes} genes.")
        if self.features is None:
            return
        coef = state["coef"]
        if coef.ndim != 2 or coef.shape[1] != genes:
            raise ValueError(f"`coef` has shape {coef.shape}, expected (features, {genes}) for {genes} genes.")
        optional = [k for k in ("centred",) if k in state]  # saves before the per-column choice lack it
        for key in (
            "feature_mean",
            "feature_std",
            *(("pooled_mean", "pooled_std") if self.per_section else ()),
            *optional,
        ):
            if state[key].shape != (coef.shape[0],):
                raise ValueError(f"`{key}` has shape {state[key].shape}, expected ({coef.shape[0]},) as `coef`.")


def is_embedding_key(features) -> bool:
    """Whether ``features`` names cached embeddings in ``obsm`` (``"X_<name>"``), not a hand-crafted feature set."""
    return isinstance(features, str) and features.startswith(EMBEDDING_PREFIX) and len(features) > len(EMBEDDING_PREFIX)


def is_feature_set(features) -> bool:
    """Whether a ridge probe takes ``features``: a name of :data:`FEATURE_SETS` or an embedding key."""
    return (features is None or isinstance(features, str)) and (features in FEATURE_SETS or is_embedding_key(features))


def section_mode(per_section) -> str | bool:
    """``per_section`` as ``"zscore"``, ``"centre"`` or ``False`` (``True`` and saved states' ``"True"`` mean z-scoring)."""
    if isinstance(per_section, np.ndarray):
        per_section = per_section.item()
    if isinstance(per_section, bool | np.bool_):
        return "zscore" if per_section else False
    if not isinstance(per_section, str):
        raise TypeError(f"`per_section` must be 'zscore' (or True), 'centre', 'hybrid' or False, got {per_section!r}.")
    if per_section in ("True", "zscore"):
        return "zscore"
    if per_section in ("False", ""):
        return False
    if per_section in ("centre", "hybrid"):
        return per_section
    raise ValueError(f"`per_section` must be 'zscore' (or True), 'centre', 'hybrid' or False, got {per_section!r}.")


def check_probe_options(features, *, lowres, per_section, white_balance) -> None:
    """Raise naming the option when the probe's options do not go together with its ``features``.

    Shared by :class:`RidgeProbe` and the ridge presets of :class:`~st_from_he.tl.ExpressionModel`, which check
    before any patch is cut.
    """
    if not is_feature_set(features):
        raise ValueError(
            f"Unknown `features` {features!r}; choose one of {list(FEATURE_SETS)}, or an obsm key of cached "
            f"embeddings 'X_<name>' (from `sth.tl.embed`)."
        )
    if is_embedding_key(features) and lowres > 1:
        raise ValueError("`lowres` blurs image patches; it does not apply to cached embeddings (`features='X_...'`).")
    handcrafted = features in ("handcrafted", "handcrafted+blobs")
    if section_mode(per_section) == "hybrid" and not handcrafted:  # section_mode also checks the value
        raise ValueError(f"`per_section='hybrid'` applies to hand-crafted features, not to {features!r}.")
    if white_balance and not handcrafted:
        raise ValueError(f"`white_balance` applies to hand-crafted features, not to {features!r}.")


def _as_uint8_tensor(patches):
    """uint8 patches (array or tensor) as a CPU tensor, refusing other dtypes as the NumPy features would not."""
    import torch

    x = patches if isinstance(patches, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(patches))
    if x.dtype != torch.uint8:
        raise TypeError(
            f"Patches must be uint8 RGB (0-255), got dtype {x.dtype}; cut them with `sth.pp.extract_patches`."
        )
    return x


def _fingerprint(encoder) -> str:
    """The fingerprint of an :class:`~st_from_he.models.ImageEncoder` or of a foundation encoder's backbone."""
    return getattr(encoder, "backbone", encoder).fingerprint()


def _groups(groups, n: int) -> np.ndarray:
    """Section label of each of ``n`` spots as an array (``None``: all in one section)."""
    if groups is None:
        return np.zeros(n, dtype=int)
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"`groups` has {len(groups)} entries for {n} spots.")
    return groups


def _standardise_sections(
    x: np.ndarray,
    groups: np.ndarray,
    min_spots: int,
    pooled_mean: np.ndarray,
    pooled_std: np.ndarray,
    *,
    eps: float = 1e-6,
    scales: bool = False,
    centre_only: bool | np.ndarray = False,
):
    """Columns of ``x`` z-scored within each group of spots (section).

    Groups under ``min_spots`` spots are standardised with ``pooled_mean`` and ``pooled_std``; ``eps`` is added to
    each group's standard deviation. With ``centre_only`` (for every column, or a boolean per column), every group is
    centred on its own mean but divided by ``pooled_std``. With ``scales``, also return the spot-weighted mean of the standard deviations used (the typical
    within-section scale of each column).
    """
    out = np.empty_like(x, dtype=np.float64)
    scale = np.zeros(x.shape[1])
    small = []
    for group in np.unique(groups):
        rows = groups == group
        if rows.sum() >= min_spots:
            # statistics of the sorted columns: the same to the last bit whatever the order of the spots
            block = np.sort(x[rows], axis=0)
            mean, std = block.mean(0), np.where(centre_only, pooled_std, block.std(0) + eps)
        else:
            small.append(str(group))
            mean, std = pooled_mean, pooled_std
        out[rows] = (x[rows] - mean) / std
        scale += std * rows.mean()
    if small:
        logger.info(
            "Section(s) %s have fewer than %d spots: their features are standardised with the training statistics.",
            ", ".join(small[:5]) + (" ..." if len(small) > 5 else ""),
            min_spots,
        )
    return (out, scale) if scales else out
