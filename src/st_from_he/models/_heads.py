"""Projection heads, the expression encoders and the regression head."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """Reference projection head: ``p = Linear(x)``; ``out = LayerNorm(p + Dropout(Linear(GELU(p))))``.

    Parameters
    ----------
    in_dim
        Input dimension.
    out_dim
        Output (embedding) dimension.
    dropout
        Dropout rate on the residual branch.
    """

    def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``(B, in_dim)`` (or ``(B, N, in_dim)``) to ``(B, out_dim)`` (or ``(B, N, out_dim)``)."""
        projected = self.projection(x)
        return self.layer_norm(projected + self.dropout(self.fc(self.gelu(projected))))


class GeneEncoder(ProjectionHead):
    """Expression encoder: a :class:`ProjectionHead` over a spot's expression vector.

    Parameters
    ----------
    n_genes
        Number of genes ``G``; input ``(B, G)``, output ``(B, out_dim)``.
    out_dim
        Embedding dimension.
    dropout
        Dropout rate on the residual branch.
    """

    def __init__(self, n_genes: int, out_dim: int = 256, dropout: float = 0.1):
        super().__init__(n_genes, out_dim, dropout)


class SNNGeneTokens(nn.Module):
    """Self-normalising network turning expression ``(B, G)`` into gene tokens ``(B, n_tokens, dim)``.

    ``Linear(G, n_tokens * dim)``, ELU, AlphaDropout, then a reshape, as in the reference.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_tokens
        Number of gene tokens.
    dim
        Token dimension.
    dropout
        Alpha-dropout rate.
    """

    def __init__(self, n_genes: int, n_tokens: int = 8, dim: int = 256, dropout: float = 0.25):
        super().__init__()
        self.n_tokens, self.dim = n_tokens, dim
        self.net = nn.Sequential(nn.Linear(n_genes, n_tokens * dim), nn.ELU(), nn.AlphaDropout(dropout))

    def forward(self, expression: torch.Tensor) -> torch.Tensor:
        """Map expression ``(B, G)`` to tokens ``(B, n_tokens, dim)``."""
        return self.net(expression).view(-1, self.n_tokens, self.dim)


class RegressionHead(nn.Module):
    """Direct expression regression from an embedding: linear, or a one-hidden-layer MLP.

    Parameters
    ----------
    in_dim
        Embedding dimension; input ``(B, in_dim)``.
    n_genes
        Number of genes ``G``; output ``(B, G)``.
    hidden
        Hidden width of the MLP; ``None`` makes the head linear.
    dropout
        Dropout after the hidden layer.
    """

    def __init__(self, in_dim: int, n_genes: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        if hidden is None:
            self.net = nn.Linear(in_dim, n_genes)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_genes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict expression ``(B, G)`` from embeddings ``(B, in_dim)``."""
        return self.net(x)
