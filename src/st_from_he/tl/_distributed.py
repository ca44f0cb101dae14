"""Work over many slides (`predict_expression`, `embed`): one after the other here, or one task per slide on dask."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

from st_from_he._logging import logger
from st_from_he._sdata import check_sdata
from st_from_he._settings import settings
from st_from_he._validate import check_number

from ._predict import check_model, check_slide, slide_table

FUNCTION = "sth.tl.predict_expression"
DEFAULT_CLIENT = "default"  # the explicit opt-in for `distributed.default_client()`


def predict_slides(
    slides,
    model,
    *,
    reference,
    table_key,
    shapes_key,
    image_key,
    coordinate_system,
    pixel_size_um,
    key_added,
    batch_size,
    device,
    overwrite,
    progress_bar,
    client,
) -> None:
    """:func:`~st_from_he.tl.predict_expression` for a list of slides (or one slide with a ``client``).

    Every slide and the model are checked before any work; the tables are written only once all slides have their
    predictions, so a failure on any slide leaves all of them untouched.
    """
    client = resolve_client(client)
    slides = check_slides(slides)
    shapes_keys = _per_slide(shapes_key, len(slides))
    progress_bar = settings.progress_bar if progress_bar is None else progress_bar
    batch_size = check_number(batch_size, "batch_size", integer=True, unit="patches")
    table_keys = []
    for i, (slide, key) in enumerate(zip(slides, shapes_keys, strict=True)):
        with naming_slide(i, len(slides)):
            table_keys.append(
                check_slide(slide, table_key=table_key, shapes_key=key, key_added=key_added, overwrite=overwrite)
            )
    model = check_model(model, reference)
    kwargs = {
        "image_key": image_key,
        "coordinate_system": coordinate_system,
        "pixel_size_um": pixel_size_um,
        "batch_size": batch_size,
        "device": device,
        "progress_bar": progress_bar,
    }
    jobs = [{"table_key": t, "shapes_key": s, **kwargs} for t, s in zip(table_keys, shapes_keys, strict=True)]
    if client is None:
        tables = []
        for i, (slide, job) in enumerate(zip(slides, jobs, strict=True)):
            with naming_slide(i, len(slides)):
                tables.append(slide_table(slide, model, **job))
    else:
        tables = on_cluster(client, slides, slide_table, model, jobs)
    for slide, table in zip(slides, tables, strict=True):
        slide.tables[key_added] = table
    logger.info("Wrote table %r into %d slide(s) (%d spots in all)", key_added, len(slides), sum(map(len, tables)))


def resolve_client(client, function: str = FUNCTION):
    """The :class:`distributed.Client` to run on: ``None`` (run here), a client, or ``"default"`` (opt-in).

    ``function`` names the caller in messages (e.g. ``"sth.tl.embed"``).
    """
    if client is None:
        return None
    import distributed

    if isinstance(client, str) and client == DEFAULT_CLIENT:
        try:
            return distributed.default_client()
        except ValueError as err:
            raise ValueError(
                f"`client={DEFAULT_CLIENT!r}` of `{function}` uses the current dask.distributed client, but none "
                f"exists. Create one first (`distributed.Client(...)`), or pass `client=None` to run here."
            ) from err
    if isinstance(client, distributed.Client):
        return client
    hint = ""
    if isinstance(client, distributed.deploy.Cluster):
        hint = " For a cluster, pass a client connected to it: `client=distributed.Client(cluster)`."
    raise TypeError(
        f"`client` of `{function}` must be a `distributed.Client`, {DEFAULT_CLIENT!r} (the current default client) "
        f"or None (run here), got {type(client).__name__}.{hint}"
    )


def check_slides(slides, function: str = FUNCTION) -> list:
    """The slides as a list: each a SpatialData, each once, at least one (``function`` names the caller)."""
    if not isinstance(slides, list | tuple):
        check_sdata(slides, function)
        return [slides]
    if not slides:
        raise ValueError(f"`{function}` got an empty list of slides; pass at least one SpatialData.")
    seen = {}
    for i, slide in enumerate(slides):
        with naming_slide(i, len(slides), function):
            check_sdata(slide, function)
        if id(slide) in seen:
            raise ValueError(
                f"Slides {seen[id(slide)]} and {i} of the list passed to `{function}` are the same SpatialData; "
                f"pass each slide once."
            )
        seen[id(slide)] = i
    return list(slides)


def _per_slide(shapes_key, n: int) -> list:
    """``shapes_key`` for each of ``n`` slides: one key (or ``None``) for all, or a list of one per slide."""
    if not isinstance(shapes_key, list | tuple):
        return [shapes_key] * n
    if len(shapes_key) != n:
        raise ValueError(
            f"`shapes_key` of `{FUNCTION}` has {len(shapes_key)} entries for {n} slides; give one per slide (None "
            f"for a slide's table), or a single key for all."
        )
    return list(shapes_key)


@contextmanager
def naming_slide(i: int, n: int, function: str = FUNCTION):
    """Add "slide i of the n" to the notes of an exception raised inside: the message says which slide failed."""
    try:
        yield
    except Exception as err:
        note = f"(slide {i} of the {n} passed to `{function}`)"
        if n > 1 and note not in getattr(err, "__notes__", ()):
            err.add_note(note)
        raise


def on_cluster(client, slides: list, task, shared, jobs: list[dict], function: str = FUNCTION) -> list:
    """``task(slide, shared, **job)`` for each slide, one task per slide on ``client``'s cluster.

    ``task`` is a module-level function (workers import it); ``shared`` (e.g. the model) is scattered once and
    shared by every task. Returns the results in the slides' order, or raises the first slide's error (naming the
    slide; the other slides' tasks are cancelled).
    """
    import distributed

    # the shared object is scattered once; the slides one each (no large task graphs)
    shared_future = client.scatter(shared, hash=False)
    slide_futures = client.scatter(list(slides), hash=False)
    options = dataclasses.asdict(settings)
    futures = [
        client.submit(_remote_task, task, slide, shared_future, job, options, pure=False)
        for slide, job in zip(slide_futures, jobs, strict=True)
    ]
    index = {future.key: i for i, future in enumerate(futures)}
    results = [None] * len(futures)
    try:
        # stop at the first failure rather than after every slide
        for future in distributed.as_completed(futures):
            i = index[future.key]
            with naming_slide(i, len(slides), function):
                results[i] = future.result()
        return results
    finally:
        client.cancel([*futures, *slide_futures, shared_future])


def _remote_task(task, slide, shared, job: dict, options: dict):
    """A worker's task: the caller's ``sth.settings``, then ``task`` on one slide."""
    for name, value in options.items():
        setattr(settings, name, value)
    return task(slide, shared, **job)
