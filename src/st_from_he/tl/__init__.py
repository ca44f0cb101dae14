"""Tools: train, apply and evaluate image-to-expression models."""

from ._model import ExpressionModel
from ._predict import predict_expression

__all__ = ["ExpressionModel", "predict_expression"]
