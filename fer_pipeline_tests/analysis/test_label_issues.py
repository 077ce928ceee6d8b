"""Confident learning on given probabilities: planted label flips come out on top, with cleanlab
and with the built-in implementation, and the two agree."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fer_pipeline.analysis.label_issues import (
    confident_learning_issues,
    find_label_issues,
    normalized_margin,
    rank_label_issues,
)
from fer_pipeline.classes import CLASSES


def noisy_probs(n: int = 400, flips: int = 8, seed: int = 0):
    """A decent model's out-of-fold probabilities; ``flips`` labels are then changed to a wrong class."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, n)
    logits = rng.normal(0, 1.0, (n, 4))
    logits[np.arange(n), truth] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = truth.copy()
    flipped = rng.choice(n, flips, replace=False)
    labels[flipped] = (truth[flipped] + rng.integers(1, 4, flips)) % 4
    return labels, probs, set(flipped.tolist())


@pytest.mark.parametrize("use_cleanlab", [True, False])
def test_planted_flips_ranked_on_top(use_cleanlab: bool) -> None:
    labels, probs, flipped = noisy_probs()
    oof = pd.DataFrame({"image_id": [f"id{i:03d}" for i in range(len(labels))], "label": [CLASSES[i] for i in labels],
                        "fold": np.arange(len(labels)) % 5})
    for j, c in enumerate(CLASSES):
        oof[f"p_{c}"] = probs[:, j]
    manifest = pd.DataFrame({"image_id": oof["image_id"], "source": "demo", "source_path": oof["image_id"] + ".png"})
    ranked, impl = rank_label_issues(oof, manifest, use_cleanlab=use_cleanlab)
    assert impl.startswith("cleanlab") == use_cleanlab
    top = set(ranked.head(2 * len(flipped))["image_id"])
    found = {f"id{i:03d}" for i in flipped} & top
    assert len(found) >= len(flipped) - 1, (found, flipped)
    assert ranked.iloc[0]["is_label_issue"] and ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    first = ranked.iloc[0]
    assert first["given_label"] != first["predicted_label"] and first["source_path"].endswith(".png")
    assert len(ranked) == len(oof)


def test_builtin_agrees_with_cleanlab() -> None:
    labels, probs, _ = noisy_probs(n=600, flips=20, seed=1)
    cl, impl = find_label_issues(labels, probs)
    assert impl.startswith("cleanlab")
    ours = confident_learning_issues(labels, probs)
    jaccard = (cl & ours).sum() / max(1, (cl | ours).sum())
    assert jaccard > 0.8
    # never flags an image the model predicts as its given label
    assert not (ours & (probs.argmax(1) == labels)).any()


def test_normalized_margin_range() -> None:
    labels, probs, flipped = noisy_probs(n=50, flips=3)
    m = normalized_margin(labels, probs)
    assert ((0 <= m) & (m <= 1)).all()
    assert m[list(flipped)].max() < 0.5 < np.median(m)
