"""Docstring fragments shared by several functions, inserted with :func:`inject_docs`."""

from __future__ import annotations

from collections.abc import Callable

FRAGMENTS = {
    "measured_params": """\
    layer
        Layer of the measured table holding raw counts; ``None`` uses ``X``.
    normalize
        How measured values become targets: ``None`` normalises raw counts to ``log1p`` CP10k and refuses other
        values, ``True`` normalises any non-negative values, ``False`` takes them as they are (see
        :func:`~st_from_he.tl.evaluate`).""",
    "plot_output": """\
    return_fig
        Return the :class:`~matplotlib.figure.Figure`.
    save
        File to save the figure to (format from the suffix).

    Returns
    -------
    The figure if ``return_fig``, else ``None``.""",
}


def inject_docs(func: Callable) -> Callable:
    """Replace ``{name}`` placeholders of :data:`FRAGMENTS` in ``func``'s docstring (other braces are left alone)."""
    doc = func.__doc__ or ""
    for name, text in FRAGMENTS.items():
        doc = doc.replace(f"    {{{name}}}", text)
    func.__doc__ = doc
    return func
