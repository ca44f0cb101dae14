"""The HER2-positive breast cancer legacy ST sections of Andersson et al. (2021): local copy, cache or download."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from st_from_he._logging import logger
from st_from_he._settings import DATA_DIR_ENV, settings

SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
_REPO = "https://raw.githubusercontent.com/almaan/her2st/85df7411b987a7dec3feff9718b869a7a82091ec/"

# (file name in the package's layout, path in almaan/her2st, sha256)
_FILES = {
    "B4": [
        (
            "B4_HE.jpg",
            "data/ST-imgs/B/B4/BT10737_D2_HE.jpg",
            "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
        ),
        (
            "B4_counts.tsv.gz",
            "data/ST-cnts/B4.tsv.gz",
            "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
        ),
        (
            "B4_expression_clusters.tsv.gz",
            "res/ST-cluster/lbl/B4-cluster-annotation.tsv.gz",
            "ea7ce6d9630921a9b0d03178988192b7c71baec19eb183ebdfdb991e47d690e4",
        ),
        (
            "B4_spots.tsv",
            "data/ST-spotfiles/B4_selection.tsv",
            "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
        ),
    ],
    "C2": [
        (
            "C2_HE.jpg",
            "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
            "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
        ),
        (
            "C2_counts.tsv.gz",
            "data/ST-cnts/C2.tsv.gz",
            "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
        ),
        (
            "C2_expression_clusters.tsv.gz",
            "res/ST-cluster/lbl/C2-cluster-annotation.tsv.gz",
            "3211500325b1be1cd2be7480f2b094a48647fc25df4d8fe6afb8c48c15650ece",
        ),
        (
            "C2_spots.tsv",
            "data/ST-spotfiles/C2_selection.tsv",
            "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
        ),
    ],
    "C3": [
        (
            "C3_HE.jpg",
            "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg",
            "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
        ),
        (
            "C3_counts.tsv.gz",
            "data/ST-cnts/C3.tsv.gz",
            "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
        ),
        (
            "C3_expression_clusters.tsv.gz",
            "res/ST-cluster/lbl/C3-cluster-annotation.tsv.gz",
            "a1522a14855bc2022ccbb9ea9cbae59837cbcd310bc4c02727ae6bfa37e6d369",
        ),
        (
            "C3_spots.tsv",
            "data/ST-spotfiles/C3_selection.tsv",
            "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
        ),
    ],
    "C4": [
        (
            "C4_HE.jpg",
            "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg",
            "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
        ),
        (
            "C4_counts.tsv.gz",
            "data/ST-cnts/C4.tsv.gz",
            "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
        ),
        (
            "C4_expression_clusters.tsv.gz",
            "res/ST-cluster/lbl/C4-cluster-annotation.tsv.gz",
            "a5cc7a3a40983a21ea8400145c80a7dc5b13e7468b987ec0610f4c2123978c71",
        ),
        (
            "C4_spots.tsv",
            "data/ST-spotfiles/C4_selection.tsv",
            "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
        ),
    ],
    "C5": [
        (
            "C5_HE.jpg",
            "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg",
            "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
        ),
        (
            "C5_counts.tsv.gz",
            "data/ST-cnts/C5.tsv.gz",
            "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
        ),
        (
            "C5_expression_clusters.tsv.gz",
            "res/ST-cluster/lbl/C5-cluster-annotation.tsv.gz",
            "5929e9183e09717891fce94a71ec94551a86d5267ebb085067ac1d71894bc4ea",
        ),
        (
            "C5_spots.tsv",
            "data/ST-spotfiles/C5_selection.tsv",
            "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
        ),
    ],
    "C6": [
        (
            "C6_HE.jpg",
            "data/ST-imgs/C/C6/5714_HE_BT_E2.jpg",
            "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
        ),
        (
            "C6_counts.tsv.gz",
            "data/ST-cnts/C6.tsv.gz",
            "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
        ),
        (
            "C6_expression_clusters.tsv.gz",
            "res/ST-cluster/lbl/C6-cluster-annotation.tsv.gz",
            "bc1234a7a05073a65017f7c0c101547ae2d3c9aa37b895a27dafd9c33842f9d2",
        ),
        (
            "C6_spots.tsv",
            "data/ST-spotfiles/C6_selection.tsv",
            "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
        ),
    ],
}
_ANNOTATION = (
    "cluster_annotation_motivation.csv",
    "res/ST-cluster/motivation.csv",
    "b7701748b5de40e63771f032a864b5812f9b2aa638459db2257af4ac519f8234",
)


def _has_sections(folder: Path, sections: Sequence[str]) -> bool:
    return not _missing_files(folder, sections)


def _missing_files(folder: Path, sections: Sequence[str]) -> list[str]:
    """Required files (relative paths) of ``sections`` absent from ``folder``; the clusters file is optional."""
    return [
        f"{s}/{name}"
        for s in sections
        for name, _, _ in _FILES[s]
        if "clusters" not in name and not (folder / s / name).is_file()
    ]


_VERIFIED: dict[tuple[str, int, int], bool] = {}


def _sha256(path: Path) -> str:
    import pooch

    return pooch.file_hash(str(path), alg="sha256")


def _corrupt_files(folder: Path, sections: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(relative path, expected sha256, found sha256)`` of present files whose checksum is not the published one.

    Each file is hashed once per session (keyed by path, size and modification time).
    """
    bad = []
    for s in sections:
        for name, _, sha256 in _FILES[s]:
            path = folder / s / name
            if not path.is_file():
                continue
            stat = path.stat()
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            if key not in _VERIFIED:
                found = _sha256(path)
                _VERIFIED[key] = found == sha256
                if found != sha256:
                    bad.append((f"{s}/{name}", sha256, found))
            elif not _VERIFIED[key]:
                bad.append((f"{s}/{name}", sha256, _sha256(path)))
    return bad


def _check_checksums(folder: Path, sections: Sequence[str], fix: str) -> None:
    bad = _corrupt_files(folder, sections)
    if bad:
        listing = "; ".join(
            f"{str(folder / rel)!r} has sha256 {found[:12]}..., expected {want[:12]}..." for rel, want, found in bad
        )
        raise ValueError(f"Corrupted or modified her2st file(s): {listing}. {fix}")


def _download(folder: Path, sections: Sequence[str]) -> None:
    import pooch

    logger.info("Downloading her2st sections %s to %s", ", ".join(sections), folder)
    jobs = [(s, entry) for s in sections for entry in _FILES[s]] + [(None, _ANNOTATION)]
    for section, (name, remote, sha256) in jobs:
        target = folder / section if section else folder
        pooch.retrieve(
            _REPO + remote,
            known_hash=f"sha256:{sha256}",
            fname=name,
            path=target,
            progressbar=settings.progress_bar,
        )


def her2st_path(sections: Sequence[str] = SECTIONS, *, path: str | Path | None = None, download: bool = True) -> Path:
    """Folder holding the her2st files: ``path``, else ``$ST_FROM_HE_DATA_DIR/her2st``, else the cache (downloading)."""
    if path is not None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"`path` must be a folder path, got {type(path).__name__}.")
        folder = Path(path)
        missing_files = _missing_files(folder, sections)
        if missing_files:
            missing = list(dict.fromkeys(f.split("/")[0] for f in missing_files))
            listing = ", ".join(repr(str(folder / f)) for f in missing_files[:8])
            raise FileNotFoundError(
                f"{str(folder)!r} does not hold the her2st files of section(s) {missing}: missing {listing}. Copy "
                f"them there, or leave `path=None` to use ${DATA_DIR_ENV}, the cache or a download."
            )
        _check_checksums(folder, sections, "Replace them with the published files (or leave `path=None` to download).")
        return folder
    if os.environ.get(DATA_DIR_ENV):
        env_folder = Path(os.environ[DATA_DIR_ENV])
        for folder in (env_folder / "her2st", env_folder):
            if _has_sections(folder, sections):
                _check_checksums(folder, sections, f"Replace them with the published files, or unset ${DATA_DIR_ENV}.")
                return folder
        logger.info("$%s=%s holds no her2st files; trying the cache.", DATA_DIR_ENV, env_folder)
    folder = Path(settings.cache_dir) / "her2st"
    if _has_sections(folder, sections):
        bad = _corrupt_files(folder, sections)
        if not bad:
            return folder
        if not download:
            _check_checksums(folder, sections, "Delete them to download them again (download=True).")
        logger.warning("Cached her2st file(s) %s are corrupted; downloading them again.", [rel for rel, _, _ in bad])
    if not download:
        raise FileNotFoundError(f"her2st files not found in {str(folder)!r} and download=False.")
    try:
        _download(folder, sections)
    except Exception as err:
        raise RuntimeError(
            f"Could not download the her2st data ({err}). Pass `path=` to a local copy or set ${DATA_DIR_ENV} to a "
            f"folder containing 'her2st/'."
        ) from err
    return folder


def her2st(sections: Sequence[str] | None = None, *, path: str | Path | None = None, download: bool = True):
    """HER2-positive breast cancer sections measured with legacy Spatial Transcriptomics (Andersson et al., 2021).

    Six real sections with raw counts and full-resolution H&E: ``C2``-``C6`` (patient C, serial sections) and ``B4``
    (patient B, low sequencing depth). Spots are 100 um across on a 200 um grid; images are about 0.69 um per pixel.

    The files are looked up in ``path``, else in ``$ST_FROM_HE_DATA_DIR/her2st``, else in
    ``sth.settings.cache_dir / "her2st"``; otherwise they are downloaded from the authors' public repository
    (github.com/almaan/her2st) and checked against their sha256. Local and cached files are checked against the same
    sha256 (once per session); a mismatch names the file (a corrupted cached file is downloaded again).

    Parameters
    ----------
    sections
        Section ids to load; ``None`` loads all of :data:`SECTIONS`.
    path
        Folder with one sub-folder per section (``C6/C6_counts.tsv.gz``, ``C6/C6_spots.tsv``, ``C6/C6_HE.jpg``).
    download
        Download missing files when no local copy is found.

    Returns
    -------
    One :class:`~spatialdata.SpatialData` holding every section (see :func:`st_from_he.io.read_st`), its table
    restricted to the genes measured in all of them. ``obs["patient"]`` is the section's letter (``"C"`` for C6).
    The expression cluster of the paper, where available, is in ``obs["expression_cluster"]`` with its annotation
    in ``obs["expression_cluster_label"]`` (clusters were derived from expression, so they are only a weak stand-in
    for tissue labels).

    Examples
    --------
    >>> import st_from_he as sth
    >>> sdata = sth.datasets.her2st(["C5", "C6"], path="../shared/data/her2st")
    >>> sorted(sdata.tables["table"].obs["sample"].unique())
    ['C5', 'C6']
    """
    from st_from_he.io import concatenate, read_st

    sections = list(SECTIONS if sections is None else sections)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"Unknown her2st section(s) {unknown}; available: {list(SECTIONS)}.")
    if len(set(sections)) != len(sections):
        raise ValueError(f"Section ids repeat in {sections}.")
    folder = her2st_path(sections, path=path, download=download)
    parts = []
    for s in sections:
        sdata = read_st(
            folder / s / f"{s}_counts.tsv.gz",
            folder / s / f"{s}_spots.tsv",
            folder / s / f"{s}_HE.jpg",
            sample_id=s,
            patient_id=s[0],  # sections are named by patient letter and replicate: C6 is patient C
        )
        _add_clusters(sdata, folder, s)
        parts.append(sdata)
    return concatenate(parts)


def _add_clusters(sdata, folder: Path, sample: str) -> None:
    """Attach the paper's per-spot expression clusters, matched on array position, where the files exist."""
    import pandas as pd

    cluster_file = folder / sample / f"{sample}_expression_clusters.tsv.gz"
    if not cluster_file.is_file():
        return
    clusters = pd.read_csv(cluster_file, sep="\t", index_col=0)
    clusters.index = clusters["x"].astype(int).astype(str) + "x" + clusters["y"].astype(int).astype(str)
    obs = sdata.tables["table"].obs
    position = obs["array_col"].astype(str) + "x" + obs["array_row"].astype(str)
    label = clusters["label"].reindex(position.to_numpy())
    obs["expression_cluster"] = pd.Categorical(label.astype("Int64").astype(str).replace("<NA>", pd.NA).to_numpy())
    annotation_file = folder / "cluster_annotation_motivation.csv"
    if annotation_file.is_file():
        names = _cluster_names(annotation_file, patient=str(clusters["patient_id"].iloc[0]))
        obs["expression_cluster_label"] = pd.Categorical(label.map(names).to_numpy())


def _cluster_names(path: Path, patient: str) -> dict[int, str]:
    """Cluster -> annotation of one patient.

    The file's free-text fields hold unquoted commas, so it is not valid CSV: the annotation is what lies between the
    cluster number and the 'Marker genes' motivation.
    """
    import re

    names = {}
    for line in path.read_text().splitlines()[1:]:
        match = re.match(r"^([^,]+),(\d+),(.*?)(?:,Marker genes|,+$|,http)", line)
        if match and match.group(1) == patient:
            names[int(match.group(2))] = match.group(3).strip()
    return names
