"""Issue 21: crops are classified as crops. A model trained on crops and detected faces ("mixed")
decides per image: the demo's own face crops get no "no face found" (and no detector run), the
demo's scenes are still searched for faces. Demo data is generated in a temporary root."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_pipeline.cli import main
from fer_pipeline.demo.scenes import clutter
from fer_pipeline.demo.synthetic_faces import generate_demo_scenes, generate_demo_source
from fer_pipeline.faces.framing import NO_FACE, Detection
from fer_pipeline.ml import ArchConfig, TrainConfig, train_model
from fer_pipeline.ml.checkpoint import save_checkpoint
from fer_pipeline.ml.framing import Framing
from fer_pipeline.ml.predict import (
    CROP_FALLBACK_RATIO,
    CROP_SIDE_RATIO,
    looks_like_crop,
    predict_images,
)
from fer_pipeline_tests.conftest import blob_pattern

SIZE = 48


class CountingDetector:
    """The model's own detector, counting the images it is asked about."""

    def __init__(self, framing: Framing) -> None:
        from fer_pipeline.ml.predict import detector_from_settings

        self.inner, self.calls = detector_from_settings(framing.detector or {}), 0
        self.max_side = self.inner.max_side

    def detect(self, image: Image.Image) -> list:
        self.calls += 1
        return self.inner.detect(image)


@pytest.fixture(scope="module")
def mixed(split_arrays, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Framing]:
    """A briefly trained 48 px model recorded as "mixed", with the demo scenes' detector settings."""
    tr, va = split_arrays(64, 0, size=SIZE), split_arrays(32, 1, size=SIZE)
    result = train_model(tr.images, tr.labels, va.images, va.labels, ArchConfig("tiny48", (8, 16)),
                         TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, num_threads=2))
    detection = Detection(min_score=0.7)  # the demo catalogue's scenes: {keep: all, min_score: 0.7}
    framing = Framing("mixed", detection.settings(), detection.margin, {"crop": 64, "detect": 32})
    path = tmp_path_factory.mktemp("models") / "mixed.safetensors"
    return save_checkpoint(path, result, data_version="v", framing=framing), framing


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("root") / "raw"
    generate_demo_source(root / "demo_faces", n_images=60, seed=0)
    generate_demo_scenes(root / "demo_scenes", n_scenes=12, seed=0)
    return {"faces": root / "demo_faces", "scenes": root / "demo_scenes"}


def test_the_rule_in_sizes() -> None:
    for w, h in ((48, 48), (64, 64), (80, 72), (96, 96)):  # the demo's crops (and odd sizes), AffectNet's 96 px
        assert looks_like_crop(w, h, (SIZE, SIZE), CROP_SIDE_RATIO)
    assert not looks_like_crop(97, 97, (SIZE, SIZE), CROP_SIDE_RATIO)
    assert looks_like_crop(256, 256, (SIZE, SIZE), CROP_FALLBACK_RATIO)  # expressions-race's crops, if detection misses
    for w, h in ((400, 300), (640, 480), (90, 60), (300, 300 * 2)):  # photos are not square
        assert not looks_like_crop(w, h, (SIZE, SIZE), CROP_FALLBACK_RATIO)
    assert not looks_like_crop(400, 400, (SIZE, SIZE), CROP_FALLBACK_RATIO)


def test_the_demo_crops_are_classified_as_crops(mixed: tuple[Path, Framing], demo: dict[str, Path]) -> None:
    model, framing = mixed
    spy = CountingDetector(framing)
    rows = predict_images([demo["faces"]], model, detector=spy)
    manifest = json.loads((demo["faces"] / ".defects.json").read_text())
    broken = {e["file"] for e in manifest if e["kind"] in ("truncated", "not_an_image")}
    assert not [r for r in rows if r.error == NO_FACE]
    assert spy.calls == 0  # every crop is near the input size: no detection at all
    failed = {Path(r.input).relative_to(demo["faces"]).as_posix() for r in rows if not r.ok}
    assert failed == broken, failed ^ broken  # only the deliberately broken files fail
    classified = [r for r in rows if r.ok]
    assert len(classified) >= 60
    assert all(r.faces_found is None and r.face_index is None and r.box is None for r in classified)


def test_the_demo_scenes_are_still_searched_for_faces(mixed: tuple[Path, Framing], demo: dict[str, Path]) -> None:
    model, framing = mixed
    spy = CountingDetector(framing)
    rows = predict_images([demo["scenes"]], model, detector=spy)
    truth = {t["file"]: len(t["boxes"]) for t in json.loads((demo["scenes"] / ".scenes.json").read_text())}
    assert spy.calls == len(truth) == 12  # every scene went to the detector
    assert all(r.faces_found is not None for r in rows)  # none was taken as a crop
    found = {}
    for r in rows:
        found[Path(r.input).relative_to(demo["scenes"]).as_posix()] = r.faces_found
    assert found == truth  # every pasted face found, and the face-free scene says so (measured: exact on these 12)
    assert any(r.error == NO_FACE for r in rows)


def test_a_larger_square_image_without_a_face_is_a_crop_a_photo_is_not(mixed: tuple[Path, Framing],
                                                                      tmp_path: Path) -> None:
    model, framing = mixed
    big = tmp_path / "big_crop.png"  # 200 px, square: a face filling a bigger frame, if no face is found
    Image.fromarray(blob_pattern(5, 200)).save(big)
    photo = tmp_path / "photo.png"
    clutter(np.random.default_rng(7)).save(photo)  # 640x480, face-free
    spy = CountingDetector(framing)
    big_row, photo_row = predict_images([big, photo], model, detector=spy)
    assert spy.calls == 2
    assert big_row.ok and big_row.faces_found is None
    assert photo_row.error == NO_FACE and photo_row.faces_found == 0


def test_forcing_detect_searches_crops_too(mixed: tuple[Path, Framing], demo: dict[str, Path]) -> None:
    model, framing = mixed
    crops = sorted((demo["faces"] / "Angry").glob("*.png"))[:5]
    spy = CountingDetector(framing)
    rows = predict_images(crops, model, detector=spy, framing="detect")
    assert spy.calls == 5 and all(r.faces_found is not None for r in rows)


def test_the_cli_on_the_demo_crops_finds_no_missing_faces(mixed: tuple[Path, Framing], demo: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = mixed
    status = main(["predict", str(demo["faces"]), "--model", str(model)])
    out = capsys.readouterr().out
    assert status == 1  # the broken files
    summary = out.strip().splitlines()[-1]
    assert "faces classified" in summary and "no face found" not in summary, summary
    assert "rows failed" in summary


def test_a_bad_detector_is_reported_when_an_image_needs_it(mixed: tuple[Path, Framing], demo: dict[str, Path],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mixed model makes its detector lazily; broken settings are still a usage error, not a crash."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fer_pipeline.ml.checkpoint import METADATA_KEY

    model, _ = mixed
    with safe_open(str(model), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta["framing"]["detector"]["min_face_size"] = -5
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(model)), str(bad), metadata={METADATA_KEY: json.dumps(meta)})
    crops = sorted((demo["faces"] / "Angry").glob("*.png"))[:3]
    assert main(["predict", *map(str, crops), "--model", str(bad)]) == 0  # crops never need the detector
    capsys.readouterr()
    buf = io.BytesIO()
    clutter(np.random.default_rng(3)).save(buf, format="PNG")
    (tmp_path / "photo.png").write_bytes(buf.getvalue())
    assert main(["predict", str(tmp_path / "photo.png"), "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cannot set up face detection" in err and "min_face_size" in err and "bad.safetensors" in err
