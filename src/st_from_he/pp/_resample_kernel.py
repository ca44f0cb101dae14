"""The patch resampling kernel, compiled by numba on first import and cached on disk.

Its own module, imported only when patches are first cut (numba is slow to import), with the functions at module
level: numba cannot reuse the on-disk cache of functions defined inside another function, which then compiled
afresh in every process (2-3 s before the first patch).
"""

from __future__ import annotations

import math

import numba
import numpy as np

_njit = numba.njit(nogil=True, cache=True, fastmath=True)


@_njit
def filter_coefficients(start, scale, n_out):
    # Output pixel j has its centre at start + (j + 0.5) * scale in source coordinates; source pixel i has its
    # centre at i + 0.5. Triangle filter of half-width max(scale, 1) source pixels, weights normalised to 1.
    support = max(scale, 1.0)
    n_taps = int(math.ceil(2.0 * support))
    first = np.empty(n_out, np.int64)
    weights = np.zeros((n_out, n_taps), np.float32)
    for j in range(n_out):
        centre = start + (j + 0.5) * scale
        lo = int(math.floor(centre - support - 0.5)) + 1
        first[j] = lo
        total = 0.0
        for k in range(n_taps):
            d = abs(lo + k + 0.5 - centre) / support
            w = 1.0 - d if d < 1.0 else 0.0
            weights[j, k] = w
            total += w
        for k in range(n_taps):
            weights[j, k] = weights[j, k] / total
    return first, weights


@_njit
def resample(src, boxes, out, fill):
    # src: (C, H, W) uint8; boxes: (n, 4) float64 x0, y0, x1, y1 in src pixel coordinates; out: (n, C, S, S).
    n_ch, height, width = src.shape
    size_y, size_x = out.shape[2], out.shape[3]
    ffill = np.float32(fill)
    acc = np.empty(size_x, np.float32)
    for p in range(boxes.shape[0]):
        x0, y0, x1, y1 = boxes[p, 0], boxes[p, 1], boxes[p, 2], boxes[p, 3]
        xfirst, xw = filter_coefficients(x0, (x1 - x0) / size_x, size_x)
        yfirst, yw = filter_coefficients(y0, (y1 - y0) / size_y, size_y)
        kx, ky = xw.shape[1], yw.shape[1]
        row0 = yfirst[0]
        n_rows = yfirst[size_y - 1] + ky - row0
        col0 = xfirst[0]
        n_cols = xfirst[size_x - 1] + kx - col0
        inside = col0 >= 0 and col0 + n_cols <= width
        rel = xfirst - col0
        xwt = np.ascontiguousarray(xw.T)
        w0 = xwt[0]
        w1 = xwt[min(1, kx - 1)]
        padded = np.empty(n_cols, np.float32)
        tmp = np.empty((n_ch, n_rows, size_x), np.float32)
        # horizontal pass over the rows the vertical pass needs
        for c in range(n_ch):
            for r in range(n_rows):
                y = row0 + r
                trow = tmp[c, r]
                if y < 0 or y >= height:
                    trow[:] = ffill
                    continue
                srow = src[c, y]
                if inside and kx == 2:  # upsampling: two taps, the common case
                    for j in range(size_x):
                        q = xfirst[j]
                        trow[j] = w0[j] * np.float32(srow[q]) + w1[j] * np.float32(srow[q + 1])
                elif inside:
                    trow[:] = 0.0
                    for k in range(kx):
                        wk = xwt[k]
                        for j in range(size_x):
                            trow[j] += wk[j] * np.float32(srow[xfirst[j] + k])
                else:  # the window reaches beyond the image: pad the row with white first
                    for q in range(n_cols):
                        x = col0 + q
                        padded[q] = np.float32(srow[x]) if (x >= 0 and x < width) else ffill
                    trow[:] = 0.0
                    for k in range(kx):
                        wk = xwt[k]
                        for j in range(size_x):
                            trow[j] += wk[j] * padded[rel[j] + k]
        # vertical pass; weights are non-negative and sum to 1, so values stay within 0..255 (+0.5 rounds)
        for c in range(n_ch):
            for i in range(size_y):
                acc[:] = 0.5
                base = yfirst[i] - row0
                for k in range(ky):
                    w = yw[i, k]
                    trow = tmp[c, base + k]
                    for j in range(size_x):
                        acc[j] += w * trow[j]
                orow = out[p, c, i]
                for j in range(size_x):
                    orow[j] = np.int32(acc[j])
