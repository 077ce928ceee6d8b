"""An exported model (one ONNX file, written by :mod:`.export`) run on onnxruntime, without torch.

The file is self-describing, like a checkpoint: its ``metadata_props`` hold what a deployment
needs to feed it and read its answer (:data:`METADATA_KEYS`), each value a JSON text:

* ``classes`` (output order), ``preprocessing`` (input name, dtype and shape, grayscale, the
  preprocessing settings the training faces went through, where normalisation happens),
  ``temperature`` (per member), ``data_version``, ``model_name`` and ``members`` (name,
  normalisation, temperature, flip averaging, source checkpoint hash), ``framing`` (crop /
  detect / mixed, the detector's settings and margin).

The graph takes preprocessed uint8 faces ``(N, H, W)`` (the same arrays
:meth:`fer_pipeline.ml.checkpoint.LoadedModel.predict_proba` takes) and returns calibrated
probabilities ``(N, C)``: normalisation, flip averaging, temperature and the ensemble mean are
all inside, so a consumer only decodes and resizes. This module imports no torch, so ``predict``
on onnxruntime starts in a fraction of the time (importing torch alone takes seconds here).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.ml.framing import Framing

ONNX_FORMAT = "fer-pipeline-onnx"
ONNX_FORMAT_VERSION = 1
INPUT_NAME = "faces"
OUTPUT_NAME = "probabilities"
OPSET = 18  # ai.onnx opset the exporter targets: onnxruntime >= 1.14 runs it
PARITY_TOLERANCE = 1e-4  # largest |p_torch - p_onnx| accepted, at export and in the tests
METADATA_KEYS = ("format", "format_version", "model_name", "classes", "preprocessing", "temperature",
                 "data_version", "members", "framing", "output")


@dataclass
class OnnxModel:
    """An exported model on onnxruntime with its description; it answers like a
    :class:`~fer_pipeline.ml.checkpoint.LoadedModel` (``classes``, ``preprocess``, ``framing``,
    :meth:`predict_proba`), so ``predict`` runs either."""

    session: Any = field(repr=False)  # onnxruntime.InferenceSession
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    preprocess: PreprocessSettings
    framing: Framing
    metadata: dict[str, Any] = field(repr=False)
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("model_name") or "exported")

    @property
    def temperature(self) -> list[float]:
        """The members' calibration temperatures (applied inside the graph)."""
        return [float(t) for t in self.metadata.get("temperature", [])]

    def predict_proba(self, faces: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Calibrated probabilities (N, len(classes)), float64, for preprocessed uint8 faces (N, H, W)."""
        faces = np.asarray(faces)
        if faces.ndim != 3 or tuple(faces.shape[1:]) != self.input_size:
            raise ValueError(f"expected faces of shape (N, {self.input_size[0]}, {self.input_size[1]}), got {faces.shape}")
        faces = np.ascontiguousarray(faces, dtype=np.uint8)
        outs = [self.session.run([OUTPUT_NAME], {INPUT_NAME: faces[i:i + batch_size]})[0]
                for i in range(0, len(faces), batch_size)]
        if not outs:
            return np.zeros((0, len(self.classes)))
        return np.concatenate(outs).astype(np.float64)


def _field(raw: dict[str, str], key: str, origin: str) -> Any:
    if key not in raw:
        raise ValueError(f"{origin}: exported model has no {key!r} metadata")
    try:
        return json.loads(raw[key])
    except ValueError:
        raise ValueError(f"{origin}: exported model's {key!r} metadata is not JSON") from None


def parse_metadata(raw: dict[str, str], origin: str) -> dict[str, Any]:
    """The JSON-decoded metadata of an exported model (``ValueError`` when it is not one of ours)."""
    if raw.get("format") != json.dumps(ONNX_FORMAT):
        raise ValueError(f"{origin} is not a fer-pipeline ONNX export (no 'format' = {ONNX_FORMAT!r} metadata)")
    meta = {key: _field(raw, key, origin) for key in METADATA_KEYS}
    if meta["format_version"] != ONNX_FORMAT_VERSION:
        raise ValueError(f"{origin}: unknown export format version {meta['format_version']!r}")
    temps = meta["temperature"]
    if not isinstance(temps, list) or not temps or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in temps):
        raise ValueError(f"{origin}: broken model: temperatures {temps!r} (must be finite numbers > 0)")
    return meta


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxModel:
    """Open an exported model on onnxruntime's CPU provider (``threads``: intra-op threads,
    default onnxruntime's, one per core). ``ValueError`` when the file is not a fer-pipeline
    export or its description is broken."""
    import onnxruntime as ort

    path = Path(path)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own types for unreadable models
        raise ValueError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
    meta = parse_metadata(dict(session.get_modelmeta().custom_metadata_map), str(path))
    pre = meta["preprocessing"]
    try:
        settings = PreprocessSettings.from_dict({k: v for k, v in pre["settings"].items() if k != "key"})
        framing = Framing.from_dict(meta["framing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed exported metadata: {exc}") from None
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME] or list(inputs[0].shape[1:]) != list(settings.image_size):
        raise ValueError(f"{path}: the graph's input {[(i.name, i.shape) for i in inputs]} is not "
                         f"{INPUT_NAME!r} of shape (N, {settings.image_size[0]}, {settings.image_size[1]})")
    return OnnxModel(session=session, classes=tuple(meta["classes"]), input_size=tuple(settings.image_size),
                     preprocess=settings, framing=framing, metadata=meta, path=path)
