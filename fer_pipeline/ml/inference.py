"""Batched inference shared by validation, evaluation and the predict command.

One function turns uint8 faces into class probabilities, so training-time validation and
application-time prediction cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fer_pipeline.ml.data import Normalization, normalize, to_unit_tensor


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    norm: Normalization,
    *,
    tta_flip: bool = False,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logits (N, C) on CPU for uint8 faces (N, H, W) or [0, 1] tensors (N, 1, H, W).

    With ``tta_flip`` the logits of the image and its mirror image are averaged: faces are
    roughly symmetric, and averaging removes some of the noise of a small model.
    """
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    x = images if isinstance(images, torch.Tensor) and images.ndim == 4 else to_unit_tensor(images)
    outs = []
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = normalize(x[start : start + batch_size].to(device), norm)
            logits = model(xb)
            if tta_flip:
                logits = 0.5 * (logits + model(xb.flip(3)))
            outs.append(logits.float().cpu())
    finally:
        model.train(was_training)
    if not outs:
        n_classes = _n_outputs(model)
        return torch.zeros((0, n_classes))
    return torch.cat(outs)


def predict_proba(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    norm: Normalization,
    *,
    tta_flip: bool = False,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Class probabilities (N, C) as float64 numpy (rows sum to 1)."""
    logits = predict_logits(model, images, norm, tta_flip=tta_flip, batch_size=batch_size, device=device)
    return torch.softmax(logits.double(), dim=1).numpy()


def _n_outputs(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)
