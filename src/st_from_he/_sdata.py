"""The data model shared by readers, preprocessing and tools.

A section (sample) ``S`` in a :class:`~spatialdata.SpatialData` is:

- an image element ``f"{S}_image"`` (multiscale, dask-backed, ``c, y, x``);
- a circles element ``f"{S}_spots"`` (spot centres and radius, in pixels of that image);
- rows of the table ``"table"`` annotating those circles: ``obs["region"]`` names the circles element,
  ``obs["spot_id"]`` is the circle's index, ``obs["sample"]`` is ``S``, ``X`` holds raw counts and
  ``obsm["spatial"]`` the spot centres in pixels (x = column, y = row).

Both elements carry a :class:`~spatialdata.transformations.Scale` to the coordinate system named ``S``, whose unit
is the micrometre: this transformation is where the package keeps each image's resolution, and it travels with the
elements through zarr.

Other layouts are read the spatialdata way (:func:`table_sections`): a spot's section is ``obs["sample"]`` when
present, else the region (circles element) it annotates (the table's ``spatialdata_attrs``); its image is the one
sharing a coordinate system with those circles (spatialdata-io's ``f"{S}_full_image"``, or a downscaled image with
its ``Scale``); its centre is its circle's, carried into the image's pixels by the transformations. Without a
micrometre system the resolution comes from, in order: the user's ``pixel_size_um``, Space Ranger's
``spot_diameter_fullres`` (65 um) and the Visium spot grid (:func:`section_resolution`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from st_from_he._validate import check_number

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

TABLE_KEY = "table"
PREDICTED_KEY = "predicted_expression"
SAMPLE_KEY = "sample"
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
SPATIAL_KEY = "spatial"
UNS_KEY = "st_from_he"
"""``table.uns[UNS_KEY]`` holds the package's notes on a table, e.g. ``{"raw_counts": False}`` when ``X`` is not raw."""


def image_key(sample: str) -> str:
    """Key of the image element of ``sample``."""
    return f"{sample}_image"


def spots_key(sample: str) -> str:
    """Key of the circles element of ``sample``'s measured spots."""
    return f"{sample}_spots"


def micrometre_transform(pixel_size_um: float):
    """Transformation from an element's pixels to its section's micrometre coordinate system."""
    from spatialdata.transformations import Scale

    return Scale([pixel_size_um, pixel_size_um], axes=("y", "x"))


@dataclass(frozen=True)
class Section:
    """Where one section's pieces live in a :class:`~spatialdata.SpatialData`.

    Attributes
    ----------
    sample
        The section's id: ``obs["sample"]`` of its spots, else the region (shapes element) they annotate.
    image_key
        Its H&E image element.
    pixel_size_um
        Micrometres per pixel of the image's finest level.
    shapes_key
        The circles element of its spots, if any.
    coordinate_system
        A coordinate system the image and the circles share (their positions are compared there).
    resolution_source
        Where ``pixel_size_um`` came from, for messages.
    """

    sample: str
    image_key: str
    pixel_size_um: float
    shapes_key: str | None = None
    coordinate_system: str | None = None
    resolution_source: str = ""


# --------------------------------------------------------------------------------------------------------------------
# Finding elements the spatialdata way: tables annotate regions, elements meet in coordinate systems
# --------------------------------------------------------------------------------------------------------------------
def find_table(sdata: SpatialData, table_key: str | None = None, *, what: str = "") -> str:
    """The key of the table to use: ``table_key`` if given, else ``"table"``, else the only measured table.

    ``spatialdata.concatenate`` without ``concatenate_tables=True`` leaves one table per input (``table_0``,
    ``table_1``, ...): the message then says how to join them.

    Parameters
    ----------
    sdata
        The data.
    table_key
        The table asked for, or ``None`` for the obvious one.
    what
        What the table is for, for the message (e.g. ``"measured"``).
    """
    if table_key is not None:
        check_table_key(sdata, table_key, what=what)
        return table_key
    tables = list(sdata.tables)
    if TABLE_KEY in tables:
        return TABLE_KEY
    own = [k for k in tables if "predict_expression" not in sdata.tables[k].uns]
    if len(own) == 1:
        return own[0]
    if not own:
        raise KeyError(f"No {what + ' ' if what else ''}table in the SpatialData; tables present: {tables}.")
    hint = ""
    if all(k.startswith("table_") for k in own):
        hint = (
            " They look like the tables of `spatialdata.concatenate([...])` without `concatenate_tables=True`: "
            "concatenate with `concatenate_tables=True` (one table for all sections), or use `sth.io.concatenate`."
        )
    raise KeyError(f"Several tables {own}: pass `table_key=` to choose one.{hint}")


def table_attrs(table: AnnData) -> tuple[str | None, str | None, list[str]]:
    """``(region_key, instance_key, regions)`` of a table's spatialdata annotation; ``(None, None, [])`` without one."""
    attrs = table.uns.get("spatialdata_attrs") or {}
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    region = attrs.get("region")
    regions = [] if region is None else [region] if isinstance(region, str) else [str(r) for r in region]
    if region_key is not None and region_key not in table.obs:
        region_key = None
    if instance_key is not None and instance_key not in table.obs:
        instance_key = None
    return region_key, instance_key, regions


def spot_regions(table: AnnData) -> np.ndarray | None:
    """The element each row annotates (the table's region column), or ``None`` if the table annotates nothing."""
    region_key, _, regions = table_attrs(table)
    if region_key is not None:
        return table.obs[region_key].astype(str).to_numpy()
    if len(regions) == 1:
        return np.full(table.n_obs, regions[0])
    return None


def spot_sections(table: AnnData, *, table_key: str = TABLE_KEY) -> np.ndarray:
    """The section of every row: ``obs["sample"]`` when present, else the region (shapes element) it annotates.

    Raises
    ------
    KeyError
        If the table has neither.
    """
    if SAMPLE_KEY in table.obs:
        return table.obs[SAMPLE_KEY].astype(str).to_numpy()
    regions = spot_regions(table)
    if regions is None:
        raise KeyError(
            f"Table {table_key!r} tells no spot's section: it has no obs[{SAMPLE_KEY!r}] column and annotates no "
            f"element (no spatialdata region). Add obs[{SAMPLE_KEY!r}], or parse it with "
            f"`spatialdata.models.TableModel.parse(table, region=..., region_key=..., instance_key=...)`."
        )
    return regions


def samples(sdata: SpatialData, table_key: str | None = TABLE_KEY) -> list[str]:
    """Section ids of ``sdata``: those of the table's rows (see :func:`spot_sections`), else those of its images."""
    if table_key is not None and table_key in sdata.tables:
        return list(dict.fromkeys(spot_sections(sdata.tables[table_key], table_key=table_key)))
    suffix = image_key("")
    return [key.removesuffix(suffix) for key in sdata.images if key.endswith(suffix)]


def table_rows(table: AnnData, sample: str) -> np.ndarray:
    """Integer positions of the table rows of ``sample``."""
    return np.flatnonzero(spot_sections(table) == sample)


def systems_of(sdata: SpatialData, element_key: str) -> dict:
    """The transformations of an element, by coordinate system."""
    from spatialdata.transformations import get_transformation

    return dict(get_transformation(sdata[element_key], get_all=True))


def affine_xy(transformation) -> np.ndarray:
    """3x3 (x, y) affine matrix of a spatialdata transformation."""
    return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def element_to_element(
    sdata: SpatialData, source: str, target: str, coordinate_system: str | None = None
) -> tuple[np.ndarray, str]:
    """3x3 matrix from ``source``'s intrinsic (x, y) to ``target``'s, through a coordinate system both have.

    Parameters
    ----------
    coordinate_system
        The system to go through; default: the first one they share (any shared one gives the same map when the
        data are consistent).

    Returns
    -------
    ``(matrix, coordinate_system)``.
    """
    src, dst = systems_of(sdata, source), systems_of(sdata, target)
    shared = [cs for cs in src if cs in dst]
    if coordinate_system is not None:
        if coordinate_system not in shared:
            raise ValueError(
                f"Elements {source!r} and {target!r} do not share the coordinate system {coordinate_system!r} "
                f"(`coordinate_system`); {source!r} is in {sorted(src)}, {target!r} in {sorted(dst)}."
            )
        shared = [coordinate_system]
    if not shared:
        raise ValueError(
            f"Elements {source!r} and {target!r} share no coordinate system ({source!r}: {sorted(src)}, "
            f"{target!r}: {sorted(dst)}), so the spots cannot be placed on the image. Give them a common one with "
            f"`spatialdata.transformations.set_transformation`."
        )
    cs = shared[0]
    return np.linalg.inv(affine_xy(dst[cs])) @ affine_xy(src[cs]), cs


def linear_scale(matrix: np.ndarray, what: str) -> float:
    """The isotropic scale of a 3x3 affine matrix; non-square scaling is refused."""
    sx, sy = float(np.hypot(*matrix[:2, 0])), float(np.hypot(*matrix[:2, 1]))
    if not np.isclose(sx, sy, rtol=1e-3):
        raise ValueError(f"{what} has non-square pixels ({sx:.4g} x {sy:.4g}); this is not supported.")
    return sx


def micrometre_system(sdata: SpatialData, image: str) -> str | None:
    """The micrometre coordinate system of an image, if it has one: ``S`` for an image ``f"{S}_image"`` in ``S``.

    This is how the package's readers record each section's resolution (see the module's docstring); other tools'
    systems (e.g. spatialdata-io's, in full-resolution pixels) carry no unit the package could trust.
    """
    for cs in systems_of(sdata, image):
        if image == image_key(cs):
            return cs
    return None


def images_of_shapes(sdata: SpatialData, shapes_key: str, sample: str | None = None) -> list[str]:
    """Images sharing a coordinate system with ``shapes_key``: those named after ``sample`` first, finest first."""
    systems = set(systems_of(sdata, shapes_key))
    candidates = [key for key in sdata.images if systems & set(systems_of(sdata, key))]
    names = [n for n in (sample, shapes_key) if n]
    named = [k for k in candidates if any(k == image_key(n) or k.startswith(f"{n}_") for n in names)]
    if named:  # several sections may share one system (e.g. "global"): their names tell them apart
        candidates = named

    def pixel_area(key: str) -> float:  # circle units per image pixel, squared: smaller is finer
        matrix, _ = element_to_element(sdata, key, shapes_key)
        return abs(float(np.linalg.det(matrix[:2, :2])))

    return sorted(candidates, key=pixel_area)


VISIUM_SPOT_DIAMETER_FULLRES_UM = 65.0
"""Micrometres that Space Ranger's ``spot_diameter_fullres`` spans (10x: the diameter of a theoretical 65 um spot)."""


def _spot_diameter_fullres(sdata: SpatialData, table: AnnData | None, sample: str, shapes_key: str | None):
    """Space Ranger's ``spot_diameter_fullres`` in the circles' units, and where it was found; ``(None, "")`` if not.

    Looked up in the table's ``uns["spatial"][library]["scalefactors"]`` (scanpy's layout; the library named like
    the section or its circles, or the only one), then in the circles of spatialdata-io's Visium reader (their radius
    is ``spot_diameter_fullres / 2``; told by :func:`_spatialdata_io_visium`).
    """
    spatial = table.uns.get("spatial") if table is not None else None
    if isinstance(spatial, Mapping) and spatial:
        libraries = [k for k in (sample, shapes_key) if k in spatial] or (list(spatial) if len(spatial) == 1 else [])
        for library in libraries:
            factors = spatial[library].get("scalefactors", {}) if isinstance(spatial[library], Mapping) else {}
            if "spot_diameter_fullres" in factors:
                where = f"spot_diameter_fullres in table.uns['spatial'][{library!r}]['scalefactors']"
                return float(factors["spot_diameter_fullres"]), where
    if shapes_key is not None and _spatialdata_io_visium(sdata, shapes_key):
        radius = sdata.shapes[shapes_key].get("radius")
        if radius is not None and len(radius):
            return 2 * float(np.median(radius)), f"the radius of spatialdata-io's Visium circles {shapes_key!r}"
    return None, ""


def _spatialdata_io_visium(sdata: SpatialData, shapes_key: str) -> bool:
    """Whether circles come from spatialdata-io's Visium reader.

    Told by the reader's record in ``sdata.attrs`` (which ``spatialdata.concatenate`` drops unless ``attrs_merge``
    is given) or by the reader's coordinate systems ``f"{S}_downscaled_hires"`` / ``_lowres``.
    """
    if sdata.attrs.get("spatialdata_io_reader") == "visium":
        return True
    systems = systems_of(sdata, shapes_key)
    return any(f"{shapes_key}_downscaled_{res}" in systems for res in ("hires", "lowres"))


def _grid_pixel_size(table: AnnData | None, rows: np.ndarray | None, centres_px: np.ndarray | None):
    """Micrometres per image pixel from a Visium array grid (``array_row``/``array_col``), ``(None, "")`` if none.

    Only a hexagonal (Visium) array is recognised from its coordinates (``array_row + array_col`` of one parity);
    legacy ST arrays come through the package's readers, which record their resolution.
    """
    from st_from_he.io._resolution import layout_name, pixel_size_from_array

    if table is None or rows is None or centres_px is None or not {"array_row", "array_col"} <= set(table.obs):
        return None, ""
    col = pd.to_numeric(table.obs["array_col"].iloc[rows], errors="coerce").to_numpy(float)
    row = pd.to_numeric(table.obs["array_row"].iloc[rows], errors="coerce").to_numpy(float)
    ok = np.isfinite(col) & np.isfinite(row) & np.isfinite(centres_px).all(axis=1)
    if ok.sum() < 3 or len(np.unique((col[ok] + row[ok]) % 2)) != 1:
        return None, ""
    implied = pixel_size_from_array(col[ok], row[ok], centres_px[ok], "visium")
    return (implied, f"the spot grid ({layout_name('visium')})") if implied else (None, "")


def section_resolution(
    sdata: SpatialData,
    image: str,
    sample: str,
    *,
    shapes_key: str | None = None,
    table: AnnData | None = None,
    rows: np.ndarray | None = None,
    centres_px: np.ndarray | None = None,
    pixel_size_um: float | None = None,
) -> tuple[float, str]:
    """Micrometres per pixel of ``image``'s finest level, and where the number came from.

    The first of these that applies:

    1. ``pixel_size_um`` given by the user;
    2. the image's micrometre coordinate system (the package's readers, see :func:`micrometre_system`);
    3. Space Ranger's ``spot_diameter_fullres`` (65 um, see :data:`VISIUM_SPOT_DIAMETER_FULLRES_UM`), from the
       table's ``uns["spatial"]`` or the radius of spatialdata-io's Visium circles, carried into the image's pixels
       by the transformations (so a downscaled image gets its own, coarser, pixel size);
    4. the Visium spot grid: the spots' ``array_row``/``array_col`` against their centres in the image.

    Raises
    ------
    ValueError
        If none applies; the message asks for ``pixel_size_um=``.
    """
    if pixel_size_um is not None:
        return check_number(pixel_size_um, "pixel_size_um", unit="micrometres per pixel"), "given as `pixel_size_um`"
    cs = micrometre_system(sdata, image)
    if cs is not None:
        return linear_scale(affine_xy(systems_of(sdata, image)[cs]), f"Image {image!r}"), f"coordinate system {cs!r}"
    diameter, where = _spot_diameter_fullres(sdata, table, sample, shapes_key)
    if diameter is not None and diameter > 0:
        to_shapes, _ = element_to_element(sdata, image, shapes_key)
        return VISIUM_SPOT_DIAMETER_FULLRES_UM / diameter * linear_scale(to_shapes, f"Image {image!r}"), where
    implied, where = _grid_pixel_size(table, rows, centres_px)
    if implied is not None:
        return implied, where
    raise ValueError(
        f"Image {image!r} (section {sample!r}) has no transformation to the micrometre coordinate system "
        f"{sample!r}, so its resolution is unknown: the `sth.io` readers record one; nor are there Visium scale "
        f"factors (spot_diameter_fullres) or a Visium spot grid to infer it from. Pass `pixel_size_um=` "
        f"(micrometres per pixel of the image's finest level; a dict by section for several)."
    )


def pixel_size_um(sdata: SpatialData, element_key: str, sample: str) -> float:
    """Micrometres per pixel of an image or shapes element, read from its transformation to ``sample``."""
    transforms = systems_of(sdata, element_key)
    if sample not in transforms:
        raise ValueError(
            f"Element {element_key!r} has no transformation to the micrometre coordinate system {sample!r}, so its "
            f"resolution is unknown. Read it with an `sth.io` reader or `sth.pp.attach_histology(..., "
            f"pixel_size_um=...)`, which record it, or pass `pixel_size_um=`."
        )
    return linear_scale(affine_xy(transforms[sample]), f"Element {element_key!r}")


def get_section(sdata: SpatialData, sample: str, *, shapes_key: str | None = None) -> Section:
    """The section ``sample`` in the package's own layout (image ``f"{S}_image"`` in micrometre system ``S``)."""
    img = image_key(sample)
    if img not in sdata.images:
        raise KeyError(
            f"No image {img!r} for sample {sample!r}; images present: {sorted(sdata.images)}. Every section needs its "
            f"H&E image."
        )
    shapes = spots_key(sample) if shapes_key is None else shapes_key
    if shapes not in sdata.shapes:
        if shapes_key is not None:
            raise KeyError(f"No shapes element {shapes_key!r}; shapes present: {sorted(sdata.shapes)}.")
        shapes = None
    return Section(sample, img, pixel_size_um(sdata, img, sample), shapes, sample, f"coordinate system {sample!r}")


def per_section(value, sample: str):
    """``value`` for ``sample``: the value itself, or its entry when a dict by section id was given."""
    return value.get(sample) if isinstance(value, Mapping) else value


def check_image_key(sdata: SpatialData, image) -> str:
    """``image`` if ``sdata`` has that image element; clear errors otherwise."""
    if not isinstance(image, str):
        raise TypeError(
            f"`image_key` must be the name of an image element (or a dict of them by section), got "
            f"{type(image).__name__} {image!r}; images present: {sorted(sdata.images)}."
        )
    if image not in sdata.images:
        hint = (
            f" Did you mean {image_key(image)!r} (the image of section {image!r})?"
            if image_key(image) in sdata.images
            else ""
        )
        raise KeyError(f"No image element {image!r} (`image_key`); images present: {sorted(sdata.images)}.{hint}")
    return image


def _image_for(sdata, sample: str, shapes: list[str], image: str | None) -> str:
    if image is not None:
        return check_image_key(sdata, image)
    if image_key(sample) in sdata.images:  # the package's own layout
        return image_key(sample)
    found = images_of_shapes(sdata, shapes[0], sample) if shapes else []
    if not found:
        where = (
            f"coordinate systems {sorted(systems_of(sdata, shapes[0]))} of its circles {shapes[0]!r}" if shapes else ""
        )
        raise KeyError(
            f"No image for section {sample!r}: no image {image_key(sample)!r}{' and none in the ' + where if where else ''}; "
            f"images present: {sorted(sdata.images)}. Pass `image_key=`."
        )
    return found[0]


def table_sections(
    sdata: SpatialData,
    table_key: str,
    *,
    rows: np.ndarray | None = None,
    image_key=None,
    coordinate_system: str | None = None,
    pixel_size_um=None,
) -> tuple[dict[str, Section], np.ndarray, np.ndarray]:
    """The sections of a table's spots, each spot's section, and each spot's centre in pixels of its image.

    A spot's section is ``obs["sample"]``, else the region it annotates (:func:`spot_sections`). Its centre is the
    centre of the circle it annotates (matched by the table's instance key), carried into the pixels of the
    section's image by both elements' transformations; rows annotating no shapes element take ``obsm["spatial"]``
    as pixels of the image. The image is ``image_key`` (a name, or a dict by section), else the package's
    ``f"{S}_image"``, else the finest image sharing a coordinate system with the circles (those named after the
    section first). The resolution follows :func:`section_resolution`.

    Parameters
    ----------
    rows
        Only these rows (integer positions); default all.
    coordinate_system
        Where circles and image meet; default the first system they share.
    pixel_size_um
        Micrometres per pixel of the image (a number, or a dict by section); default: found.

    Returns
    -------
    ``(sections, sample_of, centres)``: sections by id (in order of first appearance), the section of each of
    ``rows``, and their centres ``(n, 2)`` (x, y) in pixels of their section's image (finest level).
    """
    table = sdata.tables[table_key]
    rows = np.arange(table.n_obs) if rows is None else np.asarray(rows, dtype=int)
    sample_of = spot_sections(table, table_key=table_key)[rows]
    regions = spot_regions(table)
    regions = regions[rows] if regions is not None else None
    _, instance_key, _ = table_attrs(table)
    centres = np.full((len(rows), 2), np.nan)
    sections: dict[str, Section] = {}
    present = list(dict.fromkeys(sample_of))
    if isinstance(image_key, str) and len(present) > 1:
        raise ValueError(
            f"`image_key` names one image, {image_key!r}, but table {table_key!r} holds {len(present)} sections "
            f"{present}: pass a dict {{section: image}} (or select one section with `samples=`)."
        )
    for sample in present:
        mine = np.flatnonzero(sample_of == sample)
        shapes = [] if regions is None else [r for r in dict.fromkeys(regions[mine]) if r in sdata.shapes]
        image = _image_for(sdata, sample, shapes, per_section(image_key, sample))
        used = None
        for shapes_key in shapes:
            sel = mine[regions[mine] == shapes_key]
            matrix, used = element_to_element(sdata, shapes_key, image, coordinate_system)
            try:
                xy = _circle_centres(sdata, shapes_key, table, rows[sel], instance_key, table_key)
            except KeyError as error:
                # the package's layout documents obsm["spatial"] as pixels of the image: use it, saying why
                if SPATIAL_KEY not in table.obsm or micrometre_system(sdata, image) is None:
                    raise
                from st_from_he._logging import logger

                logger.warning(
                    "%s Taking the spot centres from obsm[%r] (pixels of %r).", error.args[0], SPATIAL_KEY, image
                )
                centres[sel] = np.asarray(table.obsm[SPATIAL_KEY], dtype=float)[rows[sel], :2]
                continue
            centres[sel] = xy @ matrix[:2, :2].T + matrix[:2, 2]
        rest = mine if regions is None else mine[~np.isin(regions[mine], shapes)]
        if len(rest):
            if SPATIAL_KEY not in table.obsm:
                raise KeyError(
                    f"Table {table_key!r}: spots of section {sample!r} annotate no shapes element and the table has no "
                    f"obsm[{SPATIAL_KEY!r}], so their centres are unknown."
                )
            centres[rest] = np.asarray(table.obsm[SPATIAL_KEY], dtype=float)[rows[rest], :2]
        px, source = section_resolution(
            sdata,
            image,
            sample,
            shapes_key=shapes[0] if shapes else None,
            table=table,
            rows=rows[mine],
            centres_px=centres[mine],
            pixel_size_um=per_section(pixel_size_um, sample),
        )
        sections[sample] = Section(sample, image, px, shapes[0] if shapes else None, used, source)
    return sections, sample_of, centres


def _circle_centres(sdata, shapes_key: str, table, rows: np.ndarray, instance_key: str | None, table_key: str):
    """Centres (x, y), in the circles' own units, of the circles that ``rows`` of the table annotate."""
    shapes = sdata.shapes[shapes_key]
    geometry = shapes.geometry
    points = geometry if (geometry.geom_type == "Point").all() else geometry.centroid
    xy = np.column_stack([points.x.to_numpy(float), points.y.to_numpy(float)])
    if instance_key is None:
        if len(rows) != len(shapes):
            raise KeyError(
                f"Table {table_key!r} has no instance key to match its rows to the circles of {shapes_key!r}."
            )
        return xy
    ids = pd.Index(table.obs[instance_key].iloc[rows].to_numpy())
    position = shapes.index.get_indexer(ids)
    if (position < 0).any():  # instance ids may be strings on one side and numbers on the other
        position = pd.Index(shapes.index.astype(str)).get_indexer(ids.astype(str))
    if (position < 0).any():
        raise KeyError(
            f"Table {table_key!r}: {int((position < 0).sum())} spot(s) annotate circles absent from {shapes_key!r} "
            f"(instance ids e.g. {list(ids[position < 0][:5])})."
        )
    return xy[position]


def image_section(
    sdata: SpatialData, image: str, *, table_key: str | None = None, pixel_size_um: float | None = None
) -> Section:
    """The section an image element belongs to, with its resolution (see :func:`section_resolution`).

    Its id is ``S`` for the package's ``f"{S}_image"``; else the section of the table spots whose circles share a
    coordinate system with the image (those named after it first); else the image's first coordinate system.
    """
    image = check_image_key(sdata, image)
    cs = micrometre_system(sdata, image)
    if cs is not None:
        px, source = section_resolution(sdata, image, cs, pixel_size_um=pixel_size_um)
        return Section(cs, image, px, spots_key(cs) if spots_key(cs) in sdata.shapes else None, cs, source)
    for key in [table_key] if table_key is not None else list(sdata.tables):
        table = sdata.tables[key]
        regions = spot_regions(table)
        if regions is None:
            continue
        sample_of = spot_sections(table, table_key=key)
        for sample in dict.fromkeys(sample_of):
            rows = np.flatnonzero(sample_of == sample)
            for shapes_key in dict.fromkeys(regions[rows]):
                if shapes_key in sdata.shapes and image in images_of_shapes(sdata, shapes_key, sample):
                    sections, _, _ = table_sections(sdata, key, rows=rows, image_key=image, pixel_size_um=pixel_size_um)
                    return sections[sample]
    systems = list(systems_of(sdata, image))
    sample = systems[0] if systems else image
    px, source = section_resolution(sdata, image, sample, pixel_size_um=pixel_size_um)
    return Section(sample, image, px, None, sample, source)


# --------------------------------------------------------------------------------------------------------------------
# Checks of the arguments of the public pp and tl functions: clear errors naming the function and the fix
# --------------------------------------------------------------------------------------------------------------------
def check_sdata(sdata, function: str, *, needs_image: bool = True) -> None:
    """Raise a :class:`TypeError` naming ``function`` unless ``sdata`` is a :class:`~spatialdata.SpatialData`.

    Parameters
    ----------
    sdata
        What the user passed.
    function
        The public function, as users call it (e.g. ``"sth.tl.evaluate"``).
    needs_image
        Whether the function reads the H&E image; the message then points to ``attach_histology`` first.
    """
    from anndata import AnnData
    from spatialdata import SpatialData

    if isinstance(sdata, SpatialData):
        return
    if isinstance(sdata, AnnData):
        wrap_image = "`sth.pp.attach_histology(adata, image, pixel_size_um=...)` pairs its spots with their H&E image"
        wrap_table = "`spatialdata.SpatialData(tables={'table': adata})` holds a table alone"
        hint = f"{wrap_image}." if needs_image else f"{wrap_image}, or {wrap_table}."
        raise TypeError(f"`{function}` takes a SpatialData, got an AnnData. Wrap it first: {hint}")
    if isinstance(sdata, list | tuple) and sdata and all(isinstance(s, SpatialData) for s in sdata):
        raise TypeError(
            f"`{function}` takes one SpatialData, got a {type(sdata).__name__} of {len(sdata)}. Put the sections "
            f"together with `sth.io.concatenate(...)`, or call it once per SpatialData."
        )
    raise TypeError(f"`{function}` takes a SpatialData, got {type(sdata).__name__}.")


def check_table_key(sdata: SpatialData, key, *, what: str = "", argument: str = "table_key") -> None:
    """Raise a :class:`KeyError` listing the tables present unless ``sdata.tables`` holds ``key``."""
    if not isinstance(key, str):
        raise TypeError(f"`{argument}` must be the name of a table, got {type(key).__name__} {key!r}.")
    if key not in sdata.tables:
        raise KeyError(
            f"No {what + ' ' if what else ''}table {key!r} (`{argument}`); tables present: {sorted(sdata.tables)}."
        )


def as_names(value, name: str) -> list[str]:
    """A gene or sample list from a string (one name) or a sequence of names; ``None`` and numbers are refused."""
    if isinstance(value, str):
        return [value]
    if value is None or not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a name or a list of names, got {type(value).__name__} {value!r}.")
    return [str(v) for v in value]


def only_image(sdata: SpatialData, function: str) -> str:
    """The image of a SpatialData holding one section, for functions called without ``image_key``."""
    own = [key for key in sdata.images if micrometre_system(sdata, key) is not None]
    if len(own) == 1:
        return own[0]
    if len(sdata.images) == 1:
        return next(iter(sdata.images))
    if not own and len(sdata.tables) >= 1:
        try:
            key = find_table(sdata)
            found = samples(sdata, key)
            if len(found) == 1:
                sections, _, _ = table_sections(sdata, key, pixel_size_um=1.0)  # the image only
                return sections[found[0]].image_key
        except (KeyError, ValueError):
            pass
    raise ValueError(
        f"`{function}` needs `image_key=`: the SpatialData holds several images {sorted(sdata.images)}; pass the one "
        f"to use."
    )
