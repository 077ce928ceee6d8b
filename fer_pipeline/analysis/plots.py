"""Plots of the evaluation reports (headless: an explicit Agg canvas, never pyplot's global state).

Every function writes a PNG atomically and returns its path; an empty input gives a labelled
"no data" figure instead of an exception.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from fer_pipeline.atomic import save_figure
from fer_pipeline.classes import CLASSES
from fer_pipeline.quality.plots import (  # one figure factory for every report
    new_figure,
    no_data_panel,
)

CV_METRICS = ("accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall")


def plot_cv_folds(table: pd.DataFrame, out: Path, title: str = "Cross-validation") -> Path:
    """Per-fold scores (one dot per fold and metric) with the mean ± std as a bar and error bar."""
    fig = new_figure(8.0, 4.2)
    ax = fig.add_subplot()
    folds = table[~table["fold"].isin(["mean", "std"])] if len(table) else table
    if folds.empty:
        no_data_panel(ax, "no folds run")
        return save_figure(out, fig)
    metrics = [m for m in CV_METRICS if m in folds.columns]
    x = np.arange(len(metrics))
    means = folds[metrics].astype(float).mean().to_numpy()
    stds = folds[metrics].astype(float).std(ddof=1).fillna(0).to_numpy() if len(folds) > 1 else np.zeros(len(metrics))
    ax.bar(x, means, width=0.6, color="#c9d6ea", edgecolor="#4c72b0", label="mean ± std")
    ax.errorbar(x, means, yerr=stds, fmt="none", ecolor="#333333", capsize=5)
    palette = matplotlib.colormaps["tab10"]
    n = len(folds)
    for i, (_, row) in enumerate(folds.iterrows()):
        jitter = (i - (n - 1) / 2) * min(0.08, 0.45 / max(n, 1))
        ax.scatter(x + jitter, row[metrics].astype(float).to_numpy(), s=22, color=palette(i % 10), zorder=3,
                   label=f"fold {row['fold']}")
    for xi, m in zip(x, means):
        ax.text(xi, m + 0.01, f"{m:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [m.replace("_", " ") for m in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score on the held-out fold")
    ax.set_title(f"{title}: {n} fold(s)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(out, fig)


def plot_bias(tables: dict[str, pd.DataFrame], overall_macro_f1: float, out: Path, max_gap_points: float = 5.0,
              title: str = "Test macro-F1 by demographic group") -> Path:
    """One panel per attribute: macro-F1 per group (bars, n in the label), the overall score as a
    line and the warning threshold as a dashed line; small/unknown groups hatched and grey."""
    attrs = list(tables)
    fig = new_figure(4.2 * max(1, len(attrs)), 3.8)
    axes = fig.subplots(1, max(1, len(attrs)), squeeze=False)[0]
    if not attrs:
        no_data_panel(axes[0], "no demographic attribute in the data")
        return save_figure(out, fig)
    colors = {"ok": "#55a868", "below overall": "#c44e52", "too small to judge": "#bbbbbb",
              "unknown: not judged": "#dddddd"}
    for ax, attr in zip(axes, attrs):
        t = tables[attr]
        y = np.arange(len(t))
        vals = t["macro_f1"].astype(float).fillna(0).to_numpy()
        bars = ax.barh(y, vals, color=[colors.get(s, "#4c72b0") for s in t["status"]], edgecolor="0.3", lw=0.5)
        for bar, status in zip(bars, t["status"]):
            if status in ("too small to judge", "unknown: not judged"):
                bar.set_hatch("//")
        ax.axvline(overall_macro_f1, color="#333333", lw=1.2, label=f"overall {overall_macro_f1:.3f}")
        ax.axvline(overall_macro_f1 - max_gap_points / 100, color="#c44e52", lw=1, ls="--",
                   label=f"overall − {max_gap_points:g} pts")
        ax.set_yticks(y, [f"{g} (n={n})" for g, n in zip(t["group"], t["n"])])
        ax.invert_yaxis()
        for yi, v in zip(y, vals):
            ax.text(v + 0.01, yi, f"{v:.3f}", va="center", fontsize=8)
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("macro-F1")
        ax.set_title(attr)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    return save_figure(out, fig)


def plot_mitigation(comparison: pd.DataFrame, out: Path, title: str = "Before / after mitigation") -> Path:
    """Grouped bars: macro-F1 before (main model) and after (mitigated model), overall and per group."""
    fig = new_figure(max(6.0, 0.8 * len(comparison) + 2), 4.2)
    ax = fig.add_subplot()
    if comparison.empty:
        no_data_panel(ax)
        return save_figure(out, fig)
    labels = [g if s == "overall" else f"{s}\n{g}\n(n={n})" for s, g, n in
              zip(comparison["scope"], comparison["group"], comparison["n"])]
    x = np.arange(len(comparison))
    before = comparison["before_macro_f1"].astype(float).fillna(0).to_numpy()
    after = comparison["after_macro_f1"].astype(float).to_numpy()
    ax.bar(x - 0.2, before, width=0.4, label="before (main model)", color="#8da0cb")
    if not np.isnan(after).all():
        ax.bar(x + 0.2, np.nan_to_num(after), width=0.4, label="after (mitigated)", color="#fc8d62")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test macro-F1")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(out, fig)


def plot_source_shares(shares: pd.DataFrame, out: Path, max_share: float = 0.9,
                       title: str = "Share of each class by source") -> Path:
    """100% stacked bars per class (rows of ``shares``: classes; columns: sources)."""
    fig = new_figure(max(6.0, 1.3 * len(shares) + 3), 4.2)
    ax = fig.add_subplot()
    if shares.empty:
        no_data_panel(ax)
        return save_figure(out, fig)
    palette = matplotlib.colormaps["tab20"]
    x = np.arange(len(shares))
    bottom = np.zeros(len(shares))
    for i, source in enumerate(shares.columns):
        vals = shares[source].to_numpy(dtype=float)
        ax.bar(x, vals, bottom=bottom, color=palette(i % 20), label=str(source), edgecolor="white", lw=0.5)
        bottom += vals
    ax.axhline(max_share, color="#c44e52", ls="--", lw=1, label=f"{max_share:.0%} threshold")
    ax.set_xticks(x, [str(c) for c in shares.index])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("share of the class's images")
    ax.set_title(title)
    ax.legend(title="source", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(out, fig)


def plot_loso(table: pd.DataFrame, out: Path, title: str = "Leave-one-source-out vs in-domain") -> Path:
    """Macro-F1 on each held-out (unseen) source beside the main model's in-domain score on it."""
    fig = new_figure(max(6.0, 1.2 * len(table) + 3), 4.0)
    ax = fig.add_subplot()
    done = table[table["status"] == "evaluated"] if len(table) else table
    if done.empty:
        no_data_panel(ax, str(table["status"].iloc[0]) if len(table) else "no data")
        return save_figure(out, fig)
    x = np.arange(len(done))
    ax.bar(x - 0.2, done["in_domain_macro_f1"].astype(float).fillna(0), width=0.4, label="in-domain (main model, "
           "source's test rows)", color="#8da0cb")
    ax.bar(x + 0.2, done["loso_macro_f1"].astype(float).fillna(0), width=0.4, label="held out (trained without it)",
           color="#e78ac3")
    ax.set_xticks(x, done["held_out_source"].astype(str))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("macro-F1")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(out, fig)


def plot_label_issue_grid(faces: np.ndarray, rows: pd.DataFrame, out: Path, columns: int = 6,
                          title: str = "Most likely mislabelled (out-of-fold; * = flagged by confident learning)") -> Path:
    """Thumbnails of the top suspects, each titled with given vs predicted label and confidence."""
    n = min(len(faces), len(rows))
    cols = max(1, min(columns, n))
    nrows = max(1, math.ceil(n / cols))
    fig = new_figure(1.9 * cols, 2.25 * nrows + 0.4)
    axes = fig.subplots(nrows, cols, squeeze=False)
    if n == 0:
        no_data_panel(axes[0][0], "no images ranked")
        return save_figure(out, fig)
    colors = dict(zip(CLASSES, ("#4c72b0", "#55a868", "#8172b2", "#c44e52")))
    for i in range(nrows * cols):
        ax = axes[i // cols][i % cols]
        ax.set_axis_off()
        if i >= n:
            continue
        r = rows.iloc[i]
        ax.imshow(faces[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        flag = " *" if bool(r.get("is_label_issue", False)) else ""
        ax.set_title(f"#{int(r['rank'])}{flag} {r['image_id'][:8]}\ngiven {r['given_label']}\n"
                     f"pred {r['predicted_label']} ({float(r['predicted_probability']):.2f})",
                     fontsize=7, color=colors.get(str(r["predicted_label"]), "black"))
    fig.suptitle(title)
    return save_figure(out, fig)
