"""Seeded, CPU-friendly training loop with early stopping on validation macro-F1.

Why the loop looks like this:

* Faces sit on the training device as one uint8 tensor (uploaded once); a batch is an index
  there, augmentation is vectorised and runs on that device with a generator on that device
  (:func:`fer_pipeline.ml.data.augment_batch`), layout is channels_last. On CUDA a step
  never waits for the host: the only syncs are the per-epoch loss read-out and validation.
* Small validation sets make the per-epoch macro-F1 noisy, so by default we validate an
  exponential moving average (EMA) of the weights, under a cosine learning-rate schedule with
  a fixed budget: the EMA curve is smooth and rises to the end, so "best epoch" is not a
  lucky spike. Early stopping (``patience``) still guards against over-long budgets.
* All randomness comes from generators seeded from ``TrainConfig.seed``; with the same
  inputs, seed, device and thread count, two runs give identical metrics. The CPU path is the
  same code as the CUDA path and gives bit-identical results to the earlier host-side
  augmentation; CUDA runs are reproducible with ``deterministic=True`` (the default), with or
  without bf16 autocast (``amp``), but differ numerically from CPU runs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fer_pipeline.classes import CLASSES
from fer_pipeline.ml.architectures import ArchConfig, build_model
from fer_pipeline.ml.data import (
    AugmentConfig,
    Normalization,
    augment_batch,
    augment_generator,
    normalize,
    resident_faces,
    to_unit_tensor,
)
from fer_pipeline.ml.graphed_step import GraphedTrainStep, TensorEMA, graphable
from fer_pipeline.ml.inference import predict_logits, resolve_device
from fer_pipeline.ml.metrics import macro_f1

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (JSON-serialisable via ``to_dict``)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05  # AdamW's decoupled decay
    warmup_epochs: int = 2
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: int = 12  # epochs without val macro-F1 improvement before stopping; 0 = never stop
    min_delta: float = 1e-4
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # 0 disables mixup
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ema_decay: float = 0.998  # 0 disables the weight EMA (then raw weights are validated/kept)
    tta_flip: bool = True  # average logits over the mirror image at validation/prediction
    balance_classes: bool = False  # inverse-frequency class weights in the loss
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None  # torch intra-op threads; None = leave torch's default
    deterministic: bool = True  # deterministic kernels on CUDA (CPU ones already are)
    amp: Literal["auto", "off"] = "auto"  # auto: bf16 autocast on CUDA (if supported), never on CPU
    cuda_graphs: bool = True  # on CUDA, replay each step as one captured graph (ml/graphed_step.py)
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        if self.amp not in ("auto", "off"):
            raise ValueError(f"amp must be 'auto' or 'off', got {self.amp!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"]["scale"] = list(self.augment.scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        aug = dict(d.pop("augment", {}) or {})
        if "scale" in aug:
            aug["scale"] = tuple(aug["scale"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(augment=AugmentConfig(**aug), **{k: v for k, v in d.items() if k in known})


@dataclass
class EpochStats:
    epoch: int
    lr: float
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float
    images_per_second: float  # training throughput (forward + backward + step + augmentation)


@dataclass
class TrainResult:
    """What :func:`train_model` returns; ``state_dict`` holds the *best* epoch's weights."""

    arch: ArchConfig
    config: TrainConfig
    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_val_macro_f1: float
    best_val_accuracy: float
    history: list[EpochStats]
    normalization: Normalization
    input_size: tuple[int, int]
    n_classes: int
    stopped_early: bool
    train_seconds: float

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(h) for h in self.history])

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The trained network (best weights) in eval mode."""
        model = build_model(self.arch, self.n_classes, input_size=self.input_size)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    @property
    def mean_images_per_second(self) -> float:
        return float(np.mean([h.images_per_second for h in self.history])) if self.history else 0.0


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch global RNGs (the loop itself uses explicit generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_settings(num_threads: int | None, deterministic: bool, device: torch.device) -> Iterator[None]:
    """Set thread count (and, on accelerators, the kernel choice) for one run, then restore them.

    The CPU kernels this loop uses are deterministic already, and
    ``torch.use_deterministic_algorithms`` costs seconds on first call (it imports the
    inductor compiler), so the switch is only flipped where it matters: on accelerators.
    There, deterministic mode does not fill fresh allocations with NaN
    (``fill_uninitialized_memory``): the loop never reads uninitialised memory, and the fill
    is one extra kernel per allocation. Non-deterministic mode lets cuDNN benchmark its
    algorithms (batch shapes are fixed, so it tunes once).
    """
    old_threads = torch.get_num_threads()
    accel = device.type != "cpu"
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    old_bench = torch.backends.cudnn.benchmark
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        if accel and deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            # warn_only: an op without a deterministic kernel warns instead of failing.
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = False
        elif accel:
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(old_threads)
        if accel:
            torch.backends.cudnn.benchmark = old_bench
        if accel and deterministic:
            torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
            torch.utils.deterministic.fill_uninitialized_memory = old_fill


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``TrainConfig.amp`` on ``device``; None = full float32.

    bf16 needs no loss scaling and halves activation traffic on GPUs that support it; on
    the CPU it is never used, so CPU results stay exactly those of float32 training.
    """
    if amp == "off" or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def make_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device, graphed: bool = False
) -> torch.optim.AdamW:
    """AdamW; the fused kernel on CUDA (a couple of launches per step instead of dozens),
    torch's default implementation elsewhere, so CPU updates stay bit-identical. A graphed
    step needs the capturable variant with the learning rate in a device tensor."""
    if graphed:
        lr = torch.tensor(config.lr, dtype=torch.float32, device=device)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay,
                                 fused=True, capturable=True)
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)


class WeightEMA:
    """Exponential moving average of all float parameters *and* BN buffers.

    The decay ramps up as ``(1 + t) / (10 + t)`` so that short runs are not dominated by the
    random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._src = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
        self._dst = [t for t in self.model.state_dict().values() if t.dtype.is_floating_point]
        self._src_int = [t for t in model.state_dict().values() if not t.dtype.is_floating_point]
        self._dst_int = [t for t in self.model.state_dict().values() if not t.dtype.is_floating_point]

    def next_weight(self) -> float:
        """Count one step and return its update weight ``1 - decay``."""
        self.steps += 1
        return 1.0 - min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._dst, self._src, self.next_weight())
        if self._dst_int:
            torch._foreach_copy_(self._dst_int, self._src_int)

    def on_device(self, device: torch.device) -> TensorEMA:
        """The same update with its weight in a device tensor, for a captured step."""
        return TensorEMA(self._dst, self._src, self._dst_int, self._src_int, device)


def load_partial_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``; every key must exist there with the same shape."""
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"initial weights do not fit the architecture: {sorted(wrong)[:5]}")
    model.load_state_dict(state, strict=False)


def _lr_at(step: int, total: int, warmup: int, base: float, schedule: str) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _sample_weights(
    labels: np.ndarray, weights: np.ndarray | None, n_classes: int, balance: bool
) -> torch.Tensor:
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(labels):
        raise ValueError("sample_weights must have one entry per training sample")
    if balance:
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        class_w = np.divide(len(labels), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)
        w = w * class_w[labels]
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def train_model(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    arch: ArchConfig,
    config: TrainConfig = TrainConfig(),
    *,
    sample_weights: np.ndarray | None = None,
    n_classes: int = len(CLASSES),
    init_state: dict[str, torch.Tensor] | None = None,
    log: LogFn | None = None,
) -> TrainResult:
    """Train ``arch`` on uint8 faces (N, H, W) with integer labels; keep the best epoch.

    ``sample_weights`` (one per training sample, e.g. for bias mitigation) scale each
    sample's loss. ``init_state`` starts some weights from elsewhere (a pretrained
    backbone's ``features.*``, see :mod:`fer_pipeline.ml.pretrain`); the rest keep their
    seeded initialisation. ``log`` receives one line per epoch (pass ``context.log.info``).
    """
    log = log or (lambda _msg: None)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    if len(train_images) != len(train_labels) or len(val_images) != len(val_labels):
        raise ValueError("images and labels differ in length")
    if len(train_images) < 2 or len(val_images) < 1:
        raise ValueError("need at least 2 training and 1 validation samples")
    for labels in (train_labels, val_labels):
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(f"labels must be class indices in [0, {n_classes})")
    input_size = (int(train_images.shape[1]), int(train_images.shape[2]))
    device = resolve_device(config.device)

    with torch_settings(config.num_threads, config.deterministic, device):
        seed_everything(config.seed)
        g_shuffle = torch.Generator().manual_seed(config.seed)  # on the host: same batch order on every device
        g_aug = augment_generator(device, config.seed + 1)
        rng_mix = np.random.default_rng(config.seed + 2)
        amp_dtype = autocast_dtype(config.amp, device)

        norm = Normalization.fit(train_images)
        x_train = resident_faces(train_images, device)  # uint8, uploaded once
        y_train = torch.as_tensor(train_labels, device=device)
        w_train = _sample_weights(train_labels, sample_weights, n_classes, config.balance_classes).to(device)
        x_val = to_unit_tensor(val_images).to(device)
        y_val = torch.as_tensor(val_labels)

        model = build_model(arch, n_classes, input_size=input_size)
        if init_state is not None:
            load_partial_state(model, init_state)
        model = model.to(device)
        model = model.to(memory_format=torch.channels_last)
        ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 else None
        graphed = config.cuda_graphs and graphable(config.mixup_alpha, device)
        opt = make_optimizer(model, config, device, graphed)

        n = len(train_labels)
        bs = min(config.batch_size, n)
        # Drop the ragged last batch: BatchNorm is noisy (or fails) on a handful of samples.
        steps_per_epoch = max(1, n // bs)
        total_steps = steps_per_epoch * config.epochs
        warmup_steps = steps_per_epoch * config.warmup_epochs

        history: list[EpochStats] = []
        best: dict[str, Any] = {"f1": -1.0, "epoch": 0, "acc": 0.0, "state": None}
        stale, step, stopped_early = 0, 0, False
        runner = None
        if graphed:
            def one_step(idx: torch.Tensor) -> torch.Tensor:
                return _train_step(model, opt, to_unit_tensor(x_train[idx]), y_train[idx], w_train[idx], config,
                                   g_aug, rng_mix, norm, amp_dtype, amp_cache=False)

            runner = GraphedTrainStep(one_step, bs, opt, ema.on_device(device) if ema else None, [g_aug], device)
        t_start = time.perf_counter()

        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(n, generator=g_shuffle).to(device)
            loss_sum = torch.zeros((), device=device)
            for b in range(steps_per_epoch):
                idx = perm[b * bs : (b + 1) * bs]
                lr = _lr_at(step, total_steps, warmup_steps, config.lr, config.schedule)
                step += 1
                if runner is not None:
                    runner(idx, lr, ema.next_weight() if ema is not None else 0.0)
                    continue
                for group in opt.param_groups:
                    group["lr"] = lr
                xb = to_unit_tensor(x_train[idx])
                loss = _train_step(model, opt, xb, y_train[idx], w_train[idx], config, g_aug, rng_mix, norm, amp_dtype)
                loss_sum += loss
                if ema is not None:
                    ema.update()
            if runner is not None:
                loss_sum = runner.take_loss_sum()
            train_loss = float(loss_sum) / steps_per_epoch  # waits for the device: time after it
            train_seconds = time.perf_counter() - t0

            eval_model = ema.model if ema is not None else model
            logits = predict_logits(
                eval_model, x_val, norm, tta_flip=config.tta_flip, batch_size=config.eval_batch_size, device=device
            )
            val_loss = float(F.cross_entropy(logits, y_val))
            pred = logits.argmax(1).numpy()
            val_f1 = macro_f1(val_labels, pred, n_classes)
            val_acc = float((pred == val_labels).mean())
            stats = EpochStats(
                epoch=epoch,
                lr=lr,
                train_loss=train_loss,
                val_loss=val_loss,
                val_accuracy=val_acc,
                val_macro_f1=val_f1,
                seconds=time.perf_counter() - t0,
                images_per_second=steps_per_epoch * bs / train_seconds,
            )
            history.append(stats)

            improved = val_f1 > best["f1"] + config.min_delta
            if improved:
                state = eval_model.state_dict()
                best = {
                    "f1": val_f1,
                    "epoch": epoch,
                    "acc": val_acc,
                    "state": {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()},
                }
                stale = 0
            else:
                stale += 1
            log(
                f"[{arch.name}] epoch {epoch}/{config.epochs} lr {lr:.2e} train_loss {train_loss:.4f} "
                f"val_loss {val_loss:.4f} val_acc {val_acc:.4f} val_macro_f1 {val_f1:.4f}"
                f"{' *' if improved else ''} ({stats.seconds:.1f}s, {stats.images_per_second:.0f} img/s)"
            )
            if config.patience and stale >= config.patience:
                stopped_early = True
                log(f"[{arch.name}] early stop: no val macro-F1 gain for {config.patience} epochs")
                break

    return TrainResult(
        arch=arch,
        config=config,
        state_dict=best["state"],
        best_epoch=best["epoch"],
        best_val_macro_f1=best["f1"],
        best_val_accuracy=best["acc"],
        history=history,
        normalization=norm,
        input_size=input_size,
        n_classes=n_classes,
        stopped_early=stopped_early,
        train_seconds=time.perf_counter() - t_start,
    )


def _train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    wb: torch.Tensor,
    config: TrainConfig,
    g_aug: torch.Generator,
    rng_mix: np.random.Generator,
    norm: Normalization,
    amp_dtype: torch.dtype | None = None,
    amp_cache: bool = True,
) -> torch.Tensor:
    """One optimisation step on a [0, 1] batch; returns the (detached) weighted loss.

    Augmentation runs where the batch is, with ``g_aug`` on that device; ``amp_dtype``
    (see :func:`autocast_dtype`) autocasts the forward pass and loss (``amp_cache=False``
    inside a CUDA graph, which must not keep autocast's per-step weight casts).
    """
    if config.augment.enabled:
        xb = augment_batch(xb, config.augment, g_aug)
    xb = normalize(xb, norm)
    amp = (
        torch.autocast(xb.device.type, dtype=amp_dtype, cache_enabled=amp_cache)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    with amp:
        if config.mixup_alpha > 0:
            lam = float(rng_mix.beta(config.mixup_alpha, config.mixup_alpha))
            j = torch.as_tensor(rng_mix.permutation(len(yb)), device=yb.device)
            xb = lam * xb + (1.0 - lam) * xb[j]
            logits = model(xb)
            ce_a = F.cross_entropy(logits, yb, reduction="none", label_smoothing=config.label_smoothing)
            ce_b = F.cross_entropy(logits, yb[j], reduction="none", label_smoothing=config.label_smoothing)
            per_sample = lam * ce_a + (1.0 - lam) * ce_b
        else:
            logits = model(xb)
            per_sample = F.cross_entropy(logits, yb, reduction="none", label_smoothing=config.label_smoothing)
        loss = (per_sample.float() * wb).sum() / wb.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()
