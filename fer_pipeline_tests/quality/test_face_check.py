"""The no_face flag: the face detector run on stored faces, cached, through flag_stored_faces and
the real data job."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_pipeline.demo.scenes import clutter
from fer_pipeline.faces.preprocess import preprocess_image
from fer_pipeline.quality import face_check as fc

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def _decode(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return preprocess_image(im, (48, 48))


def _clutter(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([_decode(clutter(rng, 160, 160)) for _ in range(n)])


def test_clutter_is_flagged_and_scores_are_cached(tmp_path: Path) -> None:
    faces = _clutter(6)
    cache = fc.ScoreCache(tmp_path / "c.parquet")
    refs = [f"faces/k/shards/x.npy#{k}" for k in range(6)]
    scores = cache.scores_for(refs, lambda rows: faces[rows], fc.FaceCheck())
    rows = fc.no_face_rows(scores, fc.FaceCheck())
    assert sorted(rows["row"]) == list(range(6)) and set(rows["flag"]) == {"no_face"}
    assert rows["reason"].str.startswith("no face: the face detector finds none").all()
    cache.save()
    again = fc.ScoreCache(tmp_path / "c.parquet")
    assert np.array_equal(again.scores_for(refs, lambda rows: pytest.fail("cached faces re-checked"),
                                           fc.FaceCheck()), scores) and again.computed == 0


def test_an_unreadable_cache_is_checked_again(tmp_path: Path) -> None:
    (tmp_path / "c.parquet").write_bytes(b"PAR1 truncated")
    faces = _clutter(2)
    cache = fc.ScoreCache(tmp_path / "c.parquet")
    cache.scores_for(["a", "b"], lambda rows: faces[rows], fc.FaceCheck())
    assert cache.computed == 2


@pytest.mark.skipif(not (DATASETS / "affectnet-4class.zip").is_file(),
                    reason="../shared/datasets/affectnet-4class.zip is absent")
def test_real_faces_pass_and_non_faces_do_not() -> None:
    with zipfile.ZipFile(DATASETS / "affectnet-4class.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg") and "Gender" not in n)[::25][:80]
        real = np.stack([_decode(Image.open(io.BytesIO(zf.read(n)))) for n in names])
    scores = fc.best_face_scores(np.concatenate([real, _clutter(10)]))
    flagged = scores < fc.FaceCheck().min_score
    assert flagged[:80].sum() <= 1 and flagged[80:].all()


def test_the_data_job_flags_a_non_face_when_the_check_is_on(tmp_path: Path) -> None:
    from fer_pipeline_tests.conftest import asset_metadata, run_data_pipeline, write, write_catalogue

    buf = io.BytesIO()
    clutter(np.random.default_rng(1), 160, 160).save(buf, "PNG")
    write(tmp_path / "raw" / "s" / "angry" / "scene.png", buf.getvalue())
    write_catalogue(tmp_path, [{"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 120, "seed": 3},
                               {"name": "s", "kind": "image_folders", "path": "raw/s",
                                "label_map": {"angry": "Angry"}}])
    config = {"min_images_per_class": 1, "n_folds": 2, "view_duplicates": False, "face_check": True}
    result = run_data_pipeline(tmp_path, {"resources": {"fer": {"config": config}}})
    assert result.success
    flags = pd.read_parquet(tmp_path / "reports" / "quality_flags.parquet")
    no_face = flags[flags["flag"] == "no_face"]
    assert "angry/scene.png" in set(no_face["source_path"])  # drawn demo faces may be flagged too (docs say so)
    assert asset_metadata(result, "data_quality_flags")["face_check"].startswith("on")
    cached = list((tmp_path / "faces").glob("*/face_check-*.parquet"))
    kept = pd.read_parquet(tmp_path / "manifest" / "manifest.parquet")
    assert len(cached) == 1 and len(pd.read_parquet(cached[0])) == len(kept)
    # excluding by it: the manifest moves the scene out, stage quality
    config["exclude_flags"] = ["no_face"]
    config["face_check"] = False  # naming the flag is enough
    assert run_data_pipeline(tmp_path, {"resources": {"fer": {"config": config}}}).success
    excluded = pd.read_parquet(tmp_path / "manifest" / "excluded.parquet").set_index("source_path")
    assert excluded.loc["angry/scene.png", "stage"] == "quality"
    assert excluded.loc["angry/scene.png", "reason"].startswith("quality flag: no face")
