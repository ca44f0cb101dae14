"""Training losses: soft-target contrastive loss, masked reconstruction loss and their log(1 + L) combination."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def soft_contrastive_loss(
    image_emb: torch.Tensor, gene_emb: torch.Tensor, tau: float = 1.0, *, reduction: str = "mean"
) -> torch.Tensor:
    """Contrastive loss with soft targets between image and expression embeddings (reference).

    ``logits = G @ I.T / tau``; ``targets = softmax_rows((I @ I.T + G @ G.T) / 2 * tau)``; the loss is the mean of
    the cross-entropy of ``logits`` against ``targets`` (expression to image) and of ``logits.T`` against
    ``targets.T`` (image to expression), per spot. Spots that look or express alike are thus not pushed apart.

    Parameters
    ----------
    image_emb
        Image embeddings ``I`` ``(B, D)``.
    gene_emb
        Expression embeddings ``G`` ``(B, D)`` of the same spots.
    tau
        Temperature.
    reduction
        ``"mean"``: the batch mean (a scalar); ``"none"``: one loss per spot ``(B,)``, e.g. for
        :func:`combine_losses` to take ``log(1 + L)`` per spot as the authors' code does.

    Returns
    -------
    Scalar loss, or ``(B,)`` losses for ``reduction="none"``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")
    logits = gene_emb @ image_emb.T / tau
    similarity = (image_emb @ image_emb.T + gene_emb @ gene_emb.T) / 2
    targets = F.softmax(similarity * tau, dim=-1)
    gene_to_image = F.cross_entropy(logits, targets, reduction=reduction)
    image_to_gene = F.cross_entropy(logits.T, targets.T, reduction=reduction)
    return (gene_to_image + image_to_gene) / 2


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, *, stop_grad: bool = True) -> torch.Tensor:
    """Mean squared error of a reconstruction ``(B, D)`` against the image embedding ``(B, D)``.

    With ``stop_grad`` (the package's choice) the gradient is stopped at ``target``: the fused tokens learn to
    rebuild the image embedding, and the image branch is shaped through the masked tokens rather than by shrinking
    its own embedding towards the prediction. The authors' code lets the gradient flow into ``target`` too
    (``stop_grad=False``).
    """
    return F.mse_loss(prediction, target.detach() if stop_grad else target)


def combine_losses(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Total loss ``sum_i w_i * mean(log(1 + L_i))`` (reference: all weights 1).

    A scalar ``L_i`` gives ``log(1 + L_i)``; a vector of per-spot losses gives the mean of ``log(1 + L)`` over
    spots (the authors' contrastive term), which is not ``log(1 + mean L)``.

    Parameters
    ----------
    losses
        Named non-negative losses, scalars or per-spot vectors.
    weights
        Optional weight per name; missing names weigh 1.
    """
    weights = weights or {}
    return sum(weights.get(name, 1.0) * torch.log1p(loss).mean() for name, loss in losses.items())
