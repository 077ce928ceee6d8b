"""The manifest: one row per kept image, and the excluded table: one row per file not kept.

Every file of every source lands in exactly one of the two, or in the pretraining pool
(:mod:`fer_pipeline.dataset.pool`), with the stage that excluded it and a reason (junk, not an
image, unmapped label, rejected by decoding, no face found, duplicate of a named kept image,
label conflict). ``check_accounting`` proves it. A photo of a ``faces: detect`` source with
``keep: all`` may give several faces: each is one *item*, named by ``(source, source_path,
face_index)``, and it is items that are accounted for (:func:`accounting_items`). Pool items are
decoded like the others but never meet the four classes' de-duplication or label conflicts.

Images of a ``role: unlabelled`` source (inventory status ``unlabelled``: no class yet) are
de-duplicated *with* the labelled faces, so an unlabelled copy of a labelled face is excluded as
its duplicate and a group never straddles the splits later; the representatives that are
unlabelled form the ``unlabelled`` table (:func:`build_unlabelled`, the manifest's columns with a
null label). A reviewer's class moves one into the manifest (:func:`apply_reviews`), so the
accounting is kept + excluded + pool + unlabelled = inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fer_pipeline.classes import CLASSES
from fer_pipeline.faces.framing import NO_FACE
from fer_pipeline.sources.framing import CROP, DETECT
from fer_pipeline.sources.inventory import CANDIDATE, DECODED, UNLABELLED, UNMAPPED
from fer_pipeline.paths import RELABELS_FILE
from fer_pipeline.schema import (
    DETECTION_COLUMNS,
    EXCLUDED_COLUMNS,
    MANIFEST_COLUMNS,
    MANIFEST_REVIEW_COLUMNS,
    NOT_A_FACE,
    REVIEW_EXCLUSIONS,
    STAGE_DEDUP,
    STAGE_FACES,
    STAGE_INVENTORY,
    STAGE_LABEL_MAPPING,
    STAGE_QUALITY,
    STAGE_REVIEW,
)

ITEM = ["source", "source_path", "face_index"]  # what one manifest, excluded or pool row stands for
FACE_COLUMNS = ["face_ref", "pixel_sha", "phash", "phash_mirror", "mean_intensity", "std_intensity", "width",
                 "height", "framing", "face_index", *DETECTION_COLUMNS, "face_key"]


def published_framing(framing: pd.Series) -> np.ndarray:
    """A published table's ``framing`` (crop or detect), from the face store's (crop or the
    detection's fingerprint): readers ask how a face was framed, not with which settings."""
    return np.where(framing.fillna(CROP) == CROP, CROP, DETECT)


def image_id_for(key: pd.Series) -> pd.Series:
    """Content-addressed id from an item's face key (:func:`fer_pipeline.faces.stage.face_keys`): the
    same bytes framed the same way get the same id wherever they are found. For a crop the key is
    the file's SHA-256 (ids as before face detection existed); for a detected face it is a hash of
    the file's SHA-256, the framing fingerprint and the face index, so each face of a photo, and the
    same photo under another framing, has its own id."""
    return key.str.slice(0, 16)


def candidates_for_decoding(inventory: pd.DataFrame) -> pd.DataFrame:
    """Inventory rows that go on to decoding: target classes, pretraining-pool labels and
    unlabelled images (files with an unmapped label are not decoded)."""
    return inventory[inventory["status"].isin(list(DECODED))]


def accepted_faces(inventory: pd.DataFrame, faces: pd.DataFrame,
                   status: str | Sequence[str] = CANDIDATE) -> pd.DataFrame:
    """Accepted faces of the inventory rows with ``status`` (one status or several: target
    candidates, pool items, unlabelled images), joined with those rows: one row per face."""
    ok = faces[faces["reason"].isna()][["source", "source_path", *FACE_COLUMNS]]
    rows = inventory[inventory["status"].isin([status] if isinstance(status, str) else list(status))]
    return rows.merge(ok, on=["source", "source_path"], how="inner")


def dedup_input(inventory: pd.DataFrame, faces: pd.DataFrame) -> pd.DataFrame:
    """Accepted faces of the target candidates and the unlabelled images (one row per face; an
    unlabelled one has a null ``label``): what de-duplication groups. Pool items are not here: the
    pool has its own rules (:mod:`fer_pipeline.dataset.pool`).

    De-duplication tells faces apart by ``sha256``; here that column holds each face's key (the
    file's hash for a crop), and ``file_sha256`` the file's own hash, which :func:`build_manifest`
    puts back."""
    df = accepted_faces(inventory.drop(columns=["pool_label"], errors="ignore"), faces, (CANDIDATE, UNLABELLED))
    df["file_sha256"] = df["sha256"]
    df["sha256"] = df["face_key"]
    df["image_id"] = image_id_for(df["face_key"])
    return df


def accounting_items(inventory: pd.DataFrame, faces: pd.DataFrame) -> pd.DataFrame:
    """Every item the manifest and excluded tables must account for, once: each inventory file as
    face 0, plus each further face the faces stage kept of it (``keep: all`` photos with several
    faces). A candidate the faces stage lost still appears (as face 0), so the check would see it."""
    files = inventory[["source", "source_path"]].assign(face_index=0)
    more = faces.loc[faces["face_index"] > 0, ITEM] if len(faces) else files.iloc[0:0]
    return pd.concat([files, more], ignore_index=True)


def build_manifest(inventory: pd.DataFrame, faces: pd.DataFrame, dedup: pd.DataFrame,
                   image_size: tuple[int, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, excluded) from the three stage tables. The manifest holds the labelled
    representatives only; the unlabelled ones are :func:`build_unlabelled`'s."""
    excluded_parts: list[pd.DataFrame] = []
    # stage 1: inventory (junk, non-images, no or unmapped label); pool items go on to the pool
    inv_excl = inventory[~inventory["status"].isin(list(DECODED))].copy()
    inv_excl["stage"] = inv_excl["status"].map(lambda s: STAGE_LABEL_MAPPING if s == UNMAPPED else STAGE_INVENTORY)
    excluded_parts.append(inv_excl)
    # stage 2: decoding/validation rejects
    rejected = faces[faces["reason"].notna()][ITEM + ["reason"]]
    rej = inventory.drop(columns=["reason"]).merge(rejected, on=["source", "source_path"], how="inner")
    rej["stage"] = STAGE_FACES
    no_face = rej["reason"] == NO_FACE  # not a defect of the file: said as it is
    rej["reason"] = ("rejected: " + rej["reason"].astype(str)).where(~no_face, NO_FACE)
    excluded_parts.append(rej)
    # stage 3: duplicates and label conflicts
    rep_path = dedup[dedup["is_representative"]].set_index("dup_group")[["source", "source_path"]]
    conflicts = dedup[dedup["conflict"]].copy()
    if len(conflicts):
        labels = conflicts.groupby("dup_group")["label"].agg(lambda s: ", ".join(sorted(set(s.dropna()))))
        conflicts["reason"] = conflicts["dup_group"].map(
            lambda g: f"label conflict: duplicate group {g} is labelled {labels[g]}")
        conflicts["stage"] = STAGE_DEDUP
        conflicts["duplicate_of"] = None
        excluded_parts.append(conflicts)
    dups = dedup[~dedup["conflict"] & ~dedup["is_representative"]].copy()
    if len(dups):
        rp = dups["dup_group"].map(lambda g: f"{rep_path.loc[g, 'source']}/{rep_path.loc[g, 'source_path']}")
        dups["reason"] = "duplicate of " + dups["duplicate_of"].astype(str) + " (" + rp + ")"
        dups["stage"] = STAGE_DEDUP
        excluded_parts.append(dups)
    excluded = pd.concat([p.reindex(columns=list(EXCLUDED_COLUMNS)) for p in excluded_parts], ignore_index=True)
    excluded["face_index"] = excluded["face_index"].fillna(0).astype("int64")
    excluded = excluded.sort_values(ITEM, kind="mergesort").reset_index(drop=True)

    manifest = _kept(dedup, image_size, labelled=True)
    return manifest, excluded


def build_unlabelled(dedup: pd.DataFrame, image_size: tuple[int, int]) -> pd.DataFrame:
    """The unlabelled table: the representatives of duplicate groups with no labelled member (the
    manifest's columns, ``label`` null). Their duplicates are excluded rows of :func:`build_manifest`."""
    return _kept(dedup, image_size, labelled=False)


def _kept(dedup: pd.DataFrame, image_size: tuple[int, int], labelled: bool) -> pd.DataFrame:
    """The representatives that are kept (no label conflict), labelled or not, as manifest rows."""
    kept = dedup[dedup["is_representative"] & ~dedup["conflict"] & (dedup["label"].notna() == labelled)].copy()
    kept = kept.rename(columns={"raw_label": "original_label", "face_ref": "face_path"})
    if "file_sha256" in kept.columns:  # dedup_input lent `sha256` to the face key
        kept["sha256"] = kept["file_sha256"]
    kept["face_height"], kept["face_width"] = image_size
    for col in ("width", "height", "face_height", "face_width", "dup_group", "dup_group_size", "bytes"):
        kept[col] = kept[col].astype("int64")
    for col in ("mean_intensity", "std_intensity"):
        kept[col] = kept[col].astype("float64")
    kept = kept.reindex(columns=list(dict.fromkeys([*kept.columns, *MANIFEST_COLUMNS])))
    kept["framing"] = published_framing(kept["framing"])
    kept["face_index"] = kept["face_index"].fillna(0).astype("int64")
    kept["faces_found"] = kept["faces_found"].astype("Int64")
    for col in DETECTION_COLUMNS[1:]:
        kept[col] = kept[col].astype("Float64")
    return kept[list(MANIFEST_COLUMNS)].sort_values(ITEM, kind="mergesort").reset_index(drop=True)


def split_unlabelled(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, unlabelled) from rows of both (after :func:`apply_reviews`: a reviewed image has
    its class now, the others are still unlabelled), each in item order."""
    has_label = rows["label"].notna()
    return tuple(rows[m].sort_values(ITEM, kind="mergesort").reset_index(drop=True)  # type: ignore[return-value]
                 for m in (has_label, ~has_label))


def check_accounting(inventory: pd.DataFrame, manifest: pd.DataFrame, excluded: pd.DataFrame,
                     pool: pd.DataFrame | None = None, unlabelled: pd.DataFrame | None = None) -> dict[str, object]:
    """Inputs = kept + not kept (+ pool, + unlabelled), with no file in two tables or twice in one.
    ``inventory`` may be :func:`accounting_items` (items, with ``face_index``): then faces are what
    is counted."""
    tables = [manifest, excluded] + [t for t in (pool, unlabelled) if t is not None]
    key = ITEM if all("face_index" in t.columns for t in (inventory, *tables)) else ITEM[:2]
    inputs = set(map(tuple, inventory[key].to_numpy()))
    rows = [list(map(tuple, t[key].to_numpy())) for t in tables]
    seen = [r for table in rows for r in table]
    twice = len(set(seen)) != len(seen)  # in two tables, or twice in one
    in_two = {r for i, a in enumerate(rows) for b in rows[i + 1:] for r in set(a) & set(b)}
    missing = inputs - set(seen)
    return {"n_inputs": len(inventory), "n_kept": len(manifest), "n_excluded": len(excluded),
            "n_pool": len(pool) if pool is not None else 0,
            "n_unlabelled": len(unlabelled) if unlabelled is not None else 0,
            "balanced": len(inventory) == len(seen) and not twice and not missing,
            "in_both": sorted(in_two)[:5], "missing": sorted(missing)[:5]}


# --------------------------------------------------------------------------------------------
# User relabels: <data root>/relabels.csv (image_id,label[,note]), applied on every manifest run
# --------------------------------------------------------------------------------------------

RELABEL_REPORT_COLUMNS = ["line", "image_id", "source", "source_path", "label_before", "label_after", "note",
                          "applied"]


class RelabelError(ValueError):
    """A relabel CSV row that cannot be applied; the message names the file line(s)."""


def read_relabels(path: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The relabel CSV as strings with a ``line`` column (file line number), or None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    if not path.read_text(encoding="utf-8-sig").strip():
        return None  # an empty file: nothing to relabel
    df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("image_id", "label") if c not in df.columns]
    if missing:
        raise RelabelError(f"{path}: missing column(s) {', '.join(missing)}; expected a header image_id,label[,note]")
    df = df.map(lambda v: v.strip() if isinstance(v, str) else v)
    df.insert(0, "line", range(2, len(df) + 2))  # line 1 is the header
    return df[(df["image_id"] != "") | (df["label"] != "")].reset_index(drop=True)


def apply_relabels(manifest: pd.DataFrame, relabels: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply a user's corrections: (manifest with ``label`` changed and ``relabelled_from`` set,
    report of every row). Nothing is applied unless every row is valid: an unknown image id, a
    label outside the classes or contradictory rows raise :class:`RelabelError` naming the lines.
    A row giving the label the image already has is reported with ``applied`` False.
    """
    out = manifest.copy()
    out["relabelled_from"] = pd.Series([None] * len(out), index=out.index, dtype="object")
    if relabels is None or relabels.empty:
        out["relabelled_from"] = out["relabelled_from"].astype("string")
        return out, pd.DataFrame(columns=RELABEL_REPORT_COLUMNS)
    rel = relabels.copy()
    if "line" not in rel.columns:
        rel.insert(0, "line", range(2, len(rel) + 2))
    if "note" not in rel.columns:
        rel["note"] = ""
    by_lower = {c.lower(): c for c in CLASSES}
    index = {iid: i for i, iid in zip(out.index, out["image_id"])}
    problems: list[str] = []
    wanted: dict[str, tuple[str, int]] = {}
    for line, image_id, label in zip(rel["line"], rel["image_id"].astype(str), rel["label"].astype(str)):
        target = by_lower.get(label.strip().lower())
        if image_id not in index:
            problems.append(f"line {line}: image_id '{image_id}' is not in the manifest (unknown, excluded as a "
                            "duplicate/conflict, or its file was removed)")
        if target is None:
            problems.append(f"line {line}: label '{label}' for image_id '{image_id}' is not one of the classes "
                            f"{', '.join(CLASSES)}")
        elif image_id in wanted and wanted[image_id][0] != target:
            problems.append(f"line {line}: image_id '{image_id}' is relabelled to {target} here but to "
                            f"{wanted[image_id][0]} on line {wanted[image_id][1]}")
        elif target is not None:
            wanted.setdefault(image_id, (target, int(line)))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  … {len(problems) - 20} more" if len(problems) > 20 else "")
        raise RelabelError(f"{RELABELS_FILE}: {len(problems)} problem(s), nothing was relabelled:\n  {shown}")
    rows = []
    for line, image_id, note in zip(rel["line"], rel["image_id"].astype(str), rel["note"].astype(str)):
        target, first_line = wanted[image_id]
        i = index[image_id]
        before = out.at[i, "label"] if pd.isna(out.at[i, "relabelled_from"]) else out.at[i, "relabelled_from"]
        applied = int(line) == first_line and before != target
        if applied:
            out.at[i, "relabelled_from"] = before
            out.at[i, "label"] = target
        rows.append({"line": int(line), "image_id": image_id, "source": out.at[i, "source"],
                     "source_path": out.at[i, "source_path"], "label_before": before, "label_after": target,
                     "note": note, "applied": applied})
    out["relabelled_from"] = out["relabelled_from"].astype("string")
    return out, pd.DataFrame(rows, columns=RELABEL_REPORT_COLUMNS)


# --------------------------------------------------------------------------------------------
# Reviews: <data root>/reviews/reviews.parquet (pulled from Label Studio), applied on every manifest run
# --------------------------------------------------------------------------------------------

REVIEW_OUTCOME_COLUMNS = ["sha256", "face_index", "image_id", "source", "source_path", "decision", "reviewer",
                          "time", "task_id", "annotation_id", "outcome", "applied"]
APPLIED, CONFIRMED, EXCLUDED, STALE, NOT_KEPT, UNKNOWN, SUPERSEDED = (
    "relabelled", "label confirmed", "excluded", "not applied: the file changed since it was reviewed",
    "not applied: the image is not kept", "not applied: no such image in the data", "superseded by a later review")
LABELLED = "labelled"
"""``outcome`` of a review row (:func:`apply_reviews`); only the first three and :data:`LABELLED` (an
unlabelled image given its class) change or confirm the manifest."""


def review_source(row: pd.Series) -> str:
    """Where a decision came from, as the manifest's ``review_source`` records it."""
    return (f"label-studio {row['project']} task {row['task_id']} annotation {row['annotation_id']} by "
            f"{row['reviewer']} at {row['time']}")


def apply_reviews(manifest: pd.DataFrame, excluded: pd.DataFrame, reviews: pd.DataFrame | None,
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Apply people's review decisions: (manifest, excluded, report of every usable review).

    A review names an image by its file's content hash and face index (``sha256``, ``face_index``),
    so it follows the image wherever the file sits. The latest usable review of an image decides
    (the others are reported as superseded); refused rows (``refused`` set) are not here, the
    review table keeps them with their reason. A class relabels the kept row (``label_before_review``,
    ``reviewed_label``, ``review_source`` record it; the same class confirms it); "not a face" and
    "exclude" move the row to ``excluded`` (stage ``review``), so every item is still accounted for
    once. ``manifest`` may hold unlabelled images too (null ``label``, :func:`build_unlabelled`): a
    class gives one its label (``label_before_review`` stays null: it had none), so
    :func:`split_unlabelled` then moves it to the manifest; an exclusion excludes it like any
    other. A review whose hash matches no kept image is reported, not applied: its file changed since
    (the same source path holds other bytes now), the image is not kept (excluded, e.g. as a
    duplicate) or it is unknown.
    """
    out = manifest.copy()
    for col in MANIFEST_REVIEW_COLUMNS:
        out[col] = pd.Series([None] * len(out), index=out.index, dtype="object")
    report_rows: list[dict[str, object]] = []
    if reviews is not None and len(reviews):
        usable = reviews[reviews["refused"].isna()] if "refused" in reviews.columns else reviews
        usable = usable.assign(face_index=usable["face_index"].fillna(0).astype("int64"))
        usable = usable.sort_values(["time", "annotation_id"], kind="mergesort")
        latest = usable.drop_duplicates(["sha256", "face_index"], keep="last")
        by_key = {(s, int(f)): i for i, s, f in zip(out.index, out["sha256"], out["face_index"])}
        by_item = {(s, p, int(f)): h for s, p, f, h in zip(out["source"], out["source_path"], out["face_index"],
                                                            out["sha256"])}
        not_kept = {(s, p, int(f)) for s, p, f in zip(excluded["source"], excluded["source_path"],
                                                       excluded["face_index"].fillna(0))}
        latest_ids = set(latest["annotation_id"])
        dropped: list[int] = []
        moved: list[dict[str, object]] = []
        for _, r in usable.iterrows():
            key = (r["sha256"], int(r["face_index"]))
            item = (r["source"], r["source_path"], int(r["face_index"]))
            i = by_key.get(key)
            if r["annotation_id"] not in latest_ids:
                outcome = SUPERSEDED
            elif i is None:
                outcome = (STALE if item in by_item else NOT_KEPT if item in not_kept else UNKNOWN)
            elif r["decision"] in REVIEW_EXCLUSIONS:
                outcome = EXCLUDED
                row = out.loc[i]
                what = "not a face" if r["decision"] == NOT_A_FACE else "excluded by the reviewer"
                moved.append({"source": row["source"], "source_path": row["source_path"], "stage": STAGE_REVIEW,
                              "reason": f"review: {what} ({review_source(r)})", "raw_label": row["original_label"],
                              "label": row["label"], "duplicate_of": None, "face_index": int(row["face_index"])})
                dropped.append(i)
            else:
                before = out.at[i, "label"]
                outcome = LABELLED if pd.isna(before) else CONFIRMED if before == r["decision"] else APPLIED
                out.at[i, "label_before_review"] = None if pd.isna(before) else before
                out.at[i, "reviewed_label"] = r["decision"]
                out.at[i, "review_source"] = review_source(r)
                out.at[i, "label"] = r["decision"]
            report_rows.append({**{c: r.get(c) for c in REVIEW_OUTCOME_COLUMNS[:10]},
                                "image_id": out.at[i, "image_id"] if i is not None else r.get("image_id"),
                                "outcome": outcome, "applied": outcome in (APPLIED, CONFIRMED, EXCLUDED, LABELLED)})
        if dropped:
            out = out.drop(index=dropped)
            excluded = with_excluded(excluded, pd.DataFrame(moved))
    for col in MANIFEST_REVIEW_COLUMNS:
        out[col] = out[col].astype("string")
    report = pd.DataFrame(report_rows, columns=REVIEW_OUTCOME_COLUMNS)
    return out.reset_index(drop=True), excluded, report


def exclude_flagged(manifest: pd.DataFrame, excluded: pd.DataFrame, flags: pd.DataFrame,
                    exclude: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Move kept faces that carry a flag named in ``exclude`` to the excluded table.

    ``flags``: rows of ``image_id``, ``flag``, ``reason`` (:func:`fer_pipeline.quality.flags.quality_flags`
    keyed by image). The excluded row's stage is ``quality`` and its reason lists the flags' own
    reasons. A face a reviewer has already decided on (``review_source`` set) stays: a person's
    decision outranks a threshold. Returns (manifest, excluded, the moved rows).
    """
    if not len(exclude) or not len(flags) or not len(manifest):
        return manifest, excluded, manifest.iloc[:0]
    hit = flags[flags["flag"].isin(list(exclude))].sort_values(["image_id", "flag"], kind="mergesort")
    reasons = hit.groupby("image_id", sort=False)["reason"].agg("; ".join)
    reviewed = (manifest["review_source"].notna() if "review_source" in manifest.columns
                else pd.Series(False, index=manifest.index))
    moving = manifest["image_id"].isin(reasons.index) & ~reviewed
    moved = manifest[moving]
    if not len(moved):
        return manifest, excluded, moved
    rows = pd.DataFrame({
        "source": moved["source"].to_numpy(), "source_path": moved["source_path"].to_numpy(),
        "stage": STAGE_QUALITY, "reason": ("quality flag: " + moved["image_id"].map(reasons)).to_numpy(),
        "raw_label": moved["original_label"].to_numpy(), "label": moved["label"].to_numpy(),
        "duplicate_of": None, "face_index": moved["face_index"].astype("int64").to_numpy()})
    return manifest[~moving].reset_index(drop=True), with_excluded(excluded, rows), moved.reset_index(drop=True)


def with_excluded(excluded: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``excluded`` plus ``rows`` (excluded columns), in item order: the one way a later stage
    (a review, a quality flag) adds to the excluded table."""
    out = pd.concat([excluded, rows.reindex(columns=list(EXCLUDED_COLUMNS))], ignore_index=True)
    out = out.sort_values(ITEM, kind="mergesort").reset_index(drop=True)
    out["face_index"] = out["face_index"].astype("int64")
    return out
