"""Checkpoints as one safetensors file: weights + a JSON document in the header metadata.

safetensors holds tensors only, so loading a checkpoint can never execute code (unlike a
pickle-based ``torch.save``). Everything needed to rebuild and use the model -- architecture,
class order, input size, normalisation, the data version it was trained on, its metrics and
training config -- travels in the same file, so weights and description cannot get separated.

The description also records how the training faces were *framed* (:class:`Framing`): dataset
crops used whole ("crop"), faces found by a detector in photos ("detect"), or both ("mixed"), with
the detector's settings and the crop margin, so prediction frames its inputs the same way.

A broken model is refused when it is loaded (``ValueError`` naming the problem), not discovered
later as NaN probabilities: non-finite weights (a diverged training run) or a normalisation whose
std is not a finite positive number (every face would become NaN or infinite).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fer_pipeline.atomic import write_bytes
from fer_pipeline.classes import CLASSES
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.ml.architectures import ArchConfig, build_model
from fer_pipeline.ml.calibration import softmax
from fer_pipeline.ml.data import Normalization
from fer_pipeline.ml.framing import Framing
from fer_pipeline.ml.inference import predict_logits
from fer_pipeline.ml.train import TrainResult

FORMAT = "fer-pipeline-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "fer_pipeline"


@dataclass
class LoadedModel:
    """A checkpoint's network (eval mode, CPU unless asked otherwise) and its description."""

    model: nn.Module
    arch: ArchConfig
    classes: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width)
    normalization: Normalization
    tta_flip: bool
    preprocess: PreprocessSettings  # how the training faces were prepared: prediction does the same
    metadata: dict[str, Any] = field(repr=False)
    path: Path | None = None
    framing: Framing = field(default_factory=Framing)  # how the training faces were framed: prediction does the same

    @property
    def name(self) -> str:
        return str(self.metadata.get("model_name") or self.arch.name)

    @property
    def temperature(self) -> float:
        """The calibration temperature fitted on the validation split (1.0: none recorded)."""
        return float((self.metadata.get("calibration") or {}).get("temperature", 1.0))

    def predict_logits(self, faces: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Raw logits (N, len(classes)), float64, for preprocessed uint8 faces (N, H, W)."""
        faces = np.asarray(faces)
        if faces.ndim != 3 or tuple(faces.shape[1:]) != self.input_size:
            raise ValueError(f"expected faces of shape (N, {self.input_size[0]}, {self.input_size[1]}), got {faces.shape}")
        return predict_logits(self.model, faces, self.normalization, tta_flip=self.tta_flip,
                              batch_size=batch_size).double().numpy()

    def predict_proba(self, faces: np.ndarray, batch_size: int = 512, calibrated: bool = True) -> np.ndarray:
        """Probabilities (N, len(classes)) for preprocessed uint8 faces (N, H, W): calibrated
        with the recorded :attr:`temperature` unless ``calibrated`` is False."""
        return softmax(self.predict_logits(faces, batch_size), self.temperature if calibrated else 1.0)


def save_checkpoint(
    path: str | Path,
    result: TrainResult,
    *,
    data_version: str,
    preprocess: PreprocessSettings | None = None,
    metrics: dict[str, Any] | None = None,
    model_name: str | None = None,
    classes: tuple[str, ...] = CLASSES,
    extra: dict[str, Any] | None = None,
    framing: Framing | None = None,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Write ``result``'s best weights and description atomically to ``path`` (.safetensors).

    ``data_version`` identifies the manifest/splits the model was trained on (e.g. a hash);
    ``preprocess`` the settings the training faces were prepared with (default: the defaults at
    the model's input size), applied again at prediction time; ``framing`` how they were cut out
    of their images (default: dataset crops); ``metrics`` is any JSON-able dict
    (validation/test metrics); ``calibration`` the temperature scaling fitted on the validation
    split (:meth:`fer_pipeline.ml.calibration.Calibration.to_dict`; without it T = 1); ``extra``
    is stored as is.
    """
    if len(classes) != result.n_classes:
        raise ValueError(f"{len(classes)} class names for a {result.n_classes}-class model")
    preprocess = preprocess or PreprocessSettings(image_size=tuple(result.input_size))
    if tuple(preprocess.image_size) != tuple(result.input_size):
        raise ValueError(f"preprocessing makes {preprocess.image_size} faces, the model takes {result.input_size}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name or result.arch.name,
        "architecture": result.arch.to_dict(),
        "classes": list(classes),
        "input_size": list(result.input_size),
        "in_channels": 1,
        "normalization": result.normalization.to_dict(),
        "preprocess": {**preprocess.to_dict(), "key": preprocess.key},
        "framing": (framing or Framing()).to_dict(),
        "calibration": calibration or {},
        "tta_flip": result.config.tta_flip,
        "data_version": data_version,
        "train_config": result.config.to_dict(),
        "best_epoch": result.best_epoch,
        "validation": {"macro_f1": result.best_val_macro_f1, "accuracy": result.best_val_accuracy},
        "metrics": metrics or {},
        "history": [
            {k: getattr(h, k) for k in ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1")}
            for h in result.history
        ],
        "torch_version": torch.__version__,
        "extra": extra or {},
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in result.state_dict.items()}
    blob = st_save(tensors, metadata={METADATA_KEY: json.dumps(meta, default=_json_default)})
    return write_bytes(path, blob)


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON description only (reads the header, not the weights)."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a fer-pipeline checkpoint (no '{METADATA_KEY}' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network from the stored architecture and load its weights (strictly)."""
    path = Path(path)
    meta = read_checkpoint_metadata(path)
    arch = ArchConfig.from_dict(meta["architecture"])
    classes = tuple(meta["classes"])
    input_size = (int(meta["input_size"][0]), int(meta["input_size"][1]))
    norm = meta["normalization"]
    normalization = Normalization(mean=float(norm["mean"]), std=float(norm["std"]))
    check_normalization(normalization, str(path))
    check_temperature(meta, str(path))
    model = build_model(arch, len(classes), in_channels=int(meta.get("in_channels", 1)), input_size=input_size)
    state = st_load(path.read_bytes())
    check_weights(state, str(path))
    model.load_state_dict(state, strict=True)
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    return LoadedModel(
        model=model,
        arch=arch,
        classes=classes,
        input_size=input_size,
        normalization=normalization,
        tta_flip=bool(meta.get("tta_flip", False)),
        preprocess=_preprocess_settings(meta, input_size),
        metadata=meta,
        path=path,
        framing=_framing(meta, str(path)),
    )


def check_normalization(norm: Normalization, origin: str) -> None:
    """Refuse a normalisation that turns every face into NaN/inf (std 0, negative, NaN)."""
    if not math.isfinite(norm.mean):
        raise ValueError(f"{origin}: broken model: normalisation mean is {norm.mean!r} (must be a finite number)")
    if not (math.isfinite(norm.std) and norm.std > 0):
        raise ValueError(f"{origin}: broken model: normalisation std is {norm.std!r} (must be a finite number > 0)")


def check_temperature(meta: Mapping[str, Any], origin: str) -> None:
    """Refuse a recorded calibration temperature that is not a finite number > 0 (it divides the logits)."""
    calibration = meta.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise ValueError(f"{origin}: broken model: calibration metadata is {calibration!r} (must be an object)")
    t = calibration.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise ValueError(f"{origin}: broken model: calibration temperature is {t!r} (must be a finite number > 0)")


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors (torch or numpy) that hold NaN or infinity: the one
    finite-weights rule, for a model in memory and for a checkpoint on disk alike."""
    def finite(t: Any) -> bool:
        if isinstance(t, torch.Tensor):
            return not t.is_floating_point() or bool(torch.isfinite(t).all())
        return getattr(t, "dtype", None) is None or t.dtype.kind != "f" or bool(np.isfinite(t).all())

    return [name for name, t in state.items() if not finite(t)]


def weights_are_finite(checkpoint: Path) -> tuple[bool, list[str]]:
    """(all finite, names of tensors holding NaN/inf) of a saved checkpoint (read as numpy: no model built)."""
    from safetensors.numpy import load_file

    bad = non_finite_tensors(load_file(str(checkpoint)))
    return not bad, bad


def check_weights(state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Refuse NaN/infinite weights: such a model answers NaN for every face."""
    bad = non_finite_tensors(state)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{origin}: broken model: non-finite weights (NaN or infinity) in {shown}")


def check_model(loaded: LoadedModel) -> None:
    """The load-time checks for a model built in memory (``ValueError`` when it is broken)."""
    origin = str(loaded.path or loaded.name)
    check_normalization(loaded.normalization, origin)
    check_temperature(loaded.metadata, origin)
    check_weights(loaded.model.state_dict(), origin)


def _preprocess_settings(meta: dict[str, Any], input_size: tuple[int, int]) -> PreprocessSettings:
    """The recorded preprocessing (checkpoints written before it was recorded: the defaults)."""
    recorded = meta.get("preprocess")
    if recorded is None:
        return PreprocessSettings(image_size=input_size)
    settings = PreprocessSettings.from_dict(recorded)
    if settings.image_size != input_size:
        raise ValueError(f"checkpoint preprocessing makes {settings.image_size} faces, the model takes {input_size}")
    return settings


def _framing(meta: dict[str, Any], origin: str) -> Framing:
    """The recorded framing (checkpoints written before it was recorded: dataset crops)."""
    recorded = meta.get("framing")
    if recorded is None:
        return Framing()
    try:
        return Framing.from_dict(recorded)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{origin}: malformed framing metadata: {exc}") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
