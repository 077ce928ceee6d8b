"""Photos, not only crops (issue #11): `faces: detect` sources through the data half.

Real Dagster materializations on a catalogue the test draws: photos of drawn faces pasted into
clutter at known places (one face, two faces, none, a broken file), a `keep: all` source of pairs,
face crops (crop framing), and crops wrongly configured as `faces: detect`. The drawn faces were
picked so that MTCNN scores them above 0.97 (it finds most of the demo generator's faces, not all:
docs/data.md). Core-level cases (worker processes, EXIF orientation, large JPEGs, real faces) call
:func:`process_faces` directly."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from fer_pipeline.sources.catalog import CatalogError, parse_catalog
from fer_pipeline.sources.framing import DetectSpec
from fer_pipeline.faces.framing import NO_FACE, Detection, SourceFraming
from fer_pipeline.faces.store import FaceStore, load_faces
from fer_pipeline.faces.stage import process_faces
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.demo.scenes import box_iou, clutter, match_boxes, paste_face
from fer_pipeline.demo.synthetic_faces import (
    SCENE_SIZE,
    SCENES_TRUTH_NAME,
    generate_demo_scenes,
    render_face,
    sample_face_params,
)
from fer_pipeline.schema import MANIFEST_COLUMNS
from fer_pipeline_tests.conftest import asset_metadata, run_data_pipeline, shared_dataset, write

SCENE = (400, 300)
LARGE, SMALL = (130, 4.0, 120.0, 150.0), (90, -5.0, 310.0, 110.0)  # (side, angle, cx, cy) of a scene's faces
# view_duplicates off: the re-cropped-copy rule, calibrated on real faces, links a few generated faces to
# one another (fer_pipeline_tests/dedup/test_views.py tests it; the demo turns it off for the same reason)
RUN_CONFIG = {"resources": {"fer": {"config": {"min_images_per_class": 1, "n_folds": 2, "view_duplicates": False}}}}
DRAWN = {"min_score": 0.9}  # the picked drawn faces score >= 0.97


def drawn_face(seed: int, label: str, side: int) -> Image.Image:
    rng = np.random.default_rng([404, seed])
    return render_face(sample_face_params(label, "female", "middle", rng), side, rng)


def jpeg(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def scene(label: str, seeds: list[int], background: int = 1) -> tuple[Image.Image, list[tuple[float, ...]]]:
    """Clutter with drawn faces: ``seeds[0]`` large on the left, ``seeds[1]`` smaller on the right."""
    img = clutter(np.random.default_rng(background), *SCENE)
    boxes = []
    for seed, (side, angle, cx, cy) in zip(seeds, (LARGE, SMALL)):
        boxes.append(paste_face(img, drawn_face(seed, label, side), side, angle, cx, cy))
    return img, boxes


# --------------------------------------------------------------------------------------------
# catalogue
# --------------------------------------------------------------------------------------------

def _parse(entry: dict, tmp_path: Path):
    (tmp_path / "photos").mkdir(exist_ok=True)
    base = {"name": "photos", "kind": "image_folders", "path": "photos", "label_map": {"angry": "Angry"}}
    return parse_catalog({"sources": [{**base, **entry}]}, tmp_path)


def test_catalogue_framing_defaults_and_options(tmp_path: Path) -> None:
    assert _parse({}, tmp_path).sources[0].faces == "crop" and _parse({}, tmp_path).sources[0].detect is None
    assert _parse({"faces": "detect"}, tmp_path).sources[0].detect == DetectSpec()
    spec = _parse({"faces": "detect", "detect": {"keep": "all", "margin": 0.2, "min_score": 0.9,
                                                 "min_face_size": 24}}, tmp_path).sources[0]
    assert spec.detect == DetectSpec(keep="all", margin=0.2, min_score=0.9, min_face_size=24)


@pytest.mark.parametrize("entry, field, message", [
    ({"faces": "detcet"}, "faces", "must be 'crop' or 'detect', not 'detcet'"),
    ({"faces": "crop", "detect": {"keep": "all"}}, "detect", "only applies to sources with 'faces: detect'"),
    ({"faces": "detect", "detect": "all"}, "detect", "must be a mapping"),
    ({"faces": "detect", "detect": {"keep": "biggest"}}, "detect.keep", "must be 'largest' or 'all'"),
    ({"faces": "detect", "detect": {"margin": -0.1}}, "detect.margin", "between 0.0 and 1.0"),
    ({"faces": "detect", "detect": {"margin": "wide"}}, "detect.margin", "must be a number"),
    ({"faces": "detect", "detect": {"min_score": 1.0}}, "detect.min_score", "between 0.0 and 1.0 (exclusive)"),
    ({"faces": "detect", "detect": {"min_score": True}}, "detect.min_score", "must be a number"),
    ({"faces": "detect", "detect": {"min_face_size": 5}}, "detect.min_face_size", "between 12 and 4096"),
    ({"faces": "detect", "detect": {"min_face_size": 40.5}}, "detect.min_face_size", "must be an integer"),
    ({"faces": "detect", "detect": {"kep": "all"}}, "detect.kep", "unknown field"),
])
def test_bad_framing_fails_fast_naming_source_and_field(tmp_path: Path, entry: dict, field: str,
                                                        message: str) -> None:
    with pytest.raises(CatalogError, match=re.escape(f"source 'photos', field '{field}': ") + ".*" + re.escape(message)):
        _parse(entry, tmp_path)


def test_framing_key_follows_what_changes_the_faces(tmp_path: Path) -> None:
    """Cached detected faces are keyed by the detector's settings and the margin, not by `keep`."""
    base = Detection()
    assert base.key.startswith("detect-") and base.key == Detection().key
    assert len({base.key, Detection(margin=0.2).key, Detection(min_score=0.9).key,
                Detection(min_face_size=24).key}) == 4
    every = SourceFraming.of(_parse({"faces": "detect", "detect": {"keep": "all"}}, tmp_path).sources[0])
    largest = SourceFraming.of(_parse({"faces": "detect"}, tmp_path).sources[0])
    assert every.keep_all and not largest.keep_all and every.key == largest.key == base.key
    assert SourceFraming.of(_parse({}, tmp_path).sources[0]).key == "crop"


def test_demo_scenes_are_deterministic_with_their_layout_and_truth(tmp_path: Path) -> None:
    a = generate_demo_scenes(tmp_path / "a", n_scenes=20, seed=3)
    generate_demo_scenes(tmp_path / "b", n_scenes=20, seed=3)
    files = sorted(p.relative_to(a.root).as_posix() for p in a.root.rglob("*.jpg"))
    assert len(files) == a.n_written == 20 and a.defects == {"no_face": 2, "two_faces": 2}
    assert all((a.root / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    truth = json.loads((a.root / SCENES_TRUTH_NAME).read_text())
    assert sorted(len(t["boxes"]) for t in truth) == [0, 0] + [1] * 16 + [2, 2]
    for t in truth:
        assert t["file"].startswith(t["label"] + "/")
        for x0, y0, x1, y1 in t["boxes"]:
            assert 0 <= x0 < x1 <= SCENE_SIZE[0] and 0 <= y0 < y1 <= SCENE_SIZE[1]
    assert generate_demo_scenes(a.root, n_scenes=20, seed=3).n_written == 20  # idempotent
    with pytest.raises(CatalogError, match="field 'n_images': does not apply with 'scenes'"):
        parse_catalog({"sources": [{"name": "d", "kind": "synthetic", "path": "d", "scenes": 9, "n_images": 50}]},
                      tmp_path)


# --------------------------------------------------------------------------------------------
# the data half, materialized
# --------------------------------------------------------------------------------------------

def _files(root: Path) -> dict[str, list[tuple[float, ...]]]:
    """Writes the drawn photos; returns source/path -> pasted face boxes, largest first."""
    truth = {}
    for path, label, seeds, bg in (("photos/Angry/one.jpg", "Angry", [2], 1),
                                   ("photos/Angry/two.jpg", "Angry", [12, 112], 2),
                                   ("photos/Neutral/one.jpg", "Neutral", [14], 3),
                                   ("photos/Neutral/none.jpg", "Neutral", [], 4),
                                   ("group/Angry/pair.jpg", "Angry", [17, 117], 5),
                                   ("group/Neutral/pair.jpg", "Neutral", [3, 103], 6)):
        img, boxes = scene(label, seeds, bg)
        write(root / "raw" / path, jpeg(img))
        truth[path] = boxes
    write(root / "raw/photos/Angry/broken.jpg", jpeg(scene("Angry", [2], 7)[0])[:900])
    return truth


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("data")
    truth = _files(root)
    labels = {"angry": "Angry", "neutral": "Neutral"}
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "photos", "kind": "image_folders", "path": "raw/photos", "label_map": labels,
         "faces": "detect", "detect": DRAWN},
        {"name": "group", "kind": "image_folders", "path": "raw/group", "label_map": labels,
         "faces": "detect", "detect": {**DRAWN, "keep": "all"}},
        {"name": "crops", "kind": "synthetic", "path": "raw/crops", "n_images": 40, "seed": 5},
        # face crops configured as photos: the data check must say so
        {"name": "crops_as_detect", "kind": "synthetic", "path": "raw/crops2", "n_images": 40, "seed": 6,
         "faces": "detect", "detect": DRAWN},
    ]}))
    return root, truth


@pytest.fixture(scope="module")
def runs(catalogue: tuple[Path, dict]) -> tuple[dg.ExecuteInProcessResult, ...]:
    root, _ = catalogue
    first = run_data_pipeline(root, RUN_CONFIG)
    tables = {t: pd.read_parquet(root / "manifest" / f"{t}.parquet") for t in ("manifest", "excluded")}
    second = run_data_pipeline(root, RUN_CONFIG)
    return first, second, tables


def test_detected_faces_in_the_manifest_with_box_score_and_count(catalogue, runs) -> None:
    root, truth = catalogue
    first, _, _ = runs
    assert first.success
    manifest = pd.read_parquet(root / "manifest" / "manifest.parquet")
    assert list(manifest.columns[:len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert manifest["image_id"].is_unique
    rows = manifest.set_index(["source", "source_path", "face_index"])
    for path, boxes in truth.items():
        source, rel = path.split("/", 1)
        if not boxes:
            continue
        kept = rows.loc[(source, rel)]
        expected = boxes if source == "group" else boxes[:1]  # keep: all / keep: largest
        assert list(kept.index) == list(range(len(expected))), path
        for k, box in enumerate(expected):
            row = kept.loc[k]
            found = (row["box_left"], row["box_top"], row["box_right"], row["box_bottom"])
            cx, cy = (found[0] + found[2]) / 2, (found[1] + found[3]) / 2
            # a drawn head fills less of its square than a dataset crop does: IoU 0.3, centre inside
            assert box_iou(found, box) >= 0.3 and box[0] < cx < box[2] and box[1] < cy < box[3], (path, k, found)
            assert row["framing"] == "detect" and row["faces_found"] == len(boxes)
            assert 0.9 < row["detector_score"] <= 1.0
    pair = manifest[(manifest["source"] == "group") & (manifest["source_path"] == "Angry/pair.jpg")]
    assert pair["image_id"].nunique() == 2 and pair["sha256"].nunique() == 1  # one file, two faces
    crops = manifest[manifest["source"] == "crops"]
    assert len(crops) > 20 and (crops["framing"] == "crop").all() and (crops["face_index"] == 0).all()
    assert crops[["faces_found", "box_left", "box_top", "box_right", "box_bottom", "detector_score"]].isna().all().all()
    assert (crops["image_id"] == crops["sha256"].str.slice(0, 16)).all()  # crop ids as before detection existed
    faces = load_faces(root, manifest.loc[manifest["framing"] == "detect", "face_path"].tolist())
    assert faces.shape[1:] == (48, 48) and faces.std(axis=(1, 2)).min() > 10


def test_no_face_and_broken_photo_excluded_and_every_item_accounted(catalogue, runs) -> None:
    root, _ = catalogue
    first, _, _ = runs
    manifest = pd.read_parquet(root / "manifest" / "manifest.parquet")
    excluded = pd.read_parquet(root / "manifest" / "excluded.parquet")
    inventory = pd.read_parquet(root / "manifest" / "raw_inventory.parquet")
    why = excluded.set_index(["source", "source_path"])
    assert why.loc[("photos", "Neutral/none.jpg"), "reason"] == NO_FACE
    assert why.loc[("photos", "Neutral/none.jpg"), "stage"] == "faces"
    assert why.loc[("photos", "Angry/broken.jpg"), "reason"].startswith("rejected: unreadable or truncated")
    # every file is kept or excluded; a `keep: all` photo adds one item per further face
    item = ["source", "source_path", "face_index"]
    extra = manifest[manifest["face_index"] > 0]
    assert len(manifest) + len(excluded) == len(inventory) + len(extra) == len(inventory) + 2
    both = pd.concat([manifest[item], excluded[item]])
    assert not both.duplicated().any()
    files = set(map(tuple, inventory[["source", "source_path"]].to_numpy()))
    assert set(map(tuple, both[["source", "source_path"]].to_numpy())) == files
    checks = {e.check_name: e for e in first.get_asset_check_evaluations()}
    assert checks["manifest_accounting"].passed and checks["manifest_schema"].passed
    assert asset_metadata(first, "manifest")["input_files"] == len(inventory)


def test_framing_check_names_the_crops_configured_as_photos(runs) -> None:
    first, _, _ = runs
    check = next(e for e in first.get_asset_check_evaluations() if e.check_name == "face_framing")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    flagged = check.metadata["sources_flagged"].value
    assert set(flagged) == {"crops_as_detect"}, flagged  # photos: 1 of 4 without a face; group: keep all
    assert flagged["crops_as_detect"]["fills_frame_share"] > 0.3
    assert "crops_as_detect" in check.metadata["per_source"].value


def test_second_run_detects_nothing_and_gives_the_same_tables(catalogue, runs) -> None:
    root, _ = catalogue
    first, second, tables = runs
    assert second.success
    before, after = asset_metadata(first, "faces"), asset_metadata(second, "faces")
    assert before["detected_this_run"] >= 45  # 6 photos (not the broken one) and the 40-odd crops as photos
    assert after["detected_this_run"] == 0 and after["decoded_this_run"] == 0
    assert after["detection_reused_from_cache"] >= before["detected_this_run"]
    for name, table in tables.items():
        pd.testing.assert_frame_equal(pd.read_parquet(root / "manifest" / f"{name}.parquet"), table)


# --------------------------------------------------------------------------------------------
# core: worker processes, orientation, large files
# --------------------------------------------------------------------------------------------

def _faces(files: dict[str, bytes], root: Path, framing: SourceFraming, **kw: object) -> pd.DataFrame:
    rows = [{"source": "s", "source_path": p, "sha256": hashlib.sha256(d).hexdigest()} for p, d in files.items()]
    settings = PreprocessSettings()
    return process_faces(pd.DataFrame(rows), lambda _s, p: files[p], FaceStore(root, settings.key), settings,
                         framings={"s": framing}, **kw).table


def test_worker_processes_detect_exactly_as_in_process(tmp_path: Path) -> None:
    files = {f"{i}.jpg": jpeg(scene("Angry", seeds, i)[0])
             for i, seeds in enumerate(([2], [12, 112], [], [17, 117], [14], [3, 103]))}
    framing = SourceFraming(Detection(**DRAWN), keep_all=True)
    serial = _faces(files, tmp_path / "serial", framing, workers=1)
    pool = _faces(files, tmp_path / "pool", framing, workers=2, parallel_min=0)
    cols = ["source_path", "face_index", "reason", "faces_found", "box_left", "box_top", "box_right", "box_bottom",
            "detector_score", "pixel_sha", "phash", "face_key"]
    pd.testing.assert_frame_equal(serial[cols], pool[cols])
    assert serial.groupby("source_path")["faces_found"].first().fillna(0).tolist() == [1, 2, 0, 2, 1, 2]


def test_boxes_are_in_the_files_pixels_for_rotated_and_large_photos(tmp_path: Path) -> None:
    img, boxes = scene("Angry", [12, 112], 2)
    big = img.resize((SCENE[0] * 11, SCENE[1] * 11), Image.BICUBIC)  # 4400x3300: decoded at half scale
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; a viewer turns it back 90 degrees clockwise
    files = {"upright.jpg": jpeg(img), "turned.jpg": jpeg(img.transpose(Image.Transpose.ROTATE_90), exif=exif),
             "big.jpg": jpeg(big)}
    table = _faces(files, tmp_path, SourceFraming(Detection(**DRAWN), keep_all=True)).set_index(
        ["source_path", "face_index"])
    def box(path: str, k: int, s: float = 1.0) -> tuple[float, ...]:
        return tuple(table.loc[(path, k), c] / s for c in ("box_left", "box_top", "box_right", "box_bottom"))

    for k in (0, 1):
        assert box_iou(box("turned.jpg", k), box("upright.jpg", k)) > 0.9
        assert box_iou(box("big.jpg", k, 11.0), box("upright.jpg", k)) > 0.8
        assert box_iou(box("upright.jpg", k), boxes[k]) >= 0.3
    assert table.loc[("big.jpg", 0), "width"] == 4400


@pytest.mark.realdata
def test_real_faces_in_scenes_are_boxed_where_they_were_pasted(tmp_path: Path) -> None:
    """AffectNet faces (real people) pasted into clutter, default settings (score > 0.99): the
    manifest's box is the pasted crop (IoU >= 0.5) for nearly all of them."""
    with zipfile.ZipFile(shared_dataset("affectnet-4class.zip")) as zf:
        names = sorted(n for n in zf.namelist() if re.match(r"(?i)^(Anger|Neutral)/[^/]+\.jpe?g$", n))[:40:2]
        real = [Image.open(io.BytesIO(zf.read(n))).convert("RGB") for n in names]
    rng = np.random.default_rng(5)
    files, truth = {}, {}
    for i in range(10):
        img = clutter(rng, 640, 480)
        truth[f"{i}.jpg"] = [paste_face(img, real[2 * i], 180, float(rng.uniform(-8, 8)), 170, 240),
                             paste_face(img, real[2 * i + 1], 110, float(rng.uniform(-8, 8)), 500, 170)]
        files[f"{i}.jpg"] = jpeg(img)
    table = _faces(files, tmp_path, SourceFraming(Detection(), keep_all=True))
    hits = 0
    for path, boxes in truth.items():
        rows = table[table["source_path"] == path]
        found = rows[["box_left", "box_top", "box_right", "box_bottom"]].dropna().to_numpy().tolist()
        hits += len(match_boxes(found, boxes, 0.5))
    assert hits >= 19, hits  # of 20


def test_a_face_store_from_before_detection_is_still_reused(tmp_path: Path) -> None:
    """Stores written before framings existed hold crops only: they stay valid (nothing decoded again)."""
    files = {f"{i}.png": jpeg(drawn_face(i, "Angry", 64)) for i in range(3)}
    rows = pd.DataFrame([{"source": "s", "source_path": p, "sha256": hashlib.sha256(d).hexdigest()}
                         for p, d in files.items()])
    settings = PreprocessSettings()
    store = FaceStore(tmp_path, settings.key)
    first = process_faces(rows, lambda _s, p: files[p], store, settings)
    old = pd.read_parquet(store.index_path).drop(columns=["framing", "face_index", "faces_found", "box_left",
                                                          "box_top", "box_right", "box_bottom", "detector_score"])
    old.to_parquet(store.index_path)
    again = process_faces(rows, lambda _s, p: files[p], store, settings)
    assert first.processed == 3 and again.processed == 0 and again.reused == 3
    assert (again.table["framing"] == "crop").all() and (again.table["face_key"] == again.table["sha256"]).all()
    assert again.table["face_ref"].tolist() == first.table["face_ref"].tolist()
