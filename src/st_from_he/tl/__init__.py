"""Tools: train, apply and evaluate image-to-expression models."""

from ._ceiling import noise_ceiling
from ._cross_validate import cross_validate, few_shot
from ._embed import embed
from ._evaluate import evaluate
from ._gene_correlation import gene_correlation
from ._gene_sets import BREAST_MARKERS, TUMOR_MARKERS, gene_set
from ._model import ExpressionModel
from ._predict import predict_expression
from ._pretrain import PretrainResult, pretrain_encoder
from ._tumor import evaluate_localization, score_tumor

__all__ = [
    "BREAST_MARKERS",
    "TUMOR_MARKERS",
    "ExpressionModel",
    "PretrainResult",
    "cross_validate",
    "embed",
    "evaluate",
    "evaluate_localization",
    "few_shot",
    "gene_correlation",
    "gene_set",
    "noise_ceiling",
    "predict_expression",
    "pretrain_encoder",
    "score_tumor",
]
