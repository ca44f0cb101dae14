"""Closed-form baselines: ridge on fixed image features, and the training mean."""

from __future__ import annotations

from typing import Any

import numpy as np

_ALPHAS = np.logspace(-1, 5, 13)


class RidgeProbe:
    """Standardised features -> expression by ridge regression, its penalty chosen by leave-one-out on training spots.

    Parameters
    ----------
    features
        ``"handcrafted"`` (colour, stain and texture statistics), ``"encoder"`` (pooled tokens of a frozen encoder) or
        ``None`` (no features: predicts the training mean).
    encoder
        timm name of the frozen encoder for ``features="encoder"``.
    encoder_weights
        Weights of that encoder (``None``: random initialisation).
    lowres
        If above 1, also fit on a copy of every training patch blurred as if scanned up to ``lowres`` times coarser
        (:func:`~st_from_he.models.lower_resolution`), so that the probe holds up on lower-resolution images.
    seed
        Seed of the blur factors.
    """

    def __init__(
        self,
        features: str | None = "handcrafted",
        encoder: str = "resnet18",
        encoder_weights=None,
        *,
        lowres: float = 0.0,
        seed: int = 0,
    ):
        self.features = features
        self.encoder = encoder
        self.encoder_weights = encoder_weights
        self.lowres = lowres
        self.seed = seed
        self.state: dict[str, np.ndarray] = {}
        self._encoder_module = None

    def _features(self, patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
        if self.features == "handcrafted":
            from st_from_he.models._handcrafted import handcrafted_features

            return np.concatenate(
                [handcrafted_features(patches[i : i + batch_size]) for i in range(0, len(patches), batch_size)]
            )
        if self.features == "encoder":
            return self._encoder_features(patches, batch_size)
        return np.zeros((len(patches), 0), dtype=np.float32)

    def _encoder_features(self, patches: np.ndarray, batch_size: int) -> np.ndarray:
        import torch

        from st_from_he.models import ImageEncoder

        if self._encoder_module is None:
            self._encoder_module = ImageEncoder(self.encoder, weights=self.encoder_weights).eval()
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        scales = patches.shape[1] if patches.ndim == 5 else 1
        out = []
        with torch.inference_mode():
            for i in range(0, len(patches), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch_size]))
                x = x.reshape(-1, 3, *x.shape[-2:]).float().div(255).sub(mean).div(std)
                pooled = self._encoder_module.pool(self._encoder_module(x))
                out.append(pooled.reshape(len(pooled) // scales, -1).numpy())
        return np.concatenate(out).astype(np.float32)

    def fit(self, patches: np.ndarray, targets: np.ndarray) -> RidgeProbe:
        """Fit on uint8 patches ``(n, [s,] 3, h, w)`` and log-normalised targets ``(n, genes)``."""
        from sklearn.linear_model import RidgeCV

        targets = np.asarray(targets, dtype=np.float64)
        x = self._features(patches)
        if self.lowres > 1 and x.shape[1]:
            x = np.concatenate([x, self._blurred_features(patches)])
            targets = np.concatenate([targets, targets])
        mean = targets.mean(0)
        state = {"target_mean": mean.astype(np.float32)}
        if x.shape[1]:
            f_mean, f_std = x.mean(0), x.std(0) + 1e-6
            ridge = RidgeCV(alphas=_ALPHAS).fit((x - f_mean) / f_std, targets - mean)
            state |= {
                "feature_mean": f_mean,
                "feature_std": f_std,
                "coef": ridge.coef_.T.astype(np.float32),
                "alpha": np.array(ridge.alpha_),
            }
        self.state = state
        return self

    def _blurred_features(self, patches: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Features of uint8 patches ``(n, [s,] 3, h, w)``, each blurred by a factor log-uniform in ``[1, lowres]``.

        Batch by batch, so that no blurred copy of all the patches is held in memory.
        """
        import torch

        from st_from_he.models import lower_resolution

        factors = np.exp(np.random.default_rng(self.seed).uniform(0, np.log(self.lowres), len(patches)))
        features = []
        for i in range(0, len(patches), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch_size])).float()
            shape = x.shape
            y = lower_resolution(
                x.reshape(len(x), -1, *shape[-3:]), torch.from_numpy(factors[i : i + batch_size]).float()
            )
            features.append(self._features(y.reshape(shape).round().clamp(0, 255).to(torch.uint8).numpy()))
        return np.concatenate(features)

    def predict(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted log-normalised expression ``(n, genes)`` and the standardised features used ``(n, f)``."""
        if not self.state:
            raise RuntimeError("The ridge probe is not fitted; call `fit` first.")
        mean = self.state["target_mean"]
        if "coef" not in self.state:
            return np.tile(mean, (len(patches), 1)), np.zeros((len(patches), 0), dtype=np.float32)
        x = (self._features(patches) - self.state["feature_mean"]) / self.state["feature_std"]
        return (x @ self.state["coef"] + mean).astype(np.float32), x.astype(np.float32)

    def get_state(self) -> dict[str, Any]:
        """Arrays that define the fitted probe (saved by :meth:`ExpressionModel.save`)."""
        return dict(self.state)

    def set_state(self, state: dict[str, np.ndarray]) -> RidgeProbe:
        """Restore a fitted probe from :meth:`get_state`."""
        self.state = {k: np.asarray(v) for k, v in state.items()}
        return self
