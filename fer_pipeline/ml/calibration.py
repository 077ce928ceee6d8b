"""Calibrated probabilities: how far a model's confidence is from its accuracy, and temperature
scaling to close the gap.

A model that says "90 %" should be right about 90 % of the time. Networks trained with
cross-entropy are often over-confident; this one (label smoothing, weight averaging) tends to be
under-confident. Either way one number fixes most of it without changing any prediction:
temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks") divides the
logits by ``T`` before the softmax. ``T`` is fitted on the validation split by minimising the
negative log-likelihood; ``T > 1`` softens, ``T < 1`` sharpens, the arg-max never changes.

Expected calibration error (ECE) here is **top-label, equal-width bins**: the confidence of the
predicted class is cut into :data:`N_BINS` (15, Guo et al.'s choice) bins of width 1/15 over
[0, 1]; ECE = sum over bins of (share of samples in the bin) × |accuracy − mean confidence|.
Plain numpy: no torch, no Dagster.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

N_BINS = 15
"""Equal-width confidence bins of the ECE and the reliability diagram."""

T_BOUNDS = (0.05, 20.0)
"""Search interval of the temperature (a fit at a bound is reported as such)."""

RELIABILITY_COLUMNS = ("bin", "lower", "upper", "n", "confidence", "accuracy", "gap")
"""Columns of :func:`reliability_table` (``gap`` = accuracy − confidence; empty bins: NaN)."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.size == 0:
        return z.reshape(z.shape)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    y = np.asarray(labels, dtype=np.int64)
    if not len(y):
        return float("nan")
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float((lse - z[np.arange(len(y)), y]).mean())


def _bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index per sample: [0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1] (1.0 falls in the last bin)."""
    return np.minimum((np.asarray(confidence, dtype=np.float64) * n_bins).astype(np.int64), n_bins - 1)


def reliability_table(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Per equal-width bin of top-label confidence: samples, mean confidence, accuracy, gap.

    The data of a reliability diagram; empty bins have ``n`` 0 and NaN scores."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if not np.isfinite(p).all():
        raise ValueError("probabilities hold NaN or infinity: no calibration to measure")
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == y).astype(np.float64) if len(p) else np.zeros(0)
    idx = _bins(conf, n_bins)
    n = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / n
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / n
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({"bin": np.arange(n_bins), "lower": edges[:-1], "upper": edges[1:], "n": n,
                         "confidence": mean_conf, "accuracy": acc, "gap": acc - mean_conf},
                        columns=list(RELIABILITY_COLUMNS))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label ECE over ``n_bins`` equal-width bins (0 = perfectly calibrated; NaN without samples)."""
    table = reliability_table(probabilities, labels, n_bins)
    total = int(table["n"].sum())
    if not total:
        return float("nan")
    used = table[table["n"] > 0]
    return float((used["n"] / total * used["gap"].abs()).sum())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = T_BOUNDS,
                    tol: float = 1e-6) -> float:
    """The temperature minimising the NLL of ``labels`` under ``softmax(logits / T)``.

    Golden-section search on ``log T`` within ``bounds``: deterministic, no gradient, no random
    start. The NLL is convex in 1/T, hence unimodal in log T, so the search finds the minimum
    (or the nearer bound when the minimum lies outside). Without samples: 1.0.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if not len(y):
        return 1.0
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(z, y, math.exp(c)), nll(z, y, math.exp(d))
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(z, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(z, y, math.exp(d))
    u = (a + b) / 2.0
    # the ends of the interval are candidates too (golden section never evaluates them)
    best = min((nll(z, y, math.exp(x)), x) for x in (lo, u, hi))[1]
    return float(math.exp(best))


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it did on the split it was fitted on (checkpoint metadata)."""

    temperature: float
    fitted_on: str
    n: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    n_bins: int = N_BINS
    method: str = "temperature scaling (NLL, golden-section search on log T)"
    at_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def calibrate(logits: np.ndarray, labels: np.ndarray, fitted_on: str = "validation",
              n_bins: int = N_BINS) -> Calibration:
    """Fit the temperature on ``logits``/``labels`` and score it there (before/after NLL and ECE).

    Non-finite logits (a diverged model, never published) get T = 1 and NaN scores."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if not np.isfinite(z).all():
        nan = float("nan")
        return Calibration(1.0, fitted_on, len(y), nan, nan, nan, nan, n_bins,
                           method="not fitted: the logits hold NaN or infinity")
    t = fit_temperature(z, y)
    at_bound = bool(len(y)) and any(math.isclose(t, b, rel_tol=1e-3) for b in T_BOUNDS)
    return Calibration(temperature=t, fitted_on=fitted_on, n=len(y), nll_before=nll(z, y),
                       nll_after=nll(z, y, t), ece_before=expected_calibration_error(softmax(z), y, n_bins),
                       ece_after=expected_calibration_error(softmax(z, t), y, n_bins), n_bins=n_bins,
                       at_bound=at_bound)


@dataclass(frozen=True)
class CalibrationEffect:
    """A stored temperature applied to another split (the test split): ECE and NLL before/after,
    and the reliability tables for the diagram."""

    temperature: float
    n: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    before: pd.DataFrame  # reliability_table of softmax(logits)
    after: pd.DataFrame  # reliability_table of softmax(logits / T)
    n_bins: int = N_BINS

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the scores and the non-empty bins of both reliability tables."""
        def bins(t: pd.DataFrame) -> list[dict[str, Any]]:
            return t[t["n"] > 0].drop(columns=["gap"]).round(6).to_dict(orient="records")

        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {"temperature": self.temperature, "n": self.n, "n_bins": self.n_bins,
                "ece_before": num(self.ece_before), "ece_after": num(self.ece_after),
                "nll_before": num(self.nll_before), "nll_after": num(self.nll_after),
                "reliability_before": bins(self.before), "reliability_after": bins(self.after)}


def apply_temperature(logits: np.ndarray, labels: np.ndarray, temperature: float,
                      n_bins: int = N_BINS) -> CalibrationEffect:
    """Score ``softmax(logits)`` and ``softmax(logits / temperature)`` against ``labels``."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    raw, cal = softmax(z), softmax(z, temperature)
    return CalibrationEffect(temperature=float(temperature), n=len(y),
                             ece_before=expected_calibration_error(raw, y, n_bins),
                             ece_after=expected_calibration_error(cal, y, n_bins),
                             nll_before=nll(z, y), nll_after=nll(z, y, temperature),
                             before=reliability_table(raw, y, n_bins), after=reliability_table(cal, y, n_bins),
                             n_bins=n_bins)
