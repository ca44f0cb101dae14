"""Torch modules of the expression model: encoders, heads, fusion, spatial context, losses and the Lightning module.

This subpackage knows tensors only; :mod:`st_from_he.tl` translates between SpatialData and these tensors.
"""

from ._augment import BatchAugment, lower_resolution
from ._config import ModelConfig
from ._context import MultiScaleFusion, NeighbourAttention, neighbour_index
from ._encoders import ImageEncoder, TinyCNN, VectorEncoder, load_encoder_weights
from ._foundation import (
    FOUNDATION_ENCODERS,
    EncoderSpec,
    FoundationEncoder,
    efficientnet_lite_to_timm,
    encoder_spec,
    load_pretrained,
    weights_file,
)
from ._fusion import MaskedCrossModalFusion
from ._heads import GeneEncoder, ProjectionHead, RegressionHead, SNNGeneTokens
from ._losses import combine_losses, reconstruction_loss, soft_contrastive_loss
from ._mim import MaskedImageModel, random_patch_mask
from ._module import ExpressionModule
from ._retrieval import retrieve
from ._smoothing import smooth_neighbours
from ._white_balance import GLASS_GREY, glass_colour, white_balance

__all__ = [
    "FOUNDATION_ENCODERS",
    "GLASS_GREY",
    "EncoderSpec",
    "FoundationEncoder",
    "efficientnet_lite_to_timm",
    "glass_colour",
    "encoder_spec",
    "load_pretrained",
    "weights_file",
    "BatchAugment",
    "ExpressionModule",
    "GeneEncoder",
    "ImageEncoder",
    "MaskedCrossModalFusion",
    "MaskedImageModel",
    "ModelConfig",
    "MultiScaleFusion",
    "NeighbourAttention",
    "ProjectionHead",
    "RegressionHead",
    "SNNGeneTokens",
    "TinyCNN",
    "VectorEncoder",
    "combine_losses",
    "load_encoder_weights",
    "lower_resolution",
    "neighbour_index",
    "reconstruction_loss",
    "random_patch_mask",
    "retrieve",
    "smooth_neighbours",
    "soft_contrastive_loss",
    "white_balance",
]
