"""What the evaluation assets share: their group, the main model's key, loading the published
data, the main model's test predictions (recomputed from its checkpoint: cheap), and a warning
when a checkpoint was trained on other data than the published set."""

from __future__ import annotations

import dagster as dg
import pandas as pd

from fer_pipeline.defs.resources import FerSettings
from fer_pipeline.ml.architectures import MAIN_MODEL
from fer_pipeline.ml.evaluate import Evaluation, evaluate_checkpoint, staleness
from fer_pipeline.ml.workflow import load_pipeline_data
from fer_pipeline.schema import SPLITS

GROUP = "evaluation"
MAIN_MODEL_ASSET = dg.AssetKey(f"model_{MAIN_MODEL}")
MITIGATED_NAME = f"{MAIN_MODEL}_mitigated"


def rounded(df: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Rounded, with missing values shown blank (for markdown tables)."""
    out = df.round(digits).astype(object)
    return out.where(df.notna(), "")


def load_data(fer: FerSettings, split_names: tuple[str, ...] = SPLITS, with_images: bool = True):
    return load_pipeline_data(fer.paths, split_names, with_images=with_images)


def main_test_predictions(context: dg.AssetExecutionContext, fer: FerSettings, arrays, version: str) -> Evaluation:
    """The main model's test-split evaluation (recomputed from its checkpoint: cheap)."""
    ev = evaluate_checkpoint(fer.paths.checkpoint(MAIN_MODEL), arrays["test"])
    warn_stale(context, MAIN_MODEL, ev.trained_on, version, f"model_{MAIN_MODEL}")
    return ev


def warn_stale(context: dg.AssetExecutionContext, name: str, trained_on: str | None, version: str,
               asset: str) -> None:
    if warning := staleness(name, trained_on, version, f"re-materialize {asset}"):
        context.log.warning(warning)
