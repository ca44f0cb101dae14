"""The lightning training loop of neural presets: data loaders, best-weights tracking, history, early stopping."""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import warnings

import numpy as np
import pandas as pd

from st_from_he._settings import settings

_DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device, name: str = "device") -> str:
    """Return ``device`` if it names a device (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), else raise.

    Whether the device is present is checked when it is used (:func:`resolve_device`).
    """
    import torch

    fix = "use 'auto' (a GPU when available), 'cpu', 'cuda', 'cuda:<index>' or 'mps'"
    if not isinstance(device, str):
        raise TypeError(f"`{name}` must be a string; {fix}. Got {device!r}.")
    if device == "auto":
        return device
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"Unknown `{name}` {device!r}; {fix}.") from err
    if kind not in _DEVICE_TYPES:
        raise ValueError(f"Unsupported `{name}` {device!r}; {fix}.")
    return device


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` if available, else ``"mps"``, else ``"cpu"``; a named device must be present."""
    import torch

    device = check_device(settings.device if device == "auto" else device)
    if device != "auto":
        kind = torch.device(device).type
        present = {
            "cpu": True,
            "cuda": torch.cuda.is_available(),
            "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        }[kind]
        if not present:
            raise ValueError(f"`device` {device!r} is not available on this machine; use 'auto' or 'cpu'.")
        if kind == "cuda" and torch.device(device).index is not None:
            if torch.device(device).index >= torch.cuda.device_count():
                raise ValueError(
                    f"`device` {device!r} names a GPU this machine does not have ({torch.cuda.device_count()} "
                    "found); use 'cuda' or 'auto'."
                )
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def set_threads() -> None:
    """Apply ``sth.settings.num_threads`` to torch."""
    import torch

    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)


def normalise_images(x, mean, std):
    """uint8 images ``(..., 3, H, W)`` -> float normalised with the encoder's channel mean and std."""
    import torch

    mean = torch.as_tensor(mean, device=x.device, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(std, device=x.device, dtype=torch.float32).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


class _SpotDataset:
    """Map-style dataset over in-memory uint8 patches (or float embeddings) and targets (a torch Dataset by duck typing)."""

    def __init__(self, patches: np.ndarray, targets: np.ndarray):
        self.patches, self.targets = patches, targets

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int):
        import torch

        return {"image": torch.from_numpy(self.patches[i]), "expression": torch.from_numpy(self.targets[i])}


@contextlib.contextmanager
def _quiet_lightning():
    """Silence lightning's banners, tips and internal deprecation warnings: noise in a notebook."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _make_callbacks(patience: int | None):
    import lightning as L

    class History(L.Callback):
        """Per-epoch train and validation losses, kept in memory."""

        def __init__(self):
            self.rows: list[dict] = []

        def on_train_epoch_end(self, trainer, pl_module):
            # runs after the epoch's validation, so both train_* and val_* are final here
            row = {"epoch": trainer.current_epoch}
            row |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train_", "val_"))}
            self.rows.append(row)

    class BestWeights(L.Callback):
        """A copy of the weights at the lowest validation loss (the best checkpoint, held in memory)."""

        def __init__(self):
            self.best, self.state, self.epoch = np.inf, None, -1

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            loss = float(trainer.callback_metrics.get("val_loss", np.inf))
            if loss < self.best:
                self.best, self.epoch = loss, trainer.current_epoch
                self.state = copy.deepcopy({k: v.detach().cpu() for k, v in pl_module.state_dict().items()})

    callbacks = [History(), BestWeights()]
    if patience:
        callbacks.append(
            L.pytorch.callbacks.EarlyStopping("val_loss", patience=patience, mode="min", check_on_train_epoch_end=False)
        )
    return callbacks


def train(
    module,
    train_data: tuple[np.ndarray, np.ndarray],
    val_data: tuple[np.ndarray, np.ndarray],
    *,
    max_epochs: int,
    batch_size: int,
    accelerator: str,
    devices,
    seed: int,
    progress_bar: bool,
    patience: int | None,
    max_time: float | None = None,
) -> tuple[pd.DataFrame, int]:
    """Fit ``module`` and load its best weights; returns the history and the best epoch."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    set_threads()
    mean, std = module.config.image_mean, module.config.image_std
    vectors = module.config.features is not None  # cached embeddings: the module standardises them itself
    generator = torch.Generator().manual_seed(seed)

    def collate(items):
        batch = torch.utils.data.default_collate(items)
        if not vectors:
            batch["image"] = normalise_images(batch["image"], mean, std)
        return batch

    loader_args = {"batch_size": batch_size, "num_workers": settings.num_workers, "collate_fn": collate}
    # drop_last keeps a lone last spot from making a one-element contrastive batch
    train_loader = DataLoader(
        _SpotDataset(*train_data),
        shuffle=True,
        generator=generator,
        drop_last=len(train_data[0]) > batch_size,
        **loader_args,
    )
    val_loader = DataLoader(_SpotDataset(*val_data), shuffle=False, **loader_args)
    use_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    callbacks = _make_callbacks(patience)
    with _quiet_lightning():
        trainer = L.Trainer(
            max_epochs=max_epochs,
            max_time=None if max_time is None else datetime.timedelta(seconds=max_time),
            accelerator="cuda" if use_cuda else ("cpu" if accelerator == "auto" else accelerator),
            devices=devices,
            precision="bf16-mixed" if use_cuda else "32-true",
            deterministic=not use_cuda,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=progress_bar,
            enable_model_summary=False,
            callbacks=callbacks,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        trainer.fit(module, train_loader, val_loader)
    history, best = callbacks[0], callbacks[1]
    if best.state is not None:
        module.load_state_dict(best.state)
    module.eval()
    return pd.DataFrame(history.rows), best.epoch
