"""Reader for the legacy Spatial Transcriptomics layout (counts TSV, spot-detector selection file, H&E image)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from st_from_he._logging import logger

from ._image import log_pixel_size, read_image_levels
from ._resolution import SPOT_DIAMETER_UM, infer_pixel_size
from ._section import build_section


def read_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path,
    *,
    sample_id: str,
    pixel_size_um: float | None = None,
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
        Spot-detector selection file with columns ``x, y, pixel_x, pixel_y`` and optionally ``selected``
        (1 = under tissue).
    image
        The H&E image of the section (JPEG, PNG or TIFF), in whose pixels ``pixel_x, pixel_y`` are given.
    sample_id
        Section id; it names the elements (``f"{sample_id}_image"``, ``f"{sample_id}_spots"``) and the coordinate
        system.
    pixel_size_um
        Micrometres per pixel of ``image``. ``None`` reads it from the file's metadata or, failing that, infers it
        from the 200 um spot grid (logged).

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with image ``f"{sample_id}_image"``, circles ``f"{sample_id}_spots"`` of 100 um
    diameter and table ``"table"`` (raw integer counts in ``X``, ``obs["sample"]``, ``obs["array_col"]``,
    ``obs["array_row"]``, spot centres in pixels in ``obsm["spatial"]``).

    Examples
    --------
    >>> import st_from_he as sth
    >>> d = "../shared/data/her2st/C6"
    >>> sdata = sth.io.read_st(f"{d}/C6_counts.tsv.gz", f"{d}/C6_spots.tsv", f"{d}/C6_HE.jpg", sample_id="C6")
    >>> sdata.tables["table"].n_obs
    178
    """
    for label, path in (("counts", counts), ("spots", spots), ("image", image)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"The {label} file {str(path)!r} of sample {sample_id!r} does not exist.")
    count_table = pd.read_csv(counts, sep="\t", index_col=0)
    count_table.index = count_table.index.astype(str)
    spot_table = _read_spot_file(spots)
    levels, file_pixel_size = read_image_levels(image)

    shared = count_table.index.intersection(spot_table.index)
    no_counts = spot_table.index.difference(count_table.index)
    no_spot = count_table.index.difference(spot_table.index)
    if len(shared) == 0:
        raise ValueError(
            f"Sample {sample_id!r}: no count row matches a selected spot; the counts index should look like "
            f"'10x15' (array x 'x' array y), e.g. {list(count_table.index[:3])} vs {list(spot_table.index[:3])}."
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

    if pixel_size_um is not None:
        source = "given"
    elif file_pixel_size is not None:
        pixel_size_um, source = file_pixel_size, "read from the image file"
    else:
        pixel_size_um, source = infer_pixel_size(spatial, "st"), "inferred from the 200 um spot grid"
    log_pixel_size(sample_id, pixel_size_um, source)

    obs = pd.DataFrame(
        {"array_col": spot_table["x"].to_numpy(int), "array_row": spot_table["y"].to_numpy(int)},
        index=[f"{sample_id}_{i}" for i in shared],
    )
    return build_section(
        sample_id,
        counts=count_table,
        obs=obs,
        spatial_px=spatial,
        levels=levels,
        pixel_size_um=pixel_size_um,
        spot_diameter_um=SPOT_DIAMETER_UM["st"],
    )


def _read_spot_file(path: str | Path) -> pd.DataFrame:
    spots = pd.read_csv(path, sep="\t")
    missing = {"x", "y", "pixel_x", "pixel_y"} - set(spots.columns)
    if missing:
        raise ValueError(f"Spot file {str(path)!r} lacks column(s) {sorted(missing)}; found {list(spots.columns)}.")
    if "selected" in spots:
        spots = spots[spots["selected"] == 1]
    spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    if spots.index.duplicated().any():
        raise ValueError(
            f"Spot file {str(path)!r} lists array position(s) twice: {list(spots.index[spots.index.duplicated()][:5])}."
        )
    return spots
