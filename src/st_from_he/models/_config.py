"""Hyperparameters of the expression model, with the reference (CMRCNet-style) values as defaults."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

_TUPLE_FIELDS = ("context_scales", "image_mean", "image_std")


@dataclass
class ModelConfig:
    """Every hyperparameter of :class:`~st_from_he.models.ExpressionModule`.

    Defaults describe the reference method (contrastive soft-target loss plus cross-modal masked reconstruction,
    retrieval of the top 50 training spots) as the package builds it; the extensions (multi-scale context,
    neighbour attention, regression head, colour/stain/scale augmentation) are off. Where the authors' code
    (github ``ngfufdrdh/CMRCNet``) differs, a field says so and ``preset="cmrc"`` sets the authors' value; the
    defaults stay as they were, so saved models load unchanged. :meth:`to_dict` and :meth:`from_dict` round-trip the config
    through JSON.

    Attributes
    ----------
    encoder
        Image encoder: any :func:`timm.create_model` name (e.g. ``"vit_small_patch16_224"``, ``"resnet18"``,
        ``"convnext_tiny"``), the built-in CPU-friendly ``"sth_tinycnn"`` or ``"vit_b32_cmrc"``, the authors' own
        randomly initialised ViT-B/32 (depth 8, 8 heads, 768-d, 50 tokens; ``preset="cmrc"``).
    encoder_weights
        ``None`` (random initialisation), a local ``.safetensors``/``.pth``/``.pt``/``.bin`` file, or a hub id
        (``"hf-hub:org/repo"`` or ``"timm/<name>.<tag>"``; needs a network connection).
    encoder_kwargs
        Extra keyword arguments for :func:`timm.create_model`, e.g. ``{"init_values": 1e-5}`` for some pathology
        foundation models.
    img_size
        Side of the square patch in pixels fed to the encoder (reference 224).
    patch_um
        Physical side of the spot patch in micrometres (reference 112 um = 224 px at 0.5 um/px). Used by
        :mod:`st_from_he.tl` to cut patches; the modules only see pixels.
    context_scales
        Patch sides relative to ``patch_um``, one entry per scale; the first is the spot patch. ``(1.0,)`` is the
        reference single-scale input; e.g. ``(1.0, 3.0)`` adds a 3x wider context patch resampled to ``img_size``,
        fused by :class:`~st_from_he.models.MultiScaleFusion`.
    image_mean
        Per-channel mean used to normalise RGB images in ``[0, 1]``; augmentations undo it to jitter colours.
    image_std
        Per-channel standard deviation used with ``image_mean``.
    proj_dim
        Dimension of the shared image/expression embedding space (reference 256).
    proj_dropout
        Dropout inside the projection heads (reference 0.1).
    tau
        Temperature of the soft-target contrastive loss (reference 1.0).
    contrastive
        Train with the soft-target contrastive loss and the expression encoder (reference ``True``); needed for
        retrieval.
    use_reconstruction
        Add the cross-modal masked reconstruction loss during training (reference ``True``).
    n_gene_tokens
        Number of gene tokens the self-normalising network makes from the expression vector (reference 8).
    snn_dropout
        Alpha-dropout rate of the self-normalising network (reference 0.25).
    mask_ratio
        Fraction of image-token entries zeroed at random during training (reference 0.5).
    n_fusion_blocks
        Transformer fusion blocks after the image-to-gene cross-attention (reference 2).
    n_heads
        Attention heads in the fusion and neighbour attention (reference 8).
    fusion_dropout
        Dropout inside the attention blocks (authors 0.1).
    fusion
        Fusion after the first cross-attention: ``"stacked"`` (``n_fusion_blocks`` separate post-norm transformer
        layers over image and gene tokens joined, the first cross-attention added to the tokens and layer-normed)
        or ``"cmrc"`` (the authors': the cross-attention output alone, then ONE block applied ``n_fusion_blocks``
        times, tied weights: pre-norm self-attention over image tokens, MLP, one-way image-to-gene cross-attention;
        gene tokens never updated). See :class:`~st_from_he.models.MaskedCrossModalFusion`.
    cross_heads
        Heads of the first image-to-gene cross-attention; ``None``: ``n_heads`` (authors 4).
    cross_dropout
        Attention dropout of the first cross-attention; ``None``: ``fusion_dropout`` (authors 0).
    block_cross_dropout
        Dropout of the query/key MLPs in the ``"cmrc"`` block's gene cross-attention (authors 0.25).
    recon_stop_grad
        Stop the gradient at the reconstruction target, the projected image embedding (package ``True``; the
        authors let it flow, ``False``).
    contrastive_log
        ``"batch"``: ``log(1 + mean L)`` over the batch; ``"per_sample"``: the mean over spots of
        ``log(1 + L)`` (the authors').
    mask_in_validation
        Mask image tokens in validation too (the authors' code masks in every forward pass, ``True``).
    neighbour_attention
        Let each spot's image embedding attend over its neighbours' embeddings (extension, default off).
    neighbour_radius_um
        Radius in micrometres within which :mod:`st_from_he.tl` collects neighbours (of the same section, nearest
        first, at most ``max_neighbours``). The default 150 takes the 6 around a Visium spot (100 um apart); legacy
        ST (200 um apart, jittered centres) needs about 350 for its 8.
    max_neighbours
        Most neighbours per spot given to the neighbour attention.
    target_sum
        Total each spot's counts are scaled to before ``log1p`` for the training targets: ``1e4`` (the package's
        scale and the evaluation protocol's), or ``"median"``: the median total of the spot's section (the reference
        authors' ``normalize_total``; preset ``"cmrc"``). Predictions are on the training targets' scale; per-gene
        correlations within a section barely depend on it.
    neighbour_smoothing
        At prediction, blend each spot's prediction with the mean of its grid neighbours' (within 1.5 pitches, same
        section) with this weight (:func:`~st_from_he.models.smooth_neighbours`); ``0`` off (reference), ``0.5`` in
        the default preset. Image information only; needs the spots' positions, which
        :func:`~st_from_he.tl.predict_expression` has.
    regression_head
        Add a direct regression head on the image embedding trained with MSE (extension, default off).
    regression_hidden
        Hidden width of the regression head; ``None`` makes it linear.
    regression_weight
        Weight of ``log(1 + L_regression)`` in the total loss.
    top_k
        Number of nearest training spots averaged by retrieval (reference 50).
    lr
        AdamW learning rate (reference 1e-4).
    weight_decay
        AdamW weight decay (reference 1e-3).
    warmup_steps
        Linear warm-up steps before the per-step cosine schedule (reference 0).
    lr_schedule
        ``"step_cosine"``: cosine decay to zero over the run's steps, updated every step; ``"epoch_cosine"``: the
        authors' per-epoch cosine annealing, epoch ``e`` (from 0) at
        ``eta_min + (lr - eta_min) * (1 + cos(pi * (e + 1) / t_max)) / 2``.
    t_max
        Period in epochs of ``"epoch_cosine"``; ``None``: ``max_epochs`` (authors 60).
    eta_min
        Lowest learning rate of ``"epoch_cosine"`` (authors 1e-5).
    batch_size
        Training batch size (reference 64); also the contrastive loss's number of negatives.
    max_epochs
        Default number of training epochs (authors 60); the per-step cosine schedule spans the whole run.
    val_fraction
        Fraction of the training spots held out at random for validation (package 0.1, authors 0.2).
    val_per_section
        Draw ``val_fraction`` within each section rather than over all spots (authors ``True``).
    patience
        Early stopping after this many epochs without a lower validation loss; ``None``: train every epoch (the
        authors'). The weights of the best validation epoch are kept either way.
    augment_flips
        Random horizontal and vertical flips in training (reference ``True``).
    augment_rot90
        Random 90-degree rotations in training (reference ``True``).
    augment_color
        Strength of brightness/contrast/saturation jitter, ``0`` off (e.g. ``0.1`` = up to +-10%).
    augment_stain
        Strength of haematoxylin-eosin-DAB stain jitter, ``0`` off (e.g. ``0.05``).
    augment_rescale
        Random zoom by a factor in ``[1 / (1 + r), 1 + r]`` to mimic other scanner resolutions, ``0`` off.
    features
        ``None``: train on image patches. ``"X_<name>"``: train the heads on the cached embeddings in
        ``table.obsm["X_<name>"]`` (from :func:`st_from_he.tl.embed`) instead, with no image encoder and no image
        augmentation (each standardised vector is the spot's one token); ``encoder``, ``img_size`` and the image
        options then go unused, and ``context_scales`` must be ``(1.0,)``.
    feature_dim
        Dimension of those embeddings (set by :meth:`~st_from_he.tl.ExpressionModel.fit`).
    augment_lowres
        Largest factor of the random blur (downsample, upsample back) given to half of the training patches, to mimic
        images scanned at a coarser resolution than the patch's; ``<= 1`` off.

    Examples
    --------
    >>> from st_from_he.models import ModelConfig
    >>> config = ModelConfig(encoder="resnet18", img_size=224, augment_lowres=4)
    >>> ModelConfig.from_dict(config.to_dict()).augment_lowres
    4
    """

    encoder: str = "vit_small_patch16_224"
    encoder_weights: str | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    patch_um: float = 112.0
    context_scales: tuple[float, ...] = (1.0,)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    proj_dim: int = 256
    proj_dropout: float = 0.1
    tau: float = 1.0
    contrastive: bool = True
    use_reconstruction: bool = True
    n_gene_tokens: int = 8
    snn_dropout: float = 0.25
    mask_ratio: float = 0.5
    n_fusion_blocks: int = 2
    n_heads: int = 8
    fusion_dropout: float = 0.1
    neighbour_attention: bool = False
    neighbour_radius_um: float = 150.0
    max_neighbours: int = 8
    neighbour_smoothing: float = 0.0
    target_sum: float | str = 1e4
    regression_head: bool = False
    regression_hidden: int | None = None
    regression_weight: float = 1.0
    top_k: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-3
    warmup_steps: int = 0
    batch_size: int = 64
    max_epochs: int = 30
    augment_flips: bool = True
    augment_rot90: bool = True
    augment_color: float = 0.0
    augment_stain: float = 0.0
    augment_rescale: float = 0.0
    augment_lowres: float = 0.0
    fusion: str = "stacked"
    cross_heads: int | None = None
    cross_dropout: float | None = None
    block_cross_dropout: float = 0.25
    recon_stop_grad: bool = True
    contrastive_log: str = "batch"
    mask_in_validation: bool = False
    lr_schedule: str = "step_cosine"
    t_max: int | None = None
    eta_min: float = 0.0
    val_fraction: float = 0.1
    val_per_section: bool = False
    patience: int | None = 5
    features: str | None = None
    feature_dim: int | None = None

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("img_size", "proj_dim", "n_gene_tokens", "n_heads", "top_k", "batch_size", "max_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
            setattr(self, name, int(value))  # numpy integers too, as plain ints for JSON
        for name in ("patch_um", "tau", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
            setattr(self, name, float(value))
        for name in ("proj_dropout", "snn_dropout", "fusion_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)!r}.")
        if not self.context_scales or min(self.context_scales) <= 0:
            raise ValueError(f"`context_scales` must be positive and non-empty, got {self.context_scales}.")
        if self.proj_dim % self.n_heads:
            raise ValueError(f"`proj_dim` ({self.proj_dim}) must be divisible by `n_heads` ({self.n_heads}).")
        if self.target_sum != "median":
            value = self.target_sum
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
                raise ValueError(f"`target_sum` must be a positive number (e.g. 1e4) or 'median', got {value!r}.")
            self.target_sum = float(value)
        if isinstance(self.neighbour_smoothing, bool) or not 0 <= self.neighbour_smoothing <= 1:
            raise ValueError(f"`neighbour_smoothing` must be a weight in [0, 1], got {self.neighbour_smoothing!r}.")
        self.neighbour_smoothing = float(self.neighbour_smoothing)
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"`mask_ratio` must be in [0, 1), got {self.mask_ratio}.")
        if self.features is not None:
            if not isinstance(self.features, str) or not self.features.startswith("X_"):
                raise ValueError(
                    f"`features` must be None (image patches) or an obsm key of cached embeddings 'X_<name>' "
                    f"(from `sth.tl.embed`), got {self.features!r}."
                )
            if self.context_scales != (1.0,) or self.neighbour_attention:
                raise ValueError(
                    "Heads on cached embeddings (`features`) see one vector per spot: use `context_scales=(1,)` and "
                    "no `neighbour_attention` (embed a wider patch with `sth.tl.embed(size_um=...)` for context)."
                )
        if self.feature_dim is not None:
            if isinstance(self.feature_dim, bool) or not isinstance(self.feature_dim, numbers.Integral):
                raise ValueError(f"`feature_dim` must be a positive integer, got {self.feature_dim!r}.")
            if self.feature_dim < 1:
                raise ValueError(f"`feature_dim` must be a positive integer, got {self.feature_dim!r}.")
            self.feature_dim = int(self.feature_dim)
        self._check_reference_options()
        if not (self.contrastive or self.regression_head):
            raise ValueError(
                "Enable `contrastive` (retrieval) or `regression_head`: the model needs a prediction route."
            )

    def _check_reference_options(self) -> None:
        # the fields that switch between the package's and the authors' variants (preset "cmrc")
        choices = {
            "fusion": ("stacked", "cmrc"),
            "contrastive_log": ("batch", "per_sample"),
            "lr_schedule": ("step_cosine", "epoch_cosine"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        for name in ("cross_heads", "t_max", "patience"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if self.cross_heads is not None and self.proj_dim % self.cross_heads:
            raise ValueError(f"`proj_dim` ({self.proj_dim}) must be divisible by `cross_heads` ({self.cross_heads}).")
        for name in ("cross_dropout", "block_cross_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {self.val_fraction!r}.")
        if not 0 <= self.eta_min < self.lr:
            raise ValueError(f"`eta_min` must be in [0, lr={self.lr}), got {self.eta_min!r}.")
        if self.lr_schedule == "epoch_cosine" and self.warmup_steps:
            raise ValueError("`warmup_steps` applies to lr_schedule='step_cosine'; set it to 0 for 'epoch_cosine'.")

    @property
    def snn_hidden(self) -> int:
        """Width of the self-normalising network's output, ``n_gene_tokens * proj_dim`` (reference 2048)."""
        return self.n_gene_tokens * self.proj_dim

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for name in _TUPLE_FIELDS:
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise a :class:`ValueError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields: {unknown}.")
        return cls(**values)
