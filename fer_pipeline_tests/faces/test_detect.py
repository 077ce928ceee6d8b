"""Face detection and alignment (fer_pipeline.faces.detect, issue #11 step 2).

Always run: the box calibration and downscale arithmetic, eye alignment on a drawn pattern
rotated by known angles, every Pillow mode, the weight checks, face-free canvases, and the
project's own cartoon faces (MTCNN does find them). With ``../shared/datasets`` present: real
AffectNet faces pasted into cluttered canvases at known boxes (recall, false positives, and
whether the aligned crop is the pasted face).
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from fer_pipeline.faces._vendor import mtcnn
from fer_pipeline.faces.detect import (
    DETECTORS,
    MTCNN_CALIBRATION,
    BoxCalibration,
    DetectedFace,
    FaceDetector,
    MTCNNDetector,
    align_face,
    downscale,
    largest_first,
    make_detector,
    scale_face,
    to_rgb,
)
from fer_pipeline.faces.preprocess import preprocess_image
from fer_pipeline.demo.scenes import (
    box_iou,
    clutter,
    is_false_positive,
    match_boxes,
    scrambled_face,
)
from fer_pipeline.demo.synthetic_faces import render_face, sample_face_params
from fer_pipeline_tests.conftest import shared_dataset


@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    return MTCNNDetector()


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def gray48(img: Image.Image) -> np.ndarray:
    return preprocess_image(img.copy(), (48, 48)).astype(np.float64)


def cartoon(index: int, size: int = 128) -> Image.Image:
    """The project's demo face number ``index`` (the demo generator's drawing code)."""
    rng = np.random.default_rng([2024, index])
    params = sample_face_params(("Angry", "Focused", "Neutral", "Tired")[index % 4], ("male", "female")[index % 2],
                                ("young", "middle", "senior")[index % 3], rng)
    return render_face(params, size, rng)


# --------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------

def test_calibration_turns_the_narrow_mtcnn_box_into_the_crop_square() -> None:
    crop = (100.0, 200.0, 200.0, 300.0)  # the dataset-style crop: 100 px square centred at (150, 250)
    c = MTCNN_CALIBRATION
    w, h = 100 * c.width_ratio, 100 * c.height_ratio
    cx, cy = 150 + c.dx * w, 250 + c.dy * h  # where MTCNN's own box sits for that face (median)
    raw = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    assert c.apply(raw) == pytest.approx(crop, abs=1e-9)
    assert 0.5 < c.width_ratio < c.height_ratio < 1.0  # narrow and tall, as measured in DETECTORS.md
    assert BoxCalibration().apply(raw) == pytest.approx(raw)
    # with eyes, the centre follows them: eye_dx/eye_dy along the eye line and its downward normal
    cal = BoxCalibration(0.5, 0.5, 0.0, 0.0, eye_dx=0.1, eye_dy=0.2)
    raw = (0.0, 0.0, 50.0, 50.0)  # -> a 100 px crop
    level = cal.apply(raw, (40.0, 60.0), (60.0, 60.0))
    assert level == pytest.approx((50 + 10 - 50, 60 + 20 - 50, 50 + 10 + 50, 60 + 20 + 50))
    turned = cal.apply(raw, (50.0, 50.0), (50.0, 70.0))  # eye line pointing down: rolled 90 deg clockwise
    assert turned == pytest.approx((50 - 20 - 50, 60 + 10 - 50, 50 - 20 + 50, 60 + 10 + 50))


def test_downscale_maps_back_onto_the_original() -> None:
    big = Image.new("RGB", (3000, 2000))
    small, sx, sy = downscale(big, 1024)
    assert small.size == (1024, 683)
    assert (sx, sy) == pytest.approx((3000 / 1024, 2000 / 683))
    assert downscale(big, None)[0] is big and downscale(big, 4000)[1:] == (1.0, 1.0)
    face = DetectedFace((10.0, 20.0, 110.0, 140.0), 0.99, (40.0, 60.0), (80.0, 61.0))
    back = scale_face(face, sx, sy)
    assert back.box == pytest.approx((10 * sx, 20 * sy, 110 * sx, 140 * sy))
    assert back.left_eye == pytest.approx((40 * sx, 60 * sy)) and back.score == 0.99
    assert scale_face(DetectedFace((0, 0, 1, 1), 1.0), 2, 2).left_eye is None


def test_largest_face_first_with_a_total_order() -> None:
    a = DetectedFace((0, 0, 10, 10), 0.99)
    b = DetectedFace((50, 0, 80, 30), 0.95)
    c = DetectedFace((0, 50, 30, 80), 0.999)  # same area as b, higher score
    assert largest_first([a, b, c]) == [c, b, a]
    assert DetectedFace((0, 0, 1, 1), 1, (0, 0), (10, -10)).roll_degrees == pytest.approx(45)


# --------------------------------------------------------------------------------------------
# alignment on a drawn pattern with known eyes
# --------------------------------------------------------------------------------------------

def pattern(angle: float) -> tuple[Image.Image, DetectedFace, DetectedFace]:
    """A grey 400x400 image with two black 'eyes', a mouth bar and a red mark (top left of the
    face), rotated counter-clockwise by ``angle`` about the centre; the face as a detector would
    report it (box around the rotated face centre, eyes where they went), and the upright one."""
    img = Image.new("RGB", (400, 400), (150, 150, 150))
    d = ImageDraw.Draw(img)
    eyes = [(165.0, 190.0), (235.0, 190.0)]
    for x, y in eyes:
        d.ellipse((x - 9, y - 9, x + 9, y + 9), fill=(0, 0, 0))
    d.rectangle((175, 255, 225, 265), fill=(40, 40, 40))
    d.rectangle((135, 135, 150, 150), fill=(220, 30, 30))
    box = (120.0, 140.0, 280.0, 300.0)  # centre (200, 220)
    upright = DetectedFace(box, 1.0, eyes[0], eyes[1])
    a = math.radians(angle)

    def rot(p):  # PIL's rotate(angle) about (200, 200), in image coordinates (y down)
        dx, dy = p[0] - 200, p[1] - 200
        return (200 + dx * math.cos(a) + dy * math.sin(a), 200 - dx * math.sin(a) + dy * math.cos(a))

    rotated = img.rotate(angle, resample=Image.BICUBIC, fillcolor=(150, 150, 150))
    cx, cy = rot((200, 220))
    face = DetectedFace((cx - 80, cy - 80, cx + 80, cy + 80), 1.0, rot(eyes[0]), rot(eyes[1]))
    return rotated, face, upright


def dark_centroids(arr: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centroids of the near-black pixels in the left and right halves (the eyes)."""
    g = arr.mean(axis=2)
    ys, xs = np.nonzero(g < 30)
    mid = arr.shape[1] / 2
    left, right = xs < mid, xs >= mid
    return (xs[left].mean(), ys[left].mean()), (xs[right].mean(), ys[right].mean())


@pytest.mark.parametrize("angle", [-30.0, -12.5, 0.0, 7.0, 25.0])
def test_align_face_levels_the_eyes_and_recovers_the_upright_face(angle: float) -> None:
    rotated, face, upright = pattern(angle)
    assert face.roll_degrees == pytest.approx(angle, abs=1e-6)
    out = align_face(rotated, face, margin=0.0, size=(64, 64))
    assert out.size == (64, 64) and out.mode == "RGB"
    arr = np.asarray(out, np.float64)
    (lx, ly), (rx, ry) = dark_centroids(arr)
    assert abs(ly - ry) < 0.75, (ly, ry)  # level
    # the eyes land where the upright face puts them: 45 and 115 of 160 px across, 50 of 160 down
    assert (lx, rx, ly) == pytest.approx((45 / 160 * 64, 115 / 160 * 64, 50 / 160 * 64), abs=1.0)
    ref = np.asarray(align_face(pattern(0.0)[0], upright, 0.0, (64, 64)), np.float64)
    assert corr(arr, ref) > 0.97
    red = arr[..., 0] - arr[..., 1]
    ry_, rx_ = np.argwhere(red > 100).mean(axis=0)
    assert rx_ < 32 and ry_ < 32  # not flipped or turned: the red mark stays top left


def test_align_face_size_margin_aspect_and_edges() -> None:
    rotated, face, _ = pattern(10.0)
    tall = align_face(rotated, face, margin=0.0, size=(60, 40))  # (height, width), like PreprocessSettings
    assert tall.size == (40, 60)
    wide = align_face(rotated, face, margin=0.25, size=(48, 48))
    (lx, _), (rx, _) = dark_centroids(np.asarray(wide))
    assert rx - lx == pytest.approx(70 / (160 * 1.5) * 48, abs=1.0)  # the margin widens the view
    assert preprocess_image(wide, (48, 48)).shape == (48, 48)  # the existing preprocessing takes it as is
    # a face half outside the image: the outside is the face's mean colour, never black
    edge = DetectedFace((-60.0, -60.0, 100.0, 100.0), 1.0)
    out = np.asarray(align_face(Image.new("RGB", (300, 300), (200, 180, 160)), edge, 0.1, (48, 48)))
    assert out.min() > 100
    with pytest.raises(ValueError):
        align_face(rotated, face, margin=-0.1)
    with pytest.raises(ValueError):
        align_face(rotated, DetectedFace((5.0, 5.0, 5.0, 9.0), 1.0))


def test_align_face_without_eyes_is_a_plain_crop() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), np.uint8))
    out = align_face(img, DetectedFace((50.0, 40.0, 150.0, 140.0), 0.9), 0.0, (100, 100))
    assert corr(np.asarray(out), np.asarray(img.crop((50, 40, 150, 140)))) > 0.97


# --------------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------------

def test_registry_protocol_and_settings(detector: MTCNNDetector) -> None:
    assert DETECTORS["mtcnn"] is MTCNNDetector
    assert isinstance(detector, FaceDetector)
    assert isinstance(make_detector("mtcnn", min_face_size=30), MTCNNDetector)
    with pytest.raises(ValueError, match="unknown face detector 'dlib'; known: mtcnn"):
        make_detector("dlib")
    with pytest.raises(ValueError):
        MTCNNDetector(score_threshold=1.0)
    s = detector.settings()
    assert s["detector"] == "mtcnn" and s["score_threshold"] == detector.score_threshold


def test_weights_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(mtcnn.WEIGHTS_SHA256, "rnet", "0" * 64)
    with pytest.raises(mtcnn.WeightsUnavailable, match="SHA-256"):
        MTCNNDetector()
    monkeypatch.setattr(mtcnn, "WEIGHTS_DIST", "no-such-weights-package")
    with pytest.raises(mtcnn.WeightsUnavailable, match="not installed.*--no-deps"):
        mtcnn.load_networks()


def test_tiny_blank_and_face_free_images_give_no_face(detector: MTCNNDetector) -> None:
    assert detector.detect(Image.new("RGB", (10, 10))) == []  # facenet-pytorch's own cascade raised here
    assert detector.detect(Image.new("RGB", (13, 400), (90, 90, 90))) == []
    assert detector.detect(Image.new("L", (640, 480), 128)) == []
    rng = np.random.default_rng(7)
    for _ in range(8):
        assert detector.detect(clutter(rng)) == []
    noise = Image.fromarray(rng.integers(0, 256, (480, 640, 3), np.uint8))
    assert detector.detect(noise) == []


FOUND_CARTOONS = 12  # of 16 (15 measured)


@pytest.fixture(scope="module")
def lenient() -> MTCNNDetector:
    """Cartoon faces score lower than real ones (0.8-1.0 against 0.99+): cut at 0.9 for them."""
    return MTCNNDetector(score_threshold=0.9)


def test_finds_most_demo_generator_faces(lenient: MTCNNDetector) -> None:
    """The demo generator's cartoon faces (fer_pipeline.demo.synthetic_faces), one per clutter
    canvas at a known place. A cartoon's head fills less of its square than a dataset crop does,
    so a hit is IoU >= 0.3 with the rendered square (the box calibration is fitted on real faces)."""
    rng = np.random.default_rng(11)
    found, false = 0, 0
    for i in range(16):
        canvas = clutter(rng)
        s = int(rng.integers(80, 200))
        x, y = int(rng.integers(0, 640 - s)), int(rng.integers(0, 480 - s))
        canvas.paste(cartoon(100 + i).resize((s, s), Image.LANCZOS), (x, y))
        faces = lenient.detect(canvas)
        found += any(box_iou(f.box, (x, y, x + s, y + s)) >= 0.3 for f in faces)
        false += sum(is_false_positive(f.box, [(x, y, x + s, y + s)]) for f in faces)
    assert found >= FOUND_CARTOONS and false == 0, (found, false)


def test_several_faces_largest_first_with_eyes(lenient: MTCNNDetector) -> None:
    canvas = clutter(np.random.default_rng(3))
    truth = []
    for index, (x, y, s) in zip((12, 22, 44), ((40, 60, 180), (470, 40, 140), (300, 300, 100))):
        canvas.paste(cartoon(index).resize((s, s), Image.LANCZOS), (x, y))
        truth.append((x, y, x + s, y + s))
    faces = lenient.detect(canvas)
    assert len(faces) == 3
    for f, t in zip(faces, truth):  # largest first: the 180, 140 and 100 px faces, in that order
        assert box_iou(f.box, t) >= 0.3
        (lx, ly), (rx, _ry) = f.left_eye, f.right_eye
        assert f.box[0] < lx < rx < f.box[2] and f.box[1] < ly < (f.box[1] + f.box[3]) / 2
    assert lenient.detect(canvas) == faces  # deterministic


def test_every_pillow_mode_and_exif_orientation(lenient: MTCNNDetector) -> None:
    detector = lenient
    face = Image.new("RGB", (200, 200), (120, 140, 160))
    face.paste(cartoon(12, 128), (36, 36))
    ref = detector.detect(face)
    assert len(ref) == 1
    rgba = face.convert("RGBA")
    rgba.putalpha(Image.new("L", face.size, 255))
    p_trans = face.convert("P")
    p_trans.info["transparency"] = 0
    arr16 = (np.asarray(face.convert("L"), np.uint16) * 257)
    variants = {
        "L": face.convert("L"), "LA": face.convert("LA"), "RGBA": rgba, "P": face.convert("P"),
        "P+transparency": p_trans, "CMYK": face.convert("CMYK"), "I;16": Image.fromarray(arr16),
        "I": face.convert("I"), "F": face.convert("F"), "YCbCr": face.convert("YCbCr"),
    }
    for name, img in variants.items():
        got = detector.detect(img)
        assert len(got) == 1, name
        assert box_iou(got[0].box, ref[0].box) > 0.8, name
        crop = align_face(img, got[0], 0.1, (48, 48))
        assert crop.mode == "RGB" and crop.size == (48, 48), name
    assert detector.detect(face.convert("1")) is not None  # no crash on 1-bit
    # EXIF orientation 6: the stored pixels are turned, the viewer (and the detector) turns them back
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    face.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    turned = Image.open(io.BytesIO(buf.getvalue()))
    assert to_rgb(turned).size == (200, 200)
    got = detector.detect(turned)
    assert len(got) == 1 and box_iou(got[0].box, ref[0].box) > 0.8
    assert to_rgb(face) is face


def test_large_images_are_downscaled_and_boxes_mapped_back(lenient: MTCNNDetector) -> None:
    detector = lenient
    big = clutter(np.random.default_rng(5), 3000, 2200)
    big.paste(cartoon(12, 128).resize((700, 700), Image.LANCZOS), (1800, 900))
    faces = detector.detect(big)  # detected at 1024 px (face ~240 px there)
    assert len(faces) == 1
    assert box_iou(faces[0].box, (1800, 900, 2500, 1600)) > 0.5
    full = MTCNNDetector(max_side=None, min_face_size=400, score_threshold=0.9).detect(big)  # same face, no downscale
    assert len(full) == 1 and box_iou(full[0].box, faces[0].box) > 0.8
    assert math.dist(full[0].left_eye, faces[0].left_eye) < 0.05 * 700


# --------------------------------------------------------------------------------------------
# real faces (../shared/datasets)
# --------------------------------------------------------------------------------------------

SEED = 2026
N_SINGLE, N_DOUBLE, N_EMPTY = 60, 25, 60  # 110 faces in 85 canvases, and 60 face-free canvases
# Bounds for the seeded set below at the detector's defaults; it measured (2 shared cores,
# torch 2.14.1 CPU): recall@0.5 0.973 (107/110), 1 false positive in 60 face-free canvases
# (0.017; 2 more on the 85 face canvases), aligned crop vs original face median correlation
# 0.660 (>= 0.5 for 77%, >= 0.8 for 31%), own face the most similar of 107 for 74%; the same
# alignment in the true box: median 0.944, >= 0.8 for 84%.
# Correlation >= 0.8 for 90% of faces is out of reach for any box: the dataset's crops frame
# faces with a margin that varies from image to image (crop side / MTCNN box: interquartile
# range about +-8%), and at 48x48 a few pixels of framing difference already cost that much.
MIN_RECALL = 0.95
MAX_FP_PER_EMPTY = 0.05
MIN_MEDIAN_CORR, MIN_SHARE_CORR_05, MIN_TOP1 = 0.55, 0.65, 0.6
MIN_MEDIAN_CORR_TRUE_BOX, MIN_SHARE_CORR_08_TRUE_BOX = 0.9, 0.75


def real_faces(n: int, n_decoys: int, rng: np.random.Generator) -> tuple[list[Image.Image], list[Image.Image]]:
    pat = re.compile(r"^(Anger|Bored_Tired|Focused_Engaged|Neutral)/[^/]+\.jpe?g$", re.IGNORECASE)
    with zipfile.ZipFile(shared_dataset("affectnet-4class.zip")) as zf:
        seen, names = set(), []
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if pat.match(info.filename) and info.CRC not in seen:  # one per content (some sit in two classes)
                seen.add(info.CRC)
                names.append(info.filename)
        pick = rng.permutation(len(names))[: n + n_decoys]
        imgs = [Image.open(io.BytesIO(zf.read(names[i]))).convert("RGB") for i in pick]
    return imgs[:n], imgs[n:]


def real_canvases(rng: np.random.Generator):
    faces, decoys = real_faces(N_SINGLE + 2 * N_DOUBLE, 30, rng)
    layout = [1] * N_SINGLE + [2] * N_DOUBLE + [0] * N_EMPTY
    layout = [layout[i] for i in rng.permutation(len(layout))]
    it = iter(faces)
    out = []  # (canvas, [(box, face image)])
    for k in layout:
        img = clutter(rng)
        if rng.random() < 0.5:  # scrambled real faces in half the canvases
            for _ in range(int(rng.integers(1, 3))):
                s = int(rng.integers(60, 200))
                img.paste(scrambled_face(decoys[int(rng.integers(len(decoys)))], s, rng),
                          (int(rng.integers(0, 640 - s)), int(rng.integers(0, 480 - s))))
        if rng.random() < 0.3:
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
        placed, truth = [], []
        for _ in range(k):
            face = next(it)
            for _attempt in range(200):
                size = round(math.exp(rng.uniform(math.log(60), math.log(250 if k == 1 else 200))))
                angle = float(rng.uniform(-10, 10))
                ext = size * (abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle)))) / 2
                cx, cy = float(rng.uniform(ext + 2, 640 - ext - 2)), float(rng.uniform(ext + 2, 480 - ext - 2))
                r = (cx - ext - 8, cy - ext - 8, cx + ext + 8, cy + ext + 8)
                if all(r[2] < p[0] or r[0] > p[2] or r[3] < p[1] or r[1] > p[3] for p in placed):
                    break
            placed.append(r)
            f = face.resize((size, size), Image.LANCZOS).rotate(angle, Image.BICUBIC, expand=True)
            mask = Image.new("L", (size, size), 255).rotate(angle, Image.BICUBIC, expand=True)
            img.paste(f, (round(cx - f.width / 2), round(cy - f.height / 2)), mask)
            truth.append(((cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), face))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((Image.open(io.BytesIO(buf.getvalue())), truth))
    return out


@pytest.mark.realdata
@pytest.mark.slow
def test_real_faces_in_clutter_recall_false_positives_and_alignment(detector: MTCNNDetector) -> None:
    data = real_canvases(np.random.default_rng(SEED))
    n_faces = sum(len(t) for _, t in data)
    assert n_faces >= 100
    hits, fp_empty, fp_faces, n_empty = 0, 0, 0, 0
    crops, crops_gt, originals = [], [], []
    for canvas, truth in data:
        dets = detector.detect(canvas)
        m = match_boxes([d.box for d in dets], [t[0] for t in truth], 0.5)
        hits += len(m)
        fps = sum(is_false_positive(d.box, [t[0] for t in truth]) for d in dets)
        n_empty += not truth
        fp_empty += fps if not truth else 0
        fp_faces += fps if truth else 0
        for i, j in m.items():
            d = dets[j]
            crops.append(gray48(align_face(canvas, d, margin=0.0, size=(48, 48))))
            # the same alignment in the dataset's own box: isolates align_face from box calibration
            crops_gt.append(gray48(align_face(canvas, replace(d, box=truth[i][0]), 0.0, (48, 48))))
            originals.append(gray48(truth[i][1]))
    recall = hits / n_faces
    fp_rate = fp_empty / n_empty
    c = np.array([corr(a, b) for a, b in zip(crops, originals)])
    c_gt = np.array([corr(a, b) for a, b in zip(crops_gt, originals)])
    z = lambda a: (a - a.mean()) / (a.std() + 1e-9)  # noqa: E731
    sim = np.array([z(a).ravel() for a in crops]) @ np.array([z(b).ravel() for b in originals]).T
    top1 = float((sim.argmax(axis=1) == np.arange(len(sim))).mean())
    print(f"\nreal faces: {n_faces} in {len(data) - n_empty} canvases, {n_empty} face-free; "
          f"recall@0.5 {recall:.3f}; FP per face-free canvas {fp_rate:.3f} ({fp_empty}), on face canvases "
          f"{fp_faces}\naligned crop vs original face (48x48 gray, Pearson): median {np.median(c):.3f}, "
          f"p10 {np.percentile(c, 10):.3f}, share >= 0.8 {np.mean(c >= 0.8):.3f}, >= 0.5 {np.mean(c >= 0.5):.3f}; "
          f"own face most similar of {len(sim)}: {top1:.3f}\nsame alignment in the true box: median "
          f"{np.median(c_gt):.3f}, p10 {np.percentile(c_gt, 10):.3f}, share >= 0.8 {np.mean(c_gt >= 0.8):.3f}")
    assert recall >= MIN_RECALL
    assert fp_rate <= MAX_FP_PER_EMPTY
    assert (fp_empty + fp_faces) / len(data) <= MAX_FP_PER_EMPTY
    assert np.median(c) >= MIN_MEDIAN_CORR and np.mean(c >= 0.5) >= MIN_SHARE_CORR_05
    assert top1 >= MIN_TOP1
    assert np.median(c_gt) >= MIN_MEDIAN_CORR_TRUE_BOX and np.mean(c_gt >= 0.8) >= MIN_SHARE_CORR_08_TRUE_BOX
