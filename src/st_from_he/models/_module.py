"""The Lightning module that trains image and expression encoders together."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F

from ._augment import BatchAugment
from ._config import ModelConfig
from ._context import MultiScaleFusion, NeighbourAttention
from ._encoders import ImageEncoder, VectorEncoder
from ._fusion import MaskedCrossModalFusion
from ._heads import GeneEncoder, ProjectionHead, RegressionHead, SNNGeneTokens
from ._losses import combine_losses, reconstruction_loss, soft_contrastive_loss

Batch = Mapping[str, torch.Tensor]


class ExpressionModule(L.LightningModule):
    """Image-to-expression model: contrastive image/expression encoders, masked reconstruction, optional heads.

    Batches are dicts of tensors:

    ``"image"``
        Normalised spot patches ``(B, S, 3, H, W)``, one per context scale of ``config.context_scales`` (scale
        0 = the spot patch); ``(B, 3, H, W)`` is read as ``S = 1``. With ``config.features`` (heads on cached
        embeddings), the spots' embedding vectors ``(B, feature_dim)`` instead, never augmented.
    ``"expression"``
        Targets ``(B, G)``, log1p(CP10k) expression of the model genes (training and validation only).
    ``"neighbours"`` (required for training when ``config.neighbour_attention``)
        Neighbour patches ``(B, K, S, 3, H, W)``, normalised like ``"image"``, padded to a common ``K``. They are
        encoded without gradient (only the unpadded slots): the attention and the projection learn from them, the
        encoder from each spot's own patch, which keeps a training step affordable (``K`` times more images).
    ``"neighbour_features"`` (optional alternative to ``"neighbours"``)
        Precomputed neighbour features ``(B, K, D_img)`` from :meth:`encode_features`, e.g. for inference on a
        whole slide where every spot is encoded once.
    ``"neighbour_mask"`` (optional)
        ``(B, K)`` boolean, ``True`` where a neighbour slot is padding.

    Image features are the encoder's mean token per scale, fused over scales and projected to ``proj_dim``; the
    neighbour attention then mixes in the projected neighbour features. A batch without neighbours gives the
    embedding without context (as if every neighbour slot were padding); training such a module refuses it. The
    reconstruction target is the spot's own projected embedding (before neighbour attention), gradient stopped
    unless ``config.recon_stop_grad`` is ``False`` (see :func:`~st_from_he.models.reconstruction_loss`).

    Parameters
    ----------
    config
        Hyperparameters (or their :meth:`ModelConfig.to_dict`). ``config.encoder_weights`` is loaded at
        construction; set it to ``None`` when restoring a saved state dict on a machine without that file.
    n_genes
        Number of model genes ``G``.
    """

    def __init__(self, config: ModelConfig | Mapping, n_genes: int):
        super().__init__()
        if isinstance(config, Mapping):
            config = ModelConfig.from_dict(dict(config))
        self.config, self.n_genes = config, n_genes
        self.save_hyperparameters({"config": config.to_dict(), "n_genes": n_genes})
        c = config
        if c.features is not None:  # heads on cached embeddings: each spot's vector is its one token
            self.encoder = VectorEncoder(c.feature_dim)
        else:
            self.encoder = ImageEncoder(c.encoder, weights=c.encoder_weights, img_size=c.img_size, **c.encoder_kwargs)
        # the heads see the pooled vector (twice the token width for "cls+mean"), the fusion sees the tokens
        img_dim, token_dim = self.encoder.pooled_features, self.encoder.num_features
        self.scale_fusion = MultiScaleFusion(img_dim, len(c.context_scales))
        self.image_head = ProjectionHead(img_dim, c.proj_dim, c.proj_dropout)
        self.gene_encoder = GeneEncoder(n_genes, c.proj_dim, c.proj_dropout) if c.contrastive else None
        self.gene_tokens = self.fusion = None
        if c.use_reconstruction:
            self.gene_tokens = SNNGeneTokens(n_genes, c.n_gene_tokens, c.proj_dim, c.snn_dropout)
            self.fusion = MaskedCrossModalFusion(
                token_dim,
                c.proj_dim,
                n_heads=c.n_heads,
                n_blocks=c.n_fusion_blocks,
                mask_ratio=c.mask_ratio,
                dropout=c.fusion_dropout,
                style=c.fusion,
                cross_heads=c.cross_heads,
                cross_dropout=c.cross_dropout,
                block_cross_dropout=c.block_cross_dropout,
                mask_in_eval=c.mask_in_validation,
            )
        self.neighbour_attention = (
            NeighbourAttention(c.proj_dim, c.n_heads, c.fusion_dropout) if c.neighbour_attention else None
        )
        self.regression = (
            RegressionHead(c.proj_dim, n_genes, c.regression_hidden, c.proj_dropout) if c.regression_head else None
        )
        self.augment = BatchAugment(
            flips=c.augment_flips,
            rot90=c.augment_rot90,
            color=c.augment_color,
            stain=c.augment_stain,
            rescale=c.augment_rescale,
            lowres=c.augment_lowres,
            mean=c.image_mean,
            std=c.image_std,
        )

    # -- embeddings ------------------------------------------------------------------------------------------------

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # -> scale-fused features (B, D_img) and the tokens of all scales (B, S * N, D_img)
        if images.ndim == (2 if self.config.features is not None else 4):  # one scale: give it its axis
            images = images[:, None]
        b, s = images.shape[:2]
        tokens = self.encoder(images.flatten(0, 1))
        features = self.scale_fusion(self.encoder.pool(tokens).view(b, s, -1))
        return features, tokens.reshape(b, -1, tokens.shape[-1])

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Scale-fused encoder features ``(B, D_img)`` of images ``(B, S, 3, H, W)`` (before projection)."""
        return self._encode(images)[0]

    def _neighbour_features(self, batch: Batch) -> torch.Tensor | None:
        if "neighbour_features" in batch:
            return batch["neighbour_features"]
        if "neighbours" not in batch:
            return None
        neighbours = batch["neighbours"]
        b, k = neighbours.shape[:2]
        flat = neighbours.flatten(0, 1)
        mask = batch.get("neighbour_mask")
        valid = torch.ones(b * k, dtype=torch.bool, device=flat.device) if mask is None else ~mask.flatten()
        out = flat.new_zeros(b * k, self.encoder.pooled_features, dtype=torch.float32)
        if valid.any():  # padded slots are never encoded (nor seen by batch norm)
            with torch.no_grad():
                features = self.encode_features(flat[valid])
            out = out.to(features.dtype)
            out[valid] = features
        return out.view(b, k, -1)

    def _project(
        self, features: torch.Tensor, neighbours: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # -> final embedding, the spot's own embedding before neighbour attention
        spot_emb = self.image_head(features)
        if self.neighbour_attention is None or neighbours is None:
            return spot_emb, spot_emb
        return self.neighbour_attention(spot_emb, self.image_head(neighbours), mask), spot_emb

    def embed_features(
        self,
        features: torch.Tensor,
        neighbour_features: torch.Tensor | None = None,
        neighbour_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image embeddings ``(B, proj_dim)`` from encoder features ``(B, D_img)`` of :meth:`encode_features`.

        With neighbour attention, ``neighbour_features`` ``(B, K, D_img)`` and ``neighbour_mask`` ``(B, K)``
        (``True`` where a slot is padding) give each spot's neighbours, so a whole slide is encoded once and every
        spot then attends over its neighbours' features. Equals :meth:`embed_images` of the same images.
        """
        return self._project(features, neighbour_features, neighbour_mask)[0]

    def _embed(self, batch: Batch | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # -> final image embedding, image tokens, the spot's own embedding before neighbour attention
        if isinstance(batch, torch.Tensor):
            batch = {"image": batch}
        features, tokens = self._encode(batch["image"])
        neighbours = self._neighbour_features(batch) if self.neighbour_attention is not None else None
        emb, spot_emb = self._project(features, neighbours, batch.get("neighbour_mask"))
        return emb, tokens, spot_emb

    def embed_images(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, proj_dim)`` used for retrieval, from a batch dict or images ``(B, S, 3, H, W)``."""
        return self._embed(batch)[0]

    def embed_expression(self, expression: torch.Tensor) -> torch.Tensor:
        """Expression embeddings ``(B, proj_dim)`` of expression ``(B, G)`` (the retrieval bank)."""
        if self.gene_encoder is None:
            raise RuntimeError("This model was trained without the contrastive objective and has no gene encoder.")
        return self.gene_encoder(expression)

    def predict_regression(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """Expression ``(B, G)`` predicted by the regression head."""
        if self.regression is None:
            raise RuntimeError("This model has no regression head (`ModelConfig.regression_head=False`).")
        return self.regression(self.embed_images(batch))

    def forward(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, proj_dim)``; same as :meth:`embed_images`."""
        return self.embed_images(batch)

    # -- training --------------------------------------------------------------------------------------------------

    def compute_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Scalar losses of a batch.

        Returns ``"contrastive"``, ``"reconstruction"`` and ``"regression"`` as configured, and their combination
        ``"loss"`` (``sum w * log(1 + L)``; with ``contrastive_log="per_sample"`` the contrastive term is the mean
        over spots of ``log(1 + L)``, and ``"contrastive"`` reports the mean ``L``).
        """
        c = self.config
        if self.neighbour_attention is not None and not {"neighbours", "neighbour_features"} & set(batch):
            raise ValueError(
                "This module has neighbour attention (`neighbour_attention=True`) but the batch carries no "
                "'neighbours' or 'neighbour_features': train it with `sth.tl.ExpressionModel.fit`, which adds them."
            )
        emb, tokens, spot_emb = self._embed(batch)
        expression = batch["expression"]
        losses: dict[str, torch.Tensor] = {}
        if self.gene_encoder is not None:
            reduction = "none" if c.contrastive_log == "per_sample" else "mean"
            losses["contrastive"] = soft_contrastive_loss(
                emb, self.gene_encoder(expression), c.tau, reduction=reduction
            )
        if self.fusion is not None:
            reconstruction = self.fusion(tokens, self.gene_tokens(expression))
            losses["reconstruction"] = reconstruction_loss(reconstruction, spot_emb, stop_grad=c.recon_stop_grad)
        if self.regression is not None:
            losses["regression"] = F.mse_loss(self.regression(emb), expression)
        total = combine_losses(losses, {"regression": c.regression_weight})
        losses = {name: value.mean() for name, value in losses.items()}  # per-spot terms reported as their mean
        losses["loss"] = total
        return losses

    def _log_losses(self, losses: dict[str, torch.Tensor], prefix: str, batch_size: int) -> None:
        for name, value in losses.items():
            # sync_dist: under DDP the epoch's value is the mean over every process's spots (a no-op on one device)
            self.log(
                f"{prefix}_{name}",
                value,
                on_step=False,
                on_epoch=True,
                prog_bar=name == "loss",
                batch_size=batch_size,
                sync_dist=True,
            )

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Augment the images, compute the losses and log them as ``train_*`` per epoch."""
        batch = dict(batch)
        with torch.no_grad():
            for key in ("image", "neighbours") if self.config.features is None else ():  # vectors: no image to augment
                if key in batch and batch[key].shape[1] > 0:
                    batch[key] = self.augment(batch[key])
        losses = self.compute_losses(batch)
        self._log_losses(losses, "train", batch["expression"].shape[0])
        return losses["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Compute the losses in eval mode (no dropout; masking only with ``mask_in_validation``), log ``val_*``."""
        losses = self.compute_losses(batch)
        self._log_losses(losses, "val", batch["expression"].shape[0])
        return losses["loss"]

    def configure_optimizers(self):
        """AdamW with linear warm-up then cosine decay to zero over the trainer's estimated steps.

        With ``lr_schedule="epoch_cosine"`` (the authors'): cosine annealing per epoch, epoch ``e`` (from 0) at
        ``eta_min + (lr - eta_min) * (1 + cos(pi * (e + 1) / t_max)) / 2``, as their ``CosineAnnealingLR`` stepped
        once before each epoch.
        """
        c = self.config
        optimizer = torch.optim.AdamW(self.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        if c.lr_schedule == "epoch_cosine":
            t_max = c.t_max or c.max_epochs

            def epoch_factor(epoch: int) -> float:
                return (c.eta_min + (c.lr - c.eta_min) * 0.5 * (1 + math.cos(math.pi * (epoch + 1) / t_max))) / c.lr

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, epoch_factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total = self.trainer.estimated_stepping_batches

        def lr_factor(step: int) -> float:
            if step < c.warmup_steps:
                return (step + 1) / c.warmup_steps
            if not math.isfinite(total):  # unbounded run: no schedule to follow
                return 1.0
            progress = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
