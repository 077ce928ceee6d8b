"""Pretraining through real Dagster materializations: a pool source in the catalogue, the
`pretrained_backbone` asset, the main model fine-tuned from it, its scratch twin, the comparison
table, reuse of an unchanged backbone, and `init: scratch`."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from fer_pipeline.publish import pool_version, read_pool
from fer_pipeline.definitions import defs
from fer_pipeline.ml.checkpoint import read_checkpoint_metadata
from fer_pipeline.paths import DataPaths

pytestmark = pytest.mark.slow

DATA_KEYS = ["raw_sources", "faces", "deduplicated_faces", "manifest", "splits"]
KEYS = [*DATA_KEYS, "pretrained_backbone", "model_cnn4", "model_cnn4_scratch", "model_evaluation"]
TRAINING = {"epochs": 2, "patience": 2, "pretrain_epochs": 2, "pretrain_min_images": 50}


def _run(root: Path, keys: list[str], training: dict | None = None) -> dg.ExecuteInProcessResult:
    mp = pytest.MonkeyPatch()
    mp.setenv("FER_DATA_DIR", str(root))
    try:
        return defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), asset_selection=[dg.AssetKey(k) for k in keys],
            run_config={"resources": {"training": {"config": {**TRAINING, **(training or {})}}}},
            raise_on_error=False)
    finally:
        mp.undo()


def _meta(result: dg.ExecuteInProcessResult, key: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == key]
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pretrain")
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 240, "seed": 5},
        {"name": "pool", "kind": "synthetic", "role": "pretrain", "path": "raw/pool", "n_images": 150, "seed": 7},
    ]}))
    first = _run(root, KEYS)
    published = DataPaths(root).backbone("cnn4").read_bytes() if first.success else b""
    again = _run(root, ["pretrained_backbone"])
    return root, first, again, published


def test_backbone_is_trained_on_the_pool_labels_and_published(world) -> None:
    root, first, _, _ = world
    assert first.success
    paths = DataPaths(root)
    pool = read_pool(paths)
    meta = read_checkpoint_metadata(paths.backbone("cnn4"))
    assert meta["classes"] == sorted(pool["pool_label"].unique()) and len(meta["classes"]) >= 2
    assert meta["extra"]["pool_version"] == pool_version(paths)
    assert meta["extra"]["pool_images"] == len(pool)
    shown = _meta(first, "pretrained_backbone")
    assert shown["status"] == "trained" and shown["pool_images"] == len(pool)
    checks = {e.check_name: e.passed for e in first.get_asset_check_evaluations()}
    assert checks["backbone_weights_finite"]


def test_the_main_model_starts_from_the_backbone_and_its_twin_from_scratch(world) -> None:
    root, first, _, _ = world
    paths = DataPaths(root)
    identity = read_checkpoint_metadata(paths.backbone("cnn4"))["extra"]["backbone_identity"]
    main = read_checkpoint_metadata(paths.checkpoint("cnn4"))["extra"]
    twin = read_checkpoint_metadata(paths.checkpoint("cnn4_scratch"))["extra"]
    assert main["init"] == "pretrained" and main["backbone"] == identity
    assert twin["init"] == "scratch" and twin["backbone"] is None
    assert _meta(first, "model_cnn4")["init"] == "pretrained"
    # Fine-tuning moved the features, but they stayed far closer to the backbone's than the twin's are.
    backbone, tuned, cold = (load_file(str(p)) for p in (paths.backbone("cnn4"), paths.checkpoint("cnn4"),
                                                          paths.checkpoint("cnn4_scratch")))
    key = "features.0.0.weight"
    assert (tuned[key] - backbone[key]).norm() < 0.5 * (cold[key] - backbone[key]).norm()
    table = pd.read_csv(paths.report("metrics_csv")).set_index("model")
    assert table.loc["cnn4", "init"] == "pretrained" and table.loc["cnn4_scratch", "init"] == "scratch"


def test_an_unchanged_backbone_is_reused(world) -> None:
    root, _, again, published = world
    assert again.success
    assert _meta(again, "pretrained_backbone")["status"] == "reused"
    assert DataPaths(root).backbone("cnn4").read_bytes() == published  # not retrained, not rewritten


def test_init_scratch_and_a_changed_setting(world, tmp_path: Path) -> None:
    root, _, _, _ = world
    before = DataPaths(root).backbone("cnn4").read_bytes()
    result = _run(root, ["pretrained_backbone", "model_cnn4"], {"init": "scratch", "pretrain_epochs": 3})
    assert result.success
    assert _meta(result, "pretrained_backbone")["status"] == "trained"  # a setting changed: retrained
    assert DataPaths(root).backbone("cnn4").read_bytes() != before
    main = read_checkpoint_metadata(DataPaths(root).checkpoint("cnn4"))["extra"]
    assert main["init"] == "scratch" and main["init_reason"] == "init: scratch"


def test_a_damaged_backbone_fails_the_model_and_is_retrained_by_its_asset(world) -> None:
    root, _, _, _ = world
    path = DataPaths(root).backbone("cnn4")
    path.write_bytes(path.read_bytes()[:100])  # truncated: e.g. a disk filled up during a copy
    failed = _run(root, ["model_cnn4"])
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error.to_string()  # the step error and its cause
    assert f"{path}: damaged pretrained backbone" in error
    repaired = _run(root, ["pretrained_backbone", "model_cnn4"])
    assert repaired.success and _meta(repaired, "pretrained_backbone")["status"] == "trained"
    assert read_checkpoint_metadata(DataPaths(root).checkpoint("cnn4"))["extra"]["init"] == "pretrained"
