"""Pipeline settings as one Dagster resource, so every knob is visible and editable in the UI
launchpad (``resources: fer: config: ...``) and the core modules get plain values."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from fer_pipeline.catalog import Catalog, load_catalog
from fer_pipeline.paths import DataPaths, default_data_root
from fer_pipeline.preprocess import PreprocessSettings


class FerSettings(dg.ConfigurableResource):
    """Settings of the data half (defaults match the README)."""

    data_root: str = Field(default="", description="Data root; empty = $FER_DATA_DIR or ./data")
    image_size: int = Field(default=48, description="Processed faces are image_size × image_size grayscale")
    min_side: int = Field(default=32, description="Reject images smaller than this (pixels)")
    max_pixels: int = Field(default=40_000_000, description="Larger images are rejected as decompression bombs")
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
