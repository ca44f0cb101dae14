"""The count-noise ceiling: how well a perfect predictor could correlate with measurements this noisy."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from st_from_he.pp._normalize import TARGET_SUM  # the evaluation protocol: normalize_total(1e4), log1p


def _lognorm(counts: sparse.csr_matrix) -> sparse.csr_matrix:
    """``log1p`` CP10k of a spots x genes count matrix (library size over all its genes)."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    x = sparse.diags(scale) @ counts
    return x.log1p()


def noise_ceiling(counts, cols: np.ndarray | None = None, *, n_repeats: int = 3, seed: int = 0) -> np.ndarray:
    """Per-gene PCC that a perfect predictor of expected expression could reach against these counts.

    Each spot's counts are split in two halves by binomial thinning (each molecule goes to either half with
    probability 1/2), so the halves are independent measurements of the same spots at half depth that share only
    the spots' expected expression. Their covariance across spots (of ``log1p`` CP10k, the evaluation's targets)
    estimates the variance of that shared signal; divided by the variance of the full-depth targets it gives the
    share of their variance that is signal, and its square root is the correlation between the expected expression
    and the measurement: no predictor scores higher than this on average, however good. (This covariance form stays
    close to the truth at a few hundred UMI per spot, where the Spearman-Brown correction of the halves' correlation
    overestimates: checked on Poisson-simulated spots in the tests.) Genes whose halves do not co-vary get 0. It is
    an estimate: with a few hundred spots each gene's value is uncertain by about 0.1, a mean over 50 genes much less.

    Parameters
    ----------
    counts
        Raw counts, spots x genes (dense or sparse), with every measured gene (library sizes are taken over all).
    cols
        Columns (genes) to score; ``None`` scores all.
    n_repeats
        Random splits averaged.
    seed
        Seed of the splits.

    Returns
    -------
    float64 array, one ceiling per scored gene, in ``[0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> import st_from_he as sth
    >>> rng = np.random.default_rng(0)
    >>> rates = rng.gamma(2.0, 1.0, size=(300, 1)) * np.array([[0.5, 5.0, 50.0]])  # 3 genes, 300 spots
    >>> counts = rng.poisson(np.hstack([rates, np.full((300, 1), 500.0)]))  # plus a flat gene for the library size
    >>> ceiling = sth.tl.noise_ceiling(counts, [0, 1, 2])
    >>> bool(ceiling[0] < ceiling[1] < ceiling[2])  # deeper genes allow more
    True
    """
    x = sparse.csr_matrix(counts)
    if x.nnz and (x.data.min() < 0 or not np.all(np.equal(np.mod(x.data, 1), 0))):
        raise ValueError("The noise ceiling needs raw counts: non-negative whole numbers.")
    x.data = x.data.astype(np.int64)
    rng = np.random.default_rng(seed)
    cols = np.arange(x.shape[1]) if cols is None else np.asarray(cols)
    full = _lognorm(x.astype(np.float64))[:, cols].toarray()
    signal = np.zeros(len(cols))
    for _ in range(n_repeats):
        half = x.copy()
        half.data = rng.binomial(x.data, 0.5)
        a = _lognorm(half.astype(np.float64))[:, cols].toarray()
        b = _lognorm((x - half).astype(np.float64))[:, cols].toarray()
        signal += ((a - a.mean(0)) * (b - b.mean(0))).mean(0) / n_repeats
    variance = full.var(0)
    share = np.divide(signal, variance, out=np.zeros_like(signal), where=variance > 1e-12)
    return np.sqrt(np.clip(share, 0.0, 1.0))
