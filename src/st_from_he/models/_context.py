"""Spatial context: fusion of multi-scale patch features and attention over neighbouring spots."""

from __future__ import annotations

import torch
from torch import nn


class MultiScaleFusion(nn.Module):
    """Fuse per-scale features ``(B, S, D)`` into one feature ``(B, D)``.

    The spot scale (index 0) passes through a residual connection and the concatenated scales are mixed in by a
    linear layer that starts at zero, so training starts from the single-scale model. With ``n_scales == 1`` the
    module has no parameters and returns the spot scale unchanged.

    Parameters
    ----------
    dim
        Feature dimension ``D``.
    n_scales
        Number of scales ``S``.
    """

    def __init__(self, dim: int, n_scales: int = 1):
        super().__init__()
        self.n_scales = n_scales
        if n_scales > 1:
            self.norm = nn.LayerNorm(n_scales * dim)
            self.mix = nn.Linear(n_scales * dim, dim)
            nn.init.zeros_(self.mix.weight)
            nn.init.zeros_(self.mix.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Fuse ``(B, S, D)`` into ``(B, D)``."""
        if features.shape[1] != self.n_scales:
            raise ValueError(f"Expected {self.n_scales} scales, got {features.shape[1]}.")
        if self.n_scales == 1:
            return features[:, 0]
        return features[:, 0] + self.mix(self.norm(features.flatten(1)))


class NeighbourAttention(nn.Module):
    """Let each spot's embedding attend over its own and its neighbours' embeddings.

    ``out = LayerNorm(x + MultiheadAttention(x, [x; neighbours]))``. The spot itself is always a key, so a spot
    whose neighbours are all padding stays well defined. With no neighbours (``K == 0``) the input is returned
    unchanged.

    Parameters
    ----------
    dim
        Embedding dimension ``D``.
    n_heads
        Attention heads.
    dropout
        Attention dropout.
    """

    def __init__(self, dim: int, n_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, neighbours: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Update spot embeddings ``(B, D)`` from neighbour embeddings ``(B, K, D)``.

        ``padding_mask`` ``(B, K)`` is ``True`` where a neighbour slot is padding.
        """
        if neighbours.shape[1] == 0:
            return x
        query = x[:, None]
        keys = torch.cat([query, neighbours], dim=1)
        mask = None
        if padding_mask is not None:
            mask = torch.cat([padding_mask.new_zeros(x.shape[0], 1), padding_mask], dim=1)
        attended, _ = self.attention(query, keys, keys, key_padding_mask=mask, need_weights=False)
        return self.norm(x + attended[:, 0])
