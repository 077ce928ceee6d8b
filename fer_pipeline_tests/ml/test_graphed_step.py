"""A graphed training step must follow the learning-rate schedule and the EMA ramp after capture.

A CUDA graph replays the kernels it captured on the memory they read then: a learning rate or
an EMA weight passed as a Python number, or refilled into a *new* tensor, stays frozen at its
capture-time value, and training still "works" (the loss falls), so only a step-by-step
comparison with the eager loop catches it. Both tests run the same schedule (the learning rate
drops to zero after capture, the EMA weight keeps ramping) graphed and eagerly and compare the
weights and EMA weights after every step:

* on CUDA, with the real graph (skipped elsewhere);
* everywhere, with a stand-in graph that, like a real one, replays the step on the tensors that
  were live at capture, so ``GraphedTrainStep.refill`` (the code that keeps the graph's inputs
  current) is exercised on the CPU too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fer_pipeline.ml import TrainConfig
from fer_pipeline.ml.architectures import ArchConfig, build_model
from fer_pipeline.ml.data import (
    AugmentConfig,
    Normalization,
    augment_generator,
    to_unit_tensor,
)
from fer_pipeline.ml.graphed_step import EAGER_STEPS, GraphedTrainStep, TensorEMA
from fer_pipeline.ml.train import WeightEMA, _train_step, make_optimizer
from fer_pipeline_tests.ml.test_train import pattern_faces

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the real graph)")
NO_AUG = AugmentConfig(hflip=False, rotate_deg=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
CONFIG = TrainConfig(batch_size=16, lr=0.05, augment=NO_AUG, ema_decay=0.998)
ARCH = ArchConfig(name="tiny", channels=(4, 8), dropout=0.0)  # no dropout: both runs draw nothing
STEPS = 10
# Steady, then zero: a learning rate frozen at capture keeps moving the weights after step 6.
LRS = [0.05] * 6 + [0.0] * (STEPS - 6)


@dataclass
class Trace:
    lrs: list[float]  # the learning rate the optimizer holds after each step
    weights: list[torch.Tensor]  # all float weights, flattened, after each step
    ema: list[torch.Tensor]  # all EMA weights, flattened, after each step


class StandInGraph:
    """Replays a step the way a CUDA graph does: on the tensors that were live at capture.

    The optimizer's learning rates, the EMA weight tensors and the batch-index buffer captured
    here are put back for each replay, so a refill that replaced them instead of writing into
    them (or a learning rate that is a Python number) replays with its capture-time value."""

    def __init__(self, runner: GraphedTrainStep) -> None:
        self.runner = runner
        self.lrs = [group["lr"] for group in runner.optimizer.param_groups]
        self.idx = runner.idx
        ema = runner.ema
        self.ema = (ema.weight, ema.keep) if ema is not None else None

    def replay(self) -> None:
        r = self.runner
        live = ([g["lr"] for g in r.optimizer.param_groups], r.idx, (r.ema.weight, r.ema.keep) if r.ema else None)
        for group, lr in zip(r.optimizer.param_groups, self.lrs):
            group["lr"] = lr
        r.idx = self.idx
        if r.ema is not None and self.ema is not None:
            r.ema.weight, r.ema.keep = self.ema
        try:
            r._body()
        finally:
            for group, lr in zip(r.optimizer.param_groups, live[0]):
                group["lr"] = lr
            r.idx = live[1]
            if r.ema is not None and live[2] is not None:
                r.ema.weight, r.ema.keep = live[2]


class StandInGraphedStep(GraphedTrainStep):
    """``GraphedTrainStep`` with :class:`StandInGraph` for the CUDA graph; the rest is the real code."""

    def capture(self) -> StandInGraph:
        return StandInGraph(self)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1).cpu() for t in tensors])


def _run(device: torch.device, graphed: Callable[..., GraphedTrainStep] | None) -> Trace:
    """STEPS steps of the LRS schedule, through ``graphed`` (a GraphedTrainStep class) or eagerly
    as ``train_model``'s eager loop does them."""
    torch.manual_seed(0)
    x, y = pattern_faces(CONFIG.batch_size * 4, size=16, seed=0)
    model = build_model(ARCH, 4, input_size=(16, 16)).to(device)
    norm = Normalization.fit(x)
    xs, ys = to_unit_tensor(x).to(device), torch.as_tensor(y, device=device)
    ws = torch.ones(len(y), device=device)
    ema = WeightEMA(model, CONFIG.ema_decay)
    opt = make_optimizer(model, CONFIG, device, graphed=graphed is not None)
    g_aug = augment_generator(device, 0)
    rng = np.random.default_rng(0)

    def step(idx: torch.Tensor) -> torch.Tensor:
        return _train_step(model, opt, xs[idx], ys[idx], ws[idx], CONFIG, g_aug, rng, norm, amp_cache=False)

    runner = graphed(step, CONFIG.batch_size, opt, ema.on_device(device), [g_aug], device) if graphed else None
    trace = Trace([], [], [])
    for i, lr in enumerate(LRS):
        idx = torch.arange(CONFIG.batch_size, device=device) + (i % 4) * CONFIG.batch_size
        if runner is not None:
            runner(idx, lr, ema.next_weight())
        else:
            for group in opt.param_groups:
                group["lr"] = lr
            step(idx)
            ema.update()
        trace.lrs.append(float(opt.param_groups[0]["lr"]))
        trace.weights.append(_flat([t for t in model.state_dict().values() if t.dtype.is_floating_point]))
        trace.ema.append(_flat([t for t in ema.model.state_dict().values() if t.dtype.is_floating_point]))
    if runner is not None:
        assert runner.graph is not None and runner.calls == STEPS  # the later steps were replays
    return trace


def _assert_follows_eager(graphed: Trace, eager: Trace, atol: float) -> None:
    assert graphed.lrs == pytest.approx(LRS, rel=1e-6) and eager.lrs == pytest.approx(LRS, rel=1e-6)
    for i in range(STEPS):
        assert torch.allclose(graphed.weights[i], eager.weights[i], atol=atol), f"weights differ after step {i + 1}"
        assert torch.allclose(graphed.ema[i], eager.ema[i], atol=atol), f"EMA weights differ after step {i + 1}"
    # the schedule itself: weights move while lr > 0 and stop at lr = 0 (BN buffers aside, which
    # the eager run shares); the EMA keeps converging towards them
    assert not torch.equal(eager.weights[1], eager.weights[2])
    assert not torch.equal(eager.ema[-2], eager.ema[-1])


def test_stand_in_graph_follows_the_schedule_after_capture() -> None:
    cpu = torch.device("cpu")
    assert EAGER_STEPS < 6  # capture happens while lr is still 0.05: a frozen lr would show
    assert CONFIG.mixup_alpha == 0  # mixup is never graphed
    _assert_follows_eager(_run(cpu, StandInGraphedStep), _run(cpu, None), atol=1e-5)


def test_stand_in_graph_catches_a_frozen_learning_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above is able to fail: refill the lr into a new tensor and it does."""
    def refill_into_new_tensors(self: GraphedTrainStep, idx: torch.Tensor, lr: float, w: float) -> None:
        self.idx.copy_(idx)
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(lr)  # the graph keeps reading the old tensor
        if self.ema is not None:
            self.ema.set_weight(w)

    monkeypatch.setattr(GraphedTrainStep, "refill", refill_into_new_tensors)
    cpu = torch.device("cpu")
    with pytest.raises(AssertionError, match="weights differ after step 7"):
        _assert_follows_eager(_run(cpu, StandInGraphedStep), _run(cpu, None), atol=1e-5)


def test_stand_in_graph_catches_a_frozen_ema_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the EMA weight: set into new tensors, the replay keeps the capture-time one."""
    def set_weight_into_new_tensors(self: TensorEMA, w: float) -> None:
        self.weight, self.keep = torch.tensor(w), torch.tensor(1.0 - w)

    monkeypatch.setattr(TensorEMA, "set_weight", set_weight_into_new_tensors)
    cpu = torch.device("cpu")
    with pytest.raises(AssertionError, match="EMA weights differ after step 5"):
        _assert_follows_eager(_run(cpu, StandInGraphedStep), _run(cpu, None), atol=1e-5)


@CUDA
def test_cuda_graph_follows_the_learning_rate_and_ema_schedule() -> None:
    cuda = torch.device("cuda")
    eager = _run(cuda, None)
    graphed = _run(cuda, GraphedTrainStep)
    _assert_follows_eager(graphed, eager, atol=1e-4)

