"""Face embeddings, outliers and the unlabelled images' quality flags through the real graph: a
synthetic four-class source, a pretraining pool and a ``role: unlabelled`` folder (clean faces, a
darkened face and a checkerboard that is no face). The data job publishes them and flags the
unlabelled ones too; a real (one-epoch) backbone is pretrained on the pool; ``face_embeddings``
embeds every kept and unlabelled face with it, and a second materialization reuses them all; the
review queue shows the unlabelled images' flags as reasons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from fer_pipeline.defs.assets.review import review_queue
from fer_pipeline.defs.resources import FerSettings, LabelStudio
from fer_pipeline.demo.synthetic_faces import MANIFEST_NAME, generate_demo_source
from fer_pipeline.ml.checkpoint import read_checkpoint_metadata
from fer_pipeline.paths import DataPaths
from fer_pipeline.review.embeddings import embedding_matrix
from fer_pipeline_tests.defs.test_data_pipeline_e2e import run_data_job
from fer_pipeline_tests.defs.test_pretrain_assets import _meta, _run

pytestmark = pytest.mark.slow

TRAINING = {"epochs": 1, "patience": 1, "pretrain_epochs": 1, "pretrain_min_images": 50}
NEW = [f"new_{i}.png" for i in range(3)]


def _clean_pngs(root: Path) -> list[Path]:
    defects = json.loads((root / MANIFEST_NAME).read_text())
    involved = {d["file"] for d in defects} | {d["source"] for d in defects}
    return sorted(p for p in root.rglob("*.png") if p.relative_to(root).as_posix() not in involved)


def _materialize(root: Path, keys: list[str]) -> dg.ExecuteInProcessResult:
    return _run(root, keys, TRAINING)  # the pretraining tests' runner, with this file's one-epoch budget


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("embeddings")
    generate_demo_source(root / "raw" / "demo", n_images=240, seed=5)
    extra = _clean_pngs(generate_demo_source(tmp_path_factory.mktemp("extra"), n_images=40, seed=99).root)
    unl = root / "raw" / "unl"
    unl.mkdir(parents=True)
    for name, path in zip(NEW, extra):
        shutil.copyfile(path, unl / name)
    with Image.open(extra[5]) as im:  # a face of its own (no copy of it anywhere), far too dark
        Image.fromarray((np.asarray(im.convert("L"), np.float64) * 0.12).astype(np.uint8)).save(unl / "dark.png")
    yy, xx = np.mgrid[0:96, 0:96]
    Image.fromarray((((yy // 12 + xx // 12) % 2) * 255).astype(np.uint8)).save(unl / "checkerboard.png")
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 240, "seed": 5},
        {"name": "pool", "kind": "synthetic", "role": "pretrain", "path": "raw/pool", "n_images": 150, "seed": 7},
        {"name": "unl", "kind": "image_folders", "path": "raw/unl", "role": "unlabelled"}]}))
    mp = pytest.MonkeyPatch()
    try:  # synthetic faces: the re-cropped-copy rule (calibrated on real faces) is off, as in the demo
        data = run_data_job(root, mp, run_config={"resources": {"fer": {"config": {"view_duplicates": False}}}})
    finally:
        mp.undo()
    first = _materialize(root, ["pretrained_backbone", "face_embeddings"])
    embedded = pd.read_parquet(DataPaths(root).embeddings) if first.success else None
    second = _materialize(root, ["face_embeddings"])
    return {"root": root, "data": data, "first": first, "embedded": embedded, "second": second}


def test_unlabelled_faces_get_quality_flags(world: dict) -> None:
    assert world["data"].success
    paths = DataPaths(world["root"])
    unlabelled = pd.read_parquet(paths.unlabelled).set_index("source_path")
    assert {*NEW, "dark.png", "checkerboard.png"} <= set(unlabelled.index)
    flags = pd.read_parquet(paths.report("quality_flags"))
    dark = flags[flags["image_id"] == unlabelled.loc["dark.png", "image_id"]]
    assert "dark" in set(dark["flag"]) and dark["label"].isna().all() and (dark["source"] == "unl").all()
    meta = _meta(world["data"], "data_quality_flags")
    assert meta["unlabelled_checked"] == len(unlabelled) and meta["unlabelled_flagged"] >= 1
    assert "unl" in meta["flags_by_source"]


def test_every_kept_and_unlabelled_face_is_embedded_by_the_backbone(world: dict) -> None:
    assert world["first"].success
    paths = DataPaths(world["root"])
    kept, unlabelled = pd.read_parquet(paths.manifest), pd.read_parquet(paths.unlabelled)
    table = world["embedded"]
    assert len(table) == len(kept) + len(unlabelled)
    assert set(table["image_id"]) == set(kept["image_id"]) | set(unlabelled["image_id"])
    x = embedding_matrix(table)
    assert x.shape[1] == 128 and np.isfinite(x).all()  # cnn4's pooled last block
    meta = _meta(world["first"], "face_embeddings")
    assert (meta["computed"], meta["reused"], meta["not_embedded"]) == (len(table), 0, 0)
    assert meta["model"] == "backbone" and "saw no four-class label" in meta["model_why"]
    sha = read_checkpoint_metadata(paths.backbone("cnn4"))  # the identity names the published backbone
    assert sha["model_name"] in table["model"].iloc[0] and (table["model"] == meta["model_identity"]).all()
    outliers = pd.read_parquet(paths.report("outliers"))
    assert len(outliers) == meta["outliers"] <= 0.02 * len(table)
    assert all(r.startswith("outlier: far from its 10 nearest neighbours in the backbone's") for r in outliers["reason"])
    # Measured, not asserted: here the one-epoch backbone puts the checkerboard (no face) at 4x the median face's
    # distance, the only outlier; with view duplicates on (another pool, so another backbone) it flags nothing.
    # Whether a non-face stands out depends on the backbone: the unit tests plant an outlier in a known geometry.


def test_a_second_materialization_reuses_every_embedding(world: dict) -> None:
    assert world["second"].success
    meta = _meta(world["second"], "face_embeddings")
    n = len(world["embedded"])
    assert (meta["computed"], meta["reused"], meta["dropped"]) == (0, n, 0)
    again = pd.read_parquet(DataPaths(world["root"]).embeddings)
    np.testing.assert_array_equal(embedding_matrix(again), embedding_matrix(world["embedded"]))


def test_the_queue_shows_the_unlabelled_images_flags(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FER_LABEL_STUDIO_URL", "FER_LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    root = world["root"]
    result = dg.materialize([review_queue], resources={"fer": FerSettings(data_root=str(root)),
                                                       "label_studio": LabelStudio()})
    assert result.success
    queue = pd.read_parquet(DataPaths(root).review_queue).set_index("source_path")
    assert "dark: 90th percentile intensity" in queue.loc["dark.png", "reasons"]
    assert queue.loc["dark.png", "reasons"].startswith("unlabelled: not scored")
    outliers = pd.read_parquet(DataPaths(root).report("outliers"))
    shown = queue[queue["image_id"].isin(outliers["image_id"])]
    assert shown["reasons"].str.contains("outlier: far from its 10 nearest neighbours").all()
