"""Cross-modal masked reconstruction: masked image tokens attend to gene tokens and rebuild the image embedding."""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

FUSION_STYLES = ("stacked", "cmrc")


class GeneCrossAttention(nn.Module):
    """One-way cross-attention from image tokens to gene tokens with a value path of its own (the reference's).

    ``q = ReLU-MLP_q(x)``, ``k = ReLU-MLP_k(y)`` (each ``Linear``, ReLU, dropout); ``V1 = Linear(q)``,
    ``V2 = Linear(k)``; per head ``A = softmax(q k^T / sqrt(d_head))`` and the output is ``V1 + A V2``, the heads
    concatenated (no output projection). The gene tokens are read, never updated.

    Parameters
    ----------
    dim
        Token dimension of both image and gene tokens.
    n_heads
        Attention heads; ``dim`` must be divisible by it.
    dropout
        Dropout after the ReLU of the query and key MLPs (reference 0.25).
    """

    def __init__(self, dim: int, n_heads: int = 8, dropout: float = 0.25):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by `n_heads` ({n_heads}).")
        self.n_heads = n_heads
        self.query = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.key = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.value_image = nn.Linear(dim, dim)
        self.value_gene = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, N, d_head)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Attend image tokens ``x`` ``(B, N, dim)`` to gene tokens ``y`` ``(B, T, dim)``; returns ``(B, N, dim)``."""
        q, k = self.query(x), self.key(y)
        v1, v2 = self._heads(self.value_image(q)), self._heads(self.value_gene(k))
        q, k = self._heads(q), self._heads(k)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        out = v1 + attention @ v2
        return out.transpose(1, 2).flatten(2)


class CMRCFusionBlock(nn.Module):
    """The reference's fusion block: pre-norm self-attention and MLP over image tokens, then gene cross-attention.

    ``x = x + SelfAttention(LN(x))``; ``x = x + MLP(LN(x))`` (a timm ViT block, 4x MLP, qkv bias);
    ``x = x + GeneCrossAttention(x, y)``. Gene tokens pass through unchanged.

    Parameters
    ----------
    dim
        Token dimension.
    n_heads
        Heads of the self-attention and of the cross-attention.
    dropout
        Dropout after the attention projection and inside the MLP (reference 0.1).
    cross_dropout
        Dropout of the cross-attention's query and key MLPs (reference 0.25).
    """

    def __init__(self, dim: int, n_heads: int = 8, dropout: float = 0.1, cross_dropout: float = 0.25):
        super().__init__()
        self.block = Block(dim, n_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=dropout, norm_layer=nn.LayerNorm)
        self.cross_attention = GeneCrossAttention(dim, n_heads, cross_dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Update image tokens ``x`` ``(B, N, dim)`` given gene tokens ``y`` ``(B, T, dim)``."""
        x = self.block(x)
        return x + self.cross_attention(x, y)


class MaskedCrossModalFusion(nn.Module):
    """Fuse randomly masked image tokens with gene tokens into one reconstruction ``(B, dim)``.

    The image tokens are projected to ``dim``; about ``mask_ratio`` of their entries are zeroed at random
    (element-wise) in training, and also in evaluation when ``mask_in_eval``; the masked tokens attend to the gene
    tokens (``cross_heads`` heads); fusion blocks follow; the mean fused image token is the output.

    Two styles:

    ``"stacked"``
        The cross-attention output is added to the tokens and layer-normed; ``n_blocks`` separate post-norm
        transformer encoder layers then run joint self-attention over image and gene tokens (both updated).
    ``"cmrc"`` (the authors' code)
        The cross-attention output alone is kept (no residual, no norm); ONE :class:`CMRCFusionBlock` is applied
        ``n_blocks`` times (tied weights): self-attention over image tokens, MLP, then one-way image-to-gene
        cross-attention. Gene tokens are never updated.

    Parameters
    ----------
    img_dim
        Image token dimension ``D_img``.
    dim
        Fusion dimension, equal to the gene token and embedding dimension.
    n_heads
        Attention heads of the fusion blocks.
    n_blocks
        Fusion blocks (``"stacked"``) or applications of the one tied block (``"cmrc"``).
    mask_ratio
        Probability that an entry of a projected image token is zeroed.
    dropout
        Dropout inside the fusion blocks.
    style
        ``"stacked"`` or ``"cmrc"``, see above.
    cross_heads
        Heads of the first cross-attention; ``None``: ``n_heads``.
    cross_dropout
        Attention dropout of the first cross-attention; ``None``: ``dropout``.
    block_cross_dropout
        Dropout of the query/key MLPs of the ``"cmrc"`` block's gene cross-attention.
    mask_in_eval
        Mask also in evaluation mode (the authors mask in validation too).
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
        style: str = "stacked",
        cross_heads: int | None = None,
        cross_dropout: float | None = None,
        block_cross_dropout: float = 0.25,
        mask_in_eval: bool = False,
    ):
        super().__init__()
        if style not in FUSION_STYLES:
            raise ValueError(f"Unknown fusion `style` {style!r}; use one of {list(FUSION_STYLES)}.")
        self.style, self.mask_ratio, self.mask_in_eval, self.n_blocks = style, mask_ratio, mask_in_eval, n_blocks
        cross_heads = n_heads if cross_heads is None else cross_heads
        cross_dropout = dropout if cross_dropout is None else cross_dropout
        self.image_proj = nn.Linear(img_dim, dim)
        self.cross_attention = nn.MultiheadAttention(dim, cross_heads, dropout=cross_dropout, batch_first=True)
        if style == "stacked":
            self.cross_norm = nn.LayerNorm(dim)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    dim, n_heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu", batch_first=True
                )
                for _ in range(n_blocks)
            )
        else:
            self.block = CMRCFusionBlock(dim, n_heads, dropout, block_cross_dropout)

    def random_mask(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero about ``mask_ratio`` of the entries of ``tokens`` (in training, or always if ``mask_in_eval``).

        Returns the masked tokens and the boolean mask (``True`` = zeroed), both shaped like ``tokens``; when no
        masking applies the tokens are returned unchanged with an all-``False`` mask.
        """
        if not (self.training or self.mask_in_eval) or self.mask_ratio == 0:
            return tokens, torch.zeros_like(tokens, dtype=torch.bool)
        mask = torch.rand_like(tokens) < self.mask_ratio
        return tokens.masked_fill(mask, 0.0), mask

    def forward(self, image_tokens: torch.Tensor, gene_tokens: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``(B, dim)`` from image tokens ``(B, N, D_img)`` and gene tokens ``(B, T, dim)``."""
        tokens, _ = self.random_mask(self.image_proj(image_tokens))
        attended, _ = self.cross_attention(tokens, gene_tokens, gene_tokens, need_weights=False)
        if self.style == "cmrc":
            for _ in range(self.n_blocks):  # the same block each time: tied weights, as in the authors' code
                attended = self.block(attended, gene_tokens)
            return attended.mean(dim=1)
        tokens = self.cross_norm(tokens + attended)
        n_image = tokens.shape[1]
        fused = torch.cat([tokens, gene_tokens], dim=1)
        for block in self.blocks:
            fused = block(fused)
        return fused[:, :n_image].mean(dim=1)
