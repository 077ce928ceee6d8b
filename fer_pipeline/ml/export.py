"""Export the shipped model -- one network or an ensemble -- as one ONNX file for deployment.

:func:`export_onnx` puts everything between preprocessed uint8 faces and calibrated
probabilities into one graph: per member, ``x / 255`` and its own normalisation (fold models fit
their own), the network, flip test-time averaging of the logits when the recipe uses it
(exactly :func:`fer_pipeline.ml.inference.predict_logits`), ``softmax(logits / T)`` with the
member's temperature, then the mean over members. A consumer therefore needs only the metadata
(:mod:`.exported`) and an image decoder, and cannot forget the calibration.

:func:`export_models` builds the metadata from loaded checkpoints and checks that the members
agree on what they were trained for (classes, input, preprocessing, framing). The export is
checked before it is written: onnxruntime must reproduce PyTorch's probabilities within
:data:`~fer_pipeline.ml.exported.PARITY_TOLERANCE` on a batch of faces, or nothing is written.

torch's exporter (``torch.onnx.export(dynamo=True)``, the default since torch 2.9) needs the
``onnx`` and ``onnxscript`` packages; running the file needs only ``onnxruntime``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fer_pipeline.atomic import write_bytes
from fer_pipeline.ml.checkpoint import LoadedModel
from fer_pipeline.ml.data import Normalization
from fer_pipeline.ml.exported import (
    INPUT_NAME,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    OPSET,
    OUTPUT_NAME,
    PARITY_TOLERANCE,
)
from fer_pipeline.ml.inference import predict_logits

COMBINE = "mean over members of softmax(logits / temperature); a member with tta_flip averages the logits " \
          "of the face and its mirror image first"


class _Ensemble(nn.Module):
    """uint8 faces (N, H, W) -> mean of the members' calibrated probabilities (N, C)."""

    def __init__(self, members: Sequence[nn.Module], norms: Sequence[Normalization], temperatures: Sequence[float],
                 flips: Sequence[bool]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.settings = [(float(n.mean), float(n.std), float(t), bool(f))
                         for n, t, f in zip(norms, temperatures, flips, strict=True)]

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        x = faces.to(torch.float32).unsqueeze(1) / 255.0  # ml.data.to_unit_tensor
        total = None
        for member, (mean, std, temperature, flip) in zip(self.members, self.settings):
            xn = (x - mean) / std  # ml.data.normalize
            logits = member(xn)
            if flip:
                logits = 0.5 * (logits + member(xn.flip(3)))
            probs = torch.softmax(logits / temperature, dim=1)
            total = probs if total is None else total + probs
        return total / len(self.settings)


def _per_member(value: Any, n: int, what: str) -> list[Any]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} members")
    return values


def reference_proba(members: Sequence[nn.Module], faces: np.ndarray, *, temperatures: float | Sequence[float],
                    normalizations: Normalization | Sequence[Normalization],
                    tta_flip: bool | Sequence[bool] = False) -> np.ndarray:
    """What the exported graph must answer, computed the PyTorch way (float64 softmax of
    :func:`~fer_pipeline.ml.inference.predict_logits`), averaged over members."""
    n = len(members)
    probs = []
    for m, t, norm, flip in zip(members, _per_member(temperatures, n, "temperatures"),
                                _per_member(normalizations, n, "normalisations"),
                                _per_member(tta_flip, n, "flip settings")):
        logits = predict_logits(m, faces, norm, tta_flip=flip, device="cpu").double()
        probs.append(torch.softmax(logits / float(t), dim=1).numpy())
    return np.mean(probs, axis=0)


def export_onnx(
    members: Sequence[nn.Module],
    temperatures: float | Sequence[float],
    metadata: Mapping[str, Any],
    path: str | Path,
    *,
    normalizations: Normalization | Sequence[Normalization],
    input_size: tuple[int, int],
    tta_flip: bool | Sequence[bool] = False,
    opset: int = OPSET,
    check_faces: np.ndarray | None = None,
) -> Path:
    """Write one ONNX graph averaging ``members``' temperature-scaled probabilities to ``path``.

    Per-member settings (``temperatures``, ``normalizations``, ``tta_flip``) are one value for all
    or a sequence, one per member. ``metadata`` (JSON-able values: classes, preprocessing,
    data version, names, framing...) goes into ``metadata_props`` as JSON texts, with the
    temperatures and the combination rule added here. The batch axis is dynamic. Before writing,
    onnxruntime's answer on ``check_faces`` (default: 16 random faces) must match PyTorch's within
    :data:`PARITY_TOLERANCE` (``RuntimeError`` otherwise); the file is written atomically.
    """
    if not members:
        raise ValueError("export needs at least one member")
    n = len(members)
    temps = [float(t) for t in _per_member(temperatures, n, "temperatures")]
    norms = _per_member(normalizations, n, "normalisations")
    flips = [bool(f) for f in _per_member(tta_flip, n, "flip settings")]
    if not all(t > 0 and np.isfinite(t) for t in temps):
        raise ValueError(f"temperatures must be finite numbers > 0, got {temps}")
    copies = [copy.deepcopy(m).float().to(memory_format=torch.contiguous_format).eval().cpu() for m in members]
    graph = _Ensemble(copies, norms, temps, flips).eval()
    h, w = input_size
    example = torch.zeros((2, h, w), dtype=torch.uint8)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress
        program = torch.onnx.export(graph, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=opset, dynamo=True, external_data=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    props = {**metadata, "format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "temperature": temps,
             "output": {"name": OUTPUT_NAME, "shape": ["batch", len(metadata.get("classes", ())) or None],
                        "combine": COMBINE}}
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    proto.producer_name = "fer-pipeline"
    blob = proto.SerializeToString()

    faces = check_faces if check_faces is not None else np.random.default_rng(0).integers(0, 256, (16, h, w), np.uint8)
    got = _run_onnx(blob, faces)
    want = reference_proba(members, faces, temperatures=temps, normalizations=norms, tta_flip=flips)
    diff = float(np.max(np.abs(got - want))) if len(faces) else 0.0
    if not diff <= PARITY_TOLERANCE:
        raise RuntimeError(f"exported graph disagrees with PyTorch: largest probability difference {diff:.2e} "
                           f"> {PARITY_TOLERANCE:g}; nothing written")
    return write_bytes(path, blob)


def _run_onnx(blob: bytes, faces: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(faces, np.uint8)})[0].astype(np.float64)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_metadata(models: Sequence[LoadedModel], name: str | None = None) -> dict[str, Any]:
    """The exported file's description from its members' checkpoints; ``ValueError`` when the
    members disagree on classes, input size, preprocessing or framing (they could not share one
    input, or one reading of the output)."""
    if not models:
        raise ValueError("export needs at least one model")
    first = models[0]
    for m in models[1:]:
        for what, a, b in (("classes", m.classes, first.classes), ("input size", m.input_size, first.input_size),
                           ("preprocessing", m.preprocess, first.preprocess),
                           ("framing", _framing_key(m), _framing_key(first))):
            if a != b:
                raise ValueError(f"ensemble members disagree on {what}: {m.name} has {a}, {first.name} has {b}")
    versions = sorted({str(m.metadata.get("data_version", "")) for m in models})
    framing = first.framing.to_dict()
    framing["rows"] = {k: sum(m.framing.rows.get(k, 0) for m in models) for k in first.framing.rows}
    h, w = first.input_size
    return {
        "model_name": name or first.name,
        "classes": list(first.classes),
        "preprocessing": {
            "input": INPUT_NAME, "dtype": "uint8", "shape": ["batch", h, w], "grayscale": True,
            "image_size": [h, w], "range": "0..255, as decoded: normalisation is inside the graph",
            "normalization": [m.normalization.to_dict() for m in models],
            "settings": {**first.preprocess.to_dict(), "key": first.preprocess.key},
            "steps": "crop framing: EXIF orientation, centre crop to the input's aspect, grayscale, resize "
                     "(fer_pipeline.faces.preprocess.decode_face); detect framing: detect, align with the "
                     "margin, grayscale, resize (fer_pipeline.faces.batch.detect_file)",
        },
        "data_version": versions[0] if len(versions) == 1 else versions,
        "members": [{"name": m.name, "normalization": m.normalization.to_dict(), "temperature": m.temperature,
                     "tta_flip": m.tta_flip, "architecture": m.arch.name,
                     "checkpoint_sha256": file_sha256(m.path) if m.path is not None else None} for m in models],
        "framing": framing,
        "torch_version": torch.__version__,
    }


def _framing_key(m: LoadedModel) -> tuple[Any, ...]:
    return (m.framing.mode, json.dumps(m.framing.detector, sort_keys=True), m.framing.margin)


def export_models(models: Sequence[LoadedModel], path: str | Path, *, name: str | None = None,
                  opset: int = OPSET, check_faces: np.ndarray | None = None) -> Path:
    """Export loaded checkpoints (one, or an ensemble's members) as one ONNX file at ``path``."""
    meta = export_metadata(models, name)
    return export_onnx([m.model for m in models], [m.temperature for m in models], meta, path,
                       normalizations=[m.normalization for m in models], input_size=models[0].input_size,
                       tta_flip=[m.tta_flip for m in models], opset=opset, check_faces=check_faces)
