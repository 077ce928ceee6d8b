"""Training throughput (images/second) of a registered model on this machine.

Measures full training steps exactly as :func:`fer_pipeline.ml.train_model` runs them
(augmentation + forward + backward + AdamW step + weight EMA) on random 48x48 faces, after a
warm-up, for each thread count asked for.

    .venv/bin/python benchmarks/train_throughput.py                  # main model
    .venv/bin/python benchmarks/train_throughput.py --models cnn4 cnn3 cnn4_k5 --threads 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fer_pipeline.ml import ARCHITECTURES, MAIN_MODEL, TrainConfig, build_model  # noqa: E402
from fer_pipeline.ml.data import Normalization, to_unit_tensor  # noqa: E402
from fer_pipeline.ml.train import WeightEMA, _train_step  # noqa: E402


def measure(name: str, threads: int, batch_size: int, steps: int, warmup: int = 3) -> float:
    torch.set_num_threads(threads)
    cfg = TrainConfig(batch_size=batch_size)
    rng = np.random.default_rng(0)
    x = to_unit_tensor(rng.integers(0, 256, (batch_size * 4, 48, 48), dtype=np.uint8))
    y = torch.as_tensor(rng.integers(0, 4, batch_size * 4))
    w = torch.ones(len(y))
    norm = Normalization(0.5, 0.25)
    model = build_model(ARCHITECTURES[name], 4).to(memory_format=torch.channels_last)
    ema = WeightEMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g, mix = torch.Generator().manual_seed(0), np.random.default_rng(0)
    model.train()

    def step(i: int) -> None:
        idx = torch.arange(i % 4 * batch_size, (i % 4 + 1) * batch_size)
        _train_step(model, opt, x[idx], y[idx], w[idx], cfg, g, mix, norm)
        ema.update()

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[MAIN_MODEL], choices=list(ARCHITECTURES))
    p.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    p.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available, batch {args.batch_size}")
    for name in args.models:
        for threads in args.threads:
            ips = measure(name, threads, args.batch_size, args.steps)
            print(f"{name:10s} threads={threads}  {ips:7.0f} training images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
