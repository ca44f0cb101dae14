"""Training losses: soft-target contrastive loss, masked reconstruction loss and their log(1 + L) combination."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def soft_contrastive_loss(image_emb: torch.Tensor, gene_emb: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Contrastive loss with soft targets between image and expression embeddings (reference).

    ``logits = G @ I.T / tau``; ``targets = softmax_rows((I @ I.T + G @ G.T) / 2 * tau)``; the loss is the mean of
    the cross-entropy of ``logits`` against ``targets`` (expression to image) and of ``logits.T`` against
    ``targets.T`` (image to expression). Spots that look or express alike are thus not pushed apart.

    Parameters
    ----------
    image_emb
        Image embeddings ``I`` ``(B, D)``.
    gene_emb
        Expression embeddings ``G`` ``(B, D)`` of the same spots.
    tau
        Temperature.

    Returns
    -------
    Scalar loss.
    """
    logits = gene_emb @ image_emb.T / tau
    similarity = (image_emb @ image_emb.T + gene_emb @ gene_emb.T) / 2
    targets = F.softmax(similarity * tau, dim=-1)
    gene_to_image = F.cross_entropy(logits, targets)
    image_to_gene = F.cross_entropy(logits.T, targets.T)
    return (gene_to_image + image_to_gene) / 2


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a reconstruction ``(B, D)`` against the image embedding ``(B, D)``.

    The gradient is stopped at ``target``: the fused tokens learn to rebuild the image embedding, and the image
    branch is shaped through the masked tokens rather than by shrinking its own embedding towards the prediction.
    """
    return F.mse_loss(prediction, target.detach())


def combine_losses(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Total loss ``sum_i w_i * log(1 + L_i)`` (reference: all weights 1).

    Parameters
    ----------
    losses
        Named non-negative scalar losses.
    weights
        Optional weight per name; missing names weigh 1.
    """
    weights = weights or {}
    return sum(weights.get(name, 1.0) * torch.log1p(loss) for name, loss in losses.items())
