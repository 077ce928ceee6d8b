"""Pretraining on the pool's own labels, and starting the four-class models from it.

Why: the four target classes are a few thousand faces, while the catalogue usually holds many
more labelled faces under other labels (FER2013's happy, sad, fear, surprise...). Learning
face features on those first and then fine-tuning on the four classes gives better and more
stable models (README, "Pretraining"). Only the convolutional ``features`` move from the
backbone to a four-class model; its head (pooling, dropout, classifier) starts fresh, because
the pool's labels are not the four classes.

Plain Python: the pool arrives as arrays, the backbone leaves as a :class:`TrainResult`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fer_pipeline.ml.architectures import ArchConfig
from fer_pipeline.ml.train import LogFn, TrainConfig, TrainResult, train_model

FEATURES_PREFIX = "features."
"""State-dict keys a fine-tuned model takes from the backbone (the conv blocks and their BN)."""

INITS = ("pretrained", "scratch")
"""Where a four-class model starts: the backbone's features when one exists, or random weights."""


@dataclass(frozen=True)
class PoolSplit:
    """Row indices of the pool's own training and validation parts."""

    train: np.ndarray
    validation: np.ndarray


def pool_split(labels: np.ndarray, validation_share: float = 0.1, seed: int = 0) -> PoolSplit:
    """Stratified hold-out of the pool: the backbone's early stopping and metrics use it.

    The pool never touches the four-class validation or test images (the leakage guard drops
    any pool image that duplicates one), so its own validation part is all it needs.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(validation_share * len(idx)))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return PoolSplit(np.sort(np.concatenate(train)), np.sort(np.concatenate(val)))


def pretrain_backbone(images: np.ndarray, labels: np.ndarray, n_classes: int, arch: ArchConfig,
                      config: TrainConfig, *, validation_share: float = 0.1,
                      log: LogFn | None = None) -> tuple[TrainResult, PoolSplit]:
    """Train ``arch`` on the pool's labels (``n_classes`` of them) with the project's recipe."""
    if n_classes < 2:
        raise ValueError("a pretraining pool needs at least two labels")
    split = pool_split(labels, validation_share, config.seed)
    result = train_model(images[split.train], labels[split.train], images[split.validation],
                         labels[split.validation], arch, config, n_classes=n_classes, log=log)
    return result, split


def backbone_features(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a backbone a four-class model starts from: every ``features.*`` tensor."""
    out = {k: v for k, v in state_dict.items() if k.startswith(FEATURES_PREFIX)}
    if not out:
        raise ValueError("the backbone has no 'features.*' weights")
    return out
