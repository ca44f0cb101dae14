"""Reader for the legacy Spatial Transcriptomics layout (counts TSV, spot-detector selection file, H&E image)."""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._validate import check_id, check_number, check_raw_counts

from ._image import _check_sample_id, log_pixel_size, read_image_levels
from ._resolution import SPOT_DIAMETER_UM, check_pixel_size, implied_pixel_size, infer_pixel_size
from ._section import build_section

_POSITION = re.compile(r"^\d+x\d+$")
_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def read_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path,
    *,
    sample_id: str,
    pixel_size_um: float | None = None,
    patient_id: str | None = None,
):
    """Read one legacy Spatial Transcriptomics section (the her2st layout) into :class:`~spatialdata.SpatialData`.

    Counts rows are joined to the spot file by ``f"{x}x{y}"`` (array column x, array row y). Spots under tissue
    without a count row, and count rows without a selected spot, are dropped and reported; rows are never matched by
    position.

    Parameters
    ----------
    counts
        Tab-separated spots x genes raw counts, row index ``"{x}x{y}"``, columns gene symbols (optionally gzipped).
    spots
        Spot-detector selection file with columns ``x, y`` (integer array coordinates), ``pixel_x, pixel_y`` and
        optionally ``selected`` (1 = under tissue).
    image
        The H&E image of the section (JPEG, PNG or TIFF), in whose pixels ``pixel_x, pixel_y`` are given.
    sample_id
        Section id; it names the elements (``f"{sample_id}_image"``, ``f"{sample_id}_spots"``) and the coordinate
        system.
    pixel_size_um
        Micrometres per pixel of ``image``. ``None`` reads it from the file's metadata or, failing that, infers it
        from the spot grid: the pixels per step of the array coordinates, 200 um on the 1k array and 100 um on the
        2k array (told apart by the spot layout; logged). A given or file value more than 25 % away from the one the
        grid implies is used, with a ``UserWarning``.
    patient_id
        The patient the section comes from, written to ``obs["patient"]``; ``None`` takes ``sample_id`` (each
        section its own patient).

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with image ``f"{sample_id}_image"``, circles ``f"{sample_id}_spots"`` of 100 um
    diameter and table ``"table"`` (raw integer counts in ``X``, int32 or int64 where a count exceeds int32;
    ``obs["sample"]``, ``obs["patient"]``, ``obs["array_col"]``, ``obs["array_row"]``, spot centres in pixels in
    ``obsm["spatial"]``). Each spot's identity is its array position: ``obs["spot_id"]`` and the circles' index are
    ``f"{x}x{y}"`` as in the counts file, and ``obs_names`` are ``f"{sample_id}_{x}x{y}"``, so they stay the same
    when the section is read again with other spots left out.

    Raises
    ------
    ValueError
        For files that are empty, truncated or not tab-separated, counts that are not raw counts (NaN, negative or
        fractional; the message names the gene and spot), a counts index that is not ``"{x}x{y}"``, spot files
        lacking columns or listing a position twice, and counts and spots that share no position.

    Examples
    --------
    >>> import st_from_he as sth
    >>> d = "../shared/data/her2st/C6"
    >>> sdata = sth.io.read_st(f"{d}/C6_counts.tsv.gz", f"{d}/C6_spots.tsv", f"{d}/C6_HE.jpg", sample_id="C6")
    >>> sdata.tables["table"].n_obs
    178
    >>> sdata.tables["table"].obs["spot_id"].iloc[0]
    '10x15'
    """
    check_id(sample_id, "sample_id")
    _check_sample_id(sample_id)
    check_id(patient_id, "patient_id", allow_none=True)
    pixel_size_um = check_number(pixel_size_um, "pixel_size_um", allow_none=True)
    for label, path in (("counts", counts), ("spots", spots), ("image", image)):
        if not isinstance(path, str | Path):
            raise TypeError(f"`{label}` must be a file path, got {type(path).__name__}.")
        if not Path(path).is_file():
            raise FileNotFoundError(f"The {label} file {str(path)!r} of sample {sample_id!r} does not exist.")
    count_table = _read_count_file(counts)
    spot_table = _read_spot_file(spots)
    levels, file_pixel_size = read_image_levels(image)

    shared = count_table.index.intersection(spot_table.index, sort=False)
    no_counts = spot_table.index.difference(count_table.index)
    no_spot = count_table.index.difference(spot_table.index)
    if len(shared) == 0:
        raise ValueError(
            f"Sample {sample_id!r}: no count row matches a selected spot: the rows of the counts file {str(counts)!r} "
            f"(e.g. {list(count_table.index[:3])}) and the selected positions of the spot file {str(spots)!r} (e.g. "
            f"{list(spot_table.index[:3])}) share no '{{x}}x{{y}}' position. Are both files from the same section?"
        )
    if len(no_counts):
        logger.info(
            "%s: %d selected spot(s) have no count row and are dropped: %s",
            sample_id,
            len(no_counts),
            ", ".join(no_counts[:10]),
        )
    if len(no_spot):
        logger.info(
            "%s: %d count row(s) have no selected spot and are dropped: %s",
            sample_id,
            len(no_spot),
            ", ".join(no_spot[:10]),
        )
    spot_table = spot_table.loc[shared]
    count_table = count_table.loc[shared]
    spatial = spot_table[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    array_col, array_row = spot_table["x"].to_numpy(int), spot_table["y"].to_numpy(int)

    pixel_size_um, source = _resolution(sample_id, pixel_size_um, file_pixel_size, array_col, array_row, spatial)
    log_pixel_size(sample_id, pixel_size_um, source)

    obs = pd.DataFrame({"array_col": array_col, "array_row": array_row}, index=[f"{sample_id}_{i}" for i in shared])
    return build_section(
        sample_id,
        counts=count_table,
        obs=obs,
        spatial_px=spatial,
        levels=levels,
        pixel_size_um=pixel_size_um,
        spot_diameter_um=SPOT_DIAMETER_UM["st"],
        instance_ids=shared,
        patient=patient_id,
        where=f"Counts file {str(counts)!r}",
    )


def _resolution(sample_id, given, file_pixel_size, array_col, array_row, spatial) -> tuple[float, str]:
    """The pixel size to use and where it came from; a given or file value is cross-checked against the grid."""
    implied, grid = implied_pixel_size(spatial, "st", array_col, array_row)
    if given is not None:
        check_pixel_size(given, implied, sample=sample_id, source="given as `pixel_size_um`", grid=grid)
        return given, "given"
    if file_pixel_size is not None:
        check_pixel_size(file_pixel_size, implied, sample=sample_id, source="read from the image file", grid=grid)
        return file_pixel_size, "read from the image file"
    if implied is None:
        infer_pixel_size(spatial, "st")  # raises: too few spots to tell the grid
    return implied, f"inferred from the spot grid, {grid}"


def _read_tsv(path: str | Path, what: str, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` of a tab-separated file, with errors that name the file and the fix."""
    fix = "Re-download or re-export it."
    try:
        table = pd.read_csv(path, sep="\t", **kwargs)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"The {what} file {str(path)!r} is empty. {fix}") from err
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"The {what} file {str(path)!r} is truncated or not valid gzip ({err}). {fix}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"The {what} file {str(path)!r} is not a text (tab-separated) file ({err}). {fix}") from err
    except pd.errors.ParserError as err:
        raise ValueError(f"The {what} file {str(path)!r} is not a valid tab-separated table ({err}). {fix}") from err
    if table.shape[0] == 0:
        raise ValueError(f"The {what} file {str(path)!r} has a header but no rows. {fix}")
    return table


def _read_count_file(path: str | Path) -> pd.DataFrame:
    """Spots x genes counts indexed ``"{x}x{y}"``, checked to be raw counts (before any cast)."""
    counts = _read_tsv(path, "counts", index_col=0)
    counts.index = counts.index.astype(str)
    if counts.shape[1] == 0:
        raise ValueError(
            f"The counts file {str(path)!r} has no gene columns: is it tab-separated, spots x genes, with the spot "
            f"position ('10x15') in the first column?"
        )
    bad = ~counts.index.str.match(_POSITION)
    if bad.any():
        columns = pd.Index(counts.columns.astype(str))
        hint = (
            " It looks transposed (its columns are positions): save it as spots x genes."
            if columns.str.match(_POSITION).mean() > 0.5
            else ""
        )
        raise ValueError(
            f"The counts file {str(path)!r} has {int(bad.sum())} row name(s) that are not an array position "
            f"'{{x}}x{{y}}' such as '10x15': e.g. {list(counts.index[bad][:3])}.{hint}"
        )
    if counts.index.has_duplicates:
        raise ValueError(
            f"The counts file {str(path)!r} lists position(s) {list(counts.index[counts.index.duplicated()][:5])} "
            f"more than once; each spot must have one row."
        )
    text = [c for c in counts.columns if not pd.api.types.is_numeric_dtype(counts[c])]
    if text:
        column = counts[text[0]]
        example = column[pd.to_numeric(column, errors="coerce").isna() & column.notna()]
        raise ValueError(
            f"The counts file {str(path)!r} holds text in gene column(s) {text[:5]} "
            f"(e.g. {example.iloc[:1].to_dict()}); raw counts must be numbers."
        )
    check_raw_counts(counts.to_numpy(), where=f"Counts file {str(path)!r}", genes=counts.columns, spots=counts.index)
    # pandas renames a repeated column 'GENE' to 'GENE.1' without a word; take the header as written and say so
    header = _read_tsv(path, "counts", header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0, 1:]
    if len(header) == counts.shape[1] and header.duplicated().any():
        counts.columns = header.to_numpy()
        logger.warning(
            "Counts file %s names gene(s) %s more than once; the columns are kept apart as 'GENE', 'GENE-1'.",
            path,
            list(header[header.duplicated()].unique()[:5]),
        )
    return counts


def _read_spot_file(path: str | Path) -> pd.DataFrame:
    spots = _read_tsv(path, "spots")
    missing = [c for c in _SPOT_COLUMNS if c not in spots.columns]
    if missing:
        raise ValueError(
            f"Spot file {str(path)!r} lacks column(s) {missing}; found {list(spots.columns)}. A spot-detector "
            f"selection file is tab-separated with columns {list(_SPOT_COLUMNS)} (and optionally 'selected')."
        )
    for column in _SPOT_COLUMNS:
        values = pd.to_numeric(spots[column], errors="coerce")
        if values.isna().any():
            raise ValueError(
                f"Spot file {str(path)!r}: column {column!r} has missing or non-numeric values in "
                f"{int(values.isna().sum())} row(s) (e.g. row {int(np.flatnonzero(values.isna())[0])})."
            )
        spots[column] = values
    fractional = (spots["x"] % 1 != 0) | (spots["y"] % 1 != 0)
    if fractional.any():
        raise ValueError(
            f"Spot file {str(path)!r}: the array coordinates 'x', 'y' must be whole numbers (the refined ones belong "
            f"in 'new_x', 'new_y'); e.g. row {int(np.flatnonzero(fractional)[0])} has x = "
            f"{spots['x'][fractional].iloc[0]}, y = {spots['y'][fractional].iloc[0]}."
        )
    if "selected" in spots:
        spots = spots[spots["selected"] == 1]
        if spots.empty:
            raise ValueError(f"Spot file {str(path)!r} selects no spot (no row has selected = 1).")
    spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    if spots.index.has_duplicates:
        raise ValueError(
            f"Spot file {str(path)!r} lists array position(s) {list(spots.index[spots.index.duplicated()][:5])} "
            f"twice; each position must appear once."
        )
    return spots
