"""The recipes the training work is stored and checked with, built in one place: where a model
starts (the backbone pretrained on the pool, or random weights), and the recipe of a CV fold
and of a held-out source. The assets that train a partition and the aggregates that check its
stored result build them here, so the two can never disagree."""

from __future__ import annotations

from fer_pipeline.analysis.cross_validation import FoldRecipe, TrainingRecipe
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL, ArchConfig
from fer_pipeline.ml.pretrain import Start, starting_point
from fer_pipeline.ml.train import TrainConfig
from fer_pipeline.paths import DataPaths


def model_start(paths: DataPaths, init: str, arch: ArchConfig, with_weights: bool = True) -> Start:
    """Where a model of ``arch`` starts under ``init``: the main architecture's backbone if it
    fits. Aggregates only name the start in a recipe: ``with_weights=False`` skips loading it."""
    return starting_point(init, paths.backbone(MAIN_MODEL), arch, with_weights)


def main_start(paths: DataPaths, init: str, with_weights: bool = True) -> Start:
    """Where the main architecture's analysis trainings start: the models' own start, so CV and
    leave-one-source-out judge the same recipe as the shipped model."""
    return model_start(paths, init, ARCHITECTURES[MAIN_MODEL], with_weights)


def cv_recipe(version: str, config: TrainConfig, n_cv_folds: int, start: Start) -> FoldRecipe:
    """The recipe a CV fold's result is stored (and checked) with; the backbone is part of it."""
    return FoldRecipe.of(version, ARCHITECTURES[MAIN_MODEL], config, n_cv_folds=n_cv_folds,
                         init=start.init, backbone=start.backbone)


def loso_recipe(version: str, config: TrainConfig, start: Start) -> TrainingRecipe:
    """The recipe a held-out source's row is stored (and checked) with."""
    return TrainingRecipe.of(version, ARCHITECTURES[MAIN_MODEL], config, init=start.init, backbone=start.backbone)
