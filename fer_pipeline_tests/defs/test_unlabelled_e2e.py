"""End to end through the real ``data_pipeline`` job: a ``role: unlabelled`` folder source beside
the synthetic demo source. Its new faces land in the published unlabelled table, its copy of a
labelled demo face is excluded as that face's duplicate, the accounting check passes and the
splits hold no unlabelled image; then a review gives one unlabelled image a class (it joins the
manifest and the splits, with provenance) and says another is not a face (excluded, stage
review), and the accounting still balances; the review queue lists the one left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from fer_pipeline.classes import CLASSES
from fer_pipeline.defs.assets.review import review_queue
from fer_pipeline.defs.resources import FerSettings, LabelStudio
from fer_pipeline.demo.synthetic_faces import MANIFEST_NAME, generate_demo_source
from fer_pipeline.review.label_studio import build_tasks
from fer_pipeline.review.queue import UNLABELLED_UNSCORED_REASON, UNSCORED_REASON
from fer_pipeline.schema import REVIEW_COLUMNS
from fer_pipeline_tests.defs.test_data_pipeline_e2e import run_data_job

# view_duplicates off: the re-cropped-copy rule, calibrated on real faces, links a few generated faces to
# one another (fer_pipeline_tests/dedup/test_views.py tests it; the demo turns it off for the same reason)
NO_VIEWS = {"resources": {"fer": {"config": {"view_duplicates": False}}}}

NEW = [f"new_{i}.png" for i in range(3)]


def _clean_pngs(root: Path) -> list[Path]:
    """The generator's clean face crops: no planted defect is one of them or copied from one."""
    defects = json.loads((root / MANIFEST_NAME).read_text())
    involved = {d["file"] for d in defects} | {d["source"] for d in defects}
    return sorted(p for p in root.rglob("*.png") if p.relative_to(root).as_posix() not in involved)


def _tables(root: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(root / "manifest" / f"{name}.parquet")
            for name in ("manifest", "excluded", "unlabelled", "splits", "raw_inventory")}


def _checks(result) -> dict[str, bool]:  # type: ignore[no-untyped-def]
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("unlabelled")
    demo = generate_demo_source(root / "raw" / "demo", n_images=320, seed=3).root  # the asset finds it complete
    labelled = _clean_pngs(demo)[0]
    extra = generate_demo_source(tmp_path_factory.mktemp("extra"), n_images=40, seed=99).root
    unl = root / "raw" / "unl"
    unl.mkdir(parents=True)
    for name, path in zip(NEW, _clean_pngs(extra)):
        shutil.copyfile(path, unl / name)
    shutil.copyfile(labelled, unl / "copy.png")  # an unlabelled copy of a labelled face
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 320, "seed": 3},
        {"name": "unl", "kind": "image_folders", "path": "raw/unl", "role": "unlabelled"}]}))
    mp = pytest.MonkeyPatch()
    try:
        first = run_data_job(root, mp, run_config=NO_VIEWS)
        before = _tables(root)
        by_path = before["unlabelled"].set_index("source_path")
        reviews = pd.DataFrame([
            {"sha256": by_path.loc[path, "sha256"], "face_index": 0, "image_id": by_path.loc[path, "image_id"],
             "source": "unl", "source_path": path, "decision": decision, "reviewer": "r@example.com",
             "time": "2026-01-01T00:00:00+00:00", "task_id": task, "annotation_id": task * 10, "project": "p",
             "refused": None}
            for task, (path, decision) in enumerate([(NEW[0], "Tired"), (NEW[1], "not a face")], start=1)],
            columns=list(REVIEW_COLUMNS))
        (root / "reviews").mkdir(exist_ok=True)
        reviews.to_parquet(root / "reviews" / "reviews.parquet", index=False)
        second = run_data_job(root, mp, run_config=NO_VIEWS)
    finally:
        mp.undo()
    return {"root": root, "labelled": labelled.relative_to(demo).as_posix(), "first": first, "before": before,
            "second": second, "after": _tables(root)}


def test_unlabelled_faces_are_published_apart_and_their_copy_is_a_duplicate(world: dict) -> None:
    assert world["first"].success
    checks = _checks(world["first"])
    assert checks["manifest_accounting"] and checks["sources_have_images"] and checks["split_no_group_leakage"]
    t = world["before"]
    inv = t["raw_inventory"].set_index("source_path")
    assert (inv.loc[[*NEW, "copy.png"], "status"] == "unlabelled").all()
    unlabelled = t["unlabelled"]
    assert sorted(unlabelled["source_path"]) == NEW and (unlabelled["source"] == "unl").all()
    assert unlabelled["label"].isna().all()
    copy = t["excluded"][(t["excluded"]["source"] == "unl")].set_index("source_path").loc["copy.png"]
    kept = t["manifest"].set_index(["source", "source_path"]).loc[("demo", world["labelled"])]
    assert copy["stage"] == "deduplication" and copy["duplicate_of"] == kept["image_id"]
    assert copy["reason"] == f"duplicate of {kept['image_id']} (demo/{world['labelled']})"
    assert (t["manifest"]["source"] == "demo").all() and t["manifest"]["label"].notna().all()
    assert not set(t["splits"]["image_id"]) & set(unlabelled["image_id"])
    assert set(t["splits"]["image_id"]) == set(t["manifest"]["image_id"])
    # accounted once: every file in exactly one of manifest, excluded, pool, unlabelled
    assert len(t["manifest"]) + len(t["excluded"]) + len(unlabelled) == len(t["raw_inventory"])


def test_reviews_bring_an_unlabelled_image_into_the_four_classes(world: dict) -> None:
    assert world["second"].success
    assert _checks(world["second"])["manifest_accounting"]
    before, t = world["before"], world["after"]
    first_id = before["unlabelled"].set_index("source_path").loc[NEW[0], "image_id"]
    row = t["manifest"].set_index("image_id").loc[first_id]
    assert (row["source"], row["source_path"], row["label"], row["reviewed_label"]) == ("unl", NEW[0], "Tired",
                                                                                        "Tired")
    assert pd.isna(row["label_before_review"]) and pd.isna(row["original_label"])
    assert row["review_source"] == "label-studio p task 1 annotation 10 by r@example.com at 2026-01-01T00:00:00+00:00"
    assert first_id in set(t["splits"]["image_id"])
    gone = t["excluded"].set_index(["source", "source_path"]).loc[("unl", NEW[1])]
    assert gone["stage"] == "review" and gone["reason"].startswith("review: not a face (label-studio p task 2")
    assert t["unlabelled"]["source_path"].tolist() == [NEW[2]]
    assert len(t["manifest"]) == len(before["manifest"]) + 1
    assert len(t["manifest"]) + len(t["excluded"]) + len(t["unlabelled"]) == len(t["raw_inventory"])
    meta = next(e for e in world["second"].get_asset_materialization_events()
                if e.asset_key.path[-1] == "manifest").materialization.metadata
    assert meta["reviewed_images"].value == 2 and meta["unlabelled"].value == 1


def test_the_review_queue_lists_the_unlabelled_image_before_the_unscored_ones(world: dict,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """No shipped model here: the unlabelled image is listed unscored, saying so, after the
    quality-flagged faces and before the kept images nothing scored; its task shows no label."""
    for var in ("FER_LABEL_STUDIO_URL", "FER_LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    root = world["root"]
    resources = {"fer": FerSettings(data_root=str(root)), "label_studio": LabelStudio()}
    result = dg.materialize([review_queue], resources=resources)
    assert result.success
    queue = pd.read_parquet(root / "reviews" / "review_queue.parquet")
    row = queue[queue["source"] == "unl"]
    assert row["source_path"].tolist() == [NEW[2]]  # the reviewed ones are not queued again
    assert row["label"].isna().all() and row["reasons"].tolist() == [UNLABELLED_UNSCORED_REASON]
    at = int(row["rank"].iloc[0])
    flagged = queue["reasons"] != UNSCORED_REASON
    assert flagged.iloc[: at - 1].all() and (queue["reasons"].iloc[at:] == UNSCORED_REASON).all()
    assert (queue["reasons"] == UNSCORED_REASON).sum() == len(queue) - at
    task = build_tasks(row, root, "p")[0]
    assert "predictions" not in task and task["data"]["label"] == "current label: none (unlabelled)"


def test_with_a_real_shipped_model_the_unlabelled_image_is_scored(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (tiny, one-epoch) model trained on the published faces and shipped: the queue scores
    the unlabelled image with it: a prediction, calibrated probabilities that sum to 1 and the
    top-2 margin in the reason, equal to what the model itself says of that face."""
    import numpy as np

    from fer_pipeline.classes import CLASS_TO_INDEX
    from fer_pipeline.faces.store import load_faces
    from fer_pipeline.ml import ArchConfig, TrainConfig, train_model
    from fer_pipeline.ml.checkpoint import load_checkpoint, save_checkpoint
    from fer_pipeline.paths import DataPaths
    from fer_pipeline.schema import ShippedMember, ShippedSpec

    for var in ("FER_LABEL_STUDIO_URL", "FER_LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    root = world["root"]
    paths = DataPaths(root)
    kept = pd.read_parquet(paths.manifest)
    faces = load_faces(root, kept["face_path"].tolist())
    labels = kept["label"].map(CLASS_TO_INDEX).to_numpy()
    result = train_model(faces, labels, faces, labels, ArchConfig("tiny", (8, 16)),
                         TrainConfig(epochs=1, batch_size=64, warmup_epochs=0, num_threads=1))
    ckpt = save_checkpoint(paths.models_dir / "tiny.safetensors", result, data_version="tiny")
    spec = ShippedSpec("single", "tiny", (ShippedMember("tiny", "models/tiny.safetensors",
                                                         float(load_checkpoint(ckpt).temperature)),),
                       "validation macro-F1", "tiny")
    paths.shipped_json.write_text(json.dumps(spec.to_json()))
    try:
        assert dg.materialize([review_queue], resources={"fer": FerSettings(data_root=str(root)),
                                                         "label_studio": LabelStudio()}).success
        queue = pd.read_parquet(paths.review_queue)
        row = queue[queue["source"] == "unl"].iloc[0]
        probs = np.array([row[f"p_{c}"] for c in CLASSES])
        assert row["predicted"] == CLASSES[int(probs.argmax())] and probs.sum() == pytest.approx(1.0)
        top2 = np.sort(probs)[-2:]
        assert row["reasons"] == f"unlabelled: least certain (top-2 margin {top2[1] - top2[0]:.2f})"
        unl = pd.read_parquet(root / "manifest" / "unlabelled.parquet").set_index("source_path")
        own = load_checkpoint(ckpt).predict_proba(load_faces(root, [unl.loc[NEW[2], "face_path"]]))[0]
        order = [list(load_checkpoint(ckpt).classes).index(c) for c in CLASSES]
        assert np.allclose(own[order], probs, atol=1e-5)
    finally:
        paths.shipped_json.unlink()
