"""Where everything lives under the data root (``data/`` or ``$FER_DATA_DIR``): the one home of
every published file name. Writers (assets), readers (CLI, summary printer, later assets) and
the README all take names from here, never from string literals of their own."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR_ENV = "FER_DATA_DIR"

FACES_DIR = "faces"
"""Content-addressed face store, relative to the data root (face refs start with it)."""
RELABELS_FILE = "relabels.csv"
"""User label corrections (``image_id,label[,note]``) at the data root."""
CHECKPOINT_SUFFIX = ".safetensors"

REPORT_FILES: dict[str, str] = {
    # data_plots
    "class_distribution": "class_distribution.png",
    "sample_faces": "sample_faces.png",
    "intensity_histograms": "intensity_histograms.png",
    "exclusions": "exclusions.png",
    # model_evaluation
    "metrics_json": "metrics.json",
    "metrics_csv": "metrics.csv",
    "test_predictions": "test_predictions.parquet",  # + confusion_<model>.png, reliability_<model>.png
    # cross_validation
    "cv_folds": "cv_folds",  # .parquet + .csv
    "cv_folds_png": "cv_folds.png",
    "cv_oof": "cv_oof.parquet",
    "cv_summary": "cv_summary.json",
    "cv_fold_results": "cv_fold_results",  # folder: one result per cv_fold partition (fold_NN.json + _oof.parquet)
    # bias_report
    "bias_report": "bias_report",  # .parquet + .csv
    "bias_coverage": "bias_coverage.csv",
    "bias_macro_f1": "bias_macro_f1.png",
    # mitigated_model, mitigation_comparison
    "mitigation_plan": "mitigation_plan.csv",
    "mitigation_comparison": "mitigation_comparison",  # .parquet + .csv
    "mitigation_comparison_png": "mitigation_comparison.png",
    # source_confound
    "source_confound": "source_confound",  # .parquet + .csv
    "source_metrics": "source_metrics.csv",
    "source_shares": "source_shares.png",
    # cross_source_generalisation
    "loso": "cross_source_generalisation",  # .parquet + .csv
    "loso_png": "cross_source_generalisation.png",
    "loso_results": "loso_results",  # folder: one row per loso_fold partition (<source>-<hash>.json)
    # label_issues
    "label_issues": "label_issues",  # .parquet + .csv
    "quality_flags": "quality_flags.parquet",
    "outliers": "outliers.parquet",  # face_embeddings: faces far from their nearest neighbours
    "outlier_faces": "outlier_faces.png",
    "flagged_faces": "flagged_faces.png",
    "review_queue_top": "review_queue_top.png",  # review_queue: its first faces, with their reasons
    "label_issues_top": "label_issues_top.png",
    "relabels_suggested": "relabels_suggested.csv",
    # manifest (reviews applied)
    "review_outcomes": "review_outcomes.csv",
    # model_card
    "model_card": "model_card.md",
}
"""Every file (or file stem, for tables written as .parquet and .csv) under ``reports/``."""


def data_root_setting(configured: str = "") -> str:
    """The data root as configured, a folder or an object-store URL: ``configured``, else
    ``$FER_DATA_DIR``, else ``data/`` at the repository root."""
    return configured or os.environ.get(DATA_DIR_ENV) or str(REPO_ROOT / "data")


def is_store_url(root: str | os.PathLike[str]) -> bool:
    """An object-store data root (``s3://bucket/prefix``, ``gs://…``): the pipeline then works in a
    local working copy that :mod:`fer_pipeline.storage` keeps in sync; anything else is a folder."""
    return "://" in str(root)


def default_data_root() -> Path:
    """``$FER_DATA_DIR`` if set, else ``data/`` at the repository root (a folder: an object-store
    URL is opened with :func:`fer_pipeline.storage.open_data_root`, which pulls it first)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env and is_store_url(env):
        raise ValueError(f"{DATA_DIR_ENV}={env!r} is an object-store URL, not a folder: open it with "
                         "fer_pipeline.storage.open_data_root (a local working copy, pulled first)")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


class _Under:
    """A fixed location under the data root, read as an attribute of :class:`DataPaths`."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, paths: "DataPaths | None", owner: type | None = None) -> Path:
        if paths is None:  # looked up on the class (documentation tools)
            return Path(*self.parts)
        return paths.root.joinpath(*self.parts)


@dataclass(frozen=True)
class DataPaths:
    """All output locations, derived from one root so tests can point it at a temp dir."""

    root: Path

    catalog = _Under("sources.yaml")
    settings = _Under("pipeline.yaml")
    relabels = _Under(RELABELS_FILE)
    faces_dir = _Under(FACES_DIR)
    manifest_dir = _Under("manifest")
    raw_inventory = _Under("manifest", "raw_inventory.parquet")
    faces_table = _Under("manifest", "faces.parquet")
    dedup_table = _Under("manifest", "dedup.parquet")
    manifest = _Under("manifest", "manifest.parquet")
    excluded = _Under("manifest", "excluded.parquet")
    splits = _Under("manifest", "splits.parquet")
    pool = _Under("manifest", "pool.parquet")  # the pretraining pool (published with the three above)
    unlabelled = _Under("manifest", "unlabelled.parquet")  # images with no class yet (published with them too)
    embeddings = _Under("manifest", "embeddings.parquet")  # face_embeddings: one vector per kept/unlabelled face
    candidates_dir = _Under("manifest", "candidates")  # per-run candidates (write, audit, publish)
    reports_dir = _Under("reports")
    reviews_dir = _Under("reviews")  # the review loop (Label Studio): what to review and what was decided
    review_queue = _Under("reviews", "review_queue.parquet")
    reviews = _Under("reviews", "reviews.parquet")  # every pulled review; earlier versions under versions/
    review_versions_dir = _Under("reviews", "versions")
    models_dir = _Under("models")
    model_candidates_dir = _Under("models", "candidates")  # trained, published once their weights are finite
    metrics_json = _Under("reports", REPORT_FILES["metrics_json"])
    shipped_json = _Under("models", "shipped.json")  # the shipped model (shipped_model): predict's default
    fold_models_dir = _Under("models", "cv_folds")  # one checkpoint per cv_fold partition

    @classmethod
    def from_env(cls) -> "DataPaths":
        return cls(default_data_root())

    def report(self, key: str) -> Path:
        """A file (or stem) under ``reports/`` by its key in :data:`REPORT_FILES`."""
        return self.reports_dir / REPORT_FILES[key]

    def checkpoint(self, model_name: str) -> Path:
        return self.models_dir / f"{model_name}{CHECKPOINT_SUFFIX}"

    def fold_checkpoint(self, fold: int) -> Path:
        """The model CV fold ``fold`` trained (an ensemble member; calibrated out-of-fold)."""
        return self.fold_models_dir / f"fold_{int(fold):02d}{CHECKPOINT_SUFFIX}"

    def curves(self, model_name: str) -> Path:
        return self.models_dir / f"{model_name}_curves.png"

    def backbone(self, arch_name: str) -> Path:
        """The pretrained backbone of an architecture (trained on the pool's own labels)."""
        return self.models_dir / f"backbone_{arch_name}{CHECKPOINT_SUFFIX}"

    def backbone_curves(self, arch_name: str) -> Path:
        return self.models_dir / f"backbone_{arch_name}_curves.png"

    def confusion(self, model_name: str) -> Path:
        return self.reports_dir / f"confusion_{model_name}.png"

    def reliability(self, model_name: str) -> Path:
        """The reliability diagram (test split, before/after temperature scaling) of a model."""
        return self.reports_dir / f"reliability_{model_name}.png"

    def bias_table(self, attribute: str) -> Path:
        return self.reports_dir / f"bias_{attribute}.csv"

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """Resolve a catalogue path: absolute as given, relative to the data root otherwise."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)
