"""Face embeddings (:mod:`fer_pipeline.review.embeddings`) on real files: a real (tiny, one-epoch)
checkpoint published as the backbone, faces in a real face-store shard. Reuse by content hash and
model identity, a face gone, an unreadable shard reported rather than fatal, the fallback when
there is no backbone, determinism, and cleanlab's kNN outlier score finding a planted outlier."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fer_pipeline.faces.store import FaceStore
from fer_pipeline.ml import ArchConfig, TrainConfig, train_model
from fer_pipeline.ml.checkpoint import save_checkpoint
from fer_pipeline.paths import DataPaths
from fer_pipeline.review.embeddings import (
    BACKBONE,
    MAIN,
    OutlierSettings,
    choose_embedder,
    embedding_matrix,
    find_outliers,
    refresh_embeddings,
)

N = 40


def _faces(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:48]
    base = (128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.float64)
    return np.clip(base + rng.normal(0, 25, (n, 48, 48)), 0, 255).astype(np.uint8)


def _checkpoint(path: Path, seed: int) -> Path:
    faces = _faces(64, seed)
    labels = np.arange(64) % 4
    result = train_model(faces, labels, faces, labels, ArchConfig("tiny", (8, 16)),
                         TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, num_threads=1, seed=seed))
    return save_checkpoint(path, result, data_version="tiny")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("emb")
    paths = DataPaths(root)
    store = FaceStore(root, "k1")
    refs = store.write_shard("s0", _faces(N, 1))
    table = pd.DataFrame({"image_id": [f"id{i}" for i in range(N)],
                          "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(N)],
                          "face_index": 0, "face_path": refs})
    backbone = _checkpoint(paths.backbone("cnn4"), 0)
    other = _checkpoint(root / "other.safetensors", 1)
    return {"root": root, "paths": paths, "faces": table, "backbone": backbone, "other": other, "store": store}


def test_the_backbone_embeds_and_a_rerun_reuses_every_face(world: dict) -> None:
    choice = choose_embedder(world["paths"])
    assert choice.embedder is not None and choice.embedder.kind == BACKBONE
    first = refresh_embeddings(world["root"], world["faces"], choice.embedder)
    assert (first.computed, first.reused, first.dropped, len(first.failed)) == (N, 0, 0, 0)
    x = embedding_matrix(first.table)
    assert x.shape == (N, 16) and x.dtype == np.float32 and np.isfinite(x).all()  # the pooled last block: 16 wide
    assert first.table["image_id"].tolist() == world["faces"]["image_id"].tolist()
    again = refresh_embeddings(world["root"], world["faces"], choose_embedder(world["paths"]).embedder,
                               previous=first.table)
    assert (again.computed, again.reused, again.dropped) == (0, N, 0)
    np.testing.assert_array_equal(embedding_matrix(again.table), x)


def test_embeddings_are_deterministic_and_independent_of_the_batch(world: dict) -> None:
    embedder = choose_embedder(world["paths"]).embedder
    a = refresh_embeddings(world["root"], world["faces"], embedder)
    b = refresh_embeddings(world["root"], world["faces"].iloc[::-1], embedder, chunk=7)
    left = embedding_matrix(a.table)
    right = embedding_matrix(b.table.set_index("image_id").loc[a.table["image_id"]].reset_index())
    np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(left, embedding_matrix(refresh_embeddings(world["root"], world["faces"],
                                                                            embedder).table))


def test_a_new_face_is_the_only_one_computed_and_a_face_gone_is_dropped(world: dict) -> None:
    embedder = choose_embedder(world["paths"]).embedder
    base = refresh_embeddings(world["root"], world["faces"].iloc[:-1], embedder)
    assert base.computed == N - 1
    grown = refresh_embeddings(world["root"], world["faces"], embedder, previous=base.table)
    assert (grown.computed, grown.reused, grown.dropped) == (1, N - 1, 0)
    shrunk = refresh_embeddings(world["root"], world["faces"].iloc[2:], embedder, previous=grown.table)
    assert (shrunk.computed, shrunk.reused, shrunk.dropped, len(shrunk.table)) == (0, N - 2, 2, N - 2)


def test_another_model_recomputes_everything(world: dict) -> None:
    paths = world["paths"]
    first = refresh_embeddings(world["root"], world["faces"], choose_embedder(paths).embedder)
    saved = paths.backbone("cnn4").read_bytes()
    try:
        shutil.copyfile(world["other"], paths.backbone("cnn4"))  # retrained: other weights, same file name
        other = choose_embedder(paths).embedder
        assert other.identity != first.table["model"].iloc[0]
        redo = refresh_embeddings(world["root"], world["faces"], other, previous=first.table)
        assert (redo.computed, redo.reused, redo.dropped) == (N, 0, N)
        assert (redo.table["model"] == other.identity).all()
    finally:
        paths.backbone("cnn4").write_bytes(saved)


def test_an_unreadable_shard_is_reported_per_face_and_the_rest_embedded(world: dict) -> None:
    root = world["root"]
    bad_refs = world["store"].write_shard("s_bad", _faces(3, 5))
    (root / bad_refs[0].partition("#")[0]).write_bytes(b"not a numpy file")
    bad = pd.DataFrame({"image_id": ["b0", "b1", "b2"], "sha256": ["b" * 64, "c" * 64, "d" * 64],
                        "face_index": 0, "face_path": bad_refs})
    out = refresh_embeddings(root, pd.concat([world["faces"], bad], ignore_index=True),
                             choose_embedder(world["paths"]).embedder)
    assert out.computed == N and len(out.table) == N
    assert out.failed["image_id"].tolist() == ["b0", "b1", "b2"]
    assert out.failed["reason"].str.startswith("unreadable face").all()


def test_without_a_backbone_the_main_model_embeds_and_says_why(tmp_path: Path, world: dict) -> None:
    paths = DataPaths(tmp_path)
    none = choose_embedder(paths)
    assert none.embedder is None and "no pretrained backbone" in none.reason and "no shipped or main" in none.reason
    paths.models_dir.mkdir(parents=True)
    shutil.copyfile(world["other"], paths.checkpoint("cnn4"))
    main = choose_embedder(paths)
    assert main.embedder is not None and main.embedder.kind == MAIN
    assert main.reason.startswith("no pretrained backbone") and "main model cnn4.safetensors" in main.reason
    paths.backbone("cnn4").write_bytes(b"damaged")  # a damaged backbone is passed over, saying so
    passed = choose_embedder(paths)
    assert passed.embedder is not None and passed.embedder.kind == MAIN and "cannot be loaded" in passed.reason


def _clusters(seed: int = 0, per: int = 60, dim: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, dim))
    return np.concatenate([c + rng.normal(0, 0.15, (per, dim)) for c in centres]).astype(np.float32)


def _table(x: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"f{i:03d}" for i in range(len(x))], "embedding": list(x)})


def test_a_planted_outlier_among_clusters_is_flagged_with_a_reason() -> None:
    x = _clusters()
    odd = np.random.default_rng(1).normal(size=(1, x.shape[1])).astype(np.float32)
    table = _table(np.concatenate([x, odd]))
    found, note = find_outliers(table)
    assert found["image_id"].iloc[0] == "f300"  # the planted one, most atypical first
    assert len(found) <= int(0.02 * len(table)) and "relative kNN distance" in note
    row = found.iloc[0]
    assert 0 < row["score"] < 0.2 and row["relative_distance"] > 3
    assert row["reason"].startswith("outlier: far from its 10 nearest neighbours in the backbone's embedding "
                                    f"(score {row['score']:.2f}")
    again, _ = find_outliers(table)
    pd.testing.assert_frame_equal(found, again)


def test_clean_clusters_flag_nothing_and_too_few_faces_are_not_scored() -> None:
    found, _ = find_outliers(_table(_clusters(seed=2)))
    assert found.empty
    few, note = find_outliers(_table(_clusters(per=5)), OutlierSettings(min_faces=50))
    assert few.empty and "at least 50" in note
