"""Deep evaluation, in plain Python (no Dagster): can the model's numbers be trusted?

* :mod:`~fer_pipeline.analysis.cross_validation`: k-fold CV of the main model over
  train+validation on the stored folds, resumable fold by fold, with out-of-fold probabilities;
* :mod:`~fer_pipeline.analysis.bias`: per-demographic-group test metrics and gaps;
* :mod:`~fer_pipeline.analysis.mitigation`: oversampling / re-weighting by group, before/after table;
* :mod:`~fer_pipeline.analysis.confound`: class-by-source shares and per-source metrics;
* :mod:`~fer_pipeline.analysis.generalisation`: leave-one-source-out training and testing;
* :mod:`~fer_pipeline.analysis.label_issues`: confident learning on the out-of-fold probabilities;
* :mod:`~fer_pipeline.analysis.plots`: the figures of all of the above;
* :mod:`~fer_pipeline.analysis.partition_store`: one stored result per fold or held-out source.

The Dagster wiring lives in :mod:`fer_pipeline.defs.assets.evaluation`.
"""

from fer_pipeline.analysis.bias import (
    ATTRIBUTES,
    BiasReport,
    bias_report,
    group_metrics,
)
from fer_pipeline.analysis.confound import (
    confound_findings,
    per_source_metrics,
    source_share_matrix,
)
from fer_pipeline.analysis.cross_validation import (
    CVResult,
    plan_folds,
    run_cross_validation,
    summarize_folds,
)
from fer_pipeline.analysis.generalisation import LosoResult, run_leave_one_source_out
from fer_pipeline.analysis.label_issues import (
    confident_learning_issues,
    find_label_issues,
    rank_label_issues,
)
from fer_pipeline.analysis.mitigation import (
    MitigationPlan,
    choose_attribute,
    comparison_table,
    plan_mitigation,
)

__all__ = [
    "ATTRIBUTES",
    "BiasReport",
    "CVResult",
    "LosoResult",
    "MitigationPlan",
    "bias_report",
    "choose_attribute",
    "comparison_table",
    "confident_learning_issues",
    "confound_findings",
    "find_label_issues",
    "group_metrics",
    "per_source_metrics",
    "plan_folds",
    "plan_mitigation",
    "rank_label_issues",
    "run_cross_validation",
    "run_leave_one_source_out",
    "source_share_matrix",
    "summarize_folds",
]
