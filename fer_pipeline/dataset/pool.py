"""The pretraining pool: faces under labels the four classes do not use, and its leakage guard.

Why: the catalogue usually holds many more labelled faces than the four classes use (FER2013's
happy, sad, surprise...); a backbone pretrained on them fine-tunes into better four-class models.
Pool items (inventory status ``pool``: the source's ``pretrain_labels``) are decoded by the faces
stage like every other file, but they skip the four classes' de-duplication and label conflicts:

* :func:`build_pool`: one row per accepted face (``POOL_COLUMNS``); of exact duplicates within the
  pool (same processed pixels) one is kept by the manifest's representative rule, the others are
  excluded as ``duplicate of <image id>`` (stage ``pool``). Near-duplicates within the pool stay:
  harmless for pretraining.
* :func:`leakage_guard`: once the splits are known, every pool image that duplicates a four-class
  image of *any* split, train included (exact, near or mirrored: the manifest's rule,
  :func:`~fer_pipeline.dedup.groups.duplicates_across`; and, when the manifest links re-cropped
  copies, a view similarity at its floor: :func:`~fer_pipeline.dedup.views.view_matches_across`), leaves the pool for the excluded table
  (stage ``leakage_guard``, ``duplicate_of`` = that image). Train images count too because
  cross-validation and leave-one-source-out hold them out in turn (:data:`HELDOUT_SPLITS`).

:func:`find_heldout_duplicates` is the rule itself; the ``pool_no_heldout_duplicates`` data check
runs it again on the candidate tables instead of trusting the guard's output. Plain Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fer_pipeline.dedup.groups import duplicates_across
from fer_pipeline.dedup.views import ViewRule, view_matches_across
from fer_pipeline.faces.store import load_faces
from fer_pipeline.sources.inventory import POOL
from fer_pipeline.dataset.manifest import ITEM, accepted_faces, image_id_for, published_framing
from fer_pipeline.faces.phash import from_hex, phashes
from fer_pipeline.schema import (
    DETECTION_COLUMNS,
    EXCLUDED_COLUMNS,
    POOL_COLUMNS,
    STAGE_LEAKAGE_GUARD,
    STAGE_POOL,
)

HELDOUT_SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The splits no pool image may duplicate (pretraining on a copy of one would leak it). Train
images too: cross-validation holds each of them out once and leave-one-source-out holds out whole
sources, and their models start from the same backbone, so a copy of any four-class face in the
pool would leak into some held-out score."""
MATCH_COLUMNS = ["duplicate_of", "duplicate_split", "duplicate_source", "duplicate_path"]


@dataclass(frozen=True)
class DuplicateRule:
    """The manifest's de-duplication settings (``FerSettings``), applied across pool and splits."""

    max_distance: int = 4
    match_mirrored: bool = True
    min_correlation: float = 0.95
    view: ViewRule | None = None  # re-cropped copies too (its similarity floor; see view_matches_across)


def _typed(frame: pd.DataFrame, image_size: tuple[int, int]) -> pd.DataFrame:
    """``frame`` (accepted pool faces) as the pool table: POOL_COLUMNS with the manifest's dtypes."""
    out = frame.rename(columns={"raw_label": "original_label", "face_ref": "face_path"})
    out["face_height"], out["face_width"] = image_size
    out = out.reindex(columns=list(POOL_COLUMNS))
    for col in ("width", "height", "face_height", "face_width", "bytes", "face_index"):
        out[col] = out[col].fillna(0).astype("int64")
    for col in ("mean_intensity", "std_intensity"):
        out[col] = out[col].astype("float64")
    out["framing"] = published_framing(out["framing"])
    out["faces_found"] = out["faces_found"].astype("Int64")
    for col in DETECTION_COLUMNS[1:]:
        out[col] = out[col].astype("Float64")
    return out.sort_values(ITEM, kind="mergesort").reset_index(drop=True)


def build_pool(inventory: pd.DataFrame, faces: pd.DataFrame,
               image_size: tuple[int, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pool, excluded rows) from the inventory's pool items and the faces stage's outcomes.

    Items the faces stage rejected are excluded by :func:`~fer_pipeline.dataset.manifest.build_manifest`
    like any other file; here, of exact duplicates (same processed pixels) the one with the largest
    resolution, then file, then first by (source, path, face) stays."""
    df = accepted_faces(inventory, faces, POOL).copy()
    df["image_id"] = image_id_for(df["face_key"])
    df["_area"] = df["width"].astype("int64") * df["height"].astype("int64")
    df = df.sort_values(["pixel_sha", "_area", "bytes", *ITEM], ascending=[True, False, False, True, True, True],
                        kind="mergesort")
    repeat = df.duplicated("pixel_sha").to_numpy()
    kept, dups = df[~repeat], df[repeat].copy()
    first = kept.set_index("pixel_sha")
    dups["duplicate_of"] = dups["pixel_sha"].map(first["image_id"])
    where = dups["pixel_sha"].map(first["source"] + "/" + first["source_path"])
    dups["reason"] = "duplicate of " + dups["duplicate_of"] + " (" + where + ")"
    dups["stage"], dups["label"] = STAGE_POOL, None
    excluded = dups.reindex(columns=list(EXCLUDED_COLUMNS))
    excluded["face_index"] = excluded["face_index"].astype("int64")
    return _typed(kept, image_size), excluded.sort_values(ITEM, kind="mergesort").reset_index(drop=True)


def find_heldout_duplicates(pool: pd.DataFrame, manifest: pd.DataFrame, splits: pd.DataFrame,
                            data_root: str | Path, rule: DuplicateRule,
                            heldout_splits: Sequence[str] = HELDOUT_SPLITS) -> pd.DataFrame:
    """For each pool row (same order): the held-out image it duplicates (``duplicate_of``, its
    split, source and path), or nulls.

    The held-out faces' hashes (and mirrored hashes) are recomputed from their pixels in the face
    store, the pool's come from its table. Hashes alone pick the candidates; only their pixels are
    loaded for the correlation check, so a large pool costs little."""
    out = pool[["image_id", "source", "source_path", "face_index", "pool_label"]].reset_index(drop=True)
    for col in MATCH_COLUMNS:
        out[col] = pd.Series([None] * len(out), dtype="object")
    heldout = splits.loc[splits["split"].isin(list(heldout_splits)), ["image_id", "split"]].merge(
        manifest[["image_id", "source", "source_path", "face_path"]], on="image_id")
    if not len(out) or not len(heldout):
        return out
    ref_pixels = load_faces(data_root, heldout["face_path"].tolist())
    ref_hash, ref_mirror = phashes(ref_pixels)
    hashes = from_hex(pool["phash"].tolist())
    mirror = from_hex(pool["phash_mirror"].tolist()) if rule.match_mirrored else None
    ref_mirror = ref_mirror if rule.match_mirrored else None
    found = duplicates_across(hashes, mirror, None, ref_hash, ref_mirror, None, rule.max_distance, 0.0)
    rows = np.flatnonzero(found >= 0)  # hash candidates; confirmed by pixels below
    match = np.full(len(out), -1, dtype=np.int64)
    if len(rows):
        pixels = load_faces(data_root, pool["face_path"].iloc[rows].tolist())
        match[rows] = duplicates_across(hashes[rows], None if mirror is None else mirror[rows], pixels,
                                        ref_hash, ref_mirror, ref_pixels, rule.max_distance, rule.min_correlation)
    rest = np.flatnonzero(match < 0)
    if rule.view is not None and len(rest):  # re-cropped copies pHash does not see
        paths = pool["face_path"].to_numpy()
        found, _ = view_matches_across(lambda idx: load_faces(data_root, paths[rest[idx]].tolist()), len(rest),
                                       lambda idx: ref_pixels[idx], len(ref_pixels), rule.view.min_similarity)
        match[rest] = found
    hit = np.flatnonzero(match >= 0)
    ref = heldout.iloc[match[hit]]
    for col, src in zip(MATCH_COLUMNS, ("image_id", "split", "source", "source_path")):
        out.loc[hit, col] = ref[src].to_numpy()
    return out


@dataclass
class GuardResult:
    pool: pd.DataFrame  # what stays in the pool
    excluded: pd.DataFrame  # EXCLUDED_COLUMNS rows for the pool images dropped
    matches: pd.DataFrame  # the dropped pool images with what they duplicate (MATCH_COLUMNS)


def leakage_guard(pool: pd.DataFrame, manifest: pd.DataFrame, splits: pd.DataFrame, data_root: str | Path,
                  rule: DuplicateRule) -> GuardResult:
    """Drop every pool image that duplicates a four-class image (any split); the excluded rows name
    the split and the image (``duplicate_of``)."""
    pool = pool.reset_index(drop=True)
    found = find_heldout_duplicates(pool, manifest, splits, data_root, rule)
    hit = found["duplicate_of"].notna().to_numpy()
    matches = found[hit].reset_index(drop=True)
    dropped = pool[hit].reset_index(drop=True)
    excluded = pd.DataFrame({
        "source": dropped["source"], "source_path": dropped["source_path"], "stage": STAGE_LEAKAGE_GUARD,
        "reason": ("leakage guard: duplicates " + matches["duplicate_split"] + " image " + matches["duplicate_of"]
                   + " (" + matches["duplicate_source"] + "/" + matches["duplicate_path"]
                   + "); dropped from the pretraining pool"),
        "raw_label": dropped["original_label"], "label": None, "duplicate_of": matches["duplicate_of"],
        "face_index": dropped["face_index"].astype("int64")}).reindex(columns=list(EXCLUDED_COLUMNS))
    return GuardResult(pool[~hit].reset_index(drop=True), excluded, matches)


def pool_summary(pool: pd.DataFrame) -> pd.DataFrame:
    """Pool images per source and label (a table for the UI)."""
    if not len(pool):
        return pd.DataFrame(columns=["source", "pool_label", "images"])
    return pool.groupby(["source", "pool_label"]).size().rename("images").reset_index()
