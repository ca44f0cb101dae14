"""The package logger (``logging.getLogger("st_from_he")``) and a timer for long steps."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

logger = logging.getLogger("st_from_he")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextmanager
def timed(what: str):
    """Log the start and end of a long step, with its duration."""
    logger.info("%s ...", what)
    start = time.perf_counter()
    yield
    logger.info("%s: done in %.1f s", what, time.perf_counter() - start)
