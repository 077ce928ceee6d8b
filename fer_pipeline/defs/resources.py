"""Every Dagster resource of the code location: the settings of the data half (``fer``), of
training (``training``) and of the evaluation assets (``analysis``). Each knob is visible and
editable in the UI launchpad (``resources: <name>: config: ...``); the core modules get plain
values from the properties and methods below."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from fer_pipeline.analysis.bias import ATTRIBUTES
from fer_pipeline.dataset.catalog import Catalog, load_catalog
from fer_pipeline.dataset.preprocess import PreprocessSettings
from fer_pipeline.ml.train import TrainConfig
from fer_pipeline.paths import DataPaths, default_data_root


class FerSettings(dg.ConfigurableResource):
    """Settings of the data half (defaults match the README)."""

    data_root: str = Field(default="", description="Data root; empty = $FER_DATA_DIR or ./data")
    image_size: int = Field(default=48, description="Processed faces are image_size × image_size grayscale")
    min_side: int = Field(default=32, description="Reject images smaller than this (pixels)")
    max_pixels: int = Field(default=40_000_000, description="Larger images are rejected as decompression bombs")
    max_file_bytes: int = Field(default=64 * 1024 * 1024, description="Files and archive entries larger than this "
                                "(declared or actually read) are rejected unread: memory stays bounded on "
                                "decompression bombs and oversized files")
    min_std: float = Field(default=3.0, description="Reject near-constant faces (pixel std below this)")
    phash_max_distance: int = Field(default=4, description="Near-duplicate threshold (Hamming bits of 64)")
    match_mirrored: bool = Field(default=True, description="Also treat mirrored copies as near-duplicates")
    min_correlation: float = Field(default=0.95, description="Confirm phash matches by pixel correlation "
                                   "(0 = trust the perceptual hash alone)")
    train_share: float = 0.70
    validation_share: float = 0.15
    test_share: float = 0.15
    n_folds: int = Field(default=10, description="Cross-validation folds over train+validation")
    split_seed: int = 0
    split_tolerance: float = Field(default=0.03, description="Allowed deviation of split shares")
    min_images_per_class: int = Field(default=20, description="Blocking check: each class at least this many")
    max_imbalance_ratio: float = Field(default=3.0, description="Warning check: largest/smallest class")
    workers: int = Field(default=0, description="Decoding processes; 0 = one per CPU core")
    rebuild: bool = Field(default=False, description="Reprocess everything from scratch: hash, decode and "
                          "compare every file again instead of reusing caches (the nightly safety net)")

    @property
    def paths(self) -> DataPaths:
        return DataPaths(Path(self.data_root).expanduser().resolve() if self.data_root else default_data_root())

    @property
    def preprocess(self) -> PreprocessSettings:
        return PreprocessSettings(image_size=(self.image_size, self.image_size), min_side=self.min_side,
                                  max_pixels=self.max_pixels, min_std=self.min_std)

    @property
    def split_proportions(self) -> dict[str, float]:
        return {"train": self.train_share, "validation": self.validation_share, "test": self.test_share}

    def catalog(self) -> Catalog:
        paths = self.paths
        return load_catalog(paths.catalog, paths.root)


class TrainSettings(dg.ConfigurableResource):
    """Training recipe knobs (the rest of :class:`TrainConfig` keeps its tuned defaults)."""

    epochs: int = Field(default=40, description="Maximum epochs per model")
    patience: int = Field(default=12, description="Early stopping: epochs without val macro-F1 gain")
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    device: str = Field(default="auto", description="auto = CUDA when available, else CPU")
    num_threads: int = Field(default=0, description="torch CPU threads; 0 = torch default")
    amp: str = Field(default="auto", description="auto = bf16 autocast on a CUDA GPU that supports it (never on "
                     "the CPU); off = full precision everywhere")
    cuda_graphs: bool = Field(default=True, description="On CUDA, replay each training step as one captured "
                              "CUDA graph (about 5x faster for these small models); false = eager steps")
    macro_f1_floor: float = Field(default=0.5, description="Warn when a model's test macro-F1 is below")

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, patience=self.patience, batch_size=self.batch_size, lr=self.lr,
                           seed=self.seed, device=self.device, num_threads=self.num_threads or None,
                           amp=self.amp, cuda_graphs=self.cuda_graphs)


class AnalysisSettings(dg.ConfigurableResource):
    """Knobs of the evaluation assets. Defaults are the full settings; ``configs/demo.yaml``
    shrinks the budget ones (folds, epochs) for the five-minute demo."""

    # cross-validation
    cv_folds: int = Field(default=0, description="CV folds; 0 = every fold in splits.parquet (fer.n_folds, "
                          "default 10). Fewer merges stored folds (CV fold = stored fold mod cv_folds)")
    folds: Optional[list[int]] = Field(default=None, description="Run only these CV folds (0-based); "
                                       "null = all. Finished folds are cached and never retrained")
    cv_epochs: int = Field(default=0, description="Max epochs per CV fold; 0 = training.epochs")
    cv_patience: int = Field(default=-1, description="Early-stopping patience per fold; -1 = training.patience")
    cv_cache: bool = Field(default=True, description="Reuse finished folds cached under reports/cv/")
    # bias
    bias_attributes: list[str] = Field(default=list(ATTRIBUTES),
                                       description="Demographic attributes to analyse (those present)")
    min_group_size: int = Field(default=30, description="Groups with fewer test images are 'too small to judge'")
    max_group_gap_points: float = Field(default=5.0, description="Warn when a judged group's macro-F1 is more "
                                        "than this many points below the overall")
    # mitigation
    mitigation: str = Field(default="reweight", description="off | oversample | reweight | both")
    mitigation_attribute: str = Field(default="auto", description="Attribute whose groups are balanced; "
                                      "auto = the one with the smallest group share in the training split")
    mitigation_min_share: float = Field(default=0.25, description="Target minimum share of each known group "
                                        "(capped at 1/number of groups)")
    mitigation_epochs: int = Field(default=0, description="Max epochs of the mitigated model; 0 = training.epochs")
    # source confound
    confound_max_share: float = Field(default=0.9, description="Warn when a class comes more than this share "
                                      "from one source while other classes do not")
    # leave-one-source-out
    loso_epochs: int = Field(default=0, description="Max epochs per held-out source; 0 = training.epochs")
    loso_min_classes: int = Field(default=2, description="Hold out only sources covering at least this many "
                                  "classes")
    loso_sources: Optional[list[str]] = Field(default=None, description="Hold out only these sources; "
                                              "null = all eligible")
    # label issues
    label_issue_ranking: str = Field(default="self_confidence", description="self_confidence | normalized_margin")
    label_issue_grid: int = Field(default=24, description="Top suspects shown in the thumbnail grid")

    def recipe(self, training: TrainSettings, epochs: int, patience: int = -1) -> TrainConfig:
        """The main training recipe with this asset's epoch budget (0/-1 = as in ``training``)."""
        cfg = training.config()
        return replace(cfg, epochs=epochs or cfg.epochs, patience=cfg.patience if patience < 0 else patience)
