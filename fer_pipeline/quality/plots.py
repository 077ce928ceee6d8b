"""Analysis plots of the processed dataset, written atomically as PNGs.

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas instead of pyplot's
global state, so plotting is headless and safe from worker threads. Every function returns the
written path and degrades to a labelled, mostly empty figure (never an exception) when a class has
no images or a table is empty, because a report with a "no data" panel is more useful than a
failed run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fer_pipeline.atomic import save_figure
from fer_pipeline.classes import CLASSES
from fer_pipeline.faces.store import load_face, load_faces

__all__ = [
    "CLASS_COLORS",
    "reason_category",
    "plot_class_distribution",
    "plot_sample_grid",
    "plot_intensity_histograms",
    "plot_exclusions",
]

#: One fixed colour per class so every figure in a report uses the same legend.
CLASS_COLORS: dict[str, str] = dict(zip(CLASSES, ("#4c72b0", "#55a868", "#8172b2", "#c44e52")))


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def no_data_panel(ax: Axes, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _label_series(manifest: pd.DataFrame) -> pd.Series:
    return manifest["label"] if "label" in manifest.columns else pd.Series([], dtype=object)


# --------------------------------------------------------------------------------------------
# Class distribution
# --------------------------------------------------------------------------------------------


def plot_class_distribution(manifest: pd.DataFrame, out: Path) -> Path:
    """Stacked bars: images per class (x, CLASSES order), stacked by source dataset."""
    labels = _label_series(manifest)
    sources = manifest["source"] if "source" in manifest.columns else pd.Series("all", index=manifest.index)
    table = (
        pd.crosstab(labels.astype(str), sources.fillna("unknown").astype(str))
        if len(manifest)
        else pd.DataFrame()
    )
    # Keep CLASSES order (absent classes as 0) and append unexpected labels at the end.
    extra = [c for c in table.index if c not in CLASSES]
    table = table.reindex(list(CLASSES) + extra, fill_value=0)

    fig = new_figure(max(6.0, 1.3 * len(table.index) + 3), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(table.index))
    bottom = np.zeros(len(table.index))
    palette = matplotlib.colormaps["tab20"]
    for i, source in enumerate(table.columns):
        values = table[source].to_numpy(dtype=float)
        ax.bar(x, values, bottom=bottom, label=str(source), color=palette(i % 20), edgecolor="white", lw=0.5)
        bottom += values
    for xi, total in zip(x, bottom):
        ax.text(xi, total, f"{int(total)}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, [str(c) for c in table.index])
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Class distribution by source (n={int(bottom.sum())})")
    ax.set_ylim(0, max(1.0, bottom.max(initial=0) * 1.12))
    if len(table.columns):
        ax.legend(title="source", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        no_data_panel(ax, "no images")
        ax.set_xticks(x, [str(c) for c in table.index])
    return save_figure(out, fig)


# --------------------------------------------------------------------------------------------
# Faces
# --------------------------------------------------------------------------------------------


def _sample_paths(manifest: pd.DataFrame, label: str, n: int, seed: int) -> list[str]:
    """Deterministic sample of ``face_path`` for one class, independent of the row order."""
    rows = manifest[_label_series(manifest) == label]
    if rows.empty or "face_path" not in rows.columns:
        return []
    key = "image_id" if "image_id" in rows.columns else "face_path"
    rows = rows.dropna(subset=["face_path"]).sort_values(key, kind="stable")
    if len(rows) > n:
        rows = rows.sample(n=n, random_state=seed)
    return rows["face_path"].astype(str).tolist()


def _load_sample(data_root: Path, relpaths: Sequence[str]) -> np.ndarray:
    """Load faces as (N, H, W) uint8; on mixed sizes or unreadable files fall back per face.

    Unreadable faces are skipped and faces of a different size are resized to the first one's,
    so a single bad file cannot take down a whole report.
    """
    if not relpaths:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    try:
        return load_faces(data_root, list(relpaths))
    except (OSError, ValueError):
        pass
    from PIL import Image

    faces: list[np.ndarray] = []
    for rel in relpaths:
        try:
            face = load_face(Path(data_root) / rel)
        except (OSError, ValueError):
            continue
        if faces and face.shape != faces[0].shape:
            h, w = faces[0].shape
            face = np.asarray(Image.fromarray(face).resize((w, h)), dtype=np.uint8)
        faces.append(face)
    if not faces:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    return np.stack(faces)


def _mosaic(faces: np.ndarray, side: int, pad: int = 2) -> np.ndarray:
    """Tile up to side*side faces into one image (white gaps), filling missing cells with white."""
    h, w = faces.shape[1:]
    canvas = np.full((side * (h + pad) - pad, side * (w + pad) - pad), 255, dtype=np.uint8)
    for i, face in enumerate(faces[: side * side]):
        r, c = divmod(i, side)
        canvas[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = face
    return canvas


def plot_sample_grid(
    manifest: pd.DataFrame, data_root: Path, out: Path, per_class: int = 25, seed: int = 0
) -> Path:
    """One panel per class, each a square grid (5x5 for 25) of randomly sampled processed faces.

    Faces are tiled into a single image per class (one ``imshow`` instead of 100 axes), which
    keeps rendering fast. The sample is reproducible for a given ``seed``.
    """
    side = max(1, math.ceil(math.sqrt(per_class)))
    labels = _label_series(manifest)
    fig = new_figure(3.2 * len(CLASSES), 3.6)
    axes = fig.subplots(1, len(CLASSES), squeeze=False)[0]
    for ax, label in zip(axes, CLASSES):
        n_total = int((labels == label).sum())
        faces = _load_sample(data_root, _sample_paths(manifest, label, per_class, seed))
        ax.set_title(f"{label} (n={n_total})", color=CLASS_COLORS[label], fontweight="bold")
        if len(faces) == 0:
            no_data_panel(ax, "no images")
            continue
        ax.imshow(_mosaic(faces, side), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_axis_off()
    fig.suptitle(f"Random processed faces per class (up to {per_class}, seed {seed})")
    return save_figure(out, fig)


def plot_intensity_histograms(
    manifest: pd.DataFrame,
    data_root: Path,
    out: Path,
    max_per_class: int = 500,
    seed: int = 0,
) -> Path:
    """Per-class pixel-intensity densities (left) and per-image mean brightness (right).

    Systematic brightness differences between classes are a shortcut a model can learn instead
    of the expression, so they are worth seeing. Up to ``max_per_class`` faces are sampled per
    class to stay fast on large datasets.
    """
    fig = new_figure(11.0, 4.0)
    ax_pix, ax_mean = fig.subplots(1, 2)
    bins = np.arange(0, 257, 4)
    centers = (bins[:-1] + bins[1:]) / 2
    mean_bins = np.linspace(0, 255, 33)
    plotted = 0
    for label in CLASSES:
        faces = _load_sample(data_root, _sample_paths(manifest, label, max_per_class, seed))
        if len(faces) == 0:
            continue
        hist, _ = np.histogram(faces, bins=bins, density=True)
        color = CLASS_COLORS[label]
        ax_pix.plot(centers, hist, color=color, label=f"{label} ({len(faces)})", linewidth=1.6)
        means = faces.reshape(len(faces), -1).mean(axis=1)
        ax_mean.hist(means, bins=mean_bins, density=True, histtype="step", color=color, linewidth=1.6, label=label)
        plotted += 1
    ax_pix.set_title("Pixel intensity by class")
    ax_pix.set_xlabel("intensity (0-255)")
    ax_pix.set_ylabel("density")
    ax_mean.set_title("Per-image mean intensity by class")
    ax_mean.set_xlabel("mean intensity")
    for ax in (ax_pix, ax_mean):
        ax.set_xlim(0, 255)
        if plotted:
            ax.legend(fontsize=8)
        else:
            no_data_panel(ax, "no images")
    return save_figure(out, fig)


# --------------------------------------------------------------------------------------------
# Exclusions
# --------------------------------------------------------------------------------------------

_PREFIX_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("duplicate", "duplicate"),
    ("near duplicate", "duplicate"),
    ("near-duplicate", "duplicate"),
    ("label conflict", "label conflict"),
    ("conflicting label", "label conflict"),
    ("unmapped label", "unmapped label"),
)
_CUT = re.compile(r"[:(\[;=,]| - | — ")


def reason_category(reason: object) -> str:
    """Bucket a free-text exclusion reason into a short category for counting.

    ``"duplicate of ab12"`` -> ``"duplicate"``, ``"unmapped label: happy"`` -> ``"unmapped label"``,
    ``"label conflict (...)"`` -> ``"label conflict"``; anything else keeps its leading reason: text
    before the first ``:``/``(``/``[``/``;``/``=``/``,``, minus words with digits
    (``"too small 20x20"`` -> ``"too small"``), lower-cased.
    """
    if reason is None or (isinstance(reason, float) and math.isnan(reason)) or reason is pd.NA:
        return "unspecified"
    text = " ".join(str(reason).strip().lower().split())
    if not text:
        return "unspecified"
    for prefix, category in _PREFIX_CATEGORIES:
        if text.startswith(prefix):
            return category
    head = _CUT.split(text, maxsplit=1)[0].strip()
    words = [w for w in head.split() if not any(ch.isdigit() for ch in w)]
    return " ".join(words) or head or text


def _exclusion_counts(excluded: pd.DataFrame) -> pd.DataFrame:
    """Counts per (stage, category), largest first."""
    if excluded is None or len(excluded) == 0:
        return pd.DataFrame({"stage": [], "category": [], "count": []})
    index = excluded.index
    stage = excluded["stage"].fillna("unknown").astype(str) if "stage" in excluded.columns else pd.Series("", index=index)
    reasons = excluded["reason"] if "reason" in excluded.columns else pd.Series(None, index=index, dtype=object)
    frame = pd.DataFrame({"stage": stage, "category": reasons.map(reason_category)})
    counts = frame.value_counts().rename("count").reset_index()
    return counts.sort_values(["count", "stage", "category"], ascending=[False, True, True], ignore_index=True)


def plot_exclusions(excluded: pd.DataFrame, out: Path) -> Path:
    """Horizontal bars of excluded files per stage and reason category (largest on top)."""
    counts = _exclusion_counts(excluded)
    fig = new_figure(8.0, max(2.5, 0.35 * len(counts) + 1.5))
    ax = fig.add_subplot()
    total = int(counts["count"].sum()) if len(counts) else 0
    ax.set_title(f"Excluded files by stage and reason (n={total})")
    if counts.empty:
        no_data_panel(ax, "nothing excluded")
        return save_figure(out, fig)
    palette = matplotlib.colormaps["tab10"]
    stages = sorted(counts["stage"].unique())
    colors = {s: palette(i % 10) for i, s in enumerate(stages)}
    ordered = counts.iloc[::-1]  # barh draws bottom-up; put the largest on top
    y = np.arange(len(ordered))
    names = [f"{s}: {c}" if s else c for s, c in zip(ordered["stage"], ordered["category"])]
    ax.barh(y, ordered["count"], color=[colors[s] for s in ordered["stage"]])
    for yi, value in zip(y, ordered["count"]):
        ax.text(value, yi, f" {int(value)}", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("files")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, ordered["count"].max() * 1.15)
    return save_figure(out, fig)


def plot_face_grid(faces: np.ndarray, captions: Sequence[str], out: Path, title: str, columns: int = 6) -> Path:
    """Faces (N, H, W) uint8 in a grid, each with a short caption (a flag, a reason): the review
    sample the UI shows."""
    n = len(faces)
    rows = max(1, math.ceil(n / columns))
    fig = new_figure(1.9 * columns, 2.1 * rows + 0.5)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k < n:
            ax.imshow(faces[k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(str(captions[k])[:60], fontsize=6, wrap=True)
    if n == 0:
        no_data_panel(axes[0, 0], "nothing flagged")
    fig.suptitle(title)
    return save_figure(out, fig)
