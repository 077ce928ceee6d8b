"""Architectures build for every registry entry; training learns, is deterministic, keeps the best epoch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fer_pipeline.classes import CLASSES
from fer_pipeline.ml import (
    ARCHITECTURES,
    MAIN_MODEL,
    ArchConfig,
    TrainConfig,
    build_model,
    train_model,
)
from fer_pipeline.ml.data import AugmentConfig, Normalization, augment_batch
from fer_pipeline.ml.inference import predict_proba

TINY = ArchConfig(name="tiny", channels=(8, 16), dropout=0.1)
FAST = TrainConfig(epochs=2, batch_size=32, lr=5e-3, warmup_epochs=0, patience=0, num_threads=2)


def pattern_faces(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four learnable classes that survive flips and small affine jitter:
    horizontal stripes, vertical stripes, a bright centre blob, plain noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    yy, xx = np.mgrid[0:size, 0:size]
    stripes_h = (yy // 2 % 2) * 140.0
    stripes_v = (xx // 2 % 2) * 140.0
    blob = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2) * 160.0
    base = np.stack([stripes_h, stripes_v, blob, np.zeros((size, size))])
    x = base[y] + 50 + rng.normal(0, 20, (n, size, size))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_registry_models_build_and_shape(name: str) -> None:
    model = build_model(ARCHITECTURES[name], n_classes=len(CLASSES)).eval()
    out = model(torch.zeros(3, 1, 48, 48))
    assert out.shape == (3, len(CLASSES))


def test_registry_variants_differ_as_documented() -> None:
    main = ARCHITECTURES[MAIN_MODEL]
    others = [a for n, a in ARCHITECTURES.items() if n != MAIN_MODEL]
    assert any(len(a.channels) != len(main.channels) and a.kernel_size == main.kernel_size for a in others)
    assert any(a.kernel_size != main.kernel_size and a.channels == main.channels for a in others)


def test_flatten_head_and_fc_layer() -> None:
    arch = ArchConfig(name="flat", channels=(4, 8), head="flatten", fc_dim=16, batch_norm=False)
    assert build_model(arch, 4, input_size=(20, 24))(torch.zeros(2, 1, 20, 24)).shape == (2, 4)


def test_arch_config_round_trip() -> None:
    arch = ARCHITECTURES[MAIN_MODEL]
    assert ArchConfig.from_dict(arch.to_dict()) == arch
    cfg = TrainConfig(augment=AugmentConfig(scale=(0.8, 1.2)))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_augment_batch_shapes_range_and_seed() -> None:
    x = torch.rand(8, 1, 16, 16)
    a = augment_batch(x, AugmentConfig(erase_p=0.5), torch.Generator().manual_seed(1))
    b = augment_batch(x, AugmentConfig(erase_p=0.5), torch.Generator().manual_seed(1))
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    identity = AugmentConfig(hflip=False, rotate_deg=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
    assert torch.equal(augment_batch(x, identity, torch.Generator()), x)


def test_train_learns_and_is_deterministic() -> None:
    x_tr, y_tr = pattern_faces(256, seed=0)
    x_va, y_va = pattern_faces(64, seed=1)
    lines: list[str] = []
    r1 = train_model(x_tr, y_tr, x_va, y_va, TINY, FAST, log=lines.append)
    r2 = train_model(x_tr, y_tr, x_va, y_va, TINY, FAST)

    assert len(r1.history) == 2 and len(lines) == 2 and "val_macro_f1" in lines[0]
    assert r1.best_val_accuracy > 0.6  # chance is 0.25
    assert r1.history[-1].train_loss < r1.history[0].train_loss + 0.05
    # same inputs + seed -> identical metrics and weights
    assert [h.val_macro_f1 for h in r1.history] == [h.val_macro_f1 for h in r2.history]
    assert [h.train_loss for h in r1.history] == [h.train_loss for h in r2.history]
    assert all(torch.equal(r1.state_dict[k], r2.state_dict[k]) for k in r1.state_dict)
    # normalisation comes from the training split only
    assert r1.normalization == Normalization.fit(x_tr)
    # the returned weights are usable and reproduce the best validation accuracy
    probs = predict_proba(r1.build(), x_va, r1.normalization, tta_flip=FAST.tta_flip)
    assert float((probs.argmax(1) == y_va).mean()) == pytest.approx(r1.best_val_accuracy)


def test_different_seed_changes_run() -> None:
    x_tr, y_tr = pattern_faces(128, seed=0)
    x_va, y_va = pattern_faces(32, seed=1)
    cfg = replace(FAST, epochs=1)
    a = train_model(x_tr, y_tr, x_va, y_va, TINY, cfg)
    b = train_model(x_tr, y_tr, x_va, y_va, TINY, replace(cfg, seed=1))
    assert a.history[0].train_loss != b.history[0].train_loss


def test_early_stopping_keeps_best_epoch() -> None:
    x_tr, y_tr = pattern_faces(128, seed=0)
    x_va, y_va = pattern_faces(32, seed=1)
    # lr 0 with no EMA: the weights never change, so epoch 1 stays best and patience stops at 1 + 2
    cfg = replace(FAST, epochs=10, lr=0.0, ema_decay=0.0, patience=2)
    r = train_model(x_tr, y_tr, x_va, y_va, TINY, cfg)
    assert r.stopped_early and len(r.history) == 3 and r.best_epoch == 1


def test_sample_weights_and_class_balance_run() -> None:
    x_tr, y_tr = pattern_faces(64, seed=0)
    x_va, y_va = pattern_faces(16, seed=1)
    w = np.linspace(0.5, 2.0, len(y_tr))
    cfg = replace(FAST, epochs=1, balance_classes=True, mixup_alpha=0.2)
    r = train_model(x_tr, y_tr, x_va, y_va, TINY, cfg, sample_weights=w)
    assert np.isfinite(r.history[0].train_loss)
    with pytest.raises(ValueError):
        train_model(x_tr, y_tr, x_va, y_va, TINY, cfg, sample_weights=w[:-1])
