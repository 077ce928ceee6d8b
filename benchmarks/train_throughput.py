"""Training throughput (images/second) and reproducibility of a registered model on one device.

Runs :func:`fer_pipeline.ml.train_model` itself (resident data, on-device augmentation,
forward + backward + AdamW step + weight EMA) twice per setting on random 48x48 faces. The
throughput is the median over both runs of the epochs after the first (which warms up
cuDNN and the allocator); the two runs share one seed, so their loss history, validation
metrics and weights must be identical in deterministic mode, and the script exits 1 when
they are not.

Settings: on CUDA, deterministic on/off x bf16 autocast on/off; on the CPU one setting
(the CPU kernels are deterministic anyway and autocast is never used there), per thread count.

    .venv/bin/python benchmarks/train_throughput.py                          # main model, GPU if present
    .venv/bin/python benchmarks/train_throughput.py --device cpu --threads 1 2
    .venv/bin/python benchmarks/train_throughput.py --device cuda            # exits 2 without a GPU
    .venv/bin/python benchmarks/train_throughput.py --models cnn4 cnn3 cnn4_k5 --steps 100

Results: ``benchmarks/results/train_throughput_<cpu|cuda>.json`` (``benchmarks/record.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import write_result  # noqa: E402
from fer_pipeline.classes import CLASSES  # noqa: E402
from fer_pipeline.ml import (  # noqa: E402
    ARCHITECTURES,
    MAIN_MODEL,
    TrainConfig,
    TrainResult,
    train_model,
)
from fer_pipeline.ml.train import autocast_dtype  # noqa: E402

TARGET_CUDA_IMAGES_PER_S = 30_000  # issue #12, default (deterministic) mode, batch 64


@dataclass(frozen=True)
class Setting:
    deterministic: bool
    amp: str  # TrainConfig.amp
    cuda_graphs: bool = True

    def label(self, device: torch.device) -> str:
        dtype = autocast_dtype(self.amp, device)
        amp = "bf16" if dtype == torch.bfloat16 else "off"
        graphs = f" graphs={'on' if self.cuda_graphs else 'off':3s}" if device.type == "cuda" else ""
        return f"deterministic={'on' if self.deterministic else 'off':3s} amp={amp:4s}{graphs}"


def settings_for(device: torch.device) -> list[Setting]:
    """Every combination that can differ on ``device``; the default (reproducible) one first."""
    if device.type == "cpu":
        return [Setting(True, "auto")]
    return [Setting(d, a, g) for g in (True, False) for d in (True, False) for a in ("auto", "off")]


def synthetic_faces(n_train: int, n_val: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n_train + n_val, 48, 48), dtype=np.uint8)
    y = rng.integers(0, len(CLASSES), n_train + n_val)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _curve(r: TrainResult) -> list[tuple[float, ...]]:
    return [(h.train_loss, h.val_loss, h.val_accuracy, h.val_macro_f1) for h in r.history]


def same_run(a: TrainResult, b: TrainResult) -> bool:
    """Identical loss history, validation metrics and weights."""
    return _curve(a) == _curve(b) and all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def measure(
    name: str, device: torch.device, threads: int, setting: Setting, batch_size: int, steps: int, epochs: int
) -> tuple[float, bool]:
    """(median training images/s after the first epoch, whether two same-seed runs matched)."""
    data = synthetic_faces(batch_size * steps, 256)
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        warmup_epochs=1,
        patience=0,
        device=str(device),
        num_threads=threads,
        deterministic=setting.deterministic,
        amp=setting.amp,
        cuda_graphs=setting.cuda_graphs,
    )
    runs = [train_model(*data, ARCHITECTURES[name], cfg) for _ in range(2)]
    ips = [h.images_per_second for r in runs for h in r.history[1:]] or [runs[0].history[0].images_per_second]
    return statistics.median(ips), same_run(*runs)


def resolve(device: str) -> torch.device | None:
    """The device to measure; None when CUDA was asked for and none is present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return None
    return torch.device(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[MAIN_MODEL], choices=list(ARCHITECTURES))
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    p.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (default 30 on CPU, 400 on CUDA)")
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    args = p.parse_args(argv)

    device = resolve(args.device)
    if device is None:
        print("--device cuda: no CUDA GPU present (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        return 2
    steps = args.steps or (30 if device.type == "cpu" else 400)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads available, "
          f"batch {args.batch_size}, {steps} steps x {args.epochs} epochs x 2 runs per setting")
    failed = False
    runs: list[dict[str, object]] = []
    figures: dict[str, object] = {"batch_size": args.batch_size, "steps": steps, "epochs": args.epochs, "runs": runs}
    for name in args.models:
        for threads in args.threads if device.type == "cpu" else args.threads[:1]:
            for setting in settings_for(device):
                ips, same = measure(name, device, threads, setting, args.batch_size, steps, args.epochs)
                repro = "yes" if same else ("NO" if setting.deterministic else "no (not expected)")
                print(f"{name:8s} {device.type:4s} threads={threads:<2d} {setting.label(device)}  "
                      f"{ips:8.0f} training images/s  reproducible: {repro}", flush=True)
                failed |= setting.deterministic and not same
                runs.append({"model": name, "threads": threads, "deterministic": setting.deterministic,
                             "amp": "bf16" if autocast_dtype(setting.amp, device) == torch.bfloat16 else "off",
                             "cuda_graphs": setting.cuda_graphs and device.type == "cuda",
                             "images_per_s": round(ips, 1), "reproducible": same})
                if name == MAIN_MODEL and setting == settings_for(device)[0]:  # the default mode
                    mode = "default" if device.type == "cuda" else f"threads_{threads}"
                    figures[f"{name}_{mode}_images_per_s"] = round(ips, 1)
                if device.type == "cuda" and setting == settings_for(device)[0] and name == MAIN_MODEL:
                    verdict = "met" if ips >= TARGET_CUDA_IMAGES_PER_S else "NOT met"
                    print(f"{'':8s} target >= {TARGET_CUDA_IMAGES_PER_S} images/s in the default mode: {verdict}")
    targets = {f"{MAIN_MODEL}_default_images_per_s": f">= {TARGET_CUDA_IMAGES_PER_S}"} if device.type == "cuda" else {}
    print(f"wrote {write_result(f'train_throughput_{device.type}', figures, targets=targets)}")
    if failed:
        print("a deterministic setting gave different results for the same seed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
