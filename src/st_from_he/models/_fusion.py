"""Cross-modal masked reconstruction: masked image tokens attend to gene tokens and rebuild the image embedding."""

from __future__ import annotations

import torch
from torch import nn


class MaskedCrossModalFusion(nn.Module):
    """Fuse randomly masked image tokens with gene tokens into one reconstruction ``(B, dim)``.

    The image tokens are projected to ``dim``; in training about ``mask_ratio`` of their entries are zeroed at
    random (element-wise); the masked tokens attend to the gene tokens (cross-attention, residual, LayerNorm);
    ``n_blocks`` transformer blocks then run joint self-attention over image and gene tokens (co-attention in
    both directions); the mean fused image token is the output. In eval mode nothing is masked.

    Parameters
    ----------
    img_dim
        Image token dimension ``D_img``.
    dim
        Fusion dimension, equal to the gene token and embedding dimension.
    n_heads
        Attention heads.
    n_blocks
        Transformer fusion blocks after the cross-attention.
    mask_ratio
        Probability that an entry of a projected image token is zeroed in training.
    dropout
        Dropout inside the attention blocks.
    """

    def __init__(
        self,
        img_dim: int,
        dim: int = 256,
        *,
        n_heads: int = 8,
        n_blocks: int = 2,
        mask_ratio: float = 0.5,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.mask_ratio = mask_ratio
        self.image_proj = nn.Linear(img_dim, dim)
        self.cross_attention = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, n_heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu", batch_first=True
            )
            for _ in range(n_blocks)
        )

    def random_mask(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero about ``mask_ratio`` of the entries of ``tokens`` in training.

        Returns the masked tokens and the boolean mask (``True`` = zeroed), both shaped like ``tokens``; in eval
        mode the tokens are returned unchanged with an all-``False`` mask.
        """
        if not self.training or self.mask_ratio == 0:
            return tokens, torch.zeros_like(tokens, dtype=torch.bool)
        mask = torch.rand_like(tokens) < self.mask_ratio
        return tokens.masked_fill(mask, 0.0), mask

    def forward(self, image_tokens: torch.Tensor, gene_tokens: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``(B, dim)`` from image tokens ``(B, N, D_img)`` and gene tokens ``(B, T, dim)``."""
        tokens, _ = self.random_mask(self.image_proj(image_tokens))
        attended, _ = self.cross_attention(tokens, gene_tokens, gene_tokens, need_weights=False)
        tokens = self.cross_norm(tokens + attended)
        n_image = tokens.shape[1]
        fused = torch.cat([tokens, gene_tokens], dim=1)
        for block in self.blocks:
            fused = block(fused)
        return fused[:, :n_image].mean(dim=1)
