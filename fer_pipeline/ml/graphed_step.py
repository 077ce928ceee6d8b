"""One training step (gather, augment, forward, backward, AdamW, EMA, loss sum) as a CUDA graph.

Why: at batch 64 the main model's GPU work is about 1.3 ms per step, but eager PyTorch
launches ~130 kernels per step and the host cannot issue them that fast, so an H100 sat
mostly idle (benchmarks/GPU_NOTES.md). Captured once, a step is replayed with one graph
launch plus three tiny copies (batch indices, learning rate, EMA weight), so the GPU runs
back to back.

The captured body is the eager step itself (:func:`fer_pipeline.ml.train.train_step`); the
only differences are where its changing inputs live: the batch indices, the learning rate
and the EMA weight sit in device tensors that are refilled before each replay, and the
augmentation generator is registered with the graph so every replay draws fresh numbers
from it. The first :data:`EAGER_STEPS` steps run eagerly on a side stream (they are real
training steps): they build the lazily cached constants and let cuDNN/cuBLAS allocate
their workspaces before capture. Mixup draws from a host generator, so it is not graphed
(the caller falls back to the eager loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

EAGER_STEPS = 3
"""Steps run eagerly before capture (the PyTorch CUDA graphs guide asks for a few)."""


class Replayable(Protocol):
    """A captured step (:class:`torch.cuda.CUDAGraph`, or a test's stand-in for one)."""

    def replay(self) -> None: ...


class TensorEMA:
    """The EMA update ``avg = avg * (1 - w) + model * w`` with ``w`` a device tensor.

    :class:`fer_pipeline.ml.train.WeightEMA` passes ``w`` as a Python number, which a graph
    would freeze at its capture-time value; here it is read from ``weight`` at replay.
    """

    def __init__(self, dst: list[torch.Tensor], src: list[torch.Tensor],
                 dst_int: list[torch.Tensor], src_int: list[torch.Tensor], device: torch.device) -> None:
        self.dst, self.src, self.dst_int, self.src_int = dst, src, dst_int, src_int
        self.weight = torch.zeros((), device=device)
        self.keep = torch.ones((), device=device)

    def set_weight(self, w: float) -> None:
        self.weight.fill_(w)
        self.keep.fill_(1.0 - w)

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_mul_(self.dst, self.keep)
        torch._foreach_add_(self.dst, torch._foreach_mul(self.src, self.weight))
        if self.dst_int:
            torch._foreach_copy_(self.dst_int, self.src_int)


class GraphedTrainStep:
    """Runs ``step(idx)`` for each batch: eagerly for the first few calls, then as one graph.

    ``step`` must read its batch from the ``idx`` tensor it is given (always the same
    tensor, :attr:`idx`), return the detached loss, and make no host synchronisation.
    """

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                 optimizer: torch.optim.Optimizer, ema: TensorEMA | None,
                 generators: list[torch.Generator], device: torch.device) -> None:
        self.step = step
        self.optimizer = optimizer
        self.ema = ema
        self.generators = generators
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.graph: Replayable | None = None
        self.calls = 0
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _body(self) -> None:
        self.loss_sum += self.step(self.idx)
        if self.ema is not None:
            self.ema.update()

    def refill(self, idx: torch.Tensor, lr: float, ema_weight: float) -> None:
        """Write this step's inputs *into* the tensors the graph read at capture.

        Why in place: a replay reads the memory it was captured with, so a new tensor (or a
        Python number) put in their place would leave the graph on its capture-time values."""
        self.idx.copy_(idx, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)
        if self.ema is not None:
            self.ema.set_weight(ema_weight)

    def capture(self) -> Replayable:
        """Capture one step (its body runs only when the graph is replayed)."""
        graph = torch.cuda.CUDAGraph()
        for g in self.generators:
            graph.register_generator_state(g)
        with torch.cuda.graph(graph):
            self._body()
        return graph

    def __call__(self, idx: torch.Tensor, lr: float, ema_weight: float) -> None:
        """One training step on the rows ``idx`` (a device tensor of ``batch_size`` indices)."""
        self.refill(idx, lr, ema_weight)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.calls <= EAGER_STEPS:
            if self._side is None:  # not CUDA (tests): no stream to warm up on
                self._body()
                return
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                self._body()
            torch.cuda.current_stream().wait_stream(self._side)
        else:
            self.graph = self.capture()
            self.graph.replay()  # capture records without running: this replay is the step

    def take_loss_sum(self) -> torch.Tensor:
        """The summed loss since the last call (a device scalar), then reset to zero."""
        out = self.loss_sum.clone()
        self.loss_sum.zero_()
        return out


def graphable(mixup_alpha: float, device: torch.device) -> bool:
    """Whether the step can be captured: CUDA, and no host-side randomness (mixup) inside it."""
    return device.type == "cuda" and mixup_alpha == 0 and torch.cuda.is_available()
