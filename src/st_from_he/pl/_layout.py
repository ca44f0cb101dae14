"""Where a section's spots and its H&E lie, in one drawing frame, for any SpatialData or an AnnData table.

With a :class:`~spatialdata.SpatialData`, a table row's spot is the shapes element its region names, at the row's
instance id; centres are mapped through the elements' transformations into the pixels of the image drawn underneath
(``image frame <- shared coordinate system <- shapes``). ``obsm["spatial"]`` is not read there: other libraries
rewrite it (squidpy's SpatialData route stores coordinate-system units in it), and the shapes are the spots.

With an :class:`~anndata.AnnData` there are no shapes: positions are its ``obsm["spatial"]`` as they stand, and the
image is one the caller gives (or the scanpy Visium layout's ``uns["spatial"]`` image with its scale factor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from st_from_he._logging import logger
from st_from_he._sdata import INSTANCE_KEY, REGION_KEY, SAMPLE_KEY, SPATIAL_KEY
from st_from_he._sdata import image_key as sample_image_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

OVERVIEW_MAX_SIDE = 2048
"""The image drawn is the finest pyramid level whose longer side is at most this many pixels (a Visium hires image
qualifies; a whole-slide image's full resolution never does)."""

Bounds = tuple[float, float, float, float]  # x0, x1, y0, y1 in the drawing frame
Overview = tuple[np.ndarray, Bounds]  # (rgb, (left, right, bottom, top)) for imshow


def is_sdata(data) -> bool:
    """Whether ``data`` is a :class:`~spatialdata.SpatialData`."""
    from spatialdata import SpatialData

    return isinstance(data, SpatialData)


def check_data(data, function: str) -> None:
    """Raise a clear :class:`TypeError` unless ``data`` is a SpatialData or an AnnData."""
    from anndata import AnnData

    if is_sdata(data) or isinstance(data, AnnData):
        return
    raise TypeError(f"`{function}` takes a SpatialData or an AnnData table, got {type(data).__name__}.")


def table_keys(table: AnnData) -> tuple[str, str]:
    """Region and instance key columns of a table (its spatialdata attributes, else the package's defaults)."""
    attrs = table.uns.get("spatialdata_attrs", {}) or {}
    return attrs.get("region_key", REGION_KEY), attrs.get("instance_key", INSTANCE_KEY)


def table_samples(table: AnnData) -> np.ndarray | None:
    """Section of every row: ``obs["sample"]``, else the region the row annotates; ``None`` when neither exists."""
    if SAMPLE_KEY in table.obs:
        return table.obs[SAMPLE_KEY].astype(str).to_numpy()
    region_key, _ = table_keys(table)
    if region_key in table.obs:
        return table.obs[region_key].astype(str).to_numpy()
    return None


def table_store(data, tables: dict[str, Any], function: str) -> dict[str, AnnData]:
    """The tables by key, as the ``tl`` helpers that look tables up by key take them (a mapping or a SpatialData).

    ``tables`` maps keys to an :class:`~anndata.AnnData` or to ``None`` (take ``data.tables[key]``). Tables without
    region and instance columns (a plain scanpy table) are matched by ``obs_names``: shallow copies get a region
    ``"spots"`` and the ``obs_names`` as instance ids; the caller's tables are not modified.
    """
    from anndata import AnnData

    out = {}
    for key, table in tables.items():
        if table is None:
            if not is_sdata(data):
                raise TypeError(f"`{function}`: table {key!r} must be given as an AnnData when `data` is an AnnData.")
            if key not in data.tables:
                raise KeyError(f"No table {key!r} in the SpatialData; tables present: {sorted(data.tables)}.")
            table = data.tables[key]
        if not isinstance(table, AnnData):
            raise TypeError(f"`{function}`: table {key!r} must be an AnnData, got {type(table).__name__}.")
        out[key] = table
    if any(not {*table_keys(t)} <= set(t.obs.columns) for t in out.values()):
        out = {key: _keyed_by_obs_names(t) for key, t in out.items()}
    return out


def _keyed_by_obs_names(table: AnnData) -> AnnData:
    from anndata import AnnData

    obs = table.obs.copy()
    obs[REGION_KEY] = "spots"
    obs[INSTANCE_KEY] = table.obs_names.astype(str)
    uns = {k: v for k, v in table.uns.items() if k != "spatialdata_attrs"}  # keeps e.g. the raw-counts note
    return AnnData(X=table.X, obs=obs, var=table.var, layers=dict(table.layers), uns=uns)


# --------------------------------------------------------------------------------------------------------------------
# the layout
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class SpotLayout:
    """Spots of one section in a drawing frame, and how to read the image under them."""

    xy: np.ndarray  # (n, 2) centres, x = column, y = row of the drawing frame
    radius: float  # spot radius in drawing-frame units
    um_per_unit: float | None  # micrometres per drawing-frame unit, where known (scale bar)
    read_image: Callable[[Bounds], Overview | None] | None = None

    def overview(self, bounds: Bounds) -> Overview | None:
        """The image under ``bounds`` at overview resolution, or ``None`` when there is none."""
        return None if self.read_image is None else self.read_image(bounds)


def spot_layout(
    data,
    table: AnnData,
    rows: np.ndarray,
    *,
    sample: str | None,
    image: Any = True,
    scale_factor: float | None = None,
    spatial_key: str = SPATIAL_KEY,
    table_key: str = "table",
) -> SpotLayout:
    """Lay out table ``rows`` (one section) for drawing; see the module docstring for where positions come from.

    Parameters
    ----------
    data
        The SpatialData holding ``table``, or the AnnData ``table`` itself.
    table
        Table whose rows are drawn.
    rows
        Integer positions of the rows.
    sample
        The section's name (the image of our layout is ``f"{sample}_image"``).
    image
        ``True``: the section's image if one is found; ``False``/``None``: none; a name: that image element (or, for
        an AnnData, that image of ``uns["spatial"]``); an array (``y, x[, c]`` or ``c, y, x``) or an image element.
    scale_factor
        Image pixels per unit of the positions, for an image given as an array (default 1) or for an AnnData.
    spatial_key
        ``obsm`` key of an AnnData's positions.
    table_key
        Name of the table, for messages.
    """
    rows = np.asarray(rows)
    if image is None:
        image = False
    if is_sdata(data):
        layout = _sdata_layout(data, table, rows, sample=sample, image=image, scale_factor=scale_factor, key=table_key)
        if layout is not None:
            return layout
    return _table_layout(table, rows, sample=sample, image=image, scale_factor=scale_factor, spatial_key=spatial_key)


def _affine(element, cs: str) -> np.ndarray:
    """3x3 (x, y) affine matrix from an element's intrinsic coordinates to coordinate system ``cs``."""
    from spatialdata.transformations import get_transformation

    matrix = get_transformation(element, to_coordinate_system=cs).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    return np.asarray(matrix, dtype=float)


def _systems(element) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True))


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _linear_scale(matrix: np.ndarray) -> float:
    """Length scale of an affine map (square root of the area factor)."""
    return float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def _shape_spots(sdata: SpatialData, region: str, ids: np.ndarray, table_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Centres (intrinsic x, y) and radii of the shapes of ``region`` with instance ids ``ids``."""
    shapes = sdata.shapes[region]
    index = shapes.index
    if index.has_duplicates:
        raise ValueError(f"Shapes element {region!r} has duplicate indices, so table rows cannot name one shape each.")
    pos = index.get_indexer(ids)
    if (pos < 0).any():  # ids read back as strings (or numbers) from another file format
        pos = pd.Index(index.astype(str)).get_indexer(pd.Index(ids).astype(str))
    if (pos < 0).any():
        missing = list(pd.Index(ids)[pos < 0][:5])
        raise KeyError(
            f"{int((pos < 0).sum())} rows of table {table_key!r} name instance ids absent from shapes element "
            f"{region!r} (e.g. {missing}): the table and its shapes no longer match."
        )
    geometry = shapes.geometry.iloc[pos]
    if (geometry.geom_type == "Point").all():
        xy = np.c_[geometry.x.to_numpy(), geometry.y.to_numpy()]
        radius = shapes["radius"].to_numpy(dtype=float)[pos] if "radius" in shapes else np.full(len(pos), np.nan)
    else:  # polygons (e.g. bins): centroid, and the radius of a disc of the same area
        centroids = geometry.centroid
        xy = np.c_[centroids.x.to_numpy(), centroids.y.to_numpy()]
        radius = np.sqrt(geometry.area.to_numpy() / np.pi)
    return xy.astype(float), radius


def _sdata_layout(
    sdata: SpatialData, table: AnnData, rows: np.ndarray, *, sample, image, scale_factor, key
) -> SpotLayout | None:
    """Positions from shapes and transformations; ``None`` when the rows annotate no shapes element."""
    region_key, instance_key = table_keys(table)
    if region_key not in table.obs or instance_key not in table.obs:
        return _no_shapes(table, key, f"it has no obs columns {region_key!r} and {instance_key!r}")
    regions = table.obs[region_key].astype(str).to_numpy()[rows]
    ids = table.obs[instance_key].to_numpy()[rows]
    order = list(dict.fromkeys(regions))
    absent = [r for r in order if r not in sdata.shapes]
    if absent:
        return _no_shapes(table, key, f"its rows annotate {absent}, which are not shapes elements")
    first = order[0]

    # choose the image (and so the drawing frame)
    chosen = None  # (image key, coordinate system, level)
    element_key = next((k for k, element in sdata.images.items() if element is image), None)
    if element_key is not None:  # one of this SpatialData's image elements, passed as an object
        image = element_key
    if isinstance(image, str):
        if image not in sdata.images:
            raise KeyError(f"No image element {image!r} (`image`); images present: {sorted(sdata.images)}.")
        chosen = _pick_level(sdata, [image], sdata.shapes[first], sample, strict=True)
    elif image is True:
        chosen = _pick_level(sdata, _image_candidates(sdata, first, sample), sdata.shapes[first], sample)

    xy = np.full((len(rows), 2), np.nan)
    radii = np.full(len(rows), np.nan)
    if chosen is not None:
        img_key, cs, level = chosen
        frame_inv = np.linalg.inv(_affine(sdata.images[img_key], cs))
    else:
        img_key, level = None, None
        frame_cs = sample if sample in _systems(sdata.shapes[first]) else _systems(sdata.shapes[first])[0]
        frame_inv = np.linalg.inv(_affine(sdata.shapes[first], frame_cs))
        cs = frame_cs
    for region in order:
        mask = regions == region
        centres, r = _shape_spots(sdata, region, ids[mask], key)
        element = sdata.shapes[region]
        if cs not in _systems(element):
            raise ValueError(
                f"Shapes elements {first!r} and {region!r} of one section share no coordinate system ({cs!r} is "
                f"missing from {region!r}), so they cannot be drawn together."
            )
        to_frame = frame_inv @ _affine(element, cs)
        xy[mask] = _apply(to_frame, centres)
        radii[mask] = r * _linear_scale(to_frame)
    radius = float(np.nanmedian(radii)) if np.isfinite(radii).any() else _spacing_radius(xy)

    um = _um_per_unit(sdata, img_key if img_key is not None else first, cs, sample)
    read_image = None
    if chosen is not None:
        levels = _levels(sdata.images[img_key])
        read_image = _level_reader(levels, level)
    elif not isinstance(image, bool | str):  # an array or image element, in the shapes' frame x scale_factor
        read_image = _array_reader(image, 1.0 if scale_factor is None else float(scale_factor))
    if chosen is None and image is True:
        logger.info("No image shares a coordinate system with shapes %r: spots are drawn without a background.", first)
    return SpotLayout(xy, radius, um, read_image)


def _no_shapes(table: AnnData, key: str, why: str) -> None:
    if SPATIAL_KEY not in table.obsm:
        raise KeyError(
            f"Cannot place the spots of table {key!r}: {why}, and it has no obsm[{SPATIAL_KEY!r}]. Link the table to "
            f"its circles with `spatialdata.models.TableModel.parse(table, region=..., region_key=..., "
            f"instance_key=...)`."
        )
    logger.warning(
        "Spots of table %r are placed from obsm[%r] because %s; these positions are only right if no other library "
        "rewrote them.",
        key,
        SPATIAL_KEY,
        why,
    )
    return None


def _image_candidates(sdata: SpatialData, shapes_key: str, sample: str | None) -> list[str]:
    """Images sharing a coordinate system with the shapes; those named after the section first, if any."""
    systems = set(_systems(sdata.shapes[shapes_key]))
    shared = [key for key, element in sdata.images.items() if systems & set(_systems(element))]
    names = {shapes_key} | ({sample} if sample else set())
    named = [
        key
        for key in shared
        if key == sample_image_key(sample or "") or any(key.startswith(f"{name}_") for name in names)
    ]
    return named or shared


def _shared_system(sdata: SpatialData, img_key: str, shapes, sample: str | None) -> str | None:
    shared = [cs for cs in _systems(sdata.images[img_key]) if cs in set(_systems(shapes))]
    if not shared:
        return None
    return sample if sample in shared else shared[0]


def _pick_level(
    sdata: SpatialData, keys: Sequence[str], shapes, sample: str | None, *, strict: bool = False
) -> tuple[str, str, int] | None:
    """``(image, coordinate system, level)``: among images covering the spots, the finest level that fits.

    A level fits when its longer side is at most :data:`OVERVIEW_MAX_SIDE`; without one, the coarsest level of all
    is taken (read with a stride).
    """
    centres = np.c_[shapes.geometry.centroid.x.to_numpy(), shapes.geometry.centroid.y.to_numpy()]
    options = []  # (coordinate-system units per level pixel, longer side, key, cs, level)
    for key in keys:
        cs = _shared_system(sdata, key, shapes, sample)
        if cs is None:
            if strict:
                raise ValueError(
                    f"Image {key!r} (`image`) shares no coordinate system with the spots' shapes: its systems are "
                    f"{_systems(sdata.images[key])}, the shapes' {_systems(shapes)}."
                )
            continue
        image_affine = _affine(sdata.images[key], cs)
        levels = _levels(sdata.images[key])
        full_h, full_w = levels[0].shape[-2:]
        in_image = _apply(np.linalg.inv(image_affine) @ _affine(shapes, cs), centres)
        inside = (in_image[:, 0] >= 0) & (in_image[:, 0] <= full_w) & (in_image[:, 1] >= 0) & (in_image[:, 1] <= full_h)
        if not inside.any():
            if strict:
                raise ValueError(f"No spot lies on image {key!r} (`image`): check the elements' transformations.")
            continue
        unit = _linear_scale(image_affine)
        for i, level in enumerate(levels):
            h, w = level.shape[-2:]
            options.append((unit * full_w / w, max(h, w), -int(inside.sum()), key, cs, i))
    if not options:
        return None
    best_cover = min(o[2] for o in options)
    options = [o for o in options if o[2] == best_cover]  # images holding most spots
    fitting = [o for o in options if o[1] <= OVERVIEW_MAX_SIDE]
    pick = min(fitting, key=lambda o: o[0]) if fitting else max(options, key=lambda o: o[0])
    return pick[3], pick[4], pick[5]


def _um_per_unit(sdata: SpatialData, element_key: str, cs: str, sample: str | None) -> float | None:
    """Micrometres per intrinsic unit of ``element_key``, known when ``cs`` is our micrometre system of ``sample``.

    The package's readers give each section a coordinate system named after it, in micrometres, next to an image
    ``f"{sample}_image"``; other layouts' systems (e.g. spatialdata-io's, in full-resolution pixels) have no unit
    the data states, so no scale bar is drawn rather than a wrong one.
    """
    from st_from_he._sdata import pixel_size_um

    if sample is None or cs != sample or sample_image_key(sample) not in sdata.images:
        return None
    if sample not in _systems(sdata.images[sample_image_key(sample)]):
        return None
    try:
        return pixel_size_um(sdata, element_key, sample)
    except (ValueError, KeyError):
        return None


def _spacing_radius(xy: np.ndarray) -> float:
    """45% of the median nearest-neighbour distance (spots of a grid nearly touch); 1 for fewer than 2 spots."""
    finite = xy[np.isfinite(xy).all(axis=1)]
    if len(finite) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(finite).query(finite, k=2)
    spacing = float(np.median(dist[:, 1]))
    return 0.45 * spacing if spacing > 0 else 1.0


# --------------------------------------------------------------------------------------------------------------------
# AnnData tables
# --------------------------------------------------------------------------------------------------------------------
def _library(table: AnnData, sample: str | None) -> dict | None:
    """The scanpy Visium layout's ``uns["spatial"][library]`` of ``sample`` (or the only one)."""
    libraries = table.uns.get("spatial")
    if not isinstance(libraries, dict) or not libraries:
        return None
    if sample is not None and sample in libraries:
        return libraries[sample]
    return next(iter(libraries.values())) if len(libraries) == 1 else None


def _table_layout(table: AnnData, rows: np.ndarray, *, sample, image, scale_factor, spatial_key) -> SpotLayout:
    if spatial_key not in table.obsm:
        raise KeyError(
            f"The AnnData has no obsm[{spatial_key!r}] of spot positions (`spatial_key`); obsm keys: "
            f"{list(table.obsm)}. Pass the SpatialData instead, whose shapes place the spots."
        )
    xy = np.asarray(table.obsm[spatial_key], dtype=float)[rows, :2]
    library = _library(table, sample)
    scalefactors = (library or {}).get("scalefactors", {}) or {}
    diameter = scalefactors.get("spot_diameter_fullres")
    radius = float(diameter) / 2 if diameter else _spacing_radius(xy)
    read_image = None
    if image is True or isinstance(image, str):
        images = (library or {}).get("images", {}) or {}
        name = image if isinstance(image, str) else next((n for n in ("hires", "lowres") if n in images), None)
        if isinstance(image, str) and name not in images:
            raise KeyError(
                f"No image {image!r} (`image`) in the AnnData's uns['spatial']; images there: {sorted(images)}. Pass "
                f"the image itself (an array) with `image=`."
            )
        if name is not None:
            factor = scale_factor if scale_factor is not None else scalefactors.get(f"tissue_{name}_scalef", 1.0)
            read_image = _array_reader(images[name], float(factor))
    elif image is not False:
        read_image = _array_reader(image, 1.0 if scale_factor is None else float(scale_factor))
    return SpotLayout(xy, radius, None, read_image)


# --------------------------------------------------------------------------------------------------------------------
# reading the image at overview resolution
# --------------------------------------------------------------------------------------------------------------------
def _levels(element) -> list:
    """The ``(c, y, x)`` levels of an image element (DataTree or DataArray), finest first."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return [element]
    names = sorted(element.children, key=lambda name: int("".join(ch for ch in name if ch.isdigit()) or 0))
    return [next(iter(element[name].to_dataset().data_vars.values())) for name in names]


def _as_cyx(array) -> Any:
    """A ``(c, y, x)`` view of an image array given as ``(y, x)``, ``(y, x, c)`` or ``(c, y, x)``."""
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"`image` must be a 2-D or 3-D array (y, x[, c] or c, y, x), got shape {array.shape}.")
    if array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4):
        return np.moveaxis(array, -1, 0)
    if array.shape[0] in (1, 3, 4):
        return array
    raise ValueError(f"`image` of shape {array.shape} has no axis of 1, 3 or 4 channels.")


def _array_reader(image, scale: float) -> Callable[[Bounds], Overview | None]:
    """Reader of an image given as an object: array (numpy/dask/xarray) or image element, in pixels = units x scale."""
    import xarray as xr

    if isinstance(image, xr.DataArray) or hasattr(image, "children"):
        levels = _levels(image)
    else:
        levels = [_as_cyx(image)]
    if scale <= 0 or not np.isfinite(scale):
        raise ValueError(f"`scale_factor` must be a positive number, got {scale!r}.")
    sizes = [max(lvl.shape[-2:]) for lvl in levels]
    level = next((i for i, s in enumerate(sizes) if s <= OVERVIEW_MAX_SIDE), len(levels) - 1)
    inner = _level_reader(levels, level)

    def read(bounds: Bounds) -> Overview | None:
        x0, x1, y0, y1 = (v * scale for v in bounds)
        got = inner((x0, x1, y0, y1))
        if got is None:
            return None
        rgb, (left, right, bottom, top) = got
        return rgb, (left / scale, right / scale, bottom / scale, top / scale)

    return read


def _level_reader(levels: list, level: int) -> Callable[[Bounds], Overview | None]:
    """Reader of ``levels[level]`` cropped to bounds given in pixels of ``levels[0]``."""

    def read(bounds: Bounds) -> Overview | None:
        return crop_level(levels, level, bounds)

    return read


def crop_level(levels: list, level: int, bounds: Bounds, max_side: int = OVERVIEW_MAX_SIDE) -> Overview | None:
    """Crop of one pyramid level to ``bounds`` (in finest-level pixels) as ``(rgb uint8, imshow extent)``.

    A level larger than ``2 * max_side`` is read with a stride; ``None`` when ``bounds`` miss the image.
    """
    import xarray as xr

    full_h, full_w = levels[0].shape[-2:]
    data = levels[level]
    if isinstance(data, xr.DataArray):
        data = data.data  # dask or numpy
    h, w = data.shape[-2:]
    sy, sx = full_h / h, full_w / w  # finest-level pixels per level pixel
    x0, x1, y0, y1 = bounds
    c0, c1 = max(0, int(np.floor(x0 / sx))), min(w, int(np.ceil(x1 / sx)))
    r0, r1 = max(0, int(np.floor(y0 / sy))), min(h, int(np.ceil(y1 / sy)))
    if c1 <= c0 or r1 <= r0:
        return None
    stride = max(1, int(np.ceil(max(r1 - r0, c1 - c0) / (2 * max_side))))
    crop = np.asarray(data[:, r0:r1:stride, c0:c1:stride])
    rgb = _to_uint8(np.moveaxis(crop, 0, -1))
    rows, cols = rgb.shape[:2]
    return rgb, (c0 * sx, (c0 + cols * stride) * sx, (r0 + rows * stride) * sy, r0 * sy)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 from 1, 3 or 4 channels of uint8, 16-bit or float (0-1) values (alpha dropped)."""
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    rgb = rgb[..., :3]
    if rgb.dtype == np.uint8:
        return rgb
    if rgb.dtype == np.uint16:
        return (rgb // 257).astype(np.uint8)
    values = rgb.astype(float)
    if values.size and np.nanmin(values) < 0:
        logger.warning("The image holds negative values (not an RGB image?); they are drawn as black.")
    if values.size and np.nanmax(values) <= 1.0:
        values = values * 255
    return np.clip(np.nan_to_num(values, nan=255.0), 0, 255).round().astype(np.uint8)
