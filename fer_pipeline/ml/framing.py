"""How a model's training faces were framed (:class:`Framing`), as its checkpoint or exported
ONNX file records it, so prediction frames its inputs the same way.

Kept apart from :mod:`.checkpoint` and free of torch: ``predict`` on onnxruntime reads it without
importing torch (its import alone takes seconds on a small machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fer_pipeline.sources.framing import CROP, MIXED, MODEL_FRAMINGS


@dataclass(frozen=True)
class Framing:
    """How the training faces were framed, so prediction frames its inputs the same way.

    ``mode``: "crop" (each image is a face crop, centre-cropped and resized: what checkpoints
    written before this was recorded did), "detect" (faces found by a detector and aligned) or
    "mixed" (both; prediction decides per image, :func:`fer_pipeline.ml.predict.looks_like_crop`). ``detector`` is the detector's ``settings()`` (its name
    under ``"detector"``: :meth:`fer_pipeline.faces.framing.Detection.settings`) and ``margin`` the
    margin given to ``align_face``; both are ``None`` for "crop". ``rows`` counts the training rows
    per framing (for people reading the metadata)."""

    mode: str = CROP
    detector: dict[str, Any] | None = None
    margin: float | None = None
    rows: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fer_pipeline.faces.detect import DETECTORS

        if self.mode not in MODEL_FRAMINGS:
            raise ValueError(f"framing mode must be one of {', '.join(MODEL_FRAMINGS)}, got {self.mode!r}")
        if self.detector is not None:
            if not isinstance(self.detector, dict) or not isinstance(self.detector.get("detector"), str):
                raise ValueError(f"framing detector must be a settings object naming its detector, got {self.detector!r}")
            if self.detector["detector"] not in DETECTORS:
                raise ValueError(f"framing detector {self.detector['detector']!r} is unknown; "
                                 f"known: {', '.join(sorted(DETECTORS))}")
        if self.margin is not None and (isinstance(self.margin, bool) or not isinstance(self.margin, (int, float))
                                        or not math.isfinite(self.margin) or self.margin < 0):
            raise ValueError(f"framing margin must be a finite number >= 0, got {self.margin!r}")
        if self.detects and (self.detector is None or self.margin is None):
            raise ValueError(f"framing {self.mode!r} needs the detector's settings and the margin")

    @property
    def detects(self) -> bool:
        """Whether inputs go through face detection ("detect" and "mixed")."""
        return self.mode != CROP

    @property
    def per_image(self) -> bool:
        """Whether each input is judged crop or photo on its own ("mixed": trained on both kinds)."""
        return self.mode == MIXED

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "detector": self.detector, "margin": self.margin, "rows": dict(self.rows)}

    @classmethod
    def from_dict(cls, data: Any) -> Framing:
        """A recorded framing (``ValueError`` when it is malformed; unknown keys are ignored)."""
        if not isinstance(data, dict):
            raise ValueError(f"framing must be an object, got {data!r}")  # noqa: TRY004 -- bad metadata, one error type
        rows = data.get("rows") or {}
        if not isinstance(rows, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in rows.values()):
            raise ValueError(f"framing rows must map framings to counts, got {rows!r}")
        return cls(mode=data.get("mode", CROP), detector=data.get("detector"), margin=data.get("margin"),
                   rows={str(k): int(v) for k, v in rows.items()})
