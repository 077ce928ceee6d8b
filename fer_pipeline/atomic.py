"""Write-then-rename helpers, so an interrupted run never leaves a half-written output.

Every write goes to a temporary file beside the target, is flushed to disk (fsync), then renamed
over the target, and the folder is synced so the rename itself survives a crash: a reader sees
the old file or the new one, never a torn one. A write that fails because the disk is full
raises ``OSError(ENOSPC, "disk full writing <target>")`` whatever the writer said (numpy only says
"N requested and M written"); the temporary file is removed and the target left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        fsync_file(tmp_path)
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise OSError(errno.ENOSPC, f"disk full writing {target}") from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# how writers that lose the errno say the disk is full: numpy's tofile (np.save) "69120 requested
# and 44928 written" (a short write), Arrow's "[errno 28] No space left on device" in its text
_DISK_FULL_TEXT = re.compile(r"\d+ requested and \d+ written|no space left on device|errno 28\b", re.IGNORECASE)


def is_disk_full(exc: OSError) -> bool:
    """Whether a write failed because the disk (or the user's quota) is full."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return exc.errno is None and _DISK_FULL_TEXT.search(str(exc)) is not None


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be synced."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_synced(src: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Rename an already written (and synced) file over ``target`` and sync the folder."""
    fsync_file(src)
    os.replace(src, target)
    fsync_dir(Path(target).parent)
    return Path(target)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


PARQUET_META_KEY = b"fer_pipeline"


def write_parquet(target: str | os.PathLike[str], df: pd.DataFrame, meta: dict[str, Any] | None = None) -> Path:
    """``df`` as Parquet; ``meta`` (JSON) goes into the file's key-value metadata under
    ``fer_pipeline``, where :func:`read_parquet_meta` finds it without reading the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(target) as tmp:
        table = pa.Table.from_pandas(df, preserve_index=False)
        if meta is not None:
            schema_meta = {**(table.schema.metadata or {}), PARQUET_META_KEY: json.dumps(meta, sort_keys=True)}
            table = table.replace_schema_metadata(schema_meta)
        pq.write_table(table, tmp)
    return Path(target)


def read_parquet_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``fer_pipeline`` key-value metadata of a Parquet file ({} when it has none)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(PARQUET_META_KEY)
    return json.loads(raw) if raw else {}


def write_csv(target: str | os.PathLike[str], df: pd.DataFrame) -> Path:
    with atomic_path(target) as tmp:
        df.to_csv(tmp, index=False)
    return Path(target)


def save_figure(target: str | os.PathLike[str], fig: Any, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(target)


def write_table(base: str | os.PathLike[str], df: pd.DataFrame) -> dict[str, str]:
    """A report table as ``base``.parquet (for tools) and ``base``.csv (for people); both paths."""
    base = Path(base)
    return {"parquet": str(write_parquet(base.with_suffix(".parquet"), df)),
            "csv": str(write_csv(base.with_suffix(".csv"), df))}
