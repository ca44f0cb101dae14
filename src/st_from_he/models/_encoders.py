"""Image encoders: any timm backbone, or the built-in tiny CNN, returning a sequence of tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.nn import functional as F

from st_from_he._logging import logger

_HUB_PREFIXES = ("hf-hub:", "timm/")
_WRAPPER_KEYS = ("state_dict", "model")
_KEY_PREFIXES = ("module.", "model.")


class TinyCNN(nn.Module):
    """Four stride-2 conv-bn-relu stages (about 0.3M parameters) for fast training on a CPU.

    Registered as the encoder name ``"sth_tinycnn"``. The feature map is 1/16 of the input side, like a
    ViT with 16 px patches.

    Parameters
    ----------
    widths
        Output channels of each stage; the last is :attr:`num_features`.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 192)):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch in widths:
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.num_features = in_ch

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, 3, H, W)`` to a feature map ``(B, C, H / 16, W / 16)``.

        In eval mode each batch norm is folded into the convolution before it and the images run channels-last:
        the same function (equal within float32 rounding), 2.5x faster on a CPU (``benchmarks/inference.py``).
        """
        if self.training:
            return self.features(x)
        x = x.contiguous(memory_format=torch.channels_last)
        for conv, norm, _ in zip(*[iter(self.features)] * 3, strict=True):
            weight, bias = _fold_batch_norm(conv, norm)
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding).relu_()
        return x


def _fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to ``norm(conv(x))`` with the norm's running statistics."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    weight = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
    shift = norm.running_mean if conv.bias is None else norm.running_mean - conv.bias
    return weight, norm.bias - shift * scale


def vit_b32_cmrc(img_size: int = 224, **kwargs) -> nn.Module:
    """The authors' CMRCNet image encoder: a randomly initialised ViT-B/32 cut to 8 blocks and 8 heads.

    A timm :class:`~timm.models.vision_transformer.VisionTransformer` (patch 32, 768-d, MLP ratio 4, qkv bias,
    class token, learned position embedding, pre-norm blocks, final LayerNorm with eps 1e-6, no classifier): 50
    tokens at 224 px, the mean of which is the image feature. Initialised as the authors' code does (linear
    weights truncated normal with sd 0.01, patch convolution Kaiming normal, position embedding and class token
    truncated normal with sd 0.02). Registered as the encoder name ``"vit_b32_cmrc"``; ``kwargs`` override the
    architecture (e.g. ``depth=1`` for a small test model).
    """
    from timm.models.vision_transformer import VisionTransformer

    args = {"patch_size": 32, "embed_dim": 768, "depth": 8, "num_heads": 8, "mlp_ratio": 4.0, "qkv_bias": True}
    model = VisionTransformer(img_size=img_size, num_classes=0, global_pool="", **(args | kwargs))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    return model


_BUILTIN_ENCODERS = {"sth_tinycnn": TinyCNN, "vit_b32_cmrc": vit_b32_cmrc}


def _hub_id(weights: str | Path | None) -> str | None:
    if isinstance(weights, str) and weights.startswith(_HUB_PREFIXES):
        return weights.removeprefix("hf-hub:")
    return None


def _create_timm(name: str, img_size: int | None, hub_id: str | None, kwargs: dict) -> nn.Module:
    if not timm.is_model(name):
        raise ValueError(
            f"Unknown encoder {name!r}: use a timm model name (see `timm.list_models()`) or 'sth_tinycnn'."
        )
    # The classifier is never used (we read `forward_features`), so drop its parameters.
    kwargs = {"num_classes": 0, **kwargs}
    if hub_id is not None:
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"source": "hf-hub", "hf_hub_id": hub_id}}
    try:
        if img_size is not None:
            try:
                return timm.create_model(name, img_size=img_size, **kwargs)
            except TypeError as err:
                # CNNs accept any input size and have no `img_size` argument.
                if "img_size" not in str(err):
                    raise
        return timm.create_model(name, **kwargs)
    except OSError as err:
        if hub_id is None:
            raise
        raise OSError(
            f"Could not fetch encoder weights {hub_id!r} from the Hugging Face hub ({err}). Is this machine offline? "
            "Download the weights file elsewhere and pass its local path as `weights`."
        ) from err


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"Encoder weights file {str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip readers raise unrelated types on corrupt files
        raise ValueError(f"Could not read encoder weights file {str(path)!r}: {err}") from err
    while isinstance(state, Mapping) and any(isinstance(state.get(k), Mapping) for k in _WRAPPER_KEYS):
        state = next(state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Encoder weights file {str(path)!r} does not hold a state dict of tensors.")
    return dict(state)


def load_encoder_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local ``.safetensors`` or ``.pth``/``.pt``/``.bin`` state dict into ``model`` (non-strict).

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and ``"module."``/``"model."`` key prefixes are
    removed; classifier weights and other extra keys are skipped; a ViT position embedding of another grid size
    is resampled. Missing or skipped keys are logged.

    Parameters
    ----------
    model
        The timm (or built-in) model to fill.
    path
        The weights file.

    Raises
    ------
    ValueError
        If the file is missing or unreadable, or none of its tensors matches a parameter of ``model``.
    """
    path = Path(path)
    state = _read_state_dict(path)
    target = model.state_dict()
    matched: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        while key not in target and key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        if key not in target:
            continue
        if value.shape != target[key].shape and key.endswith("pos_embed") and value.ndim == 3:
            prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
            value = resample_abs_pos_embed(value, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
        if value.shape != target[key].shape:
            mismatched.append(key)
            continue
        matched[key] = value
    if not matched:
        raise ValueError(
            f"No tensor in encoder weights file {str(path)!r} matches a parameter of the encoder "
            f"(file keys start {list(state)[:3]}, encoder keys start {list(target)[:3]})."
        )
    model.load_state_dict(matched, strict=False)
    missing = sorted(set(target) - set(matched))
    logger.info("Loaded %d of %d encoder tensors from %s.", len(matched), len(target), path)
    if missing:
        logger.warning("Encoder tensors not in %s (left at random init): %s", path.name, missing[:10])
    if mismatched:
        logger.warning("Encoder tensors skipped for a shape mismatch: %s", mismatched[:10])


class ImageEncoder(nn.Module):
    """Image backbone returning tokens, built from a timm model name, a foundation-model name or ``"sth_tinycnn"``.

    The backbone is randomly initialised (timm's ``pretrained=False``) unless ``weights`` is given; only a hub id
    touches the network.

    Parameters
    ----------
    name
        A :func:`timm.create_model` name (e.g. ``"vit_small_patch16_224"``, ``"resnet18"``), ``"sth_tinycnn"``, or
        a name of :data:`~st_from_he.models.FOUNDATION_ENCODERS` (``"uni"``, ``"uni2-h"``, ``"virchow2"``, ...,
        any case): then the registry's architecture and timm arguments are used, a local checkpoint is loaded
        strictly (:func:`~st_from_he.models.load_pretrained`, every tensor must fit), and :meth:`pool` pools the
        tokens as the model's authors do.
    weights
        ``None`` (random initialisation), a local ``.safetensors``/``.pth``/``.pt``/``.bin`` file (see
        :func:`load_encoder_weights`; for a registry name also the folder holding the published file), or a hub id
        ``"hf-hub:org/repo"`` / ``"timm/<model>.<tag>"`` whose weights fit the architecture ``name``.
    img_size
        Input side in pixels for models with a fixed input size (ViTs); ignored by CNNs.
    **kwargs
        Passed to :func:`timm.create_model` (for a registry name: overrides of the registry's arguments, e.g.
        ``depth=1`` for a small test model; a checkpoint only fits the arguments it was trained with).

    Attributes
    ----------
    num_features
        Token dimension ``D``.
    pooling
        How :meth:`pool` makes one vector of the tokens: ``"mean"`` (plain timm names and the tiny CNN: the mean
        token), or a registry entry's ``"cls"``, ``"cls+mean"`` or ``"timm"``.
    pooled_features
        Dimension of :meth:`pool`'s output: ``2 * D`` for ``"cls+mean"``, else ``D``.
    spec
        The registry entry (:class:`~st_from_he.models.EncoderSpec`), or ``None`` for other names.

    Examples
    --------
    >>> from st_from_he.models import ImageEncoder
    >>> ImageEncoder("resnet18").pooled_features
    512
    >>> ImageEncoder("virchow2", depth=1).pooled_features  # doctest: +SKIP
    2560
    """

    def __init__(self, name: str, *, weights: str | Path | None = None, img_size: int | None = None, **kwargs):
        super().__init__()
        self.name = name
        self.spec = _registry_spec(name)
        self.pooling = "mean" if self.spec is None else self.spec.pooling
        hub_id = _hub_id(weights)
        if self.spec is not None:
            self.model = self._create_registered(self.spec, weights, hub_id, img_size, kwargs)
        elif name in _BUILTIN_ENCODERS:
            if hub_id is not None or (kwargs and name == "sth_tinycnn"):
                raise ValueError(f"The built-in encoder {name!r} takes neither hub weights nor timm arguments.")
            # the tiny CNN takes any input size; the authors' ViT is built for `img_size`
            size = {} if name == "sth_tinycnn" else {"img_size": img_size or 224}
            self.model = _BUILTIN_ENCODERS[name](**size, **kwargs)
        else:
            self.model = _create_timm(name, img_size, hub_id, kwargs)
        self.num_features: int = self.model.num_features
        self.pooled_features: int = self.num_features * (2 if self.pooling == "cls+mean" else 1)
        fmt = getattr(self.model, "output_fmt", "NCHW")
        self._channels_last = getattr(fmt, "value", fmt) == "NHWC"
        if weights is not None and hub_id is None and self.spec is None:
            load_encoder_weights(self.model, weights)

    @staticmethod
    def _create_registered(spec, weights, hub_id, img_size, kwargs) -> nn.Module:
        """The timm model of a registry entry, with its published weights loaded strictly from a local file."""
        from ._foundation import _resolve_layers, load_pretrained, weights_file

        kwargs = _resolve_layers({**spec.timm_kwargs, **kwargs})
        side = img_size or kwargs.pop("img_size", None) or spec.img_size
        kwargs.pop("img_size", None)
        model = _create_timm(spec.architecture, side, hub_id, kwargs)
        if weights is not None and hub_id is None:
            load_pretrained(model, weights_file(weights, spec), convert=spec.convert, name=spec.name)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode normalised images ``(B, 3, H, W)`` into tokens ``(B, N, D)``.

        Transformers return all their tokens (class and register tokens included); CNN feature maps are flattened
        to ``h * w`` tokens.
        """
        features = self.model.forward_features(x)
        if features.ndim == 4:
            features = features.flatten(1, 2) if self._channels_last else features.flatten(2).transpose(1, 2)
        return features

    def fingerprint(self) -> str:
        """SHA-256 of every parameter and buffer (names, shapes, dtypes and values), in state-dict order.

        Two encoders with the same fingerprint compute the same features: a saved model records it to check that
        the encoder it rebuilds (from a seed or a weights file) is the one it was fitted with.
        """
        digest = hashlib.sha256()
        for name, tensor in self.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """One vector ``(B, pooled_features)`` of tokens ``(B, N, D)``, as :attr:`pooling` says.

        ``"mean"``: the mean token. ``"cls"``: the class token. ``"cls+mean"``: the class token concatenated with
        the mean of the patch tokens (class and register tokens excluded). ``"timm"``: the pooling of timm's own head
        (``global_pool``: the class token for ``"token"``, the mean patch token for ``"avg"``; a CNN's feature-map
        mean otherwise).
        """
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        pooling = self.pooling
        if pooling == "timm":
            global_pool = getattr(self.model, "global_pool", None)  # a ViT's is a string, a CNN's a pooling layer
            pooling = {"token": "cls", "avg": "patches"}.get(global_pool if isinstance(global_pool, str) else "")
            pooling = pooling or "mean"
        if pooling == "mean":
            return tokens.mean(dim=1)
        if pooling == "patches":
            return tokens[:, prefix:].mean(dim=1)
        if pooling == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)  # "cls+mean"


def _registry_spec(name: str):
    """The :class:`~st_from_he.models.EncoderSpec` of a foundation-model name, else ``None`` (timm or built-in)."""
    from ._foundation import FOUNDATION_ENCODERS, _canonical

    if not isinstance(name, str) or name in _BUILTIN_ENCODERS or timm.is_model(name):
        return None
    return FOUNDATION_ENCODERS.get(_canonical(name))


class VectorEncoder(nn.Module):
    """The "encoder" of a model trained on cached embeddings: each vector, standardised, as one token.

    Heads trained on the embeddings of a frozen (foundation) encoder need no image encoder: a spot's embedding
    ``(D,)``, standardised with the training spots' mean and standard deviation (buffers, saved with the weights),
    is its single token. The projection heads then learn everything else.

    Parameters
    ----------
    dim
        Embedding dimension ``D``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from st_from_he.models._encoders import VectorEncoder
    >>> encoder = VectorEncoder(4)
    >>> encoder.set_statistics(np.random.default_rng(0).normal(size=(10, 4)))
    >>> encoder(torch.zeros(3, 4)).shape
    torch.Size([3, 1, 4])
    """

    pooling = "mean"

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = self.pooled_features = int(dim)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_statistics(self, features: np.ndarray) -> None:
        """Standardise with the mean and standard deviation of ``features`` ``(n, D)`` (the training spots)."""
        features = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"Expected features (n, {self.num_features}), got {tuple(features.shape)}.")
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0, unbiased=False) + 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, D)`` -> standardised single tokens ``(B, 1, D)``."""
        return ((x.float() - self.mean) / self.std)[:, None]

    @staticmethod
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        """The token ``(B, D)`` of tokens ``(B, 1, D)``."""
        return tokens.mean(dim=1)
