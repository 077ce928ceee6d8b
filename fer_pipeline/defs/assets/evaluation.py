"""Deep evaluation assets (group ``evaluation``): can the model's numbers be trusted?

Lineage in the UI::

    splits ──► cv_fold (one partition per fold) ──► cross_validation ──► label_issues
    splits ──► held_out_sources ──► loso_fold (one partition per source) ──► cross_source_generalisation
    model_<main> ──► bias_report, source_confound, mitigation_comparison, cross_source_generalisation
    splits ──► mitigated_model ──► mitigation_comparison

The training work (CV folds, held-out sources) is partitioned (:mod:`fer_pipeline.defs.jobs`):
each partition trains one unit and stores its result with the recipe it was trained with
(:mod:`fer_pipeline.analysis.recipes`); the aggregates publish the reports from the stored results
of the current recipe and refuse the others. The assets live by concern in
:mod:`.cross_validation`, :mod:`.bias` and :mod:`.generalisation`; the core logic is plain Python
in :mod:`fer_pipeline.analysis`.
"""

from __future__ import annotations

import dagster as dg

from fer_pipeline.defs.assets.bias import bias_report, mitigated_model, mitigation_comparison, source_confound
from fer_pipeline.defs.assets.cross_validation import build_cv_assets, label_issues
from fer_pipeline.defs.assets.generalisation import build_loso_assets, cross_source_generalisation
from fer_pipeline.defs.jobs import cv_fold_count, held_out_source_keys

__all__ = ["bias_report", "cross_source_generalisation", "evaluation_assets", "label_issues", "mitigated_model",
           "mitigation_comparison", "source_confound"]


def evaluation_assets(n_cv_folds: int | None = None, held_out: list[str] | None = None) -> list[dg.AssetsDefinition]:
    """Every evaluation asset, the CV folds sized ``n_cv_folds`` (default: the settings file's
    ``cv_folds``), one held-out source partition per name in ``held_out`` (default: the
    catalogue's four-class sources)."""
    keys = held_out if held_out is not None else held_out_source_keys()[0]
    return [*build_cv_assets(n_cv_folds or cv_fold_count()), bias_report, mitigated_model, mitigation_comparison,
            source_confound, *build_loso_assets(keys), cross_source_generalisation, label_issues]
