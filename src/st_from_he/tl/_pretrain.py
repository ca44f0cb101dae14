"""`pretrain_encoder`: self-supervised masked image modelling on tissue tiles of whole slides, saved as weights."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from st_from_he._logging import logger, timed
from st_from_he._settings import settings

from ._data import as_list

if TYPE_CHECKING:
    from spatialdata import SpatialData

_SUFFIX = ".safetensors"
_IMAGE_SUFFIX = "_image"
_DEFAULT_EPOCHS = 10
_WARMUP_FRACTION = 0.05  # of the planned steps, linear warm-up before the cosine decay
_MIN_LR_FRACTION = 0.01
_BN_BATCHES = 20  # batches of whole tiles that re-estimate BatchNorm statistics after training


@dataclass
class PretrainResult:
    """What :func:`~st_from_he.tl.pretrain_encoder` wrote and how training went.

    Attributes
    ----------
    path
        The saved ``.safetensors`` encoder weights; pass it as ``encoder_weights`` with the same ``encoder``.
    history
        One row per optimisation step: ``step``, ``epoch``, ``loss`` (reconstruction error of hidden patches),
        ``flat_loss`` (the error of filling hidden patches with the batch's average colour: the encoder has learnt
        from the visible context where ``loss`` falls below it), ``lr`` and ``time_s`` (seconds since training
        began).
    tiles
        Number of tissue tiles trained on, per image (``"<i>:<image key>"``, ``i`` the position of its SpatialData).
    params
        The call's parameters, also stored in the file's metadata.

    Examples
    --------
    >>> import st_from_he as sth
    >>> slide = sth.io.read_image("../shared/data/her2st/C6/C6_HE.jpg", sample_id="slide", pixel_size_um=0.69)
    >>> result = sth.tl.pretrain_encoder(slide, path="slide_mim.safetensors", max_steps=200)  # doctest: +SKIP
    >>> result.history.plot(x="step", y=["loss", "flat_loss"])  # doctest: +SKIP
    >>> result.params["encoder"], result.params["size_um"]  # doctest: +SKIP
    ('sth_tinycnn', 112.0)
    """

    path: str
    history: pd.DataFrame
    tiles: dict[str, int] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        last = self.history["loss"].tail(10).mean() if len(self.history) else float("nan")
        return (
            f"PretrainResult(path={self.path!r}, steps={len(self.history)}, tiles={sum(self.tiles.values())}, "
            f"final loss {last:.3f})"
        )


def pretrain_encoder(
    sdatas: SpatialData | Sequence[SpatialData],
    *,
    path: str | os.PathLike,
    encoder: str = "sth_tinycnn",
    encoder_kwargs: dict[str, Any] | None = None,
    encoder_weights: str | os.PathLike | None = None,
    image_keys: Sequence[str] | None = None,
    size_um: float = 112.0,
    size_px: int = 112,
    n_tiles: int | None = 4096,
    method: Literal["auto", "token", "pixel"] = "auto",
    mask_ratio: float = 0.6,
    mask_patch_px: int | None = None,
    loss: Literal["l1", "l2"] = "l1",
    max_steps: int | None = None,
    max_epochs: int | None = None,
    max_time: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    augment: bool = True,
    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
    image_std: Sequence[float] = (0.229, 0.224, 0.225),
    seed: int = 0,
    device: str = "auto",
    progress_bar: bool | None = None,
    overwrite: bool = False,
) -> PretrainResult:
    """Pretrain an image encoder without labels by masked image modelling on tissue tiles of whole slides.

    What it is for: an encoder learns the look of H&E, stain and scanner included, from images alone. The slide of a
    new patient has no expression measured, yet its image is there; so are archived H&E-only slides. Pretraining on
    the tiles of all of them, the new patient's slide among them, adapts the encoder to that slide's domain before
    :class:`~st_from_he.tl.ExpressionModel` learns expression on the measured sections, and gives an encoder where no
    pretrained weights are available or allowed (offline machines, another stain, another species).

    How: square tiles of ``size_um`` micrometres (resampled to ``size_px`` pixels, so slides of different resolution
    agree) are cut on a grid of the same spacing over the tissue of every image (:func:`st_from_he.pp.detect_tissue`,
    or a stored mask ``f"{S}_tissue"``; :func:`st_from_he.pp.spot_grid`, :func:`st_from_he.pp.extract_patches`), at
    most ``n_tiles`` shared out evenly between images. Each step flips and rotates a batch, hides ``mask_ratio`` of
    each tile in squares of ``mask_patch_px`` and trains the encoder, with a light decoder, to reconstruct the hidden
    pixels (:class:`~st_from_he.models.MaskedImageModel`: SimMIM mask tokens for ViTs, input masking for CNNs).
    After training, BatchNorm statistics are re-estimated on whole tiles (the encoder will not see masked ones
    again). The encoder's state dict is written to ``path`` (to a temporary file first, renamed when complete), with
    the parameters in the file's metadata; the decoder is dropped.

    This is a plain training loop (no Lightning): one model, one loss, no validation set to monitor. Tiles are held
    in memory (``n_tiles * 3 * size_px**2`` bytes: 154 MB for the defaults).

    Parameters
    ----------
    sdatas
        One :class:`~spatialdata.SpatialData` or a list: measured sections, H&E-only slides
        (:func:`st_from_he.io.read_image`), the new patient's slide. No table is needed.
    path
        The ``.safetensors`` file to write; its folder is created if missing.
    encoder
        Encoder name as :class:`~st_from_he.models.ImageEncoder` takes it: a timm model (e.g.
        ``"vit_small_patch16_224"``, ``"resnet18"``) or ``"sth_tinycnn"`` (the default preset's encoder).
    encoder_kwargs
        Extra :func:`timm.create_model` arguments (e.g. ``{"depth": 6}``); pass the same to ``ExpressionModel``.
    encoder_weights
        Start from these weights (a local file or hub id, see :class:`~st_from_he.models.ImageEncoder`) instead of a
        random initialisation, e.g. to adapt a pretrained encoder to new slides.
    image_keys
        Image elements to tile; default: every image named ``f"{S}_image"`` (the package's convention). Each key is
        looked for in every SpatialData and must be in at least one.
    size_um
        Side of a tile in micrometres; use the ``size_um`` the expression model will use (112 by default).
    size_px
        Side of a tile in pixels; also the encoder's ``img_size`` (use the model's ``img_size``: 112 for the
        default preset, 224 for ``"cmrc"``).
    n_tiles
        Most tiles in all; ``None`` keeps every tissue tile.
    method
        ``"token"`` (ViT-like encoders), ``"pixel"`` (CNNs) or ``"auto"`` (by architecture).
    mask_ratio
        Fraction of each tile hidden, strictly between 0 and 1 (SimMIM uses 0.6, MAE 0.75).
    mask_patch_px
        Side of a hidden square in pixels of the tile (``mask_patch_px * size_um / size_px`` micrometres); default:
        the encoder's patch size (ViT) or feature-map stride (CNN), see :class:`~st_from_he.models.MaskedImageModel`.
    loss
        ``"l1"`` or ``"l2"`` reconstruction error.
    max_steps, max_epochs, max_time
        Training stops at the first of: ``max_steps`` optimisation steps, ``max_epochs`` passes over the tiles,
        ``max_time`` seconds of training (at least one step is made). With neither ``max_steps`` nor ``max_epochs``,
        10 epochs. The learning rate follows a cosine schedule over the planned steps (a ``max_time`` stop cuts it
        short).
    batch_size
        Tiles per step.
    lr
        Peak AdamW learning rate, after a linear warm-up over the first 5% of steps.
    weight_decay
        AdamW weight decay.
    augment
        Random flips and 90-degree rotations of each tile.
    image_mean, image_std
        Channel normalisation of RGB in ``[0, 1]``; use the expression model's (``ImageNet`` by default).
    seed
        Seeds tile sampling, initialisation, masks, augmentations and batch order (and torch's global generator).
    device
        ``"auto"`` (``sth.settings.device``, else CUDA, MPS, CPU) or a torch device; CUDA trains in bf16.
    progress_bar
        Show progress; default ``sth.settings.progress_bar``.
    overwrite
        Replace an existing file at ``path``.

    Returns
    -------
    A :class:`~st_from_he.tl.PretrainResult`: ``path`` (a string), the per-step loss ``history``, the ``tiles`` per
    image and the ``params``. No SpatialData is modified.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is false.
    ValueError
        For an unknown encoder, a ``mask_ratio`` outside ``(0, 1)``, a path not ending in ``.safetensors``, or an
        image on which no tissue is found.

    Examples
    --------
    Pretrain on the measured sections and on the new patient's slide (its image only), then train the expression
    model from the pretrained encoder:

    >>> import st_from_he as sth
    >>> train = sth.datasets.her2st(["C2", "C3"], path="../shared/data/her2st")
    >>> new = sth.io.read_image("../shared/data/her2st/B4/B4_HE.jpg", sample_id="new", pixel_size_um=0.69)
    >>> result = sth.tl.pretrain_encoder([train, new], path="mim.safetensors", max_time=600)  # doctest: +SKIP
    >>> result.history[["loss", "flat_loss"]].tail()  # doctest: +SKIP
    >>> genes = sth.pp.select_genes(train, n_top=200)
    >>> model = sth.tl.ExpressionModel(genes, encoder_weights=result.path)  # doctest: +SKIP
    >>> model.fit(train)  # doctest: +SKIP
    """
    import torch

    from st_from_he.models._augment import BatchAugment
    from st_from_he.models._encoders import ImageEncoder
    from st_from_he.models._mim import MaskedImageModel

    from ._training import normalise_images, resolve_device, set_threads

    started = time.perf_counter()
    path = _check_path(path, overwrite)
    dev = torch.device(resolve_device(device))
    sdatas = as_list(sdatas)
    _check_options(size_um, size_px, n_tiles, batch_size, lr, max_steps, max_epochs, max_time, mask_ratio)
    progress_bar = settings.progress_bar if progress_bar is None else progress_bar
    encoder_kwargs = dict(encoder_kwargs or {})
    set_threads()
    torch.manual_seed(seed)
    # build the model first: a wrong encoder name or mask geometry fails before any tile is read
    weights = None if encoder_weights is None else str(encoder_weights)
    net = ImageEncoder(encoder, weights=weights, img_size=size_px, **encoder_kwargs)
    mim = MaskedImageModel(
        net, img_size=size_px, mask_patch_px=mask_patch_px, mask_ratio=mask_ratio, method=method, loss=loss
    )
    rng = np.random.default_rng(seed)
    with timed(f"Cutting tissue tiles of {size_um:g} um at {size_px} px"):
        tiles, counts = _tissue_tiles(sdatas, image_keys, size_um, size_px, n_tiles, rng)
    batch_size = min(batch_size, len(tiles))
    steps_per_epoch = len(tiles) // batch_size
    if max_steps is None and max_epochs is None:
        max_epochs = _DEFAULT_EPOCHS
    planned = min(
        max_steps if max_steps is not None else math.inf,
        max_epochs * steps_per_epoch if max_epochs is not None else math.inf,
    )
    params = {
        "encoder": encoder,
        "encoder_kwargs": encoder_kwargs,
        "encoder_weights": weights,
        "size_um": float(size_um),
        "size_px": int(size_px),
        "method": mim.method,
        "mask_ratio": float(mask_ratio),
        "mask_patch_px": mim.mask_patch_px,
        "loss": loss,
        "batch_size": int(batch_size),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "augment": bool(augment),
        "image_mean": [float(v) for v in image_mean],
        "image_std": [float(v) for v in image_std],
        "seed": int(seed),
        "n_tiles": len(tiles),
        "tiles": counts,
    }

    mim = mim.to(dev)
    augmenter = BatchAugment(flips=augment, rot90=augment, mean=tuple(image_mean), std=tuple(image_std)).to(dev)
    optimizer = torch.optim.AdamW(mim.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, round(_WARMUP_FRACTION * planned))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, planned))
    generator = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    tiles_t = torch.from_numpy(tiles)

    def batch_images(index: torch.Tensor) -> torch.Tensor:
        images = normalise_images(tiles_t[index].to(dev, non_blocking=True), image_mean, std=image_std)
        return augmenter(images)

    rows = []
    step, epoch, train_start = 0, 0, time.perf_counter()
    stop_reason = "max_steps" if max_steps is not None and max_steps <= planned else "max_epochs"
    mim.train()
    bar = tqdm(total=planned, desc="Masked image modelling", disable=not progress_bar, unit="step")
    with timed(f"Pretraining {encoder!r} by {mim.method} masking on {len(tiles)} tiles ({planned} steps planned)"):
        while step < planned:
            order = torch.randperm(len(tiles), generator=generator)
            for start in range(0, steps_per_epoch * batch_size, batch_size):
                if step >= planned:
                    break
                if max_time is not None and step > 0 and time.perf_counter() - train_start > max_time:
                    stop_reason = "max_time"
                    planned = step
                    break
                images = batch_images(order[start : start + batch_size])
                mask = mim.random_mask(len(images), generator=generator)
                with autocast:
                    out = mim(images, mask)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                optimizer.step()
                scheduler.step()
                rows.append(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": float(out["loss"].detach()),
                        "flat_loss": float(out["flat_loss"]),
                        "lr": optimizer.param_groups[0]["lr"],
                        "time_s": time.perf_counter() - train_start,
                    }
                )
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")
            epoch += 1
    bar.close()
    _recalibrate_batchnorm(net, tiles_t, batch_images, batch_size, generator)
    history = pd.DataFrame(rows)
    params |= {"steps": len(rows), "epochs": epoch, "stopped_by": stop_reason}
    _save(net.model, path, params)
    first, last = history["loss"].head(10).mean(), history["loss"].tail(10).mean()
    logger.info(
        "Saved the pretrained %r encoder to %s: %d steps (stopped by %s), loss %.3f -> %.3f (flat-colour yardstick "
        "%.3f), %.0f s in all",
        encoder,
        path,
        len(rows),
        stop_reason,
        first,
        last,
        history["flat_loss"].tail(10).mean(),
        time.perf_counter() - started,
    )
    return PretrainResult(path=str(path), history=history, tiles=counts, params=params)


# ---- checks ---------------------------------------------------------------------------------------------------------


def _check_path(path, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix != _SUFFIX:
        raise ValueError(f"`path` must end in {_SUFFIX!r} (encoder weights are saved with safetensors), got {path}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass `overwrite=True` to replace it, or another `path`.")
    if path.is_dir():
        raise IsADirectoryError(f"`path` {str(path)!r} is a folder; give a file name ending in {_SUFFIX!r}.")
    return path


def _check_options(size_um, size_px, n_tiles, batch_size, lr, max_steps, max_epochs, max_time, mask_ratio) -> None:
    if not np.isfinite(size_um) or size_um <= 0:
        raise ValueError(f"`size_um` must be a positive number of micrometres, got {size_um}.")
    if int(size_px) != size_px or size_px < 8:
        raise ValueError(f"`size_px` must be an integer of at least 8, got {size_px}.")
    if not 0 < mask_ratio < 1:
        raise ValueError(f"`mask_ratio` must lie strictly between 0 and 1, got {mask_ratio}.")
    for name, value in (("n_tiles", n_tiles), ("max_steps", max_steps), ("max_epochs", max_epochs)):
        if value is not None and (int(value) != value or value < 1):
            raise ValueError(f"`{name}` must be a positive integer or None, got {value}.")
    if int(batch_size) != batch_size or batch_size < 2:
        raise ValueError(f"`batch_size` must be an integer of at least 2, got {batch_size}.")
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"`lr` must be a positive learning rate, got {lr}.")
    if max_time is not None and not max_time > 0:
        raise ValueError(f"`max_time` must be a positive number of seconds or None, got {max_time}.")


# ---- tiles ----------------------------------------------------------------------------------------------------------


def _image_keys(sdatas: list, image_keys: Sequence[str] | None) -> list[tuple[int, str]]:
    """``(position of the SpatialData, image key)`` of every image to tile."""
    if isinstance(image_keys, str):
        image_keys = [image_keys]
    if image_keys is None:
        chosen = [(i, k) for i, s in enumerate(sdatas) for k in s.images if k.endswith(_IMAGE_SUFFIX)]
        if not chosen:
            present = sorted({k for s in sdatas for k in s.images})
            raise ValueError(
                f"No image named 'S_image' to tile (images present: {present}); pass `image_keys` or read slides "
                "with `sth.io.read_image`."
            )
        return chosen
    missing = [k for k in image_keys if not any(k in s.images for s in sdatas)]
    if missing:
        present = sorted({k for s in sdatas for k in s.images})
        raise KeyError(f"Image(s) {missing} are in none of the SpatialData objects; images present: {present}.")
    return [(i, k) for i, s in enumerate(sdatas) for k in image_keys if k in s.images]


def _image_tiles(sdata, key: str, size_um: float, size_px: int):
    """The tissue tiles of one image, as a lazy :class:`~st_from_he.pp.PatchDataset` (``sdata`` is not modified)."""
    from spatialdata import SpatialData

    from st_from_he.pp import extract_patches, spot_grid
    from st_from_he.pp._patches import image_of

    sample, _, _ = image_of(sdata, key)
    # a light SpatialData of the same (lazy) elements, named by the package's convention, receives the grid
    tissue = f"{sample}_tissue"
    labels = {tissue: sdata.labels[tissue]} if tissue in sdata.labels else {}
    view = SpatialData(images={f"{sample}_image": sdata.images[key]}, labels=labels)
    try:
        grid = spot_grid(view, f"{sample}_image", spacing_um=size_um, diameter_um=size_um, tissue_only=True)
    except ValueError as err:
        raise ValueError(
            f"No tissue found on image {key!r} (sample {sample!r}) to cut {size_um:g} um tiles from ({err}). Check "
            f"its tissue mask with `sth.pp.detect_tissue(sdata, {key!r})`, store a corrected one as labels "
            f"{tissue!r}, or leave the image out with `image_keys`."
        ) from err
    return extract_patches(view, shapes_key=grid, size_um=size_um, size_px=size_px)


def _share(available: list[int], total: int | None) -> list[int]:
    """Tiles taken from each image: an even share of ``total``, what a small image cannot use going to the others."""
    if total is None or total >= sum(available):
        return list(available)
    taken = [0] * len(available)
    left, open_ = total, [i for i, n in enumerate(available) if n > 0]
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for i in list(open_):
            extra = min(share, available[i] - taken[i], left)
            taken[i] += extra
            left -= extra
            if taken[i] == available[i]:
                open_.remove(i)
            if left == 0:
                break
    return taken


def _tissue_tiles(sdatas, image_keys, size_um, size_px, n_tiles, rng) -> tuple[np.ndarray, dict[str, int]]:
    keys = _image_keys(sdatas, image_keys)
    datasets = [_image_tiles(sdatas[i], key, size_um, size_px) for i, key in keys]
    taken = _share([len(d) for d in datasets], n_tiles)
    parts, counts = [], {}
    for (i, key), dataset, n in zip(keys, datasets, taken, strict=True):
        chosen = np.sort(rng.choice(len(dataset), size=n, replace=False))
        parts.append(dataset[chosen])
        counts[f"{i}:{key}"] = int(n)
        logger.info("%s: %d of %d tissue tiles", key, n, len(dataset))
    tiles = np.concatenate(parts)
    if len(tiles) < 2:
        raise ValueError(f"Found {len(tiles)} tissue tile(s); masked image modelling needs at least 2.")
    return tiles, counts


# ---- training helpers -----------------------------------------------------------------------------------------------


def _lr_factor(step: int, warmup: int, planned: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if not math.isfinite(planned):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1.0, planned - warmup))
    return _MIN_LR_FRACTION + (1 - _MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def _recalibrate_batchnorm(net, tiles, batch_images, batch_size: int, generator) -> None:
    """Re-estimate BatchNorm running statistics on whole (unmasked) tiles, as the encoder will see them downstream."""
    import torch

    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    net.train()
    order = torch.randperm(len(tiles), generator=generator)
    with torch.no_grad():
        for start in range(0, min(len(tiles), _BN_BATCHES * batch_size), batch_size):
            net.model.forward_features(batch_images(order[start : start + batch_size]))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    net.eval()


def _save(model, path: Path, params: dict[str, Any]) -> None:
    """Write the state dict to a temporary file beside ``path``, then rename: ``path`` is complete or absent."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": "st_from_he.pretrain_encoder/1", "params": json.dumps(params)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
