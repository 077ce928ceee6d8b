"""PNG figures for reports: training curves, confusion matrices, reliability diagrams (written atomically)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import matplotlib.pyplot as plt  # headless runs fall back to the Agg backend by themselves
import numpy as np
import pandas as pd

from fer_pipeline.atomic import save_figure
from fer_pipeline.ml.metrics import normalize_confusion

if TYPE_CHECKING:
    from fer_pipeline.ml.calibration import CalibrationEffect


def _history_frame(history: Any) -> pd.DataFrame:
    if isinstance(history, pd.DataFrame):
        return history
    return pd.DataFrame([asdict(h) if is_dataclass(h) else dict(h) for h in history])


def plot_training_curves(
    history: Any, out_png: str | Path, title: str = "", best_epoch: int | None = None
) -> Path:
    """Loss (train/val) and validation accuracy / macro-F1 per epoch, side by side.

    ``history`` is ``TrainResult.history``, its ``history_frame()``, or a list of dicts.
    """
    df = _history_frame(history)
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(df["epoch"], df["train_loss"], label="train (augmented)")
    ax_loss.plot(df["epoch"], df["val_loss"], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_score.plot(df["epoch"], df["val_accuracy"], label="val accuracy")
    ax_score.plot(df["epoch"], df["val_macro_f1"], label="val macro-F1")
    ax_score.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1))
    for ax in (ax_loss, ax_score):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(out_png, fig)


def plot_confusion_matrix(
    cm: np.ndarray,
    classes: Sequence[str],
    out_png: str | Path,
    normalize: bool | Literal["both"] = "both",
    title: str = "",
) -> Path:
    """Confusion matrix heat map(s): counts, row-normalised (recall per true class), or both."""
    cm = np.asarray(cm)
    panels: list[tuple[np.ndarray, str, str]] = []
    if normalize in (False, "both"):
        panels.append((cm, "counts", "d"))
    if normalize in (True, "both"):
        panels.append((normalize_confusion(cm), "row-normalised", ".2f"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (mat, name, fmt) in zip(axes[0], panels):
        vmax = 1.0 if fmt != "d" else max(1, int(mat.max()))
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="predicted", ylabel="true", title=name)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                value = mat[i, j]
                ax.text(
                    j, i, format(value, fmt), ha="center", va="center", fontsize=9,
                    color="white" if value > 0.6 * vmax else "black",
                )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(out_png, fig)


def plot_reliability_diagram(effect: "CalibrationEffect", out_png: str | Path, title: str = "") -> Path:
    """Reliability diagram before and after temperature scaling: per equal-width confidence bin,
    accuracy against mean confidence (the diagonal is perfect calibration), with the samples per
    bin below. ``effect`` is :func:`fer_pipeline.ml.calibration.apply_temperature`'s result."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.2, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / effect.n_bins
    series = ((effect.before, f"uncalibrated (ECE {effect.ece_before:.3f})", "tab:grey", -0.2),
              (effect.after, f"T = {effect.temperature:.2f} (ECE {effect.ece_after:.3f})", "tab:blue", 0.2))
    for table, label, color, shift in series:
        used = table[table["n"] > 0]
        centres = (used["lower"] + used["upper"]) / 2 + shift * width
        ax.bar(centres, used["accuracy"], width=0.4 * width, color=color, alpha=0.8, label=label)
        ax.plot(used["confidence"], used["accuracy"], "o", color=color, markersize=3)
        ax_n.bar(centres, used["n"], width=0.4 * width, color=color, alpha=0.8)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1),
           title=f"top-label reliability, {effect.n_bins} equal-width bins")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax_n.set(xlabel="confidence (top class probability)", ylabel="images")
    ax_n.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(out_png, fig)
