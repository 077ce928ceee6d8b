"""Annotated copies of the images ``fer-pipeline predict --annotate DIR`` classified: each face's
box and predicted label drawn on a copy of the input, so a person can see what the model looked at.

Plain Pillow. Output names are made here, never taken from the input: ``<n>_<stem>.<ext>``, where
``n`` is the input's position in the run (unique, so names cannot collide, even for two zip
entries of one name) and ``stem`` keeps only ASCII letters, digits, ``-`` and ``_`` of the input's
base name (so ``../x.png``, control characters or a name that is not UTF-8 cannot escape the
folder, hide a file or forge another). Files are written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from fer_pipeline.atomic import atomic_path

Box = tuple[float, float, float, float]  # (left, top, right, bottom), pixels of the EXIF-oriented image

MAX_STEM = 60
OK_COLOUR = (40, 220, 60)
FAILED_COLOUR = (235, 40, 40)


@dataclass(frozen=True)
class Mark:
    """One thing to draw: a box (None: a caption for the whole image) and its text."""

    box: Box | None
    text: str
    ok: bool = True


def output_name(index: int, input_name: str, fmt: str) -> str:
    """``00012_holiday.jpg`` for input number 12 named ``.../holiday.JPG`` saved as JPEG."""
    base = re.split(r"[/\\]", input_name)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:MAX_STEM] or "image"
    return f"{index:05d}_{safe}.{'jpg' if fmt == 'JPEG' else 'png'}"


def centre_crop_box(width: int, height: int, size: tuple[int, int]) -> Box:
    """The region the "crop" framing keeps (a centred crop to the (height, width) aspect), as
    ``preprocess_image``'s ``ImageOps.fit`` cuts it."""
    th, tw = size
    if width / height > tw / th:
        w = height * tw / th
        return ((width - w) / 2, 0.0, (width + w) / 2, float(height))
    h = width * th / tw
    return (0.0, (height - h) / 2, float(width), (height + h) / 2)


def draw_marks(image: Image.Image, marks: Sequence[Mark]) -> Image.Image:
    """An RGB copy of ``image`` (already EXIF-oriented) with every mark drawn: a box outline and
    its text on a filled label above it (below it at the top edge); captions at the top left."""
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    side = min(w, h)
    line = max(2, round(side / 150))
    font = ImageFont.load_default(size=max(10, round(side / 25)))
    caption_y = 0.0
    for mark in marks:
        colour = OK_COLOUR if mark.ok else FAILED_COLOUR
        if mark.box is None:
            x, y = 0.0, caption_y
        else:
            draw.rectangle([round(v) for v in mark.box], outline=colour, width=line)
            x, y = max(0.0, mark.box[0]), mark.box[1]
        left, top, right, bottom = draw.textbbox((0, 0), mark.text, font=font)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        if mark.box is not None:
            y = y - th if y - th >= 0 else max(0.0, min(mark.box[3], h - th))
        x = min(x, max(0.0, w - tw))
        draw.rectangle((x, y, x + tw, y + th), fill=colour)
        draw.text((x + line - left, y + line - top), mark.text, fill=(0, 0, 0), font=font)
        if mark.box is None:
            caption_y += th
    return out


def write_annotated(image: Image.Image, marks: Sequence[Mark], folder: Path, index: int, input_name: str,
                    fmt: str | None) -> Path:
    """Draw ``marks`` on ``image`` and write it to ``folder`` (JPEG for JPEG inputs, else PNG)."""
    fmt = "JPEG" if fmt == "JPEG" else "PNG"
    target = folder / output_name(index, input_name, fmt)
    annotated = draw_marks(image, marks)
    with atomic_path(target) as tmp:
        annotated.save(tmp, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return target
