"""Batch image augmentations run on the training device: flips, 90-degree rotations, colour, stain, zoom and blur."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density space.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_LUMA = (0.299, 0.587, 0.114)


def _uniform(shape: tuple[int, ...], low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, device=device).uniform_(low, high)


def lower_resolution(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Keep only the detail of an image scanned ``factor`` times coarser: area-downsample, then bilinear-upsample back.

    Parameters
    ----------
    images
        Float images ``(B, M, 3, H, W)`` (``M`` context scales of each sample, all treated alike).
    factor
        Per-sample factor ``(B,)``; samples with a factor at or below 1 are returned unchanged.

    Returns
    -------
    Images of the same shape, dtype and device.

    Examples
    --------
    >>> import torch
    >>> from st_from_he.models import lower_resolution
    >>> images = torch.rand(2, 1, 3, 112, 112)
    >>> lower_resolution(images, torch.tensor([1.0, 4.0])).shape  # the first image unchanged, the second blurred
    torch.Size([2, 1, 3, 112, 112])
    """
    b, m, c, h, w = images.shape
    out = images.clone()
    sizes = (h / factor.clamp_min(1)).round().clamp_min(4).long()
    for size in sizes.unique().tolist():  # one resize per distinct target size
        if size >= h:
            continue
        chosen = sizes == size
        flat = images[chosen].reshape(-1, c, h, w)
        small = F.interpolate(flat, size=(size, max(1, round(size * w / h))), mode="area")
        back = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        out[chosen] = back.reshape(-1, m, c, h, w)
    return out


class BatchAugment(nn.Module):
    """Random augmentations of a batch of normalised images ``(B, ..., 3, H, W)``.

    One random draw per sample (first axis) is shared by all its images along the middle axes, so the scales of
    a spot (and its neighbours) are transformed alike. The reference preset is flips and 90-degree rotations only.
    Colour and stain jitter undo the normalisation with ``mean``/``std``, jitter in RGB ``[0, 1]``, and
    normalise again.

    Parameters
    ----------
    flips
        Random horizontal and vertical flips.
    rot90
        Random rotation by a multiple of 90 degrees (square images only).
    color
        Brightness, contrast and saturation factors drawn from ``[1 - color, 1 + color]``; ``0`` is off.
    stain
        Haematoxylin-eosin-DAB jitter: each stain concentration ``c`` becomes ``c * (1 + a) + b`` with
        ``a, b`` drawn from ``[-stain, stain]``; ``0`` is off.
    rescale
        Zoom by a factor drawn log-uniformly from ``[1 / (1 + rescale), 1 + rescale]`` about the centre (a
        different scanner resolution), with reflected borders when zooming out; ``0`` is off.
    lowres
        Largest factor by which half of the samples are downsampled (area average) and upsampled back (bilinear),
        the factor drawn log-uniformly from ``[1, lowres]``: the patch then holds only the detail of an image scanned
        that many times coarser (a Visium "hires" image is about 4x coarser than a 1 um/px patch); ``<= 1`` is off.
    mean
        Channel mean of the normalisation.
    std
        Channel standard deviation of the normalisation.

    Examples
    --------
    >>> import torch
    >>> from st_from_he.models import BatchAugment
    >>> augment = BatchAugment(color=0.1, stain=0.05, lowres=4)
    >>> augment(torch.randn(8, 2, 3, 112, 112)).shape  # 8 spots, 2 context scales each
    torch.Size([8, 2, 3, 112, 112])
    """

    def __init__(
        self,
        *,
        flips: bool = True,
        rot90: bool = True,
        color: float = 0.0,
        stain: float = 0.0,
        rescale: float = 0.0,
        lowres: float = 0.0,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    ):
        super().__init__()
        self.flips, self.rot90, self.color, self.stain, self.rescale = flips, rot90, color, stain, rescale
        self.lowres = lowres
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        self.register_buffer("rgb_from_hed", _RGB_FROM_HED.clone(), persistent=False)
        self.register_buffer("hed_from_rgb", torch.linalg.inv(_RGB_FROM_HED), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return augmented images shaped like ``images`` ``(B, ..., 3, H, W)``."""
        shape = images.shape
        x = images.reshape(shape[0], -1, *shape[-3:])
        if self.rescale > 0:
            x = self._rescale(x)
        if self.lowres > 1:
            x = self._lower_resolution(x)
        if self.flips:
            x = self._flip(x)
        if self.rot90:
            x = self._rotate(x)
        if self.color > 0 or self.stain > 0:
            rgb = (x * self.std + self.mean).clamp(0, 1)
            if self.stain > 0:
                rgb = self._stain_jitter(rgb)
            if self.color > 0:
                rgb = self._color_jitter(rgb)
            x = (rgb - self.mean) / self.std
        return x.reshape(shape)

    def _per_sample(self, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        # One value per sample, broadcastable over (B, M, C, H, W).
        return _uniform((x.shape[0], 1, 1, 1, 1), low, high, x.device)

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        flip_x, flip_y = (torch.rand(2, x.shape[0], 1, 1, 1, 1, device=x.device) < 0.5).unbind(0)
        x = torch.where(flip_x, x.flip(-1), x)
        return torch.where(flip_y, x.flip(-2), x)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"90-degree rotations need square images, got {tuple(x.shape[-2:])}.")
        turns = torch.randint(0, 4, (x.shape[0],), device=x.device)
        out = x.clone()
        for k in (1, 2, 3):
            chosen = turns == k
            out[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
        return out

    def _rescale(self, x: torch.Tensor) -> torch.Tensor:
        b, m, c, h, w = x.shape
        bound = math.log1p(self.rescale)
        zoom = _uniform((b,), -bound, bound, x.device).exp().repeat_interleave(m)
        theta = torch.zeros(b * m, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
        flat = x.reshape(b * m, c, h, w)
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        return F.grid_sample(flat, grid, padding_mode="reflection", align_corners=False).reshape(x.shape)

    def _lower_resolution(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        factor = _uniform((b,), 0, math.log(self.lowres), x.device).exp()
        factor = torch.where(torch.rand(b, device=x.device) < 0.5, factor, torch.ones_like(factor))
        return lower_resolution(x, factor)

    def _color_jitter(self, rgb: torch.Tensor) -> torch.Tensor:
        low, high = 1 - self.color, 1 + self.color
        rgb = rgb * self._per_sample(rgb, low, high)
        luma = torch.tensor(_LUMA, device=rgb.device).view(3, 1, 1)
        gray = (rgb * luma).sum(dim=-3, keepdim=True)
        rgb = gray + (rgb - gray) * self._per_sample(rgb, low, high)  # saturation
        mean_gray = gray.mean(dim=(-2, -1), keepdim=True)
        rgb = mean_gray + (rgb - mean_gray) * self._per_sample(rgb, low, high)  # contrast
        return rgb.clamp(0, 1)

    def _stain_jitter(self, rgb: torch.Tensor) -> torch.Tensor:
        optical_density = -torch.log(rgb.clamp_min(1e-6)).movedim(-3, -1)
        stains = optical_density @ self.hed_from_rgb
        shape = (rgb.shape[0], 1, 1, 1, 3)
        scale = 1 + _uniform(shape, -self.stain, self.stain, rgb.device)
        shift = _uniform(shape, -self.stain, self.stain, rgb.device)
        optical_density = (stains * scale + shift) @ self.rgb_from_hed
        return torch.exp(-optical_density).movedim(-1, -3).clamp(0, 1)
