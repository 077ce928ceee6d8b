"""Pretraining on the pool's own labels, and starting the four-class models from it.

Why: the four target classes are a few thousand faces, while the catalogue usually holds many
more labelled faces under other labels (FER2013's happy, sad, fear, surprise...). Learning
face features on those first and then fine-tuning on the four classes gives better and more
stable models (docs/models.md, "Pretraining"). Only the convolutional ``features`` move from the
backbone to a four-class model; its head (pooling, dropout, classifier) starts fresh, because
the pool's labels are not the four classes.

Plain Python: the pool arrives as arrays, the backbone leaves as a :class:`TrainResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fer_pipeline.ml.architectures import ArchConfig
from fer_pipeline.ml.train import LogFn, TrainConfig, TrainResult, train_model

if TYPE_CHECKING:
    import pandas as pd

    from fer_pipeline.faces.preprocess import PreprocessSettings
    from fer_pipeline.paths import DataPaths

FEATURES_PREFIX = "features."
"""State-dict keys a fine-tuned model takes from the backbone (the conv blocks and their BN)."""

FEATURE_FIELDS = ("channels", "kernel_size", "convs_per_block", "batch_norm")
"""The architecture fields that decide the shapes of ``features.*``."""

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


@dataclass(frozen=True)
class PretrainConfig:
    """How the backbone is trained (the rest of the recipe is the four-class one).

    Defaults from a sweep on ``affectnet-4class`` with a FER2013 pool (hand-recorded history in
    docs/benchmarks.md): at most 24,000 pool images for 15 epochs. That sweep ranked recipes by the
    benchmark's *test* split, so these defaults are to be re-chosen on validation (issue 21).
    """

    epochs: int = 15
    max_images: int = 24_000  # a stratified, seeded sample when the pool is larger (0 = no cap)
    min_images: int = 100  # a smaller pool trains no backbone: too little to learn features from
    validation_share: float = 0.1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.max_images < 0 or self.min_images < 1:
            raise ValueError(f"pretraining settings out of range: {self}")
        if not 0.0 < self.validation_share < 0.5:
            raise ValueError(f"validation_share must be in (0, 0.5), got {self.validation_share}")


def cap_pool(labels: np.ndarray, max_images: int, seed: int = 0) -> np.ndarray:
    """Row indices of at most ``max_images`` pool rows, each label keeping its share (sorted)."""
    labels = np.asarray(labels)
    n = len(labels)
    if not max_images or n <= max_images:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[: max(1, int(round(max_images * len(idx) / n)))])
    return np.sort(np.concatenate(keep))[:max_images]


def backbone_identity(pool_version: str, arch: ArchConfig, train_config: TrainConfig,
                      config: PretrainConfig) -> str:
    """What a backbone is a function of: the pool, the architecture and both recipes.

    The asset retrains only when this changes; a fine-tuned model records it, so its result is
    tied to the backbone it started from.
    """
    import hashlib
    import json
    from dataclasses import asdict

    recipe = {k: v for k, v in train_config.to_dict().items() if k not in ("device", "num_threads", "eval_batch_size")}
    blob = json.dumps({"pool": pool_version, "arch": arch.to_dict(), "recipe": recipe, "pretrain": asdict(config)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Start:
    """Where a four-class model starts: ``state`` (backbone features) or None for random weights."""

    init: str  # "pretrained" | "scratch"
    reason: str
    backbone: str | None = None  # the backbone's identity
    state: dict[str, torch.Tensor] | None = None

    def describe(self) -> dict[str, str | None]:
        """What a checkpoint or a fold result records about its start."""
        return {"init": self.init, "init_reason": self.reason, "backbone": self.backbone}


def starting_point(init: str, backbone_checkpoint: Path, arch: ArchConfig, with_weights: bool = True) -> Start:
    """The start for ``arch`` under the ``init`` setting, given the published backbone (a path);
    ``with_weights`` False reads only its header (enough to name the start in a recipe).

    ``pretrained`` uses the backbone when there is one and it was trained for this
    architecture (its ``features`` fit); otherwise the model starts from scratch and the reason
    says why, so a variant architecture or a catalogue without a pool still trains.
    """
    from safetensors.torch import load_file

    from fer_pipeline.ml.checkpoint import check_weights, read_checkpoint_metadata

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "scratch":
        return Start("scratch", "init: scratch")
    path = Path(backbone_checkpoint)
    if not path.is_file():
        return Start("scratch", "no pretrained backbone (no pretraining pool, or not materialized)")
    try:
        meta = read_checkpoint_metadata(path)
        theirs = meta.get("architecture") or {}
        ours = arch.to_dict()
        if any(theirs.get(k) != ours[k] for k in FEATURE_FIELDS):
            return Start("scratch", f"the backbone is a {theirs.get('name')}, not a {arch.name}: "
                                    "its features do not fit")
        identity = (meta.get("extra") or {}).get("backbone_identity")
        state = backbone_features(load_file(str(path))) if with_weights else None
        if state is not None:
            check_weights(state, str(path))
    except Exception as exc:  # noqa: BLE001 -- never fall back to scratch silently: the recipe would change
        raise ValueError(f"{path}: damaged pretrained backbone ({exc}); re-materialize pretrained_backbone "
                         "(it retrains over a backbone it cannot read)") from exc
    return Start("pretrained", f"backbone {path.name}", identity, state)


@dataclass
class BackboneOutcome:
    """What :func:`refresh_backbone` did: trained, reused the published one, or none (and why)."""

    status: str  # "trained" | "reused" | "none" | "rejected" (NaN/inf weights: not published)
    reason: str
    checkpoint: Path | None = None
    identity: str | None = None
    labels: dict[str, int] | None = None  # pool images per pool label
    used: int = 0  # pool images trained on (after the cap)
    result: TrainResult | None = None
    curves: Path | None = None


def refresh_backbone(paths: "DataPaths", pool: "pd.DataFrame", pool_version: str, arch: ArchConfig,
                     train_config: TrainConfig, config: PretrainConfig, preprocess: "PreprocessSettings",
                     log: LogFn | None = None) -> BackboneOutcome:
    """Make ``paths.backbone(arch.name)`` match the published pool: retrain it when the pool or a
    setting changed, keep it when nothing did, remove it when the pool is too small to pretrain.

    Write, audit, publish like the four-class models: the candidate is written under
    ``models/candidates/`` and renamed over the published backbone only when every weight is
    finite. A removed backbone makes the next models start from scratch (and say so) rather
    than from features of a pool that no longer exists.
    """
    from fer_pipeline.faces.store import load_faces
    from fer_pipeline.ml.checkpoint import read_checkpoint_metadata, save_checkpoint, weights_are_finite
    from fer_pipeline.ml.plots import plot_training_curves
    from fer_pipeline.publish_lock import publication_lock, publish_files

    log = log or (lambda _m: None)
    target, curves = paths.backbone(arch.name), paths.backbone_curves(arch.name)
    counts = {str(k): int(v) for k, v in pool["pool_label"].value_counts().sort_index().items()} if len(pool) else {}
    if len(pool) < config.min_images or len(counts) < 2:
        with publication_lock(paths.root, what=f"removing backbone {arch.name}"):
            for stale in (target, curves):
                stale.unlink(missing_ok=True)
        why = (f"the pool has {len(pool)} images under {len(counts)} labels; pretraining needs at least "
               f"{config.min_images} images under 2 labels")
        return BackboneOutcome("none", why, labels=counts)
    identity = backbone_identity(pool_version, arch, train_config, config)
    if target.is_file():
        try:
            same = (read_checkpoint_metadata(target).get("extra") or {}).get("backbone_identity") == identity
        except Exception:  # noqa: BLE001 -- an unreadable backbone is simply retrained
            same = False
        if same:
            return BackboneOutcome("reused", "pool and settings unchanged", target, identity, counts)
    names = tuple(sorted(counts))
    frame = pool.sort_values("image_id").reset_index(drop=True)  # row order never changes the result
    labels = frame["pool_label"].map({n: i for i, n in enumerate(names)}).to_numpy(dtype=np.int64)
    rows = cap_pool(labels, config.max_images, train_config.seed)
    images = load_faces(paths.root, list(frame["face_path"].iloc[rows]))
    log(f"pretraining {arch.name} on {len(rows)} of {len(frame)} pool images, labels {counts}")
    result, split = pretrain_backbone(images, labels[rows], len(names), arch,
                                      _pretrain_recipe(train_config, config), validation_share=config.validation_share,
                                      log=log)
    candidate = paths.model_candidates_dir / target.name
    extra = {"backbone_identity": identity, "pool_version": pool_version, "pool_images": len(frame),
             "pool_used": len(rows), "pool_labels": counts, "pool_validation_images": len(split.validation)}
    ckpt = save_checkpoint(candidate, result, data_version=pool_version, preprocess=preprocess,
                           model_name=f"backbone_{arch.name}", classes=names, extra=extra,
                           metrics={"pool_validation": {"macro_f1": result.best_val_macro_f1,
                                                        "accuracy": result.best_val_accuracy}})
    plot = plot_training_curves(result.history, paths.model_candidates_dir / curves.name,
                                title=f"backbone {arch.name} (pool labels)", best_epoch=result.best_epoch)
    finite, bad = weights_are_finite(ckpt)
    if not finite:
        return BackboneOutcome("rejected", f"NaN/inf weights in {', '.join(bad)}", ckpt, identity, counts,
                               len(rows), result, plot)
    why = "pool or settings changed" if target.is_file() else "no backbone yet"
    published, published_curves = publish_files(paths.root, [(ckpt, target), (plot, curves)],
                                                what=f"publishing backbone {arch.name}")
    return BackboneOutcome("trained", why, published, identity, counts, len(rows), result, published_curves)


def _pretrain_recipe(train_config: TrainConfig, config: PretrainConfig) -> TrainConfig:
    """The four-class recipe with the pretraining budget; no early stop (the budget is short)."""
    from dataclasses import replace

    return replace(train_config, epochs=config.epochs, patience=0)
