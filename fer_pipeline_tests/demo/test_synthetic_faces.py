"""The embedded demo-data generator: deterministic, well-formed, and defective on purpose."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_pipeline.classes import CLASSES
from fer_pipeline.demo.synthetic_faces import (
    FaceParams,
    SyntheticReport,
    generate_demo_source,
    render_face,
    sample_face_params,
)

N = 120
IMAGE_EXTS = {".png", ".jpg"}


def _files(root: Path) -> dict[str, bytes]:
    """Every non-hidden file under ``root``, keyed by forward-slash relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _image_files(root: Path) -> list[str]:
    return [rel for rel in _files(root) if Path(rel).suffix in IMAGE_EXTS]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(root: Path) -> list[dict[str, str]]:
    return json.loads((root / ".defects.json").read_text())


def _loads(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> SyntheticReport:
    return generate_demo_source(tmp_path_factory.mktemp("demo") / "src", n_images=N, seed=3)


def test_same_seed_is_byte_identical_and_other_seed_differs(demo: SyntheticReport, tmp_path: Path) -> None:
    again = generate_demo_source(tmp_path / "again", n_images=N, seed=3)
    other = generate_demo_source(tmp_path / "other", n_images=N, seed=4)
    first, second = _files(demo.root), _files(again.root)
    assert first == second
    assert again.per_class == demo.per_class and again.defects == demo.defects
    other_files = _files(other.root)
    differing = [rel for rel in first if rel in other_files and first[rel] != other_files[rel]]
    assert len(differing) > N // 2 or set(first) != set(other_files)


def test_layout_readme_and_report(demo: SyntheticReport) -> None:
    root = demo.root
    assert (root / "README.txt").read_text().lower().count("synthetic") >= 1
    assert (root / ".complete").exists() and not (root / ".in_progress").exists()
    assert not [p for p in root.rglob("*.tmp")]  # atomic writes left no temp files behind
    top = {p.name for p in root.iterdir() if not p.name.startswith(".")}
    assert top == set(CLASSES) | {"README.txt", "demographics.csv"}
    images = _image_files(root)
    assert len(images) == demo.n_written == N + sum(demo.defects.values())
    assert sum(demo.per_class.values()) == N
    assert set(demo.per_class) == set(CLASSES) and min(demo.per_class.values()) > 0
    assert len(set(demo.per_class.values())) > 1  # roughly, not perfectly, balanced
    assert {rel.split("/")[0] for rel in images} == set(CLASSES)
    assert any(rel.endswith(".jpg") for rel in images) and any(rel.endswith(".png") for rel in images)
    assert set(demo.defects) == {"exact_duplicate", "near_duplicate", "truncated", "not_an_image", "cross_class"}
    assert all(v >= 1 for v in demo.defects.values())


def test_every_image_has_a_demographics_row(demo: SyntheticReport) -> None:
    with demo.demographics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "gender", "age_group"]
    by_file = {r["file"]: r for r in rows}
    assert len(by_file) == len(rows)
    assert set(_image_files(demo.root)) <= set(by_file)
    assert all("\\" not in f and not f.startswith("/") and (demo.root / f).is_file() for f in by_file)
    assert {r["gender"] for r in rows} <= {"male", "female"}
    assert {r["age_group"] for r in rows} <= {"young", "middle", "senior"}
    genders = Counter(r["gender"] for r in rows)
    assert genders["male"] > genders["female"] > 0  # deliberately imbalanced


def test_clean_images_are_rgb_at_image_size_with_a_few_odd_sizes(demo: SyntheticReport) -> None:
    broken = {m["file"] for m in _manifest(demo.root) if m["kind"] in ("truncated", "not_an_image")}
    sizes = Counter()
    for rel in _image_files(demo.root):
        if rel in broken:
            continue
        with Image.open(demo.root / rel) as im:
            assert im.mode == "RGB"
            sizes[im.size] += 1
    assert sizes.most_common(1)[0][0] == (64, 64)
    assert (80, 72) in sizes


def test_declared_defects_really_exist(demo: SyntheticReport) -> None:
    root, manifest = demo.root, _manifest(demo.root)
    kinds = Counter(m["kind"] for m in manifest)
    assert dict(kinds) == demo.defects
    for m in manifest:
        path, src = root / m["file"], root / m["source"] if m["source"] else None
        if m["kind"] == "exact_duplicate":
            assert m["file"] != m["source"] and _sha(path.read_bytes()) == _sha(src.read_bytes())
            assert m["file"].split("/")[0] == m["source"].split("/")[0]
        elif m["kind"] == "cross_class":
            assert path.read_bytes() == src.read_bytes()
            assert m["file"].split("/")[0] != m["source"].split("/")[0]
        elif m["kind"] == "near_duplicate":
            assert path.read_bytes() != src.read_bytes()
            assert m["file"].split("/")[0] == m["source"].split("/")[0]
            a = np.asarray(Image.open(path).convert("L").resize((32, 32)), dtype=float)
            b = np.asarray(Image.open(src).convert("L").resize((32, 32)), dtype=float)
            assert np.abs(a - b).mean() < 20  # perceptually the same picture
        elif m["kind"] in ("truncated", "not_an_image"):
            assert Path(m["file"]).suffix in IMAGE_EXTS and not _loads(path)


def test_defect_copies_share_demographics_with_their_original(demo: SyntheticReport) -> None:
    with demo.demographics_csv.open(newline="") as f:
        rows = {r["file"]: (r["gender"], r["age_group"]) for r in csv.DictReader(f)}
    for m in _manifest(demo.root):
        if m["source"]:
            assert rows[m["file"]] == rows[m["source"]]


def test_exact_duplicates_are_found_by_hashing_alone(demo: SyntheticReport) -> None:
    """Independent of the manifest: byte-identical groups exist, within and across classes."""
    groups: dict[str, list[str]] = {}
    for rel, data in _files(demo.root).items():
        if Path(rel).suffix in IMAGE_EXTS:
            groups.setdefault(_sha(data), []).append(rel)
    dupes = [g for g in groups.values() if len(g) > 1]
    assert len(dupes) >= demo.defects["exact_duplicate"]
    assert any(len({rel.split("/")[0] for rel in g}) > 1 for g in dupes)  # a label conflict


@functools.cache
def _cue_samples(label: str, n: int = 300) -> list[dict[str, float]]:
    rng = np.random.default_rng(0)
    return [sample_face_params(label, "male", "young", rng).cues for _ in range(n)]


def _cue_means(label: str, cue: str) -> float:
    return float(np.mean([cues[cue] for cues in _cue_samples(label)]))


def test_class_cues_differ_on_average() -> None:
    assert _cue_means("Angry", "brow_angle") > _cue_means("Neutral", "brow_angle") + 5
    assert _cue_means("Tired", "eye_open") < _cue_means("Focused", "eye_open") - 0.25
    assert _cue_means("Angry", "lip_thickness") < _cue_means("Neutral", "lip_thickness")
    assert _cue_means("Angry", "mouth_curve") < _cue_means("Neutral", "mouth_curve")
    assert _cue_means("Tired", "gaze_down") > _cue_means("Focused", "gaze_down")


def test_minority_groups_are_shifted_and_less_expressive() -> None:
    """Something for the bias analysis: weaker senior expressions, higher resting brows for women."""
    rng = np.random.default_rng(2)

    def mean(label: str, gender: str, age: str, cue: str) -> float:
        return float(np.mean([sample_face_params(label, gender, age, rng).cues[cue] for _ in range(400)]))

    young_gap = mean("Angry", "male", "young", "brow_angle") - mean("Neutral", "male", "young", "brow_angle")
    senior_gap = mean("Angry", "male", "senior", "brow_angle") - mean("Neutral", "male", "senior", "brow_angle")
    assert senior_gap < young_gap
    assert mean("Neutral", "female", "young", "brow_raise") > mean("Neutral", "male", "young", "brow_raise")


def test_class_cues_overlap() -> None:
    """No cue separates two classes perfectly: the task must not be trivially solvable."""
    rng = np.random.default_rng(1)
    open_tired = [sample_face_params("Tired", "male", "young", rng).cues["eye_open"] for _ in range(300)]
    open_neutral = [sample_face_params("Neutral", "male", "young", rng).cues["eye_open"] for _ in range(300)]
    assert max(open_tired) > min(open_neutral)


def test_render_face_is_rgb_and_deterministic() -> None:
    params = sample_face_params("Angry", "female", "senior", np.random.default_rng(5))
    assert isinstance(params, FaceParams)
    a = render_face(params, 64, np.random.default_rng(9))
    b = render_face(params, 64, np.random.default_rng(9))
    assert a.mode == "RGB" and a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).std() > 10  # not a blank canvas


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        sample_face_params("Happy", "male", "young", np.random.default_rng(0))
    with pytest.raises(ValueError):
        sample_face_params("Angry", "other", "young", np.random.default_rng(0))


def test_marker_makes_rerun_a_noop_and_rejects_other_parameters(demo: SyntheticReport) -> None:
    marker = demo.root / ".complete"
    stamp = marker.stat().st_mtime_ns
    mtimes = {p: p.stat().st_mtime_ns for p in demo.root.rglob("*.png")}
    again = generate_demo_source(demo.root, n_images=N, seed=3)
    assert again == demo
    assert marker.stat().st_mtime_ns == stamp
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert json.loads(marker.read_text())["params"]["seed"] == 3
    with pytest.raises(ValueError, match="already holds"):
        generate_demo_source(demo.root, n_images=N, seed=4)


def test_refuses_foreign_folder_and_redoes_interrupted_run(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        generate_demo_source(foreign, n_images=N, seed=3)
    assert (foreign / "mine.txt").read_text() == "keep me"

    interrupted = tmp_path / "interrupted"
    report = generate_demo_source(interrupted, n_images=N, seed=3)
    (interrupted / ".complete").rename(interrupted / ".in_progress")  # simulate a crash before the marker
    first = _files(interrupted)
    assert generate_demo_source(interrupted, n_images=N, seed=3) == report
    assert _files(interrupted) == first and (interrupted / ".complete").exists()
