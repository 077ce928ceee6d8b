"""In-memory face tensors, normalisation and batched augmentation.

The faces are tiny (48x48 uint8), so a whole split lives in one tensor and a batch is an
index into it: no DataLoader, no per-sample Python in the training loop. Augmentation works
on a whole batch at once (one ``affine_grid``/``grid_sample`` call), which is what makes
CPU training fast, and it runs on whatever device the batch is on, drawing from a generator
on that device, so GPU training never sends a batch back to the host.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fer_pipeline.classes import CLASS_TO_INDEX
from fer_pipeline.schema import SPLITS


@dataclass(frozen=True)
class Normalization:
    """Pixel mean/std on the [0, 1] scale, computed on the training split only."""

    mean: float
    std: float

    @classmethod
    def fit(cls, images: np.ndarray) -> "Normalization":
        x = np.asarray(images, dtype=np.float64) / 255.0
        return cls(mean=float(x.mean()), std=float(max(x.std(), 1e-3)))

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}


def to_unit_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim != 3:
        raise ValueError(f"expected (N, H, W) grayscale faces, got shape {tuple(x.shape)}")
    return x.to(torch.float32).div_(255.0).unsqueeze(1)


def resident_faces(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """The (N, H, W) faces as one tensor on ``device``, kept in their own dtype (uint8).

    One upload for the whole run, four times smaller than float32; a batch is then an index
    into it plus :func:`to_unit_tensor` on the device, which gives the same floats as
    converting the whole split first.
    """
    x = torch.as_tensor(np.ascontiguousarray(images))
    if x.ndim != 3:
        raise ValueError(f"expected (N, H, W) grayscale faces, got shape {tuple(x.shape)}")
    return x.to(device)


def augment_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on ``device`` for :func:`augment_batch`, seeded from the run's seed.

    Drawing on the training device keeps augmentation off the host; on the CPU it is the
    same generator (and hence the same stream) as before augmentation moved to the device.
    """
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def normalize(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """[0, 1] batch -> standardised, channels_last (the faster conv layout on CPU)."""
    return ((x - norm.mean) / norm.std).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation switches; all ranges are symmetric around identity."""

    hflip: bool = True
    rotate_deg: float = 10.0
    translate: float = 0.08  # fraction of the image size
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.2  # additive, on the [0, 1] scale
    contrast: float = 0.2  # multiplicative around the per-image mean
    erase_p: float = 0.0  # probability of one random-erasing rectangle per image

    @property
    def enabled(self) -> bool:
        return bool(
            self.hflip
            or self.rotate_deg
            or self.translate
            or self.scale != (1.0, 1.0)
            or self.brightness
            or self.contrast
            or self.erase_p
        )


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def _draw_rows(cfg: AugmentConfig) -> list[tuple[str, float, float, float]]:
    """(name, lo, hi, factor) per random row, in the order the draws were first made one by one."""
    rows = [
        ("angle", -cfg.rotate_deg, cfg.rotate_deg, math.pi / 180.0),
        ("scale", cfg.scale[0], cfg.scale[1], 1.0),
    ]
    if cfg.hflip:
        rows.append(("flip", 0.0, 1.0, 1.0))
    rows += [("tx", -cfg.translate, cfg.translate, 2.0), ("ty", -cfg.translate, cfg.translate, 2.0)]
    if cfg.contrast:
        rows.append(("contrast", 1.0 - cfg.contrast, 1.0 + cfg.contrast, 1.0))
    if cfg.brightness:
        rows.append(("brightness", -cfg.brightness, cfg.brightness, 1.0))
    return rows


@functools.lru_cache(maxsize=16)
def _draw_constants(rows: tuple[tuple[str, float, float, float], ...], device: torch.device) -> torch.Tensor:
    """(3, rows, 1) float32 span, offset and factor per row; cached so CUDA steps upload nothing."""
    consts = torch.tensor([[hi - lo, lo, f] for _, lo, hi, f in rows], dtype=torch.float32)
    return consts.T.contiguous().unsqueeze(2).to(device)


def _draws(n: int, cfg: AugmentConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """All per-image parameters from one ``torch.rand`` call (one kernel instead of seven).

    Each row is ``u * (hi - lo) + lo`` (times a unit factor) in float32, exactly what
    separate ``torch.rand(n) * (hi - lo) + lo`` draws computed; the CPU generator fills a
    block serially, so on the CPU every value is bit-identical to the one-by-one draws.
    """
    rows = tuple(_draw_rows(cfg))
    span, lo, factor = _draw_constants(rows, g.device)
    u = torch.rand(len(rows), n, generator=g, device=g.device)
    u = u.mul_(span).add_(lo).mul_(factor)  # x * 1.0 is exact: rows without a factor keep their bits
    return {row[0]: u[i] for i, row in enumerate(rows)}


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Randomly flip, rotate, shift, scale and jitter a [0, 1] batch (N, 1, H, W).

    Flip, rotation, scale and translation are folded into one affine matrix per image, so
    the batch is resampled once; border pixels are replicated rather than zero-filled, so
    no artificial black frame appears that the network could learn from. Everything runs on
    ``x``'s device with ``g`` on that same device (see :func:`augment_generator`): on CUDA
    there is no host round trip and no synchronisation, and all ops used have deterministic
    CUDA kernels (``grid_sample`` is only non-deterministic in its backward, never needed
    here because the batch does not require grad).
    """
    if not cfg.enabled:
        return x
    if x.device.type != g.device.type:
        raise ValueError(f"augmentation generator is on {g.device}, batch on {x.device}: use augment_generator")
    n = x.shape[0]
    d = _draws(n, cfg, g)
    flip = torch.where(d["flip"] < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n, device=x.device)
    cos, sin = torch.cos(d["angle"]) / d["scale"], torch.sin(d["angle"]) / d["scale"]
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, d["tx"]], 1), torch.stack([sin * flip, cos, d["ty"]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    if cfg.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * d["contrast"].view(n, 1, 1, 1) + mean
    if cfg.brightness:
        x = x + d["brightness"].view(n, 1, 1, 1)
    if cfg.erase_p > 0:
        x = _random_erase(x, cfg.erase_p, g)
    return x.clamp_(0.0, 1.0)


def _random_erase(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Fill one rectangle (20-45% of each side) with the image mean, in a fraction ``p`` of images."""
    n, _, h, w = x.shape
    eh = (_uniform(n, 0.2, 0.45, g) * h).long()
    ew = (_uniform(n, 0.2, 0.45, g) * w).long()
    y0 = (torch.rand(n, generator=g, device=g.device) * (h - eh)).long()
    x0 = (torch.rand(n, generator=g, device=g.device) * (w - ew)).long()
    use = torch.rand(n, generator=g, device=g.device) < p
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    mask = (
        (rows >= y0.view(n, 1, 1))
        & (rows < (y0 + eh).view(n, 1, 1))
        & (cols >= x0.view(n, 1, 1))
        & (cols < (x0 + ew).view(n, 1, 1))
        & use.view(n, 1, 1)
    )
    fill = x.mean(dim=(1, 2, 3)).view(n, 1, 1).expand(n, h, w)
    return torch.where(mask.unsqueeze(1), fill.unsqueeze(1), x)


@dataclass
class SplitArrays:
    """One split's faces, labels and ids, aligned row by row."""

    images: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # int64 (N,), indices into CLASSES
    image_ids: list[str]
    frame: pd.DataFrame  # the manifest rows, same order (for slicing by demographics later)

    def __len__(self) -> int:
        return len(self.labels)


def load_split_arrays(
    data_root: str | Path,
    manifest: pd.DataFrame,
    splits: pd.DataFrame,
    split_names: tuple[str, ...] = SPLITS,
    with_images: bool = True,
) -> dict[str, SplitArrays]:
    """Join manifest and splits on ``image_id`` and load each split's processed faces.

    Rows are sorted by ``image_id`` within a split, so the arrays (and hence training) do not
    depend on the row order the tables happened to be written in. ``with_images=False`` gives
    empty (N, 0, 0) images, for callers that only need labels and rows.
    """
    from fer_pipeline.faces.store import load_faces

    joined = manifest.merge(splits[["image_id", "split", "fold"]], on="image_id", how="inner")
    unknown = set(joined["label"]) - set(CLASS_TO_INDEX)
    if unknown:
        raise ValueError(f"manifest has labels outside CLASSES: {sorted(unknown)}")
    out: dict[str, SplitArrays] = {}
    for name in split_names:
        part = joined[joined["split"] == name].sort_values("image_id").reset_index(drop=True)
        images = (load_faces(data_root, list(part["face_path"])) if with_images and len(part)
                  else np.zeros((len(part), 0, 0), np.uint8))
        labels = part["label"].map(CLASS_TO_INDEX).to_numpy(dtype=np.int64)
        out[name] = SplitArrays(images, labels, list(part["image_id"]), part)
    return out
