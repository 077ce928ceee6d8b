import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from fer_pipeline.faces.phash import _resize_pillow, phashes, thumbnails, to_hex
from fer_pipeline.faces.preprocess import (
    PreprocessSettings,
    decode_face,
    decode_faces,
    preprocess_image,
)
from fer_pipeline_tests.conftest import face_png

S = PreprocessSettings()


def test_accepts_and_normalises_rgb_jpeg() -> None:
    out = decode_face(face_png(1, size=96, mode="RGB", fmt="JPEG", quality=90), S)
    assert out.ok and out.face.shape == (48, 48) and out.face.dtype == np.uint8
    assert (out.width, out.height) == (96, 96)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (face_png(1)[:200], "unreadable or truncated"),
        (b"this is text, not an image", "not an image"),
        (face_png(1, size=20), "too small"),
    ],
)
def test_rejections_have_reasons(data: bytes, reason: str) -> None:
    out = decode_face(data, S)
    assert not out.ok and out.reason.startswith(reason) and out.face is None


def test_blank_image_rejected() -> None:
    buf = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buf, format="PNG")
    out = decode_face(buf.getvalue(), S)
    assert out.reason.startswith("near-constant/blank")


def test_decompression_bomb_rejected_without_decoding() -> None:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 0).save(buf, format="PNG")  # 9 MP, small file
    out = decode_face(buf.getvalue(), PreprocessSettings(max_pixels=1_000_000))
    assert out.reason.startswith("decompression bomb")


def test_exif_orientation_applied() -> None:
    # a wide image whose EXIF says "rotate 90°": after transposing it is tall, so the centre
    # crop of the left half (dark) / right half (bright) pattern becomes top/bottom
    arr = np.zeros((40, 80), np.uint8)
    arr[:, 40:] = 255
    img = Image.fromarray(arr, "L")
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    face = preprocess_image(Image.open(io.BytesIO(buf.getvalue())), (48, 48))
    top, bottom = face[:20].mean(), face[-20:].mean()
    left, right = face[:, :20].mean(), face[:, -20:].mean()
    assert abs(top - bottom) > 150 and abs(left - right) < 60


def test_rgba_and_16bit_modes() -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 32, 64))
    face = preprocess_image(rgba, (48, 48))
    assert face[:, :10].mean() < 20 and face[:, -10:].mean() > 235  # transparent -> white
    arr16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    face16 = preprocess_image(Image.fromarray(arr16), (48, 48))
    assert face16.min() < 20 and face16.max() > 235


def test_batched_phash_matches_imagehash_including_mirror() -> None:
    faces = [decode_face(face_png(s), S).face for s in range(40)]
    ph, mph = phashes(np.stack(faces))
    assert to_hex(ph) == [str(imagehash.phash(Image.fromarray(f))) for f in faces]
    assert to_hex(mph) == [str(imagehash.phash(Image.fromarray(np.ascontiguousarray(f[:, ::-1])))) for f in faces]


def test_settings_key_changes_with_size() -> None:
    assert PreprocessSettings().key != PreprocessSettings(image_size=(64, 64)).key
    assert PreprocessSettings().key == PreprocessSettings().key


@pytest.mark.parametrize(("h", "w"), [(48, 48), (64, 64), (100, 37), (37, 100), (24, 24), (181, 167)])
def test_batched_thumbnails_equal_pillow_lanczos(h: int, w: int) -> None:
    """The matrix resize reproduces Pillow's fixed-point LANCZOS exactly (including the pass
    order Pillow picks for tall inputs), on noise, edges and flat images."""
    rng = np.random.default_rng(h * 1000 + w)
    faces = rng.integers(0, 256, (12, h, w), dtype=np.uint8)
    faces[0] = 0
    faces[1] = 255
    faces[2, :, : w // 2] = 0
    faces[2, :, w // 2:] = 255
    assert np.array_equal(thumbnails(faces), _resize_pillow(faces, 32))


def test_batched_decode_matches_single_decode() -> None:
    datas = [face_png(s) for s in range(6)] + [b"not an image", face_png(1)[:100]]
    buf = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buf, format="PNG")
    datas.append(buf.getvalue())
    batch = decode_faces(datas, S)
    single = [decode_face(d, S) for d in datas]
    assert [b.reason for b in batch] == [s.reason for s in single]
    assert [b.ok for b in batch] == [True] * 6 + [False] * 3
    assert all(np.array_equal(b.face, s.face) for b, s in zip(batch[:6], single[:6]))
