"""A source's framing as the faces stage runs it: the face-store key of its detection settings.

The settings themselves are the catalogue's (:class:`fer_pipeline.sources.framing.DetectSpec`);
what they mean for faces needs the detector (:mod:`.detect`), so it is added here. Only the
standard library is imported up front: face workers unpickle these and must start fast.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from fer_pipeline.sources.framing import CROP, DETECT, DetectSpec

if TYPE_CHECKING:
    from fer_pipeline.sources.catalog import SourceSpec

NO_FACE = "no face found"  # the reason of a photo in which the detector found no face
DETECT_VERSION = 1  # bump when detect -> align -> crop changes, so cached detected faces are recomputed


@dataclass(frozen=True)
class Detection(DetectSpec):
    """Detection settings with what the faces depend on: the detector's full settings
    (:meth:`settings`, what checkpoints record) and the face-store key (:attr:`key`)."""

    @classmethod
    def of(cls, spec: DetectSpec) -> Detection:
        return cls(**{f.name: getattr(spec, f.name) for f in fields(spec)})

    def settings(self) -> dict[str, Any]:
        """The detector's settings (its name under ``"detector"``), without loading it."""
        from fer_pipeline.faces.detect import DETECTORS

        return DETECTORS[self.detector].describe(**self.detector_options())

    @property
    def key(self) -> str:
        """The framing's fingerprint in the face store: the detector's settings, the margin and
        :data:`DETECT_VERSION`. Which faces are *kept* is not part of it: every face found is
        stored, so switching ``keep`` costs no detection."""
        payload = json.dumps({"version": DETECT_VERSION, "margin": float(self.margin), **self.settings()},
                             sort_keys=True)
        return f"detect-{hashlib.sha1(payload.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class SourceFraming:
    """How one source's files become faces: crops (``detection`` None) or detected faces, of which
    the largest (``keep_all`` False) or every one is kept."""

    detection: Detection | None = None
    keep_all: bool = False

    @property
    def key(self) -> str:
        """The framing in the face store: ``crop`` or the detection's fingerprint."""
        return CROP if self.detection is None else self.detection.key

    @classmethod
    def of(cls, spec: SourceSpec) -> SourceFraming:
        if spec.faces != DETECT or spec.detect is None:
            return cls()
        return cls(Detection.of(spec.detect), keep_all=spec.detect.keep_all)
