"""Procedural demo faces, written as an ordinary "image folders" source.

No real face dataset can ship with the project, so the demo data is drawn here: cartoon faces
whose expression cues (brows, eyelids, gaze, mouth, head pose) are sampled from per-class normal
distributions with a shared spread, so the classes overlap and a classifier can do well but not
perfectly. Nuisance variation (shape, skin, pose, light, noise), imbalanced demographics that
change appearance, and deliberate defects (duplicates, near-duplicates, broken files, a label
conflict) give every cleaning and analysis step real work. Output is byte-identical for the same
parameters, so re-runs of the pipeline see the same raw files. The planted defects are listed
in the hidden ``.defects.json`` (ground truth for tests of the cleaning steps).

:func:`generate_demo_pool` draws other expressions than the four classes (:data:`POOL_EXPRESSIONS`:
a broad smile, raised brows over an open mouth, raised inner brows over a frown) for a
``role: pretrain`` source: the demo's pretraining pool.

Plain numpy + pillow on purpose: this module must not depend on the orchestration layer.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from fer_pipeline.atomic import write_bytes, write_json, write_text
from fer_pipeline.classes import CLASSES

GENERATOR_VERSION = 1
MARKER_NAME = ".complete"
IN_PROGRESS_NAME = ".in_progress"
MANIFEST_NAME = ".defects.json"
DEMOGRAPHICS_NAME = "demographics.csv"
README_NAME = "README.txt"

GENDERS: tuple[str, ...] = ("male", "female")
GENDER_P: tuple[float, ...] = (0.70, 0.30)
AGE_GROUPS: tuple[str, ...] = ("young", "middle", "senior")
AGE_P: tuple[float, ...] = (0.55, 0.35, 0.10)
# Roughly balanced but not perfectly, in CLASSES order.
CLASS_WEIGHTS: tuple[float, ...] = (0.28, 0.25, 0.24, 0.23)

SUPERSAMPLE = 3  # draw at 3x and box-downscale: cheap anti-aliasing
PNG_OPTIONS: dict[str, Any] = {"format": "PNG", "compress_level": 6, "optimize": False}
JPEG_CLEAN_QUALITY = 92


# --------------------------------------------------------------------------------------------
# Expression cues
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CueSpec:
    """Per-class means of one facial cue; all classes share ``sd`` so their ranges overlap."""

    sd: float
    means: tuple[float, float, float, float]  # in CLASSES order
    lo: float = -math.inf
    hi: float = math.inf


# Units: angles in degrees; lengths as fractions of the face half-width ``a``; the rest 0..1.
CUES: dict[str, CueSpec] = {
    # + = inner ends pulled down toward the nose (the angry "V"); - = inner ends raised.
    "brow_angle": CueSpec(7.0, (0.0, -2.0, -5.0, 11.0), -25.0, 30.0),
    # + = brows raised above their rest height.
    "brow_raise": CueSpec(0.06, (0.0, 0.05, 0.02, -0.09), -0.25, 0.25),
    # vertical creases between the brows (concentration, anger).
    "brow_furrow": CueSpec(0.25, (0.05, 0.30, 0.0, 0.70), 0.0, 1.0),
    # fraction of the fully open upper lid.
    "eye_open": CueSpec(0.13, (0.62, 0.84, 0.36, 0.45), 0.10, 1.0),
    # + = looking down, as a fraction of the eye half-height.
    "gaze_down": CueSpec(0.22, (0.0, -0.05, 0.40, 0.05), -0.6, 0.8),
    # sideways gaze magnitude (random sign): Focused looks straight ahead, Tired stares off.
    "gaze_off": CueSpec(0.12, (0.12, 0.02, 0.25, 0.08), 0.0, 0.6),
    # dark half-moons under the eyes.
    "eye_bags": CueSpec(0.22, (0.10, 0.05, 0.60, 0.15), 0.0, 1.0),
    # + = corners up (smile), - = frown; corner height as a fraction of ``a``.
    "mouth_curve": CueSpec(0.06, (0.05, 0.0, -0.03, -0.11), -0.25, 0.2),
    # mouth half-width.
    "mouth_width": CueSpec(0.05, (0.36, 0.33, 0.37, 0.30), 0.18, 0.50),
    # lip thickness; thin = pressed/tight.
    "lip_thickness": CueSpec(0.016, (0.060, 0.045, 0.062, 0.030), 0.010, 0.11),
    # slack open mouth.
    "mouth_open": CueSpec(0.035, (0.0, -0.02, 0.06, -0.03), 0.0, 0.16),
    # in-plane head tilt magnitude (random sign).
    "head_tilt": CueSpec(5.0, (0.0, 0.0, 9.0, 0.0), 0.0, 25.0),
    # + = head hangs forward: features sit lower in the face.
    "head_droop": CueSpec(0.04, (0.0, -0.01, 0.06, 0.02), -0.08, 0.15),
}


# Expressions that are not the four classes, for the pretraining pool: cue means (the spreads
# are CUES'), each a distinct drawing rather than a shade of a class.
POOL_EXPRESSIONS: dict[str, dict[str, float]] = {
    "happy": {"brow_angle": -3.0, "brow_raise": 0.04, "brow_furrow": 0.0, "eye_open": 0.55, "gaze_down": 0.0,
              "gaze_off": 0.08, "eye_bags": 0.05, "mouth_curve": 0.15, "mouth_width": 0.44, "lip_thickness": 0.05,
              "mouth_open": 0.06, "head_tilt": 3.0, "head_droop": -0.01},
    "surprised": {"brow_angle": -9.0, "brow_raise": 0.16, "brow_furrow": 0.0, "eye_open": 0.98, "gaze_down": -0.1,
                  "gaze_off": 0.03, "eye_bags": 0.05, "mouth_curve": 0.0, "mouth_width": 0.24,
                  "lip_thickness": 0.055, "mouth_open": 0.14, "head_tilt": 2.0, "head_droop": -0.03},
    "sad": {"brow_angle": -15.0, "brow_raise": 0.03, "brow_furrow": 0.3, "eye_open": 0.5, "gaze_down": 0.5,
            "gaze_off": 0.12, "eye_bags": 0.3, "mouth_curve": -0.16, "mouth_width": 0.32, "lip_thickness": 0.045,
            "mouth_open": 0.0, "head_tilt": 7.0, "head_droop": 0.08},
}
EXPRESSIONS: tuple[str, ...] = (*CLASSES, *POOL_EXPRESSIONS)
"""Everything :func:`sample_face_params` can draw: the four classes, then the pool's expressions."""


@dataclass(frozen=True)
class FaceParams:
    """Everything needed to draw one face; sampled by :func:`sample_face_params`."""

    label: str
    gender: str
    age_group: str
    cues: dict[str, float]
    # nuisance / appearance
    face_aspect: float
    scale: float
    offset: tuple[float, float]
    rotation: float
    skin: tuple[int, int, int]
    hair_color: tuple[int, int, int]
    hair_style: str
    iris_color: tuple[int, int, int]
    clothing: tuple[int, int, int]
    brow_thickness: float
    wrinkles: float
    fringe: float  # side-swept fringe depth (sign = side); deep ones hide part of a brow
    glasses: bool
    bg_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    bg_angle: float
    light_angle: float
    light_strength: float
    noise_sigma: float
    blur_radius: float


# How strongly each group's expressions show (1 = fully): seniors' class means are pulled
# toward the all-class average, so their classes overlap more.
EXPRESSIVENESS: dict[str, float] = {"senior": 0.8}


def _sample_cues(label: str, age_group: str, rng: np.random.Generator) -> dict[str, float]:
    expressiveness = EXPRESSIVENESS.get(age_group, 1.0)
    cues: dict[str, float] = {}
    for name, spec in CUES.items():
        centre = sum(spec.means) / len(spec.means)
        target = spec.means[CLASSES.index(label)] if label in CLASSES else POOL_EXPRESSIONS[label][name]
        mean = centre + (target - centre) * expressiveness
        cues[name] = float(np.clip(rng.normal(mean, spec.sd), spec.lo, spec.hi))
    # magnitudes get a random sign: the cue is "how much", not "which side"
    cues["gaze_side"] = cues.pop("gaze_off") * float(rng.choice((-1.0, 1.0)))
    cues["head_tilt"] *= float(rng.choice((-1.0, 1.0)))
    return cues


# Per demographic group: cue -> (mean shift, extra sd). The shift makes a group's resting face
# resemble another class; the extra spread is cue-like clutter (age lines that look like frown
# lines or bags, brow shapes), which lowers the signal-to-noise ratio for that group.
DEMOGRAPHIC_EFFECTS: dict[str, dict[str, tuple[float, float]]] = {
    "female": {
        "brow_raise": (0.05, 0.06),
        "brow_angle": (0.0, 5.0),
        "lip_thickness": (0.015, 0.015),
        "mouth_curve": (0.0, 0.04),
    },
    "middle": {"eye_open": (-0.03, 0.05), "eye_bags": (0.10, 0.10), "brow_furrow": (0.05, 0.10)},
    "senior": {
        "eye_open": (-0.10, 0.10),
        "eye_bags": (0.25, 0.20),
        "brow_furrow": (0.20, 0.25),
        "brow_angle": (0.0, 5.0),
        "mouth_curve": (-0.04, 0.05),
    },
}


def _apply_demographics(
    cues: dict[str, float], gender: str, age_group: str, rng: np.random.Generator
) -> dict[str, float]:
    """Make under-represented groups look different *and* read less clearly.

    Women get higher resting brows and fuller lips (reads as Focused, hides tight lips), seniors
    droopier lids, bags and frown lines (reads as Tired/Angry) and less pronounced expressions.
    Since the data is mostly young men, a model learns their baseline, which is what a later
    bias analysis should find.
    """
    cues = dict(cues)
    for group in (gender, age_group):
        for name, (shift, extra_sd) in DEMOGRAPHIC_EFFECTS.get(group, {}).items():
            spec = CUES[name]
            cues[name] = float(np.clip(cues[name] + shift + rng.normal(0.0, extra_sd), spec.lo, spec.hi))
    return cues


# --------------------------------------------------------------------------------------------
# Appearance sampling
# --------------------------------------------------------------------------------------------

_SKIN_LIGHT = np.array([241, 206, 180], dtype=float)
_SKIN_DARK = np.array([98, 64, 45], dtype=float)
_HAIR_COLORS: tuple[tuple[int, int, int], ...] = (
    (28, 24, 22), (62, 42, 30), (105, 72, 45), (196, 160, 98), (128, 58, 32), (45, 35, 30),
)

_IRIS_COLORS: tuple[tuple[int, int, int], ...] = ((70, 45, 25), (60, 90, 120), (80, 95, 60), (40, 30, 25))


def _rgb(x: np.ndarray | tuple[float, ...]) -> tuple[int, int, int]:
    r, g, b = (int(round(float(v))) for v in np.clip(np.asarray(x, dtype=float), 0, 255))
    return (r, g, b)


def _hair_color(age_group: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(_HAIR_COLORS[int(rng.integers(len(_HAIR_COLORS)))], dtype=float)
    grey_lo, grey_hi = {"young": (0.0, 0.0), "middle": (0.0, 0.45), "senior": (0.6, 1.0)}[age_group]
    grey = float(rng.uniform(grey_lo, grey_hi))
    grey_tone = np.full(3, rng.uniform(150, 215))
    return _rgb(base * (1 - grey) + grey_tone * grey)


def _hair_style(gender: str, age_group: str, rng: np.random.Generator) -> str:
    if gender == "female":
        return str(rng.choice(["long", "long", "bob"] if age_group != "senior" else ["bob", "bob", "long"]))
    bald_p = {"young": 0.03, "middle": 0.15, "senior": 0.45}[age_group]
    return "bald" if rng.random() < bald_p else str(rng.choice(["short", "short", "crop"]))


def _wrinkles(age_group: str, rng: np.random.Generator) -> float:
    lo, hi = {"young": (0.0, 0.05), "middle": (0.1, 0.4), "senior": (0.6, 1.0)}[age_group]
    return float(rng.uniform(lo, hi))


def _fringe(gender: str, rng: np.random.Generator) -> float:
    if gender != "female" or rng.random() < 0.3:
        return 0.0
    return float(rng.uniform(0.2, 1.0) * rng.choice((-1.0, 1.0)))


def sample_face_params(label: str, gender: str, age_group: str, rng: np.random.Generator) -> FaceParams:
    """Draw the cues for ``label`` (one of :data:`EXPRESSIONS`) plus all nuisance and demographic
    appearance for one face."""
    if label not in EXPRESSIONS:
        raise ValueError(f"unknown class {label!r}; expected one of {EXPRESSIONS}")
    if gender not in GENDERS or age_group not in AGE_GROUPS:
        raise ValueError(f"unknown demographics {gender!r}/{age_group!r}")
    cues = _apply_demographics(_sample_cues(label, age_group, rng), gender, age_group, rng)
    skin_t = float(rng.beta(1.6, 1.6))
    bg_a = rng.uniform(35, 225, size=3)
    bg_b = np.clip(bg_a + rng.normal(0, 45, size=3), 0, 255)
    glasses_p = {"young": 0.05, "middle": 0.12, "senior": 0.35}[age_group]
    return FaceParams(
        label=label,
        gender=gender,
        age_group=age_group,
        cues=cues,
        face_aspect=float(rng.uniform(1.15, 1.40)) - (0.05 if gender == "female" else 0.0),
        scale=float(np.clip(rng.normal(1.0, 0.07), 0.82, 1.18)),
        offset=(float(rng.normal(0, 0.03)), float(rng.normal(0, 0.025))),
        rotation=float(rng.normal(0, 4.0)),
        skin=_rgb(_SKIN_LIGHT * (1 - skin_t) + _SKIN_DARK * skin_t + rng.normal(0, 6, size=3)),
        hair_color=_hair_color(age_group, rng),
        hair_style=_hair_style(gender, age_group, rng),
        iris_color=_IRIS_COLORS[int(rng.integers(len(_IRIS_COLORS)))],
        clothing=_rgb(rng.uniform(20, 230, size=3)),
        brow_thickness=float(rng.uniform(0.03, 0.045) if gender == "female" else rng.uniform(0.065, 0.095)),
        wrinkles=_wrinkles(age_group, rng),
        fringe=_fringe(gender, rng),
        glasses=bool(rng.random() < glasses_p),
        bg_colors=(_rgb(bg_a), _rgb(bg_b)),
        bg_angle=float(rng.uniform(0, 2 * math.pi)),
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0.0, 0.35)),
        noise_sigma=float(rng.uniform(1.0, 8.0)),
        blur_radius=float(rng.uniform(0.4, 1.0)) if rng.random() < 0.12 else 0.0,
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _shade(
    color: tuple[int, int, int], factor: float, tint: tuple[float, float, float] = (1, 1, 1)
) -> tuple[int, int, int, int]:
    """``color`` scaled by ``factor`` (and a per-channel tint), as opaque RGBA."""
    r, g, b = _rgb(np.array(color, dtype=float) * factor * np.array(tint))
    return (r, g, b, 255)


def _mix(c1: tuple[int, ...], c2: tuple[int, ...], t: float) -> tuple[int, int, int, int]:
    """Blend two colours; ImageDraw on RGBA does not alpha-blend, so faint lines are pre-mixed."""
    r, g, b = _rgb(np.array(c1[:3], dtype=float) * (1 - t) + np.array(c2[:3], dtype=float) * t)
    return (r, g, b, 255)


@dataclass(frozen=True)
class _Geom:
    """Face geometry in hi-res pixels: centre, half-axes, and where the features sit."""

    cx: float
    cy: float
    a: float  # face half-width
    b: float  # face half-height
    eye_y: float
    eye_dx: float
    brow_y: float
    nose_y: float
    mouth_y: float

    def x(self, frac: float) -> float:
        """Horizontal position ``frac`` face half-widths right of the centre line."""
        return self.cx + frac * self.a

    def lw(self, frac: float) -> int:
        """Line width of ``frac`` face half-widths, at least one pixel."""
        return max(1, int(frac * self.a))

    @property
    def brow_rest_y(self) -> float:
        """Where relaxed brows sit; hair is anchored here so raised brows really move."""
        return self.eye_y - 0.30 * self.a


def _geometry(p: FaceParams, width: int, height: int) -> _Geom:
    s = min(width, height)
    a = 0.27 * s * p.scale
    b = a * p.face_aspect
    cx = width / 2 + p.offset[0] * s
    cy = height * 0.47 + p.offset[1] * s
    droop = p.cues["head_droop"] * b
    eye_y = cy - 0.10 * b + droop
    return _Geom(
        cx=cx, cy=cy, a=a, b=b,
        eye_y=eye_y,
        eye_dx=0.40 * a,
        brow_y=eye_y - (0.30 + p.cues["brow_raise"]) * a,
        nose_y=cy + 0.24 * b + droop * 0.8,
        mouth_y=cy + 0.52 * b + droop * 0.6,
    )


def _ellipse(d: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: Any) -> None:
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)


def _draw_hair_back(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    """Long hair falls behind the head and shoulders; a bald head keeps a fringe above the ears."""
    if p.hair_style == "bald":
        for side in (-1, 1):
            _ellipse(d, g.x(side * 0.9), g.eye_y - 0.05 * g.a, 0.17 * g.a, 0.34 * g.a, p.hair_color + (255,))
        return
    if p.hair_style != "long":
        return
    col = _shade(p.hair_color, 0.85)
    _ellipse(d, g.cx, g.cy - 0.05 * g.b, 1.28 * g.a, 1.12 * g.b, col)
    d.rectangle((g.cx - 1.28 * g.a, g.cy, g.cx + 1.28 * g.a, g.cy + 1.45 * g.b), fill=col)


def _draw_body(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    d.rectangle((g.x(-0.42), g.cy + 0.5 * g.b, g.x(0.42), g.cy + 1.6 * g.b), fill=_shade(p.skin, 0.82))  # neck
    _ellipse(d, g.cx, g.cy + g.b + 0.95 * g.a, 2.3 * g.a, 0.85 * g.a, p.clothing + (255,))
    for side in (-1, 1):  # ears
        _ellipse(d, g.cx + side * 0.98 * g.a, g.eye_y + 0.12 * g.a, 0.15 * g.a, 0.27 * g.a, _shade(p.skin, 0.93))


def _draw_hair_front(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    """Hair on top of the head; its shape depends on the sampled style."""
    if p.hair_style == "bald":
        return
    col = p.hair_color + (255,)
    hairline = g.brow_rest_y - 0.40 * g.a - 0.12 * g.a * p.wrinkles  # receding a little with age
    top = g.cy - g.b - 0.10 * g.a
    thick = {"short": 0.08, "crop": 0.02, "bob": 0.12, "long": 0.12}[p.hair_style] * g.a
    half_h = hairline - top
    # upper half of an ellipse whose centre line is the hairline: a cap over the forehead
    d.chord((g.cx - g.a - thick, top - thick, g.cx + g.a + thick, hairline + half_h), 180, 360, fill=col)
    side_len = {"short": 0.35, "crop": 0.25, "bob": 0.95, "long": 1.1}[p.hair_style] * g.a
    for side in (-1, 1):  # sideburns / side curtains
        x0 = g.cx + side * (g.a + thick * 0.6)
        x1 = g.cx + side * (g.a - (0.16 if p.hair_style in ("bob", "long") else 0.08) * g.a)
        pts = [(x0, hairline - 0.2 * g.a), (x1, hairline - 0.1 * g.a), (x1, hairline + side_len * 0.6), (x0, hairline + side_len)]
        d.polygon(pts, fill=col)


def _pts(xs: Any, ys: Any) -> list[tuple[float, float]]:
    """Zip coordinate arrays into the list of float pairs ImageDraw wants."""
    return [(float(x), float(y)) for x, y in zip(xs, ys)]


def _curve(cx: float, cy: float, half_w: float, ys: np.ndarray) -> list[tuple[float, float]]:
    xs = np.linspace(-1.0, 1.0, len(ys))
    return [(cx + float(x) * half_w, cy + float(y)) for x, y in zip(xs, ys)]


def _draw_forehead_wrinkles(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    if p.wrinkles < 0.15:
        return
    col = _mix(p.skin, _shade(p.skin, 0.55), min(1.0, p.wrinkles))
    n = 1 + int(p.wrinkles * 3)
    xs = np.linspace(-1, 1, 9)
    for i in range(n):
        y = g.brow_y - (0.14 + 0.09 * i) * g.a
        d.line(_curve(g.cx, y, 0.45 * g.a, 0.04 * g.a * xs**2), fill=col, width=g.lw(0.022))


def _draw_brows(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    """Tapered, slightly arched brows; ``brow_angle`` pulls the inner ends down (anger)."""
    # thin, pale brows (women) and grey ones (seniors) carry the brow cues with less contrast
    col = _mix(p.skin, _shade(p.hair_color, 0.75), 0.65 if p.gender == "female" else 1.0)
    tan = math.tan(math.radians(p.cues["brow_angle"]))
    t = np.linspace(0.0, 1.0, 9)
    thick_in, thick_out = p.brow_thickness * g.a, p.brow_thickness * g.a * 0.55
    for side in (-1, 1):
        x_in, x_out = g.cx + side * 0.13 * g.a, g.cx + side * 0.66 * g.a
        half_len = abs(x_out - x_in) / 2
        y_in, y_out = g.brow_y + tan * half_len, g.brow_y - tan * half_len
        xs = x_in + (x_out - x_in) * t
        ys = y_in + (y_out - y_in) * t - 0.06 * g.a * np.sin(np.pi * t)
        th = thick_in + (thick_out - thick_in) * t
        top = list(zip(xs, ys - th / 2))
        bottom = list(zip(xs[::-1], (ys + th / 2)[::-1]))
        d.polygon([(float(x), float(y)) for x, y in top + bottom], fill=col)


def _draw_fringe(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    """Drawn after the brows on purpose: a deep fringe occludes one brow's outer half."""
    if p.fringe == 0.0 or p.hair_style == "bald":
        return
    side = 1.0 if p.fringe > 0 else -1.0
    y = g.brow_rest_y
    tip_y = y - 0.2 * g.a + 0.38 * g.a * abs(p.fringe)
    pts = [
        (g.x(side * 1.0), y - 0.55 * g.a),
        (g.x(-side * 0.35), y - 0.5 * g.a),
        (g.x(side * 0.35), y - 0.25 * g.a),
        (g.x(side * 0.8), tip_y),
        (g.x(side * 1.0), tip_y - 0.1 * g.a),
    ]
    d.polygon(pts, fill=p.hair_color + (255,))


def _draw_furrow(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    k = p.cues["brow_furrow"]
    if k < 0.08:
        return
    col = _mix(p.skin, _shade(p.skin, 0.5), k)
    y0 = g.brow_y - 0.05 * g.a
    for side in (-1, 1):
        x = g.cx + side * 0.06 * g.a
        d.line([(x, y0), (x + side * 0.02 * g.a, y0 + 0.2 * g.a * (0.5 + k))], fill=col, width=g.lw(0.025))


def _eye_outline(
    p: FaceParams, ex: float, ey: float, w: float, h: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, upper-lid y, lower-lid y of an almond eye; ``eye_open`` lowers the upper lid."""
    x = np.linspace(-1.0, 1.0, 17)
    bulge = np.clip(1 - x**2, 0, None)
    openness = p.cues["eye_open"]
    upper = ey - h * (0.15 + 0.85 * openness) * bulge**0.7
    lower = ey + h * (0.30 + 0.25 * openness) * bulge**0.9
    return ex + x * w, upper, lower


def _draw_eye(layer: Image.Image, d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom, side: int) -> None:
    w, h = 0.23 * g.a, 0.17 * g.a
    ex, ey = g.cx + side * g.eye_dx, g.eye_y
    xs, upper, lower = _eye_outline(p, ex, ey, w, h)
    almond = _pts(xs, upper) + _pts(xs[::-1], lower[::-1])
    # Draw sclera + iris in a small patch, then paste it through the almond mask (clipping the iris).
    x0, y0 = int(ex - w) - 2, int(ey - h) - 2
    size = (int(2 * w) + 5, int(2 * h) + 5)
    patch = Image.new("RGB", size, (238, 236, 230))
    pd = ImageDraw.Draw(patch)
    ix = ex + p.cues["gaze_side"] * w * 0.55 - x0
    iy = ey + p.cues["gaze_down"] * h * 0.6 - y0
    r = 0.52 * h
    _ellipse(pd, ix, iy, r, r, p.iris_color)
    _ellipse(pd, ix, iy, r * 0.45, r * 0.45, (12, 10, 10))
    _ellipse(pd, ix - r * 0.3, iy - r * 0.35, r * 0.18, r * 0.18, (250, 250, 250))
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in almond], fill=255)
    layer.paste(patch, (x0, y0), mask)
    # eyelid line (lashes) and the crease above it; the crease sits on the lid, so it follows it
    lid_w = max(1, int((0.05 if p.gender == "female" else 0.035) * g.a))
    d.line(_pts(xs, upper), fill=(25, 18, 15, 255), width=lid_w)
    d.line(_pts(xs, lower), fill=_shade(p.skin, 0.6), width=g.lw(0.012))
    crease = np.minimum(upper - 0.08 * g.a, ey - 0.75 * h * (1 - np.linspace(-1, 1, len(xs)) ** 2) ** 0.7)
    d.line(_pts(xs[2:-2], crease[2:-2]), fill=_shade(p.skin, 0.72), width=g.lw(0.02))
    _draw_under_eye(d, p, g, xs, lower, side)


def _draw_under_eye(
    d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom, xs: np.ndarray, lower: np.ndarray, side: int
) -> None:
    """Tiredness bags, plus age lines that clutter the same region (harder for seniors)."""
    bags = p.cues["eye_bags"]
    if bags > 0.08:
        col = _mix(p.skin, _shade(p.skin, 0.62, (0.95, 0.9, 1.05)), bags)
        pts = [(float(x), float(y + 0.07 * g.a)) for x, y in zip(xs[3:-3], lower[3:-3])]
        d.line(pts, fill=col, width=max(1, int(0.05 * g.a * (0.4 + bags))))
    if p.wrinkles > 0.3:  # crow's feet at the outer corner + a second under-eye line
        col = _mix(p.skin, _shade(p.skin, 0.55), p.wrinkles)
        ox, oy = float(xs[-1] if side > 0 else xs[0]), float(lower[-1])
        for k in (-1, 0, 1):
            start, end = (ox + side * 0.05 * g.a, oy + k * 0.04 * g.a), (ox + side * 0.2 * g.a, oy + k * 0.09 * g.a)
            d.line([start, end], fill=col, width=g.lw(0.015))
        pts = [(float(x), float(y + 0.13 * g.a)) for x, y in zip(xs[4:-4], lower[4:-4])]
        d.line(pts, fill=col, width=g.lw(0.015))


def _draw_nose(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    shadow = _shade(p.skin, 0.7)
    bridge = [(g.x(0.05), g.eye_y + 0.1 * g.a), (g.x(0.09), g.nose_y - 0.05 * g.a)]
    d.line(bridge, fill=_shade(p.skin, 0.85), width=g.lw(0.025))
    tip = (g.x(-0.16), g.nose_y - 0.12 * g.a, g.x(0.16), g.nose_y + 0.06 * g.a)
    d.arc(tip, 20, 160, fill=shadow, width=g.lw(0.03))
    for side in (-1, 1):
        _ellipse(d, g.cx + side * 0.08 * g.a, g.nose_y, 0.035 * g.a, 0.022 * g.a, _shade(p.skin, 0.45))
    if p.wrinkles > 0.5:  # nasolabial folds
        col = _mix(p.skin, _shade(p.skin, 0.6), p.wrinkles)
        for side in (-1, 1):
            fold = [(g.x(side * 0.2), g.nose_y), (g.x(side * 0.42), g.mouth_y + 0.05 * g.a)]
            d.line(fold, fill=col, width=g.lw(0.02))


def _draw_mouth(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    """Lips around a curved midline: curve = smile/frown, thickness/width = tight vs relaxed."""
    c = p.cues
    half_w = c["mouth_width"] * g.a
    x = np.linspace(-1.0, 1.0, 19)
    body = np.sqrt(np.clip(1 - x**2, 0, None))
    mid = -c["mouth_curve"] * g.a * x**2
    t = c["lip_thickness"] * g.a
    gap = c["mouth_open"] * g.a * body
    upper_top = mid - gap / 2 - t * 0.9 * body * (1 - 0.25 * np.exp(-((x / 0.25) ** 2)))  # cupid's bow dip
    lower_bot = mid + gap / 2 + t * 1.1 * body
    lip = _shade(p.skin, 0.78, (1.08, 0.78, 0.8))
    outline = _curve(g.cx, g.mouth_y, half_w, upper_top) + _curve(g.cx, g.mouth_y, half_w, lower_bot)[::-1]
    d.polygon(outline, fill=lip)
    if c["mouth_open"] > 0.01:
        inner_w = half_w * 0.9
        inner = _curve(g.cx, g.mouth_y, inner_w, mid - gap / 2) + _curve(g.cx, g.mouth_y, inner_w, mid + gap / 2)[::-1]
        d.polygon(inner, fill=(55, 20, 22, 255))
    d.line(_curve(g.cx, g.mouth_y, half_w, mid), fill=_shade(p.skin, 0.38, (1.1, 0.8, 0.8)), width=g.lw(0.03))


def _draw_glasses(d: ImageDraw.ImageDraw, p: FaceParams, g: _Geom) -> None:
    if not p.glasses:
        return
    col = (35, 30, 30, 255)
    wd = max(1, int(0.03 * g.a))
    for side in (-1, 1):
        ex = g.cx + side * g.eye_dx
        frame = (ex - 0.3 * g.a, g.eye_y - 0.2 * g.a, ex + 0.3 * g.a, g.eye_y + 0.2 * g.a)
        d.rounded_rectangle(frame, radius=0.08 * g.a, outline=col, width=wd)
    d.line([(g.x(-0.1), g.eye_y - 0.05 * g.a), (g.x(0.1), g.eye_y - 0.05 * g.a)], fill=col, width=wd)


def _draw_head(p: FaceParams, width: int, height: int) -> Image.Image:
    """All face shapes on a transparent hi-res layer (upright; rotation is applied after)."""
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    g = _geometry(p, width, height)
    _draw_hair_back(d, p, g)
    _draw_body(d, p, g)
    _ellipse(d, g.cx, g.cy, g.a, g.b, p.skin + (255,))
    _draw_hair_front(d, p, g)
    _draw_forehead_wrinkles(d, p, g)
    _draw_brows(d, p, g)
    _draw_fringe(d, p, g)
    _draw_furrow(d, p, g)
    for side in (-1, 1):
        _draw_eye(layer, d, p, g, side)
    _draw_nose(d, p, g)
    _draw_mouth(d, p, g)
    _draw_glasses(d, p, g)
    angle = p.rotation + p.cues["head_tilt"]
    # NEAREST is ~10x faster than BILINEAR here, and the 3x box downscale smooths it anyway
    return layer.rotate(angle, resample=Image.Resampling.NEAREST, center=(g.cx, g.cy + 0.3 * g.b))


def _linear_ramp(width: int, height: int, angle: float) -> np.ndarray:
    """Values in [-1, 1] increasing along direction ``angle`` across the image."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u = (xx / max(width - 1, 1) - 0.5) * math.cos(angle) + (yy / max(height - 1, 1) - 0.5) * math.sin(angle)
    return u / 0.7071


def _background(p: FaceParams, width: int, height: int) -> Image.Image:
    t = (_linear_ramp(width, height, p.bg_angle) + 1) / 2
    c0, c1 = (np.array(c, dtype=np.float32) for c in p.bg_colors)
    arr = c0 * (1 - t[..., None]) + c1 * t[..., None]
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def _render(p: FaceParams, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    hi_w, hi_h = width * SUPERSAMPLE, height * SUPERSAMPLE
    img = _background(p, width, height).resize((hi_w, hi_h), Image.Resampling.NEAREST)
    head = _draw_head(p, hi_w, hi_h)
    img.paste(head, (0, 0), head)
    img = img.reduce(SUPERSAMPLE)
    if p.blur_radius > 0:
        img = img.filter(ImageFilter.GaussianBlur(p.blur_radius))
    arr = np.asarray(img, dtype=np.float32)
    light = 1.0 + p.light_strength * _linear_ramp(width, height, p.light_angle)
    arr = arr * light[..., None] + rng.normal(0.0, p.noise_sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def render_face(params: FaceParams, size: int, rng: np.random.Generator) -> Image.Image:
    """Render one RGB face of ``size`` x ``size``; ``rng`` only drives pixel noise."""
    return _render(params, size, size, rng)


# --------------------------------------------------------------------------------------------
# Source generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticReport:
    root: Path
    n_written: int  # files written under the class folders (clean images + all defect files)
    per_class: dict[str, int]  # clean generated images per class (before defects)
    defects: dict[str, int]
    demographics_csv: Path


@dataclass
class _Item:
    """One file to write: its class folder, extension, bytes and demographics."""

    label: str
    ext: str
    data: bytes
    gender: str
    age_group: str
    kind: str = "clean"
    source: int | None = None  # index of the clean item this one was derived from
    relpath: str = ""


def _encode(img: Image.Image, ext: str, quality: int = JPEG_CLEAN_QUALITY) -> bytes:
    """Encode with every option pinned, so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, **PNG_OPTIONS)
    else:
        img.convert("RGB").save(
            buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False
        )
    return buf.getvalue()


def _class_counts(n: int, labels: tuple[str, ...] = CLASSES,
                  weights: tuple[float, ...] = CLASS_WEIGHTS) -> dict[str, int]:
    """Largest-remainder split of ``n`` by ``weights`` (deterministic, sums to ``n``)."""
    raw = np.array(weights) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return {c: int(k) for c, k in zip(labels, counts)}


def _defect_counts(n: int) -> dict[str, int]:
    return {
        "exact_duplicate": max(2, round(0.015 * n)),
        "near_duplicate": max(3, round(0.02 * n)),
        "truncated": 2,
        "not_an_image": 2,
        "cross_class": max(1, round(n / 1000)),
    }


def _odd_size(size: int) -> tuple[int, int]:
    """A non-square size (80x72 for 64) to exercise the pipeline's aspect handling."""
    return round(size * 1.25), round(size * 1.125)


def _clean_items(
    n: int, seed: int, size: int, plan_rng: np.random.Generator, classes: tuple[str, ...] = CLASSES,
    weights: tuple[float, ...] = CLASS_WEIGHTS, stream: int = 1,
) -> tuple[list[_Item], dict[str, int]]:
    counts = _class_counts(n, classes, weights)
    labels = plan_rng.permutation(np.repeat(np.array(classes), [counts[c] for c in classes]))
    genders = plan_rng.choice(GENDERS, size=n, p=GENDER_P)
    ages = plan_rng.choice(AGE_GROUPS, size=n, p=AGE_P)
    jpg = set(plan_rng.choice(n, size=round(0.10 * n), replace=False).tolist())
    odd = set(plan_rng.choice(n, size=max(2, round(0.015 * n)), replace=False).tolist())
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, stream, i])  # per-image stream: independent of plan order
        params = sample_face_params(str(labels[i]), str(genders[i]), str(ages[i]), rng)
        w, h = _odd_size(size) if i in odd else (size, size)
        ext = "jpg" if i in jpg else "png"
        data = _encode(_render(params, w, h, rng), ext)
        items.append(_Item(str(labels[i]), ext, data, str(genders[i]), str(ages[i])))
    return items, counts


def _near_duplicate(src: _Item, variant: int, rng: np.random.Generator) -> tuple[str, bytes]:
    """A perceptually identical copy with different bytes: re-encoded, resized or brightened."""
    with Image.open(io.BytesIO(src.data)) as im:
        img = im.convert("RGB")
    if variant == 0:
        quality = int(rng.choice([60, 70, 80, 85]))
        return "jpg", _encode(img, "jpg", quality=quality)
    if variant == 1:
        f = float(rng.choice([0.88, 0.94, 1.08, 1.15]))
        resized = img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.LANCZOS)
        return src.ext, _encode(resized, src.ext)
    brighter = ImageEnhance.Brightness(img).enhance(float(rng.uniform(1.06, 1.14)))
    return src.ext, _encode(brighter, src.ext)


_NOT_IMAGE_TEXTS = (
    b"<html><head><title>404 Not Found</title></head><body>The requested image was not found.</body></html>\n",
    b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 4242\n",
)


def _random_identity(plan_rng: np.random.Generator) -> tuple[str, str, str]:
    """Class and demographics for a broken file that has no clean original."""
    label = str(plan_rng.choice(CLASSES))
    return label, str(plan_rng.choice(GENDERS, p=GENDER_P)), str(plan_rng.choice(AGE_GROUPS, p=AGE_P))


def _defect_items(
    clean: list[_Item], seed: int, size: int, plan_rng: np.random.Generator
) -> tuple[list[_Item], dict[str, int]]:
    counts = _defect_counts(len(clean))
    n_src = counts["exact_duplicate"] + counts["near_duplicate"] + counts["cross_class"]
    sources = plan_rng.choice(len(clean), size=n_src, replace=False).tolist()
    exact = sources[: counts["exact_duplicate"]]
    near = sources[counts["exact_duplicate"] : counts["exact_duplicate"] + counts["near_duplicate"]]
    cross = sources[counts["exact_duplicate"] + counts["near_duplicate"] :]
    out: list[_Item] = []
    for i in exact:
        s = clean[i]
        out.append(_Item(s.label, s.ext, s.data, s.gender, s.age_group, "exact_duplicate", i))
    for j, i in enumerate(near):
        s = clean[i]
        ext, data = _near_duplicate(s, j % 3, plan_rng)
        out.append(_Item(s.label, ext, data, s.gender, s.age_group, "near_duplicate", i))
    for i in cross:
        s = clean[i]
        other = str(plan_rng.choice([c for c in CLASSES if c != s.label]))
        out.append(_Item(other, s.ext, s.data, s.gender, s.age_group, "cross_class", i))
    for k in range(counts["truncated"]):  # fresh faces, cut in half mid-stream
        label, gender, age = _random_identity(plan_rng)
        rng = np.random.default_rng([seed, 2, k])
        data = _encode(render_face(sample_face_params(label, gender, age, rng), size, rng), "png")
        out.append(_Item(label, "png", data[: len(data) // 2], gender, age, "truncated"))
    for k in range(counts["not_an_image"]):
        label, gender, age = _random_identity(plan_rng)
        text = _NOT_IMAGE_TEXTS[k % len(_NOT_IMAGE_TEXTS)]
        out.append(_Item(label, ("png", "jpg")[k % 2], text, gender, age, "not_an_image"))
    return out, counts


def _assign_names(items: list[_Item], plan_rng: np.random.Generator) -> None:
    """Shuffled running numbers, so defect files are not recognisable by their names."""
    for item, number in zip(items, plan_rng.permutation(len(items)).tolist()):
        item.relpath = f"{item.label}/face_{number:05d}.{item.ext}"


def _demographics_csv(items: list[_Item]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "gender", "age_group"])
    for item in sorted(items, key=lambda it: it.relpath):
        w.writerow([item.relpath, item.gender, item.age_group])
    return buf.getvalue()


def _manifest(items: list[_Item]) -> list[dict[str, str]]:
    """Ground truth for the defects (hidden file: the pipeline ignores it; tests use it)."""
    return [
        {"file": it.relpath, "kind": it.kind, "source": items[it.source].relpath if it.source is not None else ""}
        for it in items
        if it.kind != "clean"
    ]


README_TEXT = """\
SYNTHETIC DEMO DATA - NOT REAL FACES

Every image in this folder was procedurally generated by fer_pipeline.demo.synthetic_faces
(cartoon faces drawn with pillow from random parameters). It exists only to demonstrate and test
the fer-pipeline data and model pipeline; it contains no photographs of people and must not be
used to draw any conclusion about real facial expressions.

Layout: <Class>/<file>.png|jpg with Class in Neutral, Focused, Tired, Angry;
demographics.csv maps each file to a synthetic gender and age_group.
The data deliberately contains defects (duplicates, near-duplicates, broken files and a label
conflict) so that every cleaning step has work to do; the hidden file .defects.json lists them
(ground truth for testing the cleaning steps, skipped by the pipeline like every hidden file).
"""


def _generation_params(n_images: int, seed: int, image_size: int) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "image_size": image_size, "n_images": n_images, "seed": seed}


def _report(out_dir: Path, meta: dict[str, Any]) -> SyntheticReport:
    return SyntheticReport(
        root=out_dir,
        n_written=int(meta["n_written"]),
        per_class={str(c): int(k) for c, k in meta["per_class"].items()},
        defects={k: int(v) for k, v in meta["defects"].items()},
        demographics_csv=out_dir / DEMOGRAPHICS_NAME,
    )


def _check_target(out_dir: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """Return the finished run's marker if it matches; refuse to mix with anything else."""
    marker, in_progress = out_dir / MARKER_NAME, out_dir / IN_PROGRESS_NAME
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("params") != params:
            raise ValueError(
                f"{out_dir} already holds synthetic demo data generated with {meta.get('params')}, "
                f"not {params}; delete the folder or choose another one instead of mixing them"
            )
        return meta
    if in_progress.exists():
        previous = json.loads(in_progress.read_text()).get("params")
        if previous != params:
            raise ValueError(
                f"{out_dir} holds an interrupted generation with {previous}, not {params}; delete it first"
            )
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(
            f"{out_dir} is not empty and was not written by generate_demo_source; refusing to write into it"
        )
    return None


def generate_demo_source(
    out_dir: Path, n_images: int = 2000, seed: int = 0, image_size: int = 64
) -> SyntheticReport:
    """Write ``n_images`` clean synthetic faces plus deliberate defects as an image-folders source.

    Idempotent: if ``out_dir/.complete`` records the same parameters nothing is written. An
    interrupted run (``.in_progress`` with the same parameters) is simply redone, which is safe
    because the output is deterministic.
    """
    if n_images < 40:
        raise ValueError(f"n_images must be at least 40 to hold every class and defect, got {n_images}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    out_dir = Path(out_dir)
    params = _generation_params(n_images, seed, image_size)
    done = _check_target(out_dir, params)
    if done is not None:
        return _report(out_dir, done)
    write_json(out_dir / IN_PROGRESS_NAME, {"params": params})

    plan_rng = np.random.default_rng([seed, 0])
    clean, per_class = _clean_items(n_images, seed, image_size, plan_rng)
    defects, defect_counts = _defect_items(clean, seed, image_size, plan_rng)
    items = clean + defects
    _assign_names(items, plan_rng)
    for item in items:
        write_bytes(out_dir / item.relpath, item.data)
    write_text(out_dir / DEMOGRAPHICS_NAME, _demographics_csv(items))
    write_text(out_dir / README_NAME, README_TEXT)
    write_json(out_dir / MANIFEST_NAME, _manifest(items))
    meta = {"params": params, "n_written": len(items), "per_class": per_class, "defects": defect_counts}
    write_json(out_dir / MARKER_NAME, meta)  # last: its presence means the folder is complete
    (out_dir / IN_PROGRESS_NAME).unlink(missing_ok=True)
    return _report(out_dir, meta)


# --------------------------------------------------------------------------------------------
# Pool: other expressions than the four classes, for a `role: pretrain` source
# --------------------------------------------------------------------------------------------

POOL_README = """\
SYNTHETIC DEMO PRETRAINING POOL - NOT REAL FACES

Every image in this folder was procedurally generated by fer_pipeline.demo.synthetic_faces:
the demo generator's cartoon faces with other expressions than the four classes (happy,
surprised, sad), for the pipeline's pretraining pool (a `role: pretrain` source). They must not
be used to draw any conclusion about real facial expressions. A few files are exact copies of
others and one is truncated, so the pool's own rules have work to do (hidden file .defects.json).
"""


def generate_demo_pool(out_dir: Path, n_images: int = 600, seed: int = 0, image_size: int = 64) -> SyntheticReport:
    """Write ``n_images`` faces of the :data:`POOL_EXPRESSIONS` (about equally many each) as an
    image-folders source ``<expression>/<file>``, plus a few exact copies and one truncated file.
    Idempotent and deterministic like :func:`generate_demo_source`."""
    expressions = tuple(POOL_EXPRESSIONS)
    if n_images < 2 * len(expressions):
        raise ValueError(f"n_images must be at least {2 * len(expressions)}, got {n_images}")
    if seed < 0 or image_size < 32:
        raise ValueError(f"seed must be non-negative and image_size at least 32, got {seed} and {image_size}")
    out_dir = Path(out_dir)
    params = {**_generation_params(n_images, seed, image_size), "pool": list(expressions)}
    done = _check_target(out_dir, params)
    if done is not None:
        return _report(out_dir, done)
    write_json(out_dir / IN_PROGRESS_NAME, {"params": params})
    plan_rng = np.random.default_rng([seed, 20])
    weights = (1.0 / len(expressions),) * len(expressions)
    items, per_class = _clean_items(n_images, seed, image_size, plan_rng, expressions, weights, stream=21)
    copies = plan_rng.choice(len(items), size=max(2, round(0.01 * n_images)), replace=False).tolist()
    defects = [_Item(items[i].label, items[i].ext, items[i].data, items[i].gender, items[i].age_group,
                     "exact_duplicate", i) for i in copies]
    cut = items[int(plan_rng.integers(len(items)))]
    defects.append(_Item(cut.label, cut.ext, cut.data[: len(cut.data) // 2], cut.gender, cut.age_group, "truncated"))
    items += defects
    _assign_names(items, plan_rng)
    for item in items:
        write_bytes(out_dir / item.relpath, item.data)
    write_text(out_dir / DEMOGRAPHICS_NAME, _demographics_csv(items))
    write_text(out_dir / README_NAME, POOL_README)
    write_json(out_dir / MANIFEST_NAME, _manifest(items))
    meta = {"params": params, "n_written": len(items), "per_class": per_class,
            "defects": {"exact_duplicate": len(copies), "truncated": 1}}
    write_json(out_dir / MARKER_NAME, meta)  # last: its presence means the folder is complete
    (out_dir / IN_PROGRESS_NAME).unlink(missing_ok=True)
    return _report(out_dir, meta)


# --------------------------------------------------------------------------------------------
# Scenes: the same faces drawn into larger cluttered pictures, for a `faces: detect` source
# --------------------------------------------------------------------------------------------

SCENES_TRUTH_NAME = ".scenes.json"
SCENE_SIZE = (400, 300)  # (width, height): small, so detection costs ~20 ms a scene
SCENE_FACE_SIDES = (80.0, 150.0)  # pasted face squares, log-uniform
SCENE_MAX_ANGLE = 8.0  # degrees, on top of the face's own head tilt
SCENE_SHARES = {"no_face": 0.10, "two_faces": 0.10}  # the rest hold one face

SCENES_README = """\
SYNTHETIC DEMO SCENES - NOT REAL FACES

Every image in this folder was procedurally generated by fer_pipeline.demo.synthetic_faces:
cartoon faces (the demo generator's) pasted into cluttered backgrounds at random positions,
sizes and small rotations; some scenes hold two faces (of the same class), some none. They show
the pipeline's `faces: detect` framing at work and must not be used to draw any conclusion about
real facial expressions. The hidden file .scenes.json lists where each face was pasted.
"""


def _scene_layout(n: int, plan_rng: np.random.Generator) -> list[int]:
    """Faces per scene (0, 1 or 2) in a seeded order."""
    zero, two = round(SCENE_SHARES["no_face"] * n), round(SCENE_SHARES["two_faces"] * n)
    layout = np.array([0] * zero + [2] * two + [1] * (n - zero - two))
    return plan_rng.permutation(layout).tolist()


def generate_demo_scenes(out_dir: Path, n_scenes: int = 60, seed: int = 0) -> SyntheticReport:
    """Write ``n_scenes`` cluttered scenes (JPEG, :data:`SCENE_SIZE`) as an image-folders source.

    Each scene is a class folder's picture: one face (most), two faces of that class, or none
    (:data:`SCENE_SHARES`), pasted with :mod:`fer_pipeline.demo.scenes` at a random place,
    size and small angle. ``.scenes.json`` (hidden) records every pasted face's upright box.
    Idempotent and deterministic like :func:`generate_demo_source`."""
    from fer_pipeline.demo.scenes import clutter, paste_face, place_square

    if n_scenes < len(CLASSES):
        raise ValueError(f"n_scenes must be at least {len(CLASSES)}, got {n_scenes}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    out_dir = Path(out_dir)
    params = {"generator_version": GENERATOR_VERSION, "scenes": n_scenes, "seed": seed,
              "scene_size": list(SCENE_SIZE)}
    done = _check_target(out_dir, params)
    if done is not None:
        return _report(out_dir, done)
    write_json(out_dir / IN_PROGRESS_NAME, {"params": params})
    plan_rng = np.random.default_rng([seed, 10])
    counts = _class_counts(n_scenes)
    labels = plan_rng.permutation(np.repeat(np.array(CLASSES), [counts[c] for c in CLASSES])).tolist()
    layout = _scene_layout(n_scenes, plan_rng)
    items, truth = [], []
    for i, (label, k) in enumerate(zip(labels, layout)):
        rng = np.random.default_rng([seed, 11, i])  # per-scene stream
        gender, age = str(rng.choice(GENDERS, p=GENDER_P)), str(rng.choice(AGE_GROUPS, p=AGE_P))
        img = clutter(rng, *SCENE_SIZE)
        taken: list = []
        boxes = []
        for _ in range(k):
            side, angle, cx, cy = place_square(rng, SCENE_SIZE, SCENE_FACE_SIDES, SCENE_MAX_ANGLE, taken)
            face = render_face(sample_face_params(label, gender, age, rng), side, rng)
            boxes.append([round(v, 2) for v in paste_face(img, face, side, angle, cx, cy)])
        item = _Item(label, "jpg", _encode(img, "jpg"), gender, age, ("no_face", "clean", "two_faces")[k])
        item.relpath = f"{label}/scene_{i:05d}.jpg"
        items.append(item)
        truth.append({"file": item.relpath, "label": label, "boxes": boxes})
    for item in items:
        write_bytes(out_dir / item.relpath, item.data)
    write_text(out_dir / DEMOGRAPHICS_NAME, _demographics_csv(items))
    write_text(out_dir / README_NAME, SCENES_README)
    write_json(out_dir / SCENES_TRUTH_NAME, truth)
    kinds = {kind: sum(it.kind == kind for it in items) for kind in ("no_face", "two_faces")}
    meta = {"params": params, "n_written": len(items), "per_class": counts, "defects": kinds}
    write_json(out_dir / MARKER_NAME, meta)  # last: its presence means the folder is complete
    (out_dir / IN_PROGRESS_NAME).unlink(missing_ok=True)
    return _report(out_dir, meta)


__all__ = [
    "CUES",
    "EXPRESSIONS",
    "POOL_EXPRESSIONS",
    "FaceParams",
    "SyntheticReport",
    "generate_demo_pool",
    "generate_demo_scenes",
    "generate_demo_source",
    "render_face",
    "sample_face_params",
]
