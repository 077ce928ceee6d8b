"""The shipped model: what ``fer-pipeline predict`` uses by default, what the model card
describes and what an export writes. Plain Python + torch, no Dagster.

``<data root>/models/shipped.json`` (written by the ``shipped_model`` asset) records it:

* ``kind`` ``single`` (one checkpoint: the model with the best validation macro-F1) or
  ``ensemble`` (the cross-validation fold models, each calibrated on its own out-of-fold rows);
* ``members``: each member's checkpoint (relative to the data root) and temperature;
* ``selected_by`` and ``scores``: the estimate the choice was made on (validation or
  out-of-fold) and the test score, read once afterwards to report;
* ``data_version``: the published data the members were trained on.

:func:`load_shipped` returns the member networks with their temperatures (what an ONNX export
needs) and one :class:`~fer_pipeline.ml.checkpoint.LoadedModel` that predicts with all of them
(what ``predict`` needs). An ensemble's probability is the mean of its members' calibrated
probabilities (each member with the flip test-time averaging its checkpoint records).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_pipeline.config_yaml import short_repr
from fer_pipeline.ml.checkpoint import LoadedModel, load_checkpoint
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import (  # the file's format: with the other published formats (readable without torch)
    ENSEMBLE,
    KINDS,
    SHIPPED_FORMAT,
    SHIPPED_FORMAT_VERSION,
    SINGLE,
    ShippedMember,
    ShippedSpec,
)

__all__ = ["ENSEMBLE", "KINDS", "SHIPPED_FORMAT", "SHIPPED_FORMAT_VERSION", "SINGLE", "EnsembleModel", "Shipped",
           "ShippedMember", "ShippedSpec", "load_members", "load_shipped"]


@dataclass
class EnsembleModel(LoadedModel):
    """Several checkpoints of one recipe used as one model: the mean of the members' calibrated
    probabilities. Preprocessing, framing, classes and input size are the members' (they must
    agree); ``temperature`` is 1 because each member's own temperature is already applied."""

    members: list[LoadedModel] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, members: Sequence[LoadedModel], name: str = "ensemble") -> EnsembleModel:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        for m in members[1:]:
            for attr in ("classes", "input_size", "preprocess", "framing"):
                if getattr(m, attr) != getattr(first, attr):
                    raise ValueError(f"ensemble members disagree on {attr}: {m.path} vs {first.path}")
        meta = {**first.metadata, "model_name": name, "calibration": {},
                "ensemble": [str(m.path) for m in members]}
        return cls(model=first.model, arch=first.arch, classes=first.classes, input_size=first.input_size,
                   normalization=first.normalization, tta_flip=first.tta_flip, preprocess=first.preprocess,
                   metadata=meta, path=first.path, framing=first.framing, members=list(members))

    @property
    def temperature(self) -> float:
        return 1.0

    def predict_proba(self, faces: np.ndarray, batch_size: int = 512, calibrated: bool = True) -> np.ndarray:
        """Mean of the members' probabilities (each calibrated with its own temperature unless
        ``calibrated`` is False)."""
        return np.mean([m.predict_proba(faces, batch_size, calibrated) for m in self.members], axis=0)

    def predict_logits(self, faces: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Log of the mean calibrated probability: softmax of it gives the ensemble's probabilities."""
        return np.log(np.clip(self.predict_proba(faces, batch_size), 1e-300, None))


@dataclass
class Shipped:
    """The shipped model loaded: its record, the member networks (with their temperatures) and
    one model that predicts with all of them."""

    spec: ShippedSpec
    members: list[LoadedModel]
    path: Path

    @property
    def temperatures(self) -> list[float]:
        return [m.temperature for m in self.members]

    @property
    def model(self) -> LoadedModel:
        """What ``predict`` runs: the one checkpoint, or the ensemble of all of them."""
        if self.spec.kind == SINGLE:
            return self.members[0]
        return EnsembleModel.of(self.members, self.spec.name)


def load_shipped(where: DataPaths | str | os.PathLike[str], device: str = "cpu") -> Shipped:
    """Load the shipped model from a data root (or a ``shipped.json`` path).

    Refuses (``ValueError``) a record whose members no longer match it: a missing checkpoint,
    one trained on another data version, or whose temperature differs from the recorded one
    (retrained since the record was written: re-materialize ``shipped_model``)."""
    if isinstance(where, DataPaths):
        path, root = where.shipped_json, where.root
    else:
        path = Path(where)
        path = path / "models" / "shipped.json" if path.is_dir() else path
        root = path.parent.parent
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: materialize shipped_model")
    spec = ShippedSpec.read(path)
    members = load_members(spec.members, DataPaths(root), spec.data_version, str(path), device)
    return Shipped(spec, members, path)


def load_members(members: Sequence[ShippedMember], paths: DataPaths, data_version: str = "",
                 origin: str = "shipped model", device: str = "cpu") -> list[LoadedModel]:
    """Each member's checkpoint, checked against its record (under the data root, exists, trained
    on ``data_version`` when given, records the same temperature). ``shipped_model`` writes its
    members under the data root; a file that names one elsewhere (``../``, an absolute path, a link
    out) was not written by it and is refused before anything is read."""
    loaded_members = []
    root = paths.root.resolve()
    for m in members:
        ckpt = paths.resolve(m.checkpoint)
        if not ckpt.resolve().is_relative_to(root):
            raise ValueError(f"{origin}: member {m.name!r} names a checkpoint outside the data root {root}: "
                             f"{short_repr(m.checkpoint, 120)}")
        if not ckpt.is_file():
            raise ValueError(f"{origin}: member {m.name!r} has no checkpoint at {ckpt}: re-materialize shipped_model")
        loaded = load_checkpoint(ckpt, device)
        trained_on = loaded.metadata.get("data_version")
        if data_version and trained_on != data_version:
            raise ValueError(f"{origin}: member {m.name!r} ({ckpt}) was trained on data version {trained_on}, the "
                             f"shipped model on {data_version}: re-materialize shipped_model")
        if not math.isclose(loaded.temperature, m.temperature, rel_tol=1e-6):
            raise ValueError(f"{origin}: member {m.name!r} ({ckpt}) records temperature {loaded.temperature}, the "
                             f"shipped model {m.temperature}: re-materialize shipped_model")
        loaded_members.append(loaded)
    return loaded_members
