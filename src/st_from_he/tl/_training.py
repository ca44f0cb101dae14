"""The lightning training loop of neural presets: data loaders, best-weights tracking, history, early stopping."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from st_from_he._logging import logger
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
    return x.float().div_(255.0).sub_(mean).div_(std)  # in place: the same values, no temporaries (3x)


def check_strategy(strategy):
    """Return ``strategy`` if Lightning knows it (``"auto"``, a registered name, a ``Strategy``), else raise."""
    fix = (
        "use 'auto', 'ddp' (in a script, under `if __name__ == \"__main__\":`), 'ddp_spawn', 'ddp_notebook' (in "
        "Jupyter), another name in `lightning.pytorch.strategies.StrategyRegistry`, or a "
        "`lightning.pytorch.strategies.Strategy` object"
    )
    if isinstance(strategy, str) and strategy == "auto":
        return strategy  # without importing lightning (the ridge presets never need it)
    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        if strategy not in StrategyRegistry.available_strategies():
            raise ValueError(f"Unknown `strategy` {strategy!r}; {fix}.")
        return strategy
    from lightning.pytorch.strategies import Strategy

    if not isinstance(strategy, Strategy):
        raise TypeError(f"`strategy` must be a strategy name or a Lightning Strategy; {fix}. Got {strategy!r}.")
    return strategy


class _Collate:
    """Stack a batch's items; normalise its images (not cached embeddings) with the encoder's mean and std.

    A class rather than a closure so that ``ddp_spawn`` can pickle the data loaders.
    """

    def __init__(self, mean, std, vectors: bool):
        self.mean, self.std, self.vectors = mean, std, vectors

    def __call__(self, items):
        import torch

        batch = torch.utils.data.default_collate(items)
        if not self.vectors:
            batch["image"] = normalise_images(batch["image"], self.mean, self.std)
            if "neighbours" in batch:
                batch["neighbours"] = normalise_images(batch["neighbours"], self.mean, self.std)
        return batch


class _SpotDataset:
    """Map-style dataset over uint8 patches (or float embeddings) and targets (a torch Dataset by duck typing).

    The patches are an in-memory array or :class:`~st_from_he.tl._data.LazyPatches`, which reads them from the
    images when indexed: the data loader asks for a whole batch at once (``__getitems__``), one read per batch.
    With ``neighbours`` (an ``(n, K)`` index into ``pool``, ``-1`` padding), each item also carries its neighbours'
    patches ``"neighbours"`` ``(K, s, 3, h, w)`` (zeros in padded slots) and ``"neighbour_mask"`` ``(K,)``, ``True``
    where a slot is padding; without, an item is exactly ``{"image", "expression"}``.
    """

    def __init__(
        self,
        patches: np.ndarray,
        targets: np.ndarray,
        neighbours: np.ndarray | None = None,
        pool: np.ndarray | None = None,
    ):
        self.patches, self.targets = patches, targets
        self.neighbours, self.pool = neighbours, pool

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices) -> list[dict]:
        """The items at ``indices``, their patches (and their neighbours') read in one go."""
        import torch

        indices = np.asarray(indices, dtype=np.intp)
        images = np.asarray(self.patches[indices])
        items = [
            {"image": torch.from_numpy(image), "expression": torch.from_numpy(self.targets[i])}
            for image, i in zip(images, indices, strict=True)
        ]
        if self.neighbours is not None:
            index = self.neighbours[indices]  # (b, K)
            padding = index < 0
            patches = np.asarray(self.pool[np.where(padding, 0, index).ravel()])  # a copy: padded slots blanked
            patches = patches.reshape(*index.shape, *patches.shape[1:])
            patches[padding] = 0
            for item, nb, pad in zip(items, patches, padding, strict=True):
                item["neighbours"] = torch.from_numpy(nb)
                item["neighbour_mask"] = torch.from_numpy(pad)
        return items


def neighbour_rows(positions_um, groups, config, *, n: int, what: str) -> np.ndarray:
    """Neighbour index ``(n, K)`` (``-1`` padding) of the spots for a model with neighbour attention, checked.

    Neighbours are the ``config.max_neighbours`` nearest spots of the same group within
    ``config.neighbour_radius_um`` (:func:`st_from_he.models._context.neighbour_index`). Raises when the positions
    are missing or malformed, or when no spot has a neighbour (the attention would have nothing to attend to).
    ``what`` names the spots in messages (e.g. ``"training spots"``).
    """
    from scipy.spatial import cKDTree

    from st_from_he.models._context import neighbour_index

    if positions_um is None:
        raise ValueError(
            f"This model attends over neighbouring spots (`neighbour_attention=True`), so it needs the centre of each "
            f"of the {what} in micrometres: pass `positions_um=` (n, 2), e.g. the pixel coordinates times the "
            f"image's micrometres per pixel, or pass the PatchDataset of `sth.pp.extract_patches`, which has them."
        )
    positions_um = np.asarray(positions_um, dtype=np.float64)
    if positions_um.shape != (n, 2):
        raise ValueError(
            f"`positions_um` must give the centre (x, y) in micrometres of each of the {n} {what}, shape ({n}, 2); "
            f"got shape {positions_um.shape}."
        )
    radius = config.neighbour_radius_um
    index = neighbour_index(positions_um, groups, radius_um=radius, max_neighbours=config.max_neighbours)
    if index.shape[1] == 0:
        nearest = np.inf
        codes = np.zeros(n, dtype=int) if groups is None else pd.factorize(np.asarray(groups))[0]
        for code in np.unique(codes):
            members = positions_um[codes == code]
            if len(members) > 1:
                nearest = min(nearest, float(cKDTree(members).query(members, k=2)[0][:, 1].min()))
        found = f"the closest two are {nearest:.0f} um apart" if np.isfinite(nearest) else "no section has two spots"
        raise ValueError(
            f"No neighbours possible: none of the {n} {what} has another spot of its section within "
            f"`neighbour_radius_um`={radius:g} um ({found}), so the neighbour attention (`neighbour_attention=True`) "
            f"would have nothing to attend to. Raise `neighbour_radius_um` above the spot spacing (legacy ST: 200 um "
            f"between spots, 350 takes the 8 around a spot; Visium: 100 um, 110 takes the 6), check that "
            f"`positions_um` are in micrometres, or set `neighbour_attention=False`."
        )
    return index


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


def _rank_zero_record(history, best, record: Path) -> None:
    """Take rank 0's history and best weights from ``record`` if training ran in other processes."""
    import torch

    if not record.is_file():
        return
    saved = torch.load(record, weights_only=False)
    if saved["pid"] != os.getpid():  # written by a spawned or forked rank 0, not by this process
        history.rows = saved["rows"]
        best.best, best.epoch, best.state = saved["best"], saved["epoch"], saved["state"]


def _warn_if_fork_may_hang(trainer) -> None:
    """Warn before forking training processes (``ddp_notebook``) after numba ran OpenMP threads in this one.

    Forked processes then hung in DDP's first broadcast here (numba's "omp" threading layer, which scanpy's
    functions such as :func:`st_from_he.pp.select_genes` start, with ``OMP_NUM_THREADS`` set).
    """
    import sys

    if trainer.num_devices < 2 or getattr(trainer.strategy, "_start_method", None) != "fork":
        return
    numba = sys.modules.get("numba")
    try:
        layer = numba.threading_layer() if numba is not None else None
    except ValueError:  # no parallel numba function has run: no OpenMP threads to inherit
        layer = None
    if layer == "omp":
        logger.warning(
            "Forking %d training processes after numba started OpenMP threads in this one: they can hang in DDP's "
            "first broadcast (seen with OMP_NUM_THREADS set). If training does not start, restart and set the "
            "environment variable NUMBA_THREADING_LAYER=workqueue before importing anything, or run a script with "
            "strategy='ddp'.",
            trainer.num_devices,
        )


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
    strategy="auto",
    progress_bar: bool,
    patience: int | None,
    max_time: float | None = None,
    neighbours: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, int]:
    """Fit ``module`` and load its best weights; returns the history and the best epoch.

    ``train_data`` and ``val_data`` are ``(patches, targets)``. ``neighbours`` (for modules with neighbour
    attention): ``(pool, train_index, val_index)``, the index arrays ``(n, K)`` giving for each training and
    validation spot the rows of ``pool`` (uint8 patches) of its neighbours, ``-1`` for padding; each batch then
    carries ``"neighbours"`` (normalised like the images) and ``"neighbour_mask"``. Without it, batches hold
    ``"image"`` and ``"expression"`` only. Patches may be in-memory arrays or
    :class:`~st_from_he.tl._data.LazyPatches` (read batch by batch). ``strategy`` and ``devices`` go to the
    Trainer (several devices: data-parallel); the history and best weights are rank 0's.
    """
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from ._callbacks import make_callbacks

    set_threads()
    mean, std = module.config.image_mean, module.config.image_std
    vectors = module.config.features is not None  # cached embeddings: the module standardises them itself
    generator = torch.Generator().manual_seed(seed)
    collate = _Collate(mean, std, vectors)
    loader_args = {"batch_size": batch_size, "num_workers": settings.num_workers, "collate_fn": collate}
    # drop_last keeps a lone last spot from making a one-element contrastive batch
    pool, train_nb, val_nb = (None, None, None) if neighbours is None else neighbours
    train_loader = DataLoader(
        _SpotDataset(*train_data, train_nb, pool),
        shuffle=True,
        generator=generator,
        drop_last=len(train_data[0]) > batch_size,
        **loader_args,
    )
    val_loader = DataLoader(_SpotDataset(*val_data, val_nb, pool), shuffle=False, **loader_args)
    use_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    scratch = tempfile.TemporaryDirectory(prefix="sth-train-")
    record = Path(scratch.name) / "rank0.pt"
    callbacks = make_callbacks(patience, str(record))
    with scratch, _quiet_lightning():
        trainer = L.Trainer(
            max_epochs=max_epochs,
            max_time=None if max_time is None else datetime.timedelta(seconds=max_time),
            accelerator="cuda" if use_cuda else ("cpu" if accelerator == "auto" else accelerator),
            devices=devices,
            strategy=strategy,
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
        _warn_if_fork_may_hang(trainer)
        trainer.fit(module, train_loader, val_loader)
        history, best = callbacks[0], callbacks[1]
        _rank_zero_record(history, best, record)
    if best.state is not None:
        module.load_state_dict(best.state)
    module.eval()
    return pd.DataFrame(history.rows), best.epoch
