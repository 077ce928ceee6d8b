"""What a member's name says, and how names are shown: image extensions, operating-system and
archive junk, and escaping, so a hostile file name (control characters, bytes that are not
UTF-8) can neither start a fake table row nor send terminal control sequences, yet still maps
back to the file it names. Light on purpose: the command line imports it before anything heavy."""

from __future__ import annotations

import os
import re

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
JUNK_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini", "ehthumbs.db"})


def junk_reason(path: str) -> str | None:
    """Why a member is operating-system or archive junk, or None when it is not."""
    parts = path.split("/")
    name = parts[-1]
    if any(p == "__MACOSX" for p in parts[:-1]):
        return "archive junk (__MACOSX)"
    if name.startswith("._"):
        return "archive junk (AppleDouble ._ file)"
    if name.lower() in JUNK_NAMES:
        return f"archive junk ({name})"
    if name.startswith("."):
        return f"hidden file ({name})"
    return None


def is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def printable(text: str) -> str:
    """``text`` as valid UTF-8 (lone surrogates from undecodable names become ``\\x..`` escapes)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace") \
            .decode("utf-8", "backslashreplace")


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_char(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_text(text: str) -> str:
    """``text`` with every non-printable character written as an escape (``\\n``, ``\\x1b``, ...),
    so a file name cannot start a fake table row or send terminal control sequences."""
    return text if text.isprintable() else "".join(c if c.isprintable() else escape_char(c) for c in text)


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def fs_name(name: str) -> str:
    """A file name (undecodable bytes as lone surrogates, as ``os.listdir`` gives them) as the
    valid UTF-8 text of a ``source_path``, one-to-one so that two files never share a path:

    * a byte that is not UTF-8 is written ``\\xNN`` (two lower-case hex digits);
    * a backslash followed by ``x``, by another backslash or by such a byte is written twice;
    * every other character is itself, so ordinary names (``a\\b.png`` too) are unchanged.

    :func:`unescape_name` is the inverse."""
    if "\\" not in name and _only_text(name):
        return name
    out: list[str] = []
    for k, ch in enumerate(name):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\" and _escapes_next(name[k + 1:k + 2]):
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)


_ESCAPE = re.compile(r"\\(?:\\|x([89a-f][0-9a-f]))")  # only bytes >= 0x80 are ever escaped


def _escapes_next(ch: str) -> bool:
    """Whether a backslash before ``ch`` would read as the start of an escape."""
    return ch in ("x", "\\") or (len(ch) == 1 and 0xDC80 <= ord(ch) <= 0xDCFF)


def _only_text(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def unescape_name(path: str) -> str:
    """The file name (undecodable bytes as lone surrogates, ready for ``os`` calls) that
    :func:`fs_name` wrote as ``path``: ``\\\\`` is one backslash, ``\\xNN`` is byte NN."""
    if "\\" not in path:
        return path
    return _ESCAPE.sub(lambda m: "\\" if m[1] is None else chr(0xDC00 + int(m[1], 16)), path)
