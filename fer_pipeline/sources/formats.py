"""The one format policy: which image formats the pipeline accepts from data folders, judged by
content, the same for the inventory, the decoder and ``predict``.

Pillow decodes far more formats than an image pipeline should take from untrusted folders, and
some of them call external programs when installed (EPS: Ghostscript). So:

* **Accepted** (:data:`ACCEPTED_FORMATS`): JPEG, PNG, BMP, GIF, WebP, TIFF and PPM/PGM/PBM. A
  file whose first bytes say one of them is an image, whatever its name (a ``.jfif``, a PNG
  named ``.ico``); Pillow is only ever asked to open it as that list of formats.
* **Refused by content**: first bytes that say another format (EPS, ICO, AVIF, PSD, PDF, ...)
  are ``not an image file (format X is not accepted)``, whatever the name (an EPS named
  ``.png``); such bytes never reach a decoder.
* **Unrecognised content**: the extension is the hint. Named like an image (``.png``...), it is a
  damaged image and decoding says why (empty, unrecognised); otherwise it is ``not an image file
  (extension .x)`` (a README, a CSV, an archive inside an archive).

Only the first :data:`SNIFF_BYTES` bytes are looked at (what Pillow's own identification reads,
through the same plugin checks), so the inventory judges a file without reading it whole.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from fer_pipeline.sources.names import is_image_name

ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
"""Pillow's names of the accepted formats (``PPM`` covers PGM and PBM)."""
SNIFF_BYTES = 16
"""The bytes a format is judged from (Pillow's ``Image.open`` identifies a file from 16)."""
_OTHER_MAGIC = ((b"%PDF-", "PDF"),)  # formats Pillow writes but cannot open: named, still refused


@cache
def _checks() -> tuple[tuple[str, Any], ...]:
    """(format, Pillow's first-bytes check) for every format Pillow knows, the accepted ones first;
    formats without a check (Pillow tries to parse them) are left out: content never names them."""
    from PIL import Image

    Image.init()
    order = [*ACCEPTED_FORMATS, *(f for f in Image.ID if f not in ACCEPTED_FORMATS)]
    return tuple((f, Image.OPEN[f][1]) for f in order if f in Image.OPEN and Image.OPEN[f][1] is not None)


def sniff_format(head: bytes) -> str | None:
    """The format the first bytes of a file say (Pillow's name, accepted or not), or None."""
    head = head[:SNIFF_BYTES]
    for fmt, accept in _checks():
        try:
            said = accept(head)  # True, or a warning text when the format is known but unsupported
        except Exception:  # noqa: BLE001, S112 - a check that cannot read a short prefix says no
            continue
        if said and not isinstance(said, str):
            return fmt
    return next((fmt for magic, fmt in _OTHER_MAGIC if head.startswith(magic)), None)


def refusal(head: bytes, name: str) -> str | None:
    """Why a file named ``name`` whose first bytes are ``head`` is not an image candidate, or
    None when it is one (an accepted format, or unrecognised content named like an image)."""
    fmt = sniff_format(head)
    if fmt in ACCEPTED_FORMATS:
        return None
    if fmt is not None:
        return format_refusal(fmt)
    if is_image_name(name):
        return None  # a damaged image: decoding says what is wrong with it
    return f"not an image file (extension {os.path.splitext(name)[1] or '(none)'})"


def format_refusal(fmt: str) -> str:
    """The reason a file in format ``fmt`` (not accepted) is refused."""
    return f"not an image file (format {fmt} is not accepted)"
