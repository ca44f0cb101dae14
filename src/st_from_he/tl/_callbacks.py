"""The Lightning callbacks of training: history, best weights, and rank 0's record for the calling process.

A module of its own, imported only when training, so that importing the package does not import lightning; at
module level, so that ``ddp_spawn`` can pickle them.
"""

from __future__ import annotations

import copy
import os

import lightning as L
import numpy as np
import torch


class History(L.Callback):
    """Per-epoch train and validation losses, kept in memory (averaged over all processes under DDP)."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        # runs after the epoch's validation, so both train_* and val_* are final here
        row = {"epoch": trainer.current_epoch}
        row |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train_", "val_"))}
        self.rows.append(row)


class BestWeights(L.Callback):
    """A copy of the weights at the lowest validation loss (the best checkpoint, held in memory).

    Under DDP the validation loss is the mean over all processes (logged with ``sync_dist``) and the weights
    are the same on every process, so every process keeps the same best epoch.
    """

    def __init__(self):
        self.best, self.state, self.epoch = np.inf, None, -1

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        loss = float(trainer.callback_metrics.get("val_loss", np.inf))
        if loss < self.best:
            self.best, self.epoch = loss, trainer.current_epoch
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in pl_module.state_dict().items()})


class ShareRankZero(L.Callback):
    """Rank 0 writes the history and the best weights to a file, for a main process that did not train.

    With ``ddp_spawn`` or ``ddp_notebook`` the training runs in child processes, whose callbacks are copies;
    the main process reads rank 0's record from ``path`` (see :func:`train`).
    """

    def __init__(self, history, best, path: str):
        self.history, self.best, self.path = history, best, path

    def on_train_end(self, trainer, pl_module):
        if trainer.world_size > 1 and trainer.is_global_zero:
            record = {"pid": os.getpid(), "rows": self.history.rows, "best": self.best.best}
            record |= {"epoch": self.best.epoch, "state": self.best.state}
            torch.save(record, self.path)


def make_callbacks(patience: int | None, record: str) -> list:
    """History, best weights, rank 0's record to ``record``, and early stopping after ``patience`` epochs (if any)."""
    history, best = History(), BestWeights()
    callbacks = [history, best, ShareRankZero(history, best, record)]
    if patience:
        callbacks.append(
            L.pytorch.callbacks.EarlyStopping("val_loss", patience=patience, mode="min", check_on_train_epoch_end=False)
        )
    return callbacks
