"""Masked image modelling: self-supervised pretraining of an image encoder on unlabeled H&E tiles."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._encoders import ImageEncoder

# Floor of a mask patch's pixel variance (normalised units, about 0.2 per grey level step of 12) before
# standardising the target: a near-uniform patch (glass, fat) would otherwise ask the decoder to reproduce noise.
_TARGET_EPS = 0.01


def random_patch_mask(
    batch_size: int,
    grid: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Hide the same number of randomly chosen cells of a ``grid x grid`` layout in every image.

    Parameters
    ----------
    batch_size
        Number of images ``B``.
    grid
        Mask patches along each side.
    mask_ratio
        Fraction of cells hidden, in ``(0, 1)``; rounded to a whole number of cells, at least one hidden and one
        visible.
    generator
        Random generator (on the CPU); ``None`` uses torch's global one.
    device
        Device of the returned mask.

    Returns
    -------
    Boolean mask ``(B, grid, grid)``, ``True`` where hidden.

    Examples
    --------
    >>> from st_from_he.models import random_patch_mask
    >>> mask = random_patch_mask(2, 4, 0.5)
    >>> mask.shape, mask.sum(dim=(1, 2)).tolist()
    (torch.Size([2, 4, 4]), [8, 8])
    """
    if not 0 < mask_ratio < 1:
        raise ValueError(f"`mask_ratio` must lie strictly between 0 and 1, got {mask_ratio}.")
    cells = grid * grid
    if cells < 2:
        raise ValueError(f"A {grid} x {grid} mask grid cannot hide some cells and show others; use smaller patches.")
    n_hidden = min(max(round(mask_ratio * cells), 1), cells - 1)
    order = torch.rand(batch_size, cells, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch_size, cells, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_hidden], True)
    return mask.view(batch_size, grid, grid).to(device)


def _default_mask_patch(img_size: int, stride: int, token_px: int) -> int:
    """The largest divisor of ``img_size`` no larger than ``stride`` that covers whole tokens (else one token)."""
    fits = [d for d in range(token_px, stride + 1, token_px) if img_size % d == 0]
    return max(fits, default=token_px)


class MaskedImageModel(nn.Module):
    """Masked image modelling around an image encoder: hide square patches of each image, reconstruct their pixels.

    Two ways of hiding a patch, after SimMIM (Xie et al., 2022) and, for CNNs, the input masking of SparK (Tian et al.,
    2023) without its sparse convolutions:

    ``"token"``
        For transformers (any timm model with a ``patch_embed``): the tokens of hidden patches are replaced by one
        learned mask token right after the patch embedding, so no hidden pixel reaches the transformer.
    ``"pixel"``
        For CNNs (and anything else whose features form a spatial map): hidden pixels are set to 0 in normalised
        space, i.e. to the normalisation's mean colour, before the encoder.

    Either way a light decoder (a 1x1 convolution from the last feature map to ``stride**2 * 3`` values,
    pixel-shuffled back to the input size, as in SimMIM) predicts every pixel. The target is each mask patch's pixels
    standardised within the patch, the three channels together (MAE's normalised pixels: brightness and contrast are
    no target; the balance of haematoxylin and eosin, and the structure, are). The L1 or L2 error is averaged over
    hidden patches only.

    A yardstick comes with the loss: ``flat_loss``, the error of filling every hidden patch with the batch's average
    standardised colour, what a model that knows only that H&E is pink and purple achieves. A decoder reaches it in a
    few steps; the encoder has learnt something from the visible context only where ``loss`` falls below it.

    Only :attr:`encoder` is meant to be kept after training; the mask token and the decoder are discarded.

    Parameters
    ----------
    encoder
        The encoder to train; its timm (or built-in) model is :attr:`ImageEncoder.model`.
    img_size
        Side of the square input images in pixels.
    mask_patch_px
        Side of a hidden patch in pixels; must divide ``img_size``, and for ``"token"`` masking be a multiple of the
        encoder's patch size. Default: the largest such size no larger than the stride of the encoder's last
        feature map (a ViT's patch size; 16 px for ``"sth_tinycnn"``).
    mask_ratio
        Fraction of patches hidden in each image, in ``(0, 1)``.
    method
        ``"token"``, ``"pixel"``, or ``"auto"``: ``"token"`` when the encoder has a ``patch_embed``, else
        ``"pixel"``.
    loss
        ``"l1"`` (SimMIM) or ``"l2"`` (MAE) distance between predicted and target pixels.

    Attributes
    ----------
    grid
        Mask patches along each side (``img_size // mask_patch_px``).
    stride
        Input pixels per feature-map cell along each side (the decoder's upsampling factor).

    Examples
    --------
    >>> import torch
    >>> from st_from_he.models import ImageEncoder, MaskedImageModel
    >>> mim = MaskedImageModel(ImageEncoder("sth_tinycnn"), img_size=64)
    >>> mim.method, mim.grid, mim.stride
    ('pixel', 4, 16)
    >>> out = mim(torch.randn(2, 3, 64, 64))
    >>> sorted(out), out["loss"].ndim
    (['flat_loss', 'loss', 'mask', 'prediction'], 0)
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        *,
        img_size: int,
        mask_patch_px: int | None = None,
        mask_ratio: float = 0.6,
        method: Literal["auto", "token", "pixel"] = "auto",
        loss: Literal["l1", "l2"] = "l1",
    ):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"`mask_ratio` must lie strictly between 0 and 1, got {mask_ratio}.")
        if loss not in ("l1", "l2"):
            raise ValueError(f"Unknown `loss` {loss!r}; use 'l1' or 'l2'.")
        if method not in ("auto", "token", "pixel"):
            raise ValueError(f"Unknown `method` {method!r}; use 'auto', 'token' or 'pixel'.")
        self.encoder, self.img_size, self.mask_ratio, self.loss = encoder, int(img_size), float(mask_ratio), loss
        patch_embed = getattr(encoder.model, "patch_embed", None)
        if method == "auto":
            method = "token" if patch_embed is not None else "pixel"
        if method == "token" and patch_embed is None:
            raise ValueError(
                f"Encoder {encoder.name!r} has no `patch_embed` to put mask tokens into; use method='pixel'."
            )
        self.method = method

        dim, fmap_side = self._probe_features()
        self.stride = math.ceil(self.img_size / fmap_side)
        token_px = self._token_px() if method == "token" else 1
        if mask_patch_px is None:
            mask_patch_px = _default_mask_patch(self.img_size, self.stride, token_px)
        mask_patch_px = int(mask_patch_px)
        if mask_patch_px < 1 or self.img_size % mask_patch_px:
            raise ValueError(
                f"`mask_patch_px` ({mask_patch_px}) must be a positive divisor of the tile side ({self.img_size} px)."
            )
        if mask_patch_px % token_px:
            raise ValueError(
                f"`mask_patch_px` ({mask_patch_px}) must be a multiple of the encoder's patch size ({token_px} px) "
                "to mask whole tokens."
            )
        self.mask_patch_px, self.grid = mask_patch_px, self.img_size // mask_patch_px
        if self.grid < 2:
            raise ValueError(
                f"Mask patches of {mask_patch_px} px leave a {self.grid} x {self.grid} grid on {self.img_size} px "
                "tiles; use smaller mask patches or larger tiles."
            )
        self._token_mask: torch.Tensor | None = None
        self.mask_token = None
        if method == "token":
            embed_dim = self._token_dim()
            self.mask_token = nn.Parameter(torch.zeros(embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            # the hook lives on the encoder's module but does nothing unless a forward pass of this model set a mask
            self._hook = patch_embed.register_forward_hook(self._mask_tokens)
        self.decoder = nn.Sequential(nn.Conv2d(dim, 3 * self.stride**2, kernel_size=1), nn.PixelShuffle(self.stride))

    # -- geometry ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _probe_features(self) -> tuple[int, int]:
        """Channels and side of the encoder's feature map for one image of ``img_size`` (a dry run)."""
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            fmap = self.feature_map(torch.zeros(1, 3, self.img_size, self.img_size))
        finally:
            self.encoder.train(was_training)
        if fmap.shape[-1] != fmap.shape[-2]:
            raise ValueError(f"Encoder {self.encoder.name!r} gives a non-square feature map {tuple(fmap.shape[-2:])}.")
        return fmap.shape[1], fmap.shape[-1]

    def _token_px(self) -> int:
        size = self.encoder.model.patch_embed.patch_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size[0] != size[1]:
            raise ValueError(f"Encoder {self.encoder.name!r} has non-square patches {size}.")
        return int(size[0])

    @torch.no_grad()
    def _token_dim(self) -> int:
        out = self.encoder.model.patch_embed(torch.zeros(1, 3, self.img_size, self.img_size))
        return out.shape[-1]

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's last features as a map ``(B, D, h, w)`` (tokens of a transformer laid out on their grid)."""
        features = self.encoder.model.forward_features(images)
        if features.ndim == 4:
            return features.permute(0, 3, 1, 2) if self.encoder._channels_last else features
        if features.ndim != 3:
            raise ValueError(f"Encoder {self.encoder.name!r} returns features of shape {tuple(features.shape)}.")
        model = self.encoder.model
        tokens = features[:, getattr(model, "num_prefix_tokens", 0) :]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(
                f"Cannot lay the {tokens.shape[1]} patch tokens of encoder {self.encoder.name!r} out on a square grid."
            )
        return tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)

    # -- masking -----------------------------------------------------------------------------------------------------

    def random_mask(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random mask ``(B, grid, grid)`` for this model (see :func:`random_patch_mask`)."""
        device = next(self.parameters()).device
        return random_patch_mask(batch_size, self.grid, self.mask_ratio, generator=generator, device=device)

    def _mask_tokens(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        mask = self._token_mask
        if mask is None:
            return None
        # mask cells cover whole tokens: expand the (B, g, g) mask to the token grid
        side = output.shape[1] if output.ndim == 4 else math.isqrt(output.shape[1])
        tokens = mask.repeat_interleave(side // self.grid, 1).repeat_interleave(side // self.grid, 2)
        tokens = tokens[..., None] if output.ndim == 4 else tokens.flatten(1)[..., None]
        return torch.where(tokens, self.mask_token.to(output.dtype), output)

    def _pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        m = self.mask_patch_px
        return mask.repeat_interleave(m, 1).repeat_interleave(m, 2)[:, None]

    # -- forward -----------------------------------------------------------------------------------------------------

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, g * g, C, m * m)``: the pixels of each channel of each mask patch."""
        b, c = images.shape[:2]
        g, m = self.grid, self.mask_patch_px
        return images.reshape(b, c, g, m, g, m).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c, m * m)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Hide patches of normalised images ``(B, 3, H, W)`` and reconstruct them.

        Parameters
        ----------
        images
            Normalised images of side ``img_size``.
        mask
            ``(B, grid, grid)`` boolean, ``True`` where hidden; default: :meth:`random_mask`.

        Returns
        -------
        A dict: ``"loss"``, the mean reconstruction error over hidden patches; ``"flat_loss"``, the same error of
        filling every hidden patch with the batch's average standardised colour (the yardstick of the module notes);
        ``"prediction"``, the decoded pixels ``(B, 3, H, W)`` (in the standardised units of
        each patch); ``"mask"``, the mask used.
        """
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"Expected images of {self.img_size} x {self.img_size} px, got {tuple(images.shape[-2:])}."
            )
        if mask is None:
            mask = self.random_mask(len(images))
        mask = mask.to(images.device)
        if self.method == "token":
            self._token_mask = mask
            try:
                fmap = self.feature_map(images)
            finally:
                self._token_mask = None
        else:
            fmap = self.feature_map(images.masked_fill(self._pixel_mask(mask), 0.0))
        prediction = self.decoder(fmap)[..., : self.img_size, : self.img_size]
        if prediction.shape[-1] < self.img_size:  # a feature map coarser than the stride suggests (odd padding)
            prediction = F.interpolate(prediction, size=images.shape[-2:], mode="bilinear", align_corners=False)
        target = self._patches(images.float())
        mean, var = target.mean((-2, -1), keepdim=True), target.var((-2, -1), keepdim=True)
        target = (target - mean) / (var + _TARGET_EPS).sqrt()
        predicted = self._patches(prediction.float())
        hidden = mask.flatten(1).float()
        n_hidden = hidden.sum()

        def hidden_mean(values: torch.Tensor) -> torch.Tensor:  # mean over the hidden patches' pixels
            return (values.mean((-2, -1)) * hidden).sum() / n_hidden

        # the yardstick: every hidden pixel given the batch's average standardised colour (one value per channel)
        flat = (target.mean(-1, keepdim=True) * hidden[..., None, None]).sum((0, 1), keepdim=True) / n_hidden
        distance = (lambda d: d.abs()) if self.loss == "l1" else (lambda d: d**2)
        return {
            "loss": hidden_mean(distance(predicted - target)),
            "flat_loss": hidden_mean(distance(flat.detach() - target)),
            "prediction": prediction,
            "mask": mask,
        }
