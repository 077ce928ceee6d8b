"""Device-side training: augmentation drawn on the batch's device, resident faces, bf16 autocast.

Runs on the CPU everywhere; the CUDA tests at the end run only where a GPU is present.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fer_pipeline.ml import TrainConfig, train_model
from fer_pipeline.ml import train as train_mod
from fer_pipeline.ml.data import (
    AugmentConfig,
    augment_batch,
    augment_generator,
    resident_faces,
    to_unit_tensor,
)
from fer_pipeline.ml.train import autocast_dtype, torch_settings
from fer_pipeline_tests.ml.test_train import FAST, TINY, pattern_faces

NO_AUG = AugmentConfig(hflip=False, rotate_deg=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference_augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """The host-side augmentation as it was before it moved to the device: one draw per call."""
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    n = x.shape[0]
    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180.0)
    scale = uniform(*cfg.scale)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n)
    tx, ty = uniform(-cfg.translate, cfg.translate) * 2.0, uniform(-cfg.translate, cfg.translate) * 2.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.contrast:
        c = uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
    if cfg.brightness:
        x = x + uniform(-cfg.brightness, cfg.brightness).view(n, 1, 1, 1)
    return x.clamp_(0.0, 1.0)


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(),
        AugmentConfig(hflip=False),
        AugmentConfig(contrast=0, brightness=0.3),
        replace(NO_AUG, contrast=0.3),
    ],
)
def test_cpu_augmentation_is_bit_identical_to_host_draws(cfg: AugmentConfig) -> None:
    x = torch.rand(64, 1, 48, 48, generator=torch.Generator().manual_seed(9))
    g_new, g_ref = augment_generator("cpu", 5), torch.Generator().manual_seed(5)
    for _ in range(3):  # consecutive batches share the stream
        assert torch.equal(augment_batch(x.clone(), cfg, g_new), _reference_augment(x.clone(), cfg, g_ref))
    assert torch.equal(g_new.get_state(), g_ref.get_state())


def test_augmentation_shape_dtype_range_and_device() -> None:
    x = torch.rand(8, 1, 16, 20)
    out = augment_batch(x, AugmentConfig(erase_p=0.5), augment_generator(x.device, 1))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_augmentation_is_deterministic_per_seed() -> None:
    x = torch.rand(16, 1, 16, 16)
    a = augment_batch(x, AugmentConfig(), augment_generator("cpu", 3))
    b = augment_batch(x, AugmentConfig(), augment_generator("cpu", 3))
    c = augment_batch(x, AugmentConfig(), augment_generator("cpu", 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_mirrors_some_images_and_keeps_the_rest() -> None:
    x = torch.rand(32, 1, 16, 16)
    out = augment_batch(x, replace(NO_AUG, hflip=True), augment_generator("cpu", 0))
    kept = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    mirrored = [torch.allclose(o, i.flip(2), atol=1e-5) for o, i in zip(out, x)]
    assert all(k or m for k, m in zip(kept, mirrored))
    assert 0 < sum(mirrored) < len(x)


def test_affine_and_photometric_jitter_change_images() -> None:
    x = torch.rand(16, 1, 24, 24) * 0.4 + 0.3
    g = augment_generator("cpu", 0)
    moved = augment_batch(x, replace(NO_AUG, rotate_deg=15, translate=0.1, scale=(0.85, 1.15)), g)
    assert float((moved - x).abs().mean(dim=(1, 2, 3)).min()) > 0.01  # every image resampled
    brighter = augment_batch(x, replace(NO_AUG, brightness=0.2), g)
    shift = brighter - x  # additive, one offset per image (no clamping in this range)
    assert torch.allclose(shift, shift.mean(dim=(1, 2, 3), keepdim=True).expand_as(shift), atol=1e-6)
    assert float(shift.abs().amax()) > 0.01
    contrasted = augment_batch(x, replace(NO_AUG, contrast=0.3), g)
    assert torch.allclose(contrasted.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)
    assert not torch.allclose(contrasted, x, atol=1e-3)


def test_generator_lives_on_the_requested_device() -> None:
    g = augment_generator(torch.device("cpu"), 7)
    assert g.device.type == "cpu"
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())
    with pytest.raises(ValueError, match="augment_generator"):  # a batch elsewhere is refused, not moved
        augment_batch(torch.empty(2, 1, 8, 8, device="meta"), AugmentConfig(), g)


def test_train_model_draws_augmentation_on_the_training_device(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.device] = []

    def spy(device: torch.device | str, seed: int) -> torch.Generator:
        seen.append(torch.device(device))
        return augment_generator(device, seed)

    monkeypatch.setattr(train_mod, "augment_generator", spy)
    x, y = pattern_faces(64)
    train_model(x, y, x[:16], y[:16], TINY, replace(FAST, epochs=1, device="cpu"))
    assert seen == [torch.device("cpu")]


def test_resident_faces_keep_dtype_and_index_like_the_float_split() -> None:
    images, _ = pattern_faces(10)
    resident = resident_faces(images, "cpu")
    assert resident.dtype == torch.uint8 and resident.shape == images.shape
    idx = torch.tensor([3, 0, 7])
    assert torch.equal(to_unit_tensor(resident[idx]), to_unit_tensor(images)[idx])
    with pytest.raises(ValueError):
        resident_faces(np.zeros((2, 3, 4, 5), np.uint8), "cpu")


def test_autocast_is_bf16_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("off", cpu) is None
    assert autocast_dtype("off", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("auto", cuda) is None


def test_amp_is_recorded_and_validated() -> None:
    assert TrainConfig().to_dict()["amp"] == "auto"
    cfg = TrainConfig(amp="off")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "amp"}  # checkpoints before the option
    assert TrainConfig.from_dict(old).amp == "auto"
    with pytest.raises(ValueError):
        TrainConfig(amp="fp16")  # type: ignore[arg-type]


def test_cpu_training_ignores_amp_and_repeats_exactly() -> None:
    x_tr, y_tr = pattern_faces(128, seed=0)
    x_va, y_va = pattern_faces(32, seed=1)
    # device pinned: on a GPU machine "auto" would train on CUDA, where amp does apply
    cfg = replace(FAST, augment=AugmentConfig(erase_p=0.3), mixup_alpha=0.2, device="cpu")
    runs = [train_model(x_tr, y_tr, x_va, y_va, TINY, replace(cfg, amp=amp)) for amp in ("auto", "auto", "off")]
    for r in runs[1:]:
        assert [h.train_loss for h in r.history] == [h.train_loss for h in runs[0].history]
        assert [h.val_macro_f1 for h in r.history] == [h.val_macro_f1 for h in runs[0].history]
        assert all(torch.equal(r.state_dict[k], runs[0].state_dict[k]) for k in r.state_dict)


def test_accelerator_settings_are_restored() -> None:
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
        torch.backends.cudnn.benchmark,
    )
    accel = torch.device("meta")  # stands in for a GPU: only the device type matters here
    with torch_settings(None, True, accel):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
        assert not torch.backends.cudnn.benchmark
    with torch_settings(None, False, accel):
        assert torch.backends.cudnn.benchmark
    after = (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
        torch.backends.cudnn.benchmark,
    )
    assert after == before


@CUDA
def test_cuda_augmentation_stays_on_the_gpu() -> None:
    x = torch.rand(8, 1, 16, 16, device="cuda")
    g = augment_generator(x.device, 1)
    a = augment_batch(x, AugmentConfig(erase_p=0.5), g)
    b = augment_batch(x, AugmentConfig(erase_p=0.5), augment_generator(x.device, 1))
    assert g.device.type == "cuda" and a.device == x.device and torch.equal(a, b)


@CUDA
@pytest.mark.parametrize("amp", ["auto", "off"])
def test_cuda_training_is_reproducible(amp: str) -> None:
    x_tr, y_tr = pattern_faces(256, seed=0)
    x_va, y_va = pattern_faces(64, seed=1)
    cfg = replace(FAST, device="cuda", amp=amp)
    r1, r2 = (train_model(x_tr, y_tr, x_va, y_va, TINY, cfg) for _ in range(2))
    assert [h.train_loss for h in r1.history] == [h.train_loss for h in r2.history]
    assert all(torch.equal(r1.state_dict[k], r2.state_dict[k]) for k in r1.state_dict)
    assert r1.best_val_accuracy > 0.6


@CUDA
def test_cuda_graphs_replay_the_step_and_learn_like_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    replays = []
    original = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), original(self))[1])
    x_tr, y_tr = pattern_faces(256, seed=0)
    x_va, y_va = pattern_faces(64, seed=1)
    cfg = replace(FAST, device="cuda", augment=AugmentConfig(erase_p=0.3))
    graphed = train_model(x_tr, y_tr, x_va, y_va, TINY, cfg)
    steps = len(graphed.history) * (256 // cfg.batch_size)
    assert len(replays) == steps - 3  # all but the eager warm-up steps
    eager = train_model(x_tr, y_tr, x_va, y_va, TINY, replace(cfg, cuda_graphs=False))
    assert len(replays) == steps - 3  # the eager run captured nothing
    assert graphed.best_val_accuracy > 0.6 and eager.best_val_accuracy > 0.6
    # Same recipe: the first epoch's loss agrees closely (random draws may differ in order).
    assert abs(graphed.history[0].train_loss - eager.history[0].train_loss) < 0.1
