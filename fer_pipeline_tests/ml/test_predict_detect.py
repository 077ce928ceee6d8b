"""``fer-pipeline predict`` on photos (issue #11, point 4), through the real CLI in a subprocess.

A checkpoint records how its training faces were framed ("crop", "detect" or "mixed", with the
detector's settings and the margin); prediction applies the same: one row per detected face with
its box, "no face found" for a face-free image, ``--annotate DIR`` copies with the boxes drawn,
and a crop-framed model answers exactly as before. Faces are pasted into cluttered canvases at
known places: the demo generator's cartoons (always), real AffectNet faces (``realdata``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_pipeline.classes import CLASSES
from fer_pipeline.cli import format_predictions
from fer_pipeline.sources.catalog import Catalog, SourceSpec
from fer_pipeline.sources.framing import DetectSpec
from fer_pipeline.faces.detect import MTCNNDetector, align_face
from fer_pipeline.faces.preprocess import (
    PreprocessSettings,
    decode_face,
    preprocess_image,
)
from fer_pipeline.demo.scenes import box_iou
from fer_pipeline.ml import ArchConfig, TrainConfig
from fer_pipeline.ml.annotate import centre_crop_box, output_name
from fer_pipeline.ml.checkpoint import (
    METADATA_KEY,
    Framing,
    load_checkpoint,
    save_checkpoint,
)
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline.faces.framing import NO_FACE
from fer_pipeline.ml.predict import detector_from_settings, predict_images
from fer_pipeline.ml.workflow import train_and_save, training_framing
from fer_pipeline.paths import DataPaths
from fer_pipeline_tests.conftest import REPO
from fer_pipeline_tests.faces.test_detect import cartoon, clutter, real_faces
from fer_pipeline_tests.ml.test_predict import SIZE, _faces, _png, trained  # noqa: F401 -- the tiny model fixture

# Two cartoon faces (demo generator numbers 12 and 22) at known squares of a 640x480 clutter
# canvas: MTCNN finds both (scores 0.997 / 0.999, IoU 0.66 / 0.69 with the squares, measured).
CARTOONS = ((12, (60, 80, 170)), (22, (400, 150, 130)))
CLEAR = (600, 440, 640, 480)  # a corner no box or label reaches
LENIENT = 0.9  # cartoons score lower than real faces (faces/test_detect.py): the detect model records this cut
MARGIN = 0.1
NAME_RE = re.compile(r"^\d{5}_[A-Za-z0-9_-]+\.(png|jpg)$")


def cli(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """``fer-pipeline predict ARGS`` in a fresh interpreter: (exit status, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "fer_pipeline.cli", "predict", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, env=env, timeout=300, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def scene(faces: list[tuple[Image.Image, tuple[int, int, int]]], seed: int) -> tuple[Image.Image, list[tuple]]:
    """A clutter canvas with ``faces`` pasted at (x, y, side); the squares they fill."""
    canvas = clutter(np.random.default_rng(seed))
    truth = []
    for face, (x, y, s) in faces:
        canvas.paste(face.resize((s, s), Image.LANCZOS), (x, y))
        truth.append((x, y, x + s, y + s))
    return canvas, truth


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """two.png (two cartoon faces), empty.png (face-free clutter; faces/test_detect.py asserts it) and
    face.png (a small crop, as the crop models were trained on)."""
    folder = tmp_path_factory.mktemp("photos")
    canvas, truth = scene([(cartoon(i), place) for i, place in CARTOONS], seed=100)
    canvas.save(folder / "two.png")
    clutter(np.random.default_rng(7)).save(folder / "empty.png")
    (folder / "face.png").write_bytes(_png(_faces(1, 7)[0][0]))
    return {"two": folder / "two.png", "empty": folder / "empty.png", "face": folder / "face.png", "truth": truth}


@pytest.fixture(scope="module")
def models(trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """The same tiny weights saved as a crop model and as a detect model."""
    result, _ = trained
    folder = tmp_path_factory.mktemp("models")
    framing = training_framing(pd.DataFrame({"source": ["scenes"] * 4, "framing": ["detect"] * 4}),
                               catalog(DetectSpec(margin=MARGIN, min_score=LENIENT)))
    return {"crop": save_checkpoint(folder / "crop.safetensors", result, data_version="v"),
            "detect": save_checkpoint(folder / "detect.safetensors", result, data_version="v", framing=framing)}


def catalog(*detects: DetectSpec) -> Catalog:
    """Sources "scenes", "scenes2", ... with ``faces: detect`` and these options, and "crops"."""
    specs = [SourceSpec(f"scenes{i + 1 if i else ''}", "image_folders", Path("x"), {}, faces="detect", detect=d)
             for i, d in enumerate(detects)]
    return Catalog((*specs, SourceSpec("crops", "image_folders", Path("y"), {})))


def test_training_framing_from_the_manifest_rows_and_the_catalogue() -> None:
    """Crop, detect or mixed from the rows' ``framing``; the detector settings and margin of the
    catalogue entries the detected rows came from, as ingestion ran them."""
    cat = catalog(DetectSpec(margin=0.2, min_score=0.95, min_face_size=60), DetectSpec(margin=0.3))
    assert training_framing(pd.DataFrame({"image_id": ["a", "b"]})) == Framing("crop", rows={"crop": 2})
    crop = training_framing(pd.DataFrame({"source": ["crops"] * 2, "framing": ["crop", None]}), cat)
    assert crop == Framing("crop", rows={"crop": 2})  # no value: a crop (rows from before detection)
    rows = pd.DataFrame({"source": ["scenes", "scenes", "scenes2", "crops"],
                         "framing": ["detect", "detect", "detect", "crop"]})
    mixed = training_framing(rows, cat)
    assert mixed.mode == "mixed" and mixed.detects and mixed.rows == {"crop": 1, "detect": 3}
    assert mixed.detector == MTCNNDetector(score_threshold=0.95, min_face_size=60).settings()  # the most rows'
    assert mixed.margin == 0.2
    detect = training_framing(rows[rows["source"] == "scenes2"], cat)
    assert (detect.mode, detect.margin, detect.detector["score_threshold"]) == ("detect", 0.3, 0.99)
    default = training_framing(rows.iloc[:1])  # no catalogue: the `faces: detect` defaults
    assert (default.detector, default.margin) == (MTCNNDetector().settings(), 0.0)
    with pytest.raises(ValueError, match="'framing' holds \\['sideways'\\]"):
        training_framing(pd.DataFrame({"framing": ["sideways"]}))


def test_train_and_save_records_the_framing_of_the_rows_it_trains_on(tmp_path: Path) -> None:
    """A mixed split trained whole is "mixed"; a row selection of only detected faces is "detect"."""
    def split(n: int, seed: int) -> SplitArrays:
        images, labels = _faces(n, seed)
        ids = [f"{seed}-{i}" for i in range(n)]
        frame = pd.DataFrame({"image_id": ids, "source": ["scenes" if i % 2 else "crops" for i in range(n)],
                              "framing": ["detect" if i % 2 else "crop" for i in range(n)]})
        return SplitArrays(images, labels.astype(np.int64), ids, frame)

    root = tmp_path / "data"
    (root / "scenes").mkdir(parents=True)
    (root / "sources.yaml").write_text(  # the data root's catalogue, read when nobody passes one
        "sources:\n  - name: scenes\n    kind: image_folders\n    path: scenes\n    label_map: {angry: Angry}\n"
        "    faces: detect\n    detect: {margin: 0.25, min_score: 0.9}\n")
    arrays = {"train": split(64, 0), "validation": split(16, 1)}
    args = (ArchConfig("tiny", (8, 16)), TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, num_threads=2),
            arrays, DataPaths(root), "v1", PreprocessSettings(image_size=(SIZE, SIZE)))
    settings = MTCNNDetector(score_threshold=LENIENT).settings()
    whole = train_and_save("whole", *args)
    detected_only = train_and_save("detected", *args, train_rows=np.arange(1, 64, 2))
    assert load_checkpoint(whole.checkpoint).framing == Framing("mixed", settings, 0.25, {"crop": 32, "detect": 32})
    assert load_checkpoint(detected_only.checkpoint).framing == Framing("detect", settings, 0.25, {"detect": 32})


def rewrite_metadata(src: Path, dst: Path, change) -> Path:  # type: ignore[no-untyped-def]
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    change(meta)
    save_file(load_file(str(src)), str(dst), metadata={METADATA_KEY: json.dumps(meta)})
    return dst


def test_checkpoints_without_framing_load_as_crop(models: dict[str, Path], tmp_path: Path) -> None:
    detect = load_checkpoint(models["detect"])
    assert detect.framing.mode == "detect" and detect.framing.margin == MARGIN
    assert detect.framing.detector["score_threshold"] == LENIENT
    assert detector_from_settings(detect.framing.detector).settings() == detect.framing.detector  # applied as recorded
    old = rewrite_metadata(models["crop"], tmp_path / "old.safetensors", lambda m: m.pop("framing"))
    assert load_checkpoint(old).framing == Framing()


@pytest.mark.parametrize("framing, message", [
    ("detect", "framing must be an object"),
    ({"mode": "sideways"}, "framing mode must be one of crop, detect, mixed"),
    ({"mode": "detect", "margin": 0.1}, "needs the detector's settings and the margin"),
    ({"mode": "detect", "detector": {"detector": "dlib"}, "margin": 0.1}, "detector 'dlib' is unknown"),
    ({"mode": "mixed", "detector": {"detector": "mtcnn"}, "margin": -1}, "margin must be a finite number >= 0"),
])
def test_malformed_framing_is_refused_naming_the_checkpoint(models: dict[str, Path], photos: dict[str, object],
                                                            tmp_path: Path, framing: object, message: str) -> None:
    bad = rewrite_metadata(models["crop"], tmp_path / "bad.safetensors", lambda m: m.update(framing=framing))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_checkpoint(bad)
    if framing == {"mode": "sideways"}:  # the CLI's handling is the same for all: one subprocess
        code, out, err = cli(str(photos["face"]), "--model", str(bad))
        assert code == 2 and out == ""
        assert "bad.safetensors" in err and "malformed framing" in err and message in err and "Traceback" not in err


def test_detector_settings_that_make_no_detector_are_a_usage_error(models: dict[str, Path],
                                                                   photos: dict[str, object], tmp_path: Path) -> None:
    def change(meta: dict) -> None:
        meta["framing"]["detector"]["min_face_size"] = -5

    bad = rewrite_metadata(models["detect"], tmp_path / "neg.safetensors", change)
    code, out, err = cli(str(photos["two"]), "--model", str(bad))
    assert code == 2 and out == ""
    assert "cannot set up face detection" in err and "neg.safetensors" in err and "min_face_size" in err


# ---------------------------------------------------------------- detect: one row per face


def test_one_row_per_face_with_its_box_and_no_face_found(models: dict[str, Path], photos: dict[str, object]) -> None:
    code, out, err = cli(str(photos["two"]), str(photos["empty"]), "--model", str(models["detect"]), "--format", "json")
    assert code == 1, err  # an image without a face is an input that could not be classified
    rows = json.loads(out)
    assert [(r["input"], r["face_index"], r["faces_found"]) for r in rows] == [
        (str(photos["two"]), 0, 2), (str(photos["two"]), 1, 2), (str(photos["empty"]), None, 0)]
    for row, truth in zip(rows[:2], photos["truth"]):  # largest first: the 170 px face, then the 130 px one
        box = tuple(row["box"][k] for k in ("left", "top", "right", "bottom"))
        assert box_iou(box, truth) >= 0.5, (box, truth)
        assert row["label"] in CLASSES and row["error"] is None and row["detector_score"] > LENIENT
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
    empty = rows[2]
    assert empty["error"] == NO_FACE and empty["label"] is None and empty["probabilities"] is None
    assert empty["box"] is None and empty["detector_score"] is None
    assert f"{photos['empty']}: {NO_FACE}" in err

    code, out, _ = cli(str(photos["two"]), str(photos["empty"]), "--model", str(models["detect"]), "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert list(table[0])[-7:] == ["face_index", "faces_found", "box_left", "box_top", "box_right", "box_bottom",
                                   "detector_score"]
    assert [(r["face_index"], r["faces_found"], r["error"]) for r in table] == [("0", "2", ""), ("1", "2", ""),
                                                                               ("", "0", NO_FACE)]
    assert float(table[1]["box_left"]) == pytest.approx(rows[1]["box"]["left"], abs=0.05)


def test_the_table_shows_faces_and_boxes(models: dict[str, Path], photos: dict[str, object]) -> None:
    code, out, _ = cli(str(photos["two"]), str(photos["empty"]), "--model", str(models["detect"]))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["input", "face", "box", "prediction"]
    two = [line for line in lines if line.startswith(str(photos["two"]))]
    assert [line.split()[1:4] for line in two] == [["0", "of", "2"], ["1", "of", "2"]]
    assert f"ERROR: {NO_FACE}" in next(line for line in lines if line.startswith(str(photos["empty"])))
    assert lines[-1] == "2 faces classified in 2 inputs, 1 rows failed (1 inputs with no face found)"


def test_prediction_cuts_faces_with_the_recorded_margin(models: dict[str, Path], photos: dict[str, object],
                                                       trained, tmp_path: Path) -> None:  # noqa: F811
    """Each face is what ingestion gives the model: align_face with the checkpoint's margin, then
    preprocess_image; another recorded margin changes what the model sees."""
    loaded = load_checkpoint(models["detect"])
    image = Image.open(photos["two"])
    faces = MTCNNDetector(score_threshold=LENIENT).detect(image)
    by_hand = np.stack([preprocess_image(align_face(image, f, MARGIN, (SIZE, SIZE)), (SIZE, SIZE)) for f in faces])
    preds = predict_images([photos["two"]], loaded)
    assert [p.box for p in preds] == [f.box for f in faces]
    np.testing.assert_allclose([list(p.probabilities.values()) for p in preds], loaded.predict_proba(by_hand))
    result, _ = trained
    wide = save_checkpoint(tmp_path / "wide.safetensors", result, data_version="v",
                           framing=Framing("detect", loaded.framing.detector, 0.6))
    assert [p.probabilities for p in predict_images([photos["two"]], wide)] != [p.probabilities for p in preds]


# ---------------------------------------------------------------- --annotate


def test_annotate_draws_the_boxes_on_copies(models: dict[str, Path], photos: dict[str, object],
                                            tmp_path: Path) -> None:
    out_dir = tmp_path / "annotated"
    code, out, err = cli(str(photos["two"]), str(photos["empty"]), "--model", str(models["detect"]),
                         "--format", "json", "--annotate", str(out_dir))
    assert code == 1
    rows = json.loads(out)
    written = sorted(out_dir.iterdir())
    assert [p.name for p in written] == ["00001_two.png", "00002_empty.png"]
    assert [r["annotated"] for r in rows] == [str(written[0])] * 2 + [str(written[1])]
    assert "2 annotated images in" in err

    before, after = (np.asarray(Image.open(p).convert("RGB"), np.int16) for p in (photos["two"], written[0]))
    assert after.shape == before.shape
    changed = np.abs(after - before).sum(axis=2) > 30
    for row in rows[:2]:
        left, top, right, bottom = (round(row["box"][k]) for k in ("left", "top", "right", "bottom"))
        h, w = changed.shape
        edges = [changed[max(0, top), max(0, left):min(w, right)], changed[min(h - 1, bottom), max(0, left):min(w, right)],
                 changed[max(0, top):min(h, bottom), max(0, left)], changed[max(0, top):min(h, bottom), min(w - 1, right)]]
        assert np.mean(np.concatenate(edges)) > 0.9  # the outline is drawn where the box is
        inside = changed[top + 15:bottom - 15, left + 15:right - 15]
        assert inside.mean() < 0.05  # the face itself is left as it was
    x0, y0, x1, y1 = CLEAR
    assert not changed[y0:y1, x0:x1].any()  # and everything away from the boxes
    empty_before, empty_after = (np.asarray(Image.open(p).convert("RGB"), np.int16) for p in (photos["empty"], written[1]))
    empty_changed = np.abs(empty_after - empty_before).sum(axis=2) > 30
    assert empty_changed[:40, :200].any() and not empty_changed[y0:y1, x0:x1].any()  # the "no face found" caption


def test_annotated_names_cannot_collide_or_escape(models: dict[str, Path], photos: dict[str, object],
                                                  tmp_path: Path) -> None:
    """Input names with dots (``../x.png``, the hidden ``..png`` named explicitly), control
    characters and one base name in several zip folders (and a duplicated entry) get one
    well-formed file each, inside the folder; nothing is written elsewhere."""
    face = photos["face"].read_bytes()
    inside = tmp_path / "work" / "in"
    inside.mkdir(parents=True)
    (tmp_path / "work" / "x.png").write_bytes(face)
    for name in ("esc\x1b[2Jred.png", "..png", "line\nbreak.png", "-rf .png"):
        (inside / name).write_bytes(face)
    with zipfile.ZipFile(inside / "faces.zip", "w") as zf:
        zf.writestr("a/face.png", face)
        zf.writestr("b/face.png", face)
        zf.writestr("dup.png", face)
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("dup.png", face)
    out_dir = tmp_path / "out"
    before = {p for p in tmp_path.rglob("*")}
    code, out, _ = cli("../x.png", "..png", ".", "--model", str(models["crop"]), "--format", "json", "--annotate", "../../out",
                       cwd=inside)
    assert code == 1  # the earlier dup.png entry is an error row
    rows = json.loads(out)
    ok = [r for r in rows if r["error"] is None]
    assert len(rows) == 9 and len(ok) == 8  # the folder listing skips the hidden ..png: named, it is read
    written = sorted(out_dir.iterdir())
    assert len(written) == 8 and all(NAME_RE.match(p.name) for p in written), [p.name for p in written]
    assert {str(out_dir / Path(r["annotated"]).name) for r in ok} == {str(p) for p in written}
    assert [Path(r["annotated"]).name for r in ok[:2]] == ["00001_x.png", "00002_png.png"]
    assert {p for p in tmp_path.rglob("*")} - before == set(written) | {out_dir}  # no temp files, nothing outside

    assert output_name(3, "../../etc/passwd", "PNG") == "00003_passwd.png"
    assert output_name(4, "zip::a\\b/..\x1b.JPG", "JPEG") == "00004_image.jpg"
    assert output_name(5, ".hidden", "PNG") == "00005_hidden.png"


def test_annotate_folder_that_is_a_file_is_a_usage_error(models: dict[str, Path], photos: dict[str, object],
                                                         tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = cli(str(photos["face"]), "--model", str(models["crop"]), "--annotate", str(blocker))
    assert code == 2 and out == "" and "exists and is not a folder" in err


# ---------------------------------------------------------------- crop models: as before


def test_crop_models_keep_todays_output_exactly(models: dict[str, Path], photos: dict[str, object],
                                                tmp_path: Path) -> None:
    """Rows, keys and probabilities of the decode_face path; --framing crop makes a detect model
    answer the same; a crop model's --annotate box is the centre crop it classified."""
    inputs = [str(photos["face"]), str(photos["two"])]
    code, out, _ = cli(*inputs, "--model", str(models["crop"]), "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert [list(r) for r in rows] == [["input", "label", "probabilities", "error"]] * 2
    loaded = load_checkpoint(models["crop"])
    faces = np.stack([decode_face(Path(p).read_bytes(), loaded.preprocess).face for p in inputs])
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in rows], loaded.predict_proba(faces),
                               rtol=1e-6)
    assert cli(*inputs, "--model", str(models["detect"]), "--format", "json", "--framing", "crop")[1] == out
    preds = predict_images(inputs, loaded)  # CSV and table columns as before (their CLI runs: test_predict.py)
    assert format_predictions(preds, "csv", CLASSES).splitlines()[0] == ",".join(
        ["input", "prediction", *[f"p_{c}" for c in CLASSES], "error"])
    table = format_predictions(preds, "table", CLASSES).splitlines()
    assert table[0].split() == ["input", "prediction", *CLASSES] and table[-1] == "2 of 2 inputs classified"

    code, _, _ = cli(str(photos["two"]), "--model", str(models["crop"]), "--annotate", str(tmp_path / "a"))
    after = np.asarray(Image.open(tmp_path / "a" / "00001_two.png").convert("RGB"), np.int16)
    changed = np.abs(after - np.asarray(Image.open(photos["two"]).convert("RGB"), np.int16)).sum(axis=2) > 30
    left, top, right, bottom = (round(v) for v in centre_crop_box(640, 480, (SIZE, SIZE)))
    assert (left, top, right, bottom) == (80, 0, 560, 480)
    assert changed[240, left:left + 2].all() and changed[240, right - 2:right].all() and not changed[240, 300:340].any()


# ---------------------------------------------------------------- real faces


@pytest.mark.realdata
def test_real_faces_in_a_photo(models: dict[str, Path], tmp_path: Path) -> None:
    """Two real AffectNet faces pasted into clutter: a crop model forced to detect (the default
    detector and margin) finds both, near where they were pasted."""
    faces, _ = real_faces(2, 0, np.random.default_rng(5))
    canvas, truth = scene([(faces[0], (60, 80, 180)), (faces[1], (400, 150, 140))], seed=201)
    path = tmp_path / "people.jpg"
    canvas.save(path, quality=90)
    code, out, err = cli(str(path), "--model", str(models["crop"]), "--framing", "detect", "--format", "json",
                         "--annotate", str(tmp_path / "out"))
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["face_index"], r["faces_found"]) for r in rows] == [(0, 2), (1, 2)]
    for row, t in zip(rows, truth):
        assert box_iou(tuple(row["box"].values()), t) >= 0.5 and row["detector_score"] > 0.99
        assert row["label"] in CLASSES
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["00001_people.jpg"]  # a JPEG stays a JPEG
