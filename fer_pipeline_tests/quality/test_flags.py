"""Quality flags on real faces (``../shared/datasets``, skipped when absent) with planted non-faces
and corrupted faces: each corruption gets its flag and reason, real faces are rarely flagged."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fer_pipeline.faces.preprocess import preprocess_image
from fer_pipeline.quality.flags import FLAG_COLUMNS, quality_flags

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"
AFFECTNET = DATASETS / "affectnet-4class.zip"


@pytest.fixture(scope="module")
def real_faces() -> np.ndarray:
    if not AFFECTNET.is_file():
        pytest.skip(f"no real faces: {AFFECTNET} is absent (a fresh clone has no ../shared)")
    with zipfile.ZipFile(AFFECTNET) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg") and "__MACOSX" not in n
                       and "Gender" not in n)[:400]
        out = []
        for n in names:
            with Image.open(io.BytesIO(zf.read(n))) as im:
                out.append(preprocess_image(im))
    return np.stack(out)


def test_each_corruption_gets_its_flag_and_real_faces_mostly_none(real_faces: np.ndarray) -> None:
    base = real_faces[:5]
    planted = {
        "blurred": np.asarray(Image.fromarray(base[0]).filter(ImageFilter.GaussianBlur(3))),
        "dark": (base[1] * 0.12).astype(np.uint8),
        "washed_out": (base[2] * 0.15 + 215).astype(np.uint8),
        "noisy": np.random.default_rng(0).integers(0, 256, (48, 48)).astype(np.uint8),
        "near_constant": np.full((48, 48), 120, np.uint8) + (np.arange(48) % 3).astype(np.uint8)[None, :],
    }
    faces = np.concatenate([real_faces, np.stack(list(planted.values()))])
    width = np.full(len(faces), 96)
    height = np.full(len(faces), 96)
    width[0] = 400  # a 400x96 original: the centre crop kept a quarter of it
    flags = quality_flags(faces, width, height)
    assert list(flags.columns) == FLAG_COLUMNS
    assert ((flags["score"] > 0) & (flags["score"] <= 1)).all()
    n = len(real_faces)
    for k, name in enumerate(planted):
        got = flags[flags["row"] == n + k]
        assert name in set(got["flag"]), (name, got)
        words = name.replace("_", " ").replace("near constant", "near-constant")
        assert got.loc[got["flag"] == name, "reason"].iloc[0].startswith(words + ":")
    assert "extreme_aspect" in set(flags.loc[flags["row"] == 0, "flag"])
    real_flagged = flags[(flags["row"] < n) & (flags["flag"] != "extreme_aspect")]["row"].nunique()
    assert real_flagged / n <= 0.03


def test_exclude_flagged_moves_named_flags_keeps_reviewed_and_accounts() -> None:
    """Only faces with a flag the setting names move (reasons joined, stage ``quality``); a face a
    reviewer decided on stays; each moved face is one excluded row, none lost or doubled."""
    import pandas as pd

    from fer_pipeline.dataset.manifest import exclude_flagged
    from fer_pipeline.schema import EXCLUDED_COLUMNS

    kept = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "source": "s", "source_path": ["a", "b", "c", "d"],
                         "face_index": 0, "label": "Angry", "original_label": "anger",
                         "review_source": [None, None, "label-studio task 7", None]})
    excluded = pd.DataFrame([{"source": "s", "source_path": "z", "stage": "faces", "reason": "rejected: x",
                              "raw_label": "anger", "label": None, "duplicate_of": None, "face_index": 0}])
    flags = pd.DataFrame({"image_id": ["a", "a", "b", "c", "d"], "flag": ["dark", "blurred", "noisy", "dark", "dark"],
                          "score": 0.5, "reason": ["dark: p90 20", "blurred: r", "noisy: r", "dark: p90 9", "dark: 3"]})
    out, excl, moved = exclude_flagged(kept, excluded, flags, ["dark", "blurred"])
    assert list(out["image_id"]) == ["b", "c"]  # b: only an unnamed flag; c: reviewed
    assert sorted(moved["image_id"]) == ["a", "d"]
    rows = excl.set_index("source_path")
    assert rows.loc["a", "stage"] == "quality" and rows.loc["a", "reason"] == "quality flag: blurred: r; dark: p90 20"
    assert rows.loc["a", "raw_label"] == "anger" and rows.loc["a", "label"] == "Angry"
    assert len(excl) == 3 and list(excl.columns) == list(EXCLUDED_COLUMNS)
    same, same_excl, none = exclude_flagged(kept, excluded, flags, [])
    assert same is kept and same_excl is excluded and none.empty
