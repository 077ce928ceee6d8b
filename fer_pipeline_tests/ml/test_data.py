"""Manifest + splits -> in-memory arrays, in a deterministic order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fer_pipeline.classes import CLASS_TO_INDEX
from fer_pipeline.ml.data import load_split_arrays


def _tables(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, split_rows = [], []
    labels = ["Neutral", "Focused", "Tired", "Angry", "Angry", "Tired"]
    splits = ["train", "train", "validation", "test", "train", "test"]
    for i, (label, split) in enumerate(zip(labels, splits)):
        rel = f"faces/k/{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((48, 48), i * 10, np.uint8)).save(root / rel)
        rows.append({"image_id": f"img{5 - i}", "label": label, "face_path": rel, "source": "s", "gender": None})
        split_rows.append({"image_id": f"img{5 - i}", "split": split, "fold": -1 if split == "test" else i % 2})
    return pd.DataFrame(rows), pd.DataFrame(split_rows)


def test_load_split_arrays(tmp_path: Path) -> None:
    manifest, splits = _tables(tmp_path)
    arrays = load_split_arrays(tmp_path, manifest, splits)
    assert {k: len(v) for k, v in arrays.items()} == {"train": 3, "validation": 1, "test": 2}
    train = arrays["train"]
    assert train.images.shape == (3, 48, 48) and train.images.dtype == np.uint8
    assert train.image_ids == sorted(train.image_ids)  # deterministic order, independent of table order
    for img, label, image_id in zip(train.images, train.labels, train.image_ids):
        row = manifest.set_index("image_id").loc[image_id]
        assert label == CLASS_TO_INDEX[row["label"]]
        assert img[0, 0] == int(row["face_path"][8:10]) * 10
    assert list(train.frame["image_id"]) == train.image_ids
