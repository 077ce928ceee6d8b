"""A model whose weights are not finite is never published: the last good checkpoint stays in
place and the rejected one is kept as a candidate (write, audit, publish for models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.ml import ArchConfig, TrainConfig, workflow
from fer_pipeline.paths import DataPaths

SIZE = 16


def test_nan_weights_are_not_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split_arrays) -> None:
    paths = DataPaths(tmp_path)
    arrays = {"train": split_arrays(64, 0, size=SIZE, noise=20), "validation": split_arrays(16, 1, size=SIZE, noise=20)}
    args = ("tiny", ArchConfig("tiny", (8, 16)), TrainConfig(epochs=1, batch_size=32, warmup_epochs=0),
            arrays, paths, "v1", PreprocessSettings(image_size=(SIZE, SIZE)))
    good = workflow.train_and_save(*args)
    assert good.published and good.checkpoint == paths.checkpoint("tiny") and good.curves_png == paths.curves("tiny")
    published = paths.checkpoint("tiny").read_bytes()

    real = workflow.train_model

    def diverged(*a, **kw):
        result = real(*a, **kw)
        first = next(k for k, v in result.state_dict.items() if v.dtype.is_floating_point)
        result.state_dict[first] = torch.full_like(result.state_dict[first], float("nan"))
        return result

    monkeypatch.setattr(workflow, "train_model", diverged)
    bad = workflow.train_and_save(*args)
    assert not bad.published and bad.bad_tensors
    assert bad.checkpoint.parent == paths.model_candidates_dir and bad.checkpoint.is_file()
    assert paths.checkpoint("tiny").read_bytes() == published  # the last good model stays
