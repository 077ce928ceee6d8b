"""Sources catalogued as unlabelled (``role: unlabelled``): the catalogue refuses labels on them,
the inventory marks their images ``unlabelled``, de-duplication keeps a labelled face over its
unlabelled copy, reviews bring them into the four classes, and the review queue ranks them least
certain first. The whole loop through the data job is in
``fer_pipeline_tests/defs/test_unlabelled_e2e.py``."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from fer_pipeline.classes import CLASSES
from fer_pipeline.dataset.manifest import (
    EXCLUDED,
    LABELLED,
    apply_reviews,
    check_accounting,
    split_unlabelled,
)
from fer_pipeline.dedup.groups import deduplicate
from fer_pipeline.review.queue import (
    FLAGGED,
    SCORED,
    SUSPECT,
    UNLABELLED,
    UNLABELLED_UNSCORED_REASON,
    UNSCORED_REASON,
    build_review_queue,
    rank_unlabelled,
)
from fer_pipeline.schema import EXCLUDED_COLUMNS, REVIEW_COLUMNS
from fer_pipeline.sources.catalog import CatalogError, parse_catalog
from fer_pipeline.sources.inventory import JUNK, NOT_IMAGE, build_inventory
from fer_pipeline.sources.inventory import UNLABELLED as STATUS_UNLABELLED
from fer_pipeline_tests.conftest import face_png, write

PROBS = [f"p_{c}" for c in CLASSES]


# --------------------------------------------------------------------------------------------
# catalogue and inventory
# --------------------------------------------------------------------------------------------

def _parse(entry: dict, root: Path):
    (root / "src").mkdir(exist_ok=True)
    return parse_catalog({"sources": [{"name": "u", "kind": "image_folders", "path": "src", **entry}]}, root)


def test_an_unlabelled_source_needs_no_label_map(tmp_path: Path) -> None:
    spec = _parse({"role": "unlabelled"}, tmp_path).sources[0]
    assert spec.unlabelled and spec.label_map == {} and spec.map_label("angry") is None
    assert spec.pool_label("angry") is None


@pytest.mark.parametrize("entry, field, message", [
    ({"label_map": {"angry": "Angry"}}, "label_map", "a 'role: unlabelled' source has no classes yet"),
    ({"pretrain_labels": "all"}, "pretrain_labels", "a 'role: unlabelled' source has no labels to give the pretraining"),
])
def test_labels_on_an_unlabelled_source_fail_naming_source_and_field(tmp_path: Path, entry: dict, field: str,
                                                                     message: str) -> None:
    with pytest.raises(CatalogError, match=re.escape(f"source 'u', field '{field}': {message}")):
        _parse({"role": "unlabelled", **entry}, tmp_path)


def test_a_synthetic_source_cannot_be_unlabelled(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=re.escape("source 'u', field 'role': 'unlabelled' applies to sources")):
        _parse({"kind": "synthetic", "role": "unlabelled"}, tmp_path)


def test_inventory_marks_images_unlabelled_ignoring_folders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "loose.png", face_png(1))
    write(src / "Angry" / "in_a_class_folder.png", face_png(2))  # the folder is no label here
    write(src / "test" / "hinted.png", face_png(3))
    write(src / "notes.pdf", b"%PDF-1.4 not an image")
    write(src / ".DS_Store", b"junk")
    table = build_inventory(_parse({"role": "unlabelled"}, tmp_path), tmp_path).table.set_index("source_path")
    images = ["loose.png", "Angry/in_a_class_folder.png", "test/hinted.png"]
    assert (table.loc[images, "status"] == STATUS_UNLABELLED).all()
    assert table.loc[images, ["label", "raw_label", "pool_label"]].isna().all().all()
    assert table.loc[images, "sha256"].notna().all()
    assert table.loc["test/hinted.png", "split_hint"] == "test"
    assert table.loc["notes.pdf", "status"] == NOT_IMAGE and table.loc[".DS_Store", "status"] == JUNK


# --------------------------------------------------------------------------------------------
# de-duplication
# --------------------------------------------------------------------------------------------

def _faces(rows: list[tuple[str, str | None, str, int]]) -> pd.DataFrame:
    """(name, label, pixel hash, width) -> the columns deduplicate needs; distinct phashes (and
    max_distance 0), so only the exact copies (same pixel hash) are grouped."""
    return pd.DataFrame([{"image_id": f"id_{name}", "source": "s", "source_path": f"{name}.png", "label": label,
                          "width": width, "height": width, "bytes": 1000, "pixel_sha": pixel,
                          "phash": f"{i + 1:016x}",
                          "phash_mirror": "ffffffffffffffff"}
                         for i, (name, label, pixel, width) in enumerate(rows)])


def test_a_labelled_face_represents_its_group_over_a_larger_unlabelled_copy() -> None:
    faces = _faces([("labelled", "Angry", "p1", 48), ("copy", None, "p1", 96),  # the copy is larger
                    ("alone", None, "p2", 48), ("twin_a", None, "p3", 48), ("twin_b", None, "p3", 64),
                    ("x", "Angry", "p4", 48), ("y", "Tired", "p4", 48), ("z", None, "p4", 96)])
    df = deduplicate(faces, max_distance=0, match_mirrored=False).table.set_index("source_path")
    assert df.loc["labelled.png", "is_representative"] and not df.loc["copy.png", "is_representative"]
    assert df.loc["copy.png", "duplicate_of"] == "id_labelled"
    assert not df.loc[["labelled.png", "copy.png", "alone.png", "twin_a.png", "twin_b.png"], "conflict"].any()
    assert df.loc["alone.png", "is_representative"]
    assert df.loc["twin_b.png", "is_representative"]  # both unlabelled: the usual rule (larger)
    assert df.loc[["x.png", "y.png", "z.png"], "conflict"].all()  # two classes conflict; a null label is no third


# --------------------------------------------------------------------------------------------
# reviews
# --------------------------------------------------------------------------------------------

def _sha(i: int) -> str:
    return f"{i:064x}"


def _rows() -> pd.DataFrame:
    """Two labelled manifest rows and three unlabelled ones (null label)."""
    return pd.DataFrame({"image_id": [f"id{i}" for i in range(5)], "source": ["a", "a", "u", "u", "u"],
                         "source_path": ["Angry/0.png", "Angry/1.png", "u2.png", "u3.png", "u4.png"],
                         "face_index": 0, "sha256": [_sha(i) for i in range(5)],
                         "original_label": ["angry", "angry", None, None, None],
                         "label": ["Angry", "Angry", None, None, None]})


def _review(task: int, sha: str, decision: str, path: str) -> dict:
    return {"sha256": sha, "face_index": 0, "image_id": None, "source": "u", "source_path": path,
            "decision": decision, "reviewer": "r@example.com", "time": "2026-01-01T00:00:00+00:00",
            "task_id": task, "annotation_id": task * 10, "project": "p", "refused": None}


def test_a_class_decision_brings_an_unlabelled_image_into_the_manifest_with_provenance() -> None:
    excluded = pd.DataFrame(columns=list(EXCLUDED_COLUMNS))
    reviews = pd.DataFrame([_review(1, _sha(2), "Focused", "u2.png"), _review(2, _sha(3), "not a face", "u3.png")],
                           columns=list(REVIEW_COLUMNS))
    rows, out, report = apply_reviews(_rows(), excluded, reviews)
    manifest, unlabelled = split_unlabelled(rows)
    assert report.set_index("task_id")["outcome"].to_dict() == {1: LABELLED, 2: EXCLUDED}
    assert report["applied"].all()
    assert manifest["source_path"].tolist() == ["Angry/0.png", "Angry/1.png", "u2.png"]
    row = manifest.set_index("image_id").loc["id2"]
    assert (row["label"], row["reviewed_label"]) == ("Focused", "Focused") and pd.isna(row["label_before_review"])
    assert row["review_source"] == ("label-studio p task 1 annotation 10 by r@example.com at "
                                    "2026-01-01T00:00:00+00:00")
    assert unlabelled["image_id"].tolist() == ["id4"] and unlabelled["label"].isna().all()
    moved = out.set_index("source_path").loc["u3.png"]
    assert moved["stage"] == "review" and moved["reason"].startswith("review: not a face (label-studio p task 2")
    inputs = _rows()[["source", "source_path", "face_index"]]
    accounting = check_accounting(inputs, manifest, out, unlabelled=unlabelled)
    assert accounting["balanced"] and accounting["n_unlabelled"] == 1
    assert not check_accounting(inputs, manifest, out)["balanced"]  # the unlabelled image counts


# --------------------------------------------------------------------------------------------
# review queue
# --------------------------------------------------------------------------------------------

def _manifest() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["k0", "k1", "k2"], "sha256": [_sha(i) for i in range(3)], "face_index": 0,
                         "source": "a", "source_path": ["0.png", "1.png", "2.png"],
                         "face_path": ["faces/x.npy#0", "faces/x.npy#1", "faces/x.npy#2"], "label": "Angry",
                         "review_source": None})


def _unlabelled() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["u0", "u1", "u2", "u3"], "sha256": [_sha(10 + i) for i in range(4)],
                         "face_index": 0, "source": "u", "source_path": [f"u{i}.png" for i in range(4)],
                         "face_path": [f"faces/y.npy#{i}" for i in range(4)], "label": None,
                         "review_source": [None, None, None, "label-studio p task 9"]})


def _unlabelled_probs() -> pd.DataFrame:
    """u0: sure (Angry 0.90 vs 0.05), u1: torn (Tired 0.41 vs Focused 0.38); u2 not scored."""
    probs = pd.DataFrame({"image_id": ["u0", "u1"], "p_Neutral": [0.05, 0.11], "p_Focused": [0.0, 0.38],
                          "p_Tired": [0.05, 0.41], "p_Angry": [0.90, 0.10]})
    return probs[["image_id", *PROBS]].assign(probabilities="calibrated (shipped model m)")


def test_rank_unlabelled_puts_the_least_certain_first() -> None:
    ranked = rank_unlabelled(_unlabelled().iloc[:3], _unlabelled_probs())
    assert ranked["image_id"].tolist() == ["u1", "u0", "u2"]
    assert ranked["reasons"].tolist() == ["unlabelled: least certain (top-2 margin 0.03)",
                                          "unlabelled: least certain (top-2 margin 0.85)", UNLABELLED_UNSCORED_REASON]
    assert ranked["score"].tolist() == pytest.approx([0.97, 0.15, 0.0])
    assert (ranked["tier"] == UNLABELLED).all()


def test_unlabelled_images_come_after_the_flagged_and_before_the_scored_tier() -> None:
    issues = pd.DataFrame({"rank": [1, 2], "image_id": ["k0", "k1"], "given_label": "Angry",
                           "predicted_label": ["Tired", "Angry"], "self_confidence": [0.1, 0.8],
                           "score": [0.1, 0.8], "is_label_issue": [True, False]})
    flags = pd.DataFrame({"image_id": ["k2"], "score": [0.5], "reason": ["dark: x"]})
    queue = build_review_queue(_manifest(), issues, flags=flags, unlabelled=_unlabelled(),
                               unlabelled_probabilities=_unlabelled_probs())
    assert SUSPECT < FLAGGED < UNLABELLED < SCORED
    # suspect k0, flagged k2, unlabelled least certain first (u3 was reviewed: left out), then scored k1
    assert queue["image_id"].tolist() == ["k0", "k2", "u1", "u0", "u2", "k1"]
    unl = queue.set_index("image_id").loc[["u1", "u0", "u2"]]
    assert unl["label"].isna().all() and unl["image"].tolist() == ["faces/y.npy#1", "faces/y.npy#0", "faces/y.npy#2"]
    assert unl["predicted"].tolist()[:2] == ["Tired", "Angry"] and pd.isna(unl.loc["u2", "predicted"])
    assert unl.loc["u1", "p_Focused"] == pytest.approx(0.38)
    assert unl.loc["u1", "probabilities"] == "calibrated (shipped model m)"
    assert unl.loc["u2", "reasons"] == UNLABELLED_UNSCORED_REASON


def test_without_a_model_unlabelled_images_are_listed_unscored_saying_why() -> None:
    queue = build_review_queue(_manifest(), unlabelled=_unlabelled(),
                               unlabelled_unscored_reason="unlabelled: not scored (no model here)")
    assert queue["image_id"].tolist() == ["u0", "u1", "u2", "k0", "k1", "k2"]
    assert (queue["reasons"].iloc[:3] == "unlabelled: not scored (no model here)").all()
    assert (queue["reasons"].iloc[3:] == UNSCORED_REASON).all() and queue["predicted"].isna().all()


def test_score_unlabelled_runs_the_shipped_model_in_the_queue_class_order(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped model's probabilities come back per image in CLASSES order (the model's own order
    may differ); a model for another face size, or none, leaves them unscored saying why."""
    from types import SimpleNamespace

    import numpy as np

    from fer_pipeline.faces.store import FaceStore
    from fer_pipeline.ml import shipped as shipped_module
    from fer_pipeline.paths import DataPaths
    from fer_pipeline.review.unlabelled import score_unlabelled

    paths = DataPaths(tmp_path)
    refs = FaceStore(tmp_path, "k").write_shard("s", np.stack([np.full((48, 48), v, np.uint8) for v in (10, 200)]))
    unlabelled = pd.DataFrame({"image_id": ["u0", "u1"], "face_path": refs})
    assert score_unlabelled(unlabelled, paths).probabilities is None  # no shipped model
    write(paths.shipped_json, b"{}")
    order = tuple(reversed(CLASSES))

    def predict_proba(faces: np.ndarray) -> np.ndarray:  # the model's class order: reversed
        bright = faces.reshape(len(faces), -1).mean(axis=1) > 100
        return np.array([[0.7, 0.1, 0.1, 0.1] if b else [0.1, 0.1, 0.1, 0.7] for b in bright])

    model = SimpleNamespace(classes=order, input_size=(48, 48), predict_proba=predict_proba)
    monkeypatch.setattr(shipped_module, "load_shipped",
                        lambda *a, **k: SimpleNamespace(model=model, spec=SimpleNamespace(name="m")))
    scores = score_unlabelled(unlabelled, paths)
    table = scores.probabilities.set_index("image_id")
    assert table.loc["u0", f"p_{order[-1]}"] == pytest.approx(0.7) and table.loc["u1", f"p_{order[0]}"] == 0.7
    assert (table["probabilities"] == "calibrated (shipped model m)").all()
    model.input_size = (64, 64)
    scores = score_unlabelled(unlabelled, paths)
    assert scores.probabilities is None and "takes (64, 64) faces" in scores.unscored_reason
