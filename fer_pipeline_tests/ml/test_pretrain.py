"""Pretraining core: the cross-set duplicate finder behind the leakage guard, the pool's own
split, and fine-tuning from a backbone's features (plain Python; the assets are tested in
defs/test_pretrain_assets.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fer_pipeline.dedup.groups import duplicates_across
from fer_pipeline.faces.phash import phashes
from fer_pipeline.ml import train_model
from fer_pipeline.ml.architectures import build_model
from fer_pipeline.ml.pretrain import backbone_features, pool_split, pretrain_backbone
from fer_pipeline.ml.train import load_partial_state
from fer_pipeline_tests.ml.test_train import FAST, TINY, pattern_faces


def smooth_faces(n: int, seed: int) -> np.ndarray:
    """Distinct face-like images: random low-frequency blobs (phash sees structure, not noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 6, 6)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(small)[:, None], size=(48, 48), mode="bicubic")
    return big[:, 0].clamp(0, 255).numpy().astype(np.uint8)


def test_duplicates_across_names_exact_near_and_mirrored_copies() -> None:
    ref = smooth_faces(60, seed=0)
    pool = smooth_faces(40, seed=1)
    pool[3] = ref[7]  # exact copy
    pool[5] = ref[9][:, ::-1]  # mirrored copy
    pool[6] = np.clip(ref[11].astype(int) + 6, 0, 255)  # brightened copy
    h, m = phashes(pool)
    rh, rm = phashes(ref)
    found = duplicates_across(h, m, pool, rh, rm, ref)
    assert dict(zip(*np.nonzero(found >= 0), found[found >= 0])) == {3: 7, 5: 9, 6: 11}
    # Without the mirror hashes the flipped copy is not found by phash.
    no_mirror = duplicates_across(h, None, pool, rh, None, ref)
    assert no_mirror[5] == -1 and no_mirror[3] == 7


def test_duplicates_across_correlation_confirms_phash_candidates() -> None:
    ref = smooth_faces(30, seed=2)
    pool = smooth_faces(30, seed=3)
    h, m = phashes(pool)
    rh, rm = phashes(ref)
    loose = duplicates_across(h, m, None, rh, rm, None, max_distance=20)  # phash alone links strangers
    strict = duplicates_across(h, m, pool, rh, rm, ref, max_distance=20)
    assert (loose >= 0).sum() > 0 and (strict >= 0).sum() == 0


def test_pool_split_is_stratified_and_disjoint() -> None:
    labels = np.repeat(np.arange(3), [50, 20, 10])
    split = pool_split(labels, 0.1, seed=0)
    assert not set(split.train) & set(split.validation)
    assert len(split.train) + len(split.validation) == len(labels)
    assert np.bincount(labels[split.validation]).tolist() == [5, 2, 1]
    assert np.array_equal(pool_split(labels, 0.1, seed=0).validation, split.validation)


def test_fine_tuning_starts_from_the_backbone_features_only() -> None:
    x, y = pattern_faces(256, seed=0)
    cfg = replace(FAST, device="cpu")
    backbone, _ = pretrain_backbone(x, y % 3, 3, TINY, cfg)  # 3 pool labels, 4 target classes
    feats = backbone_features(backbone.state_dict)
    assert feats and all(k.startswith("features.") for k in feats)
    model = build_model(TINY, 4, input_size=(16, 16))
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    load_partial_state(model, feats)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in feats.items())
    assert all(torch.equal(state[k], v) for k, v in head_before.items())
    with pytest.raises(ValueError, match="do not fit"):
        load_partial_state(build_model(replace(TINY, channels=(4, 8)), 4, input_size=(16, 16)), feats)


def test_a_pretrained_start_learns_faster_than_scratch() -> None:
    x, y = pattern_faces(512, seed=0)
    cfg = replace(FAST, device="cpu")
    backbone, _ = pretrain_backbone(x, y, 4, TINY, replace(cfg, epochs=4))
    x_small, y_small = pattern_faces(64, seed=5)
    x_val, y_val = pattern_faces(128, seed=6)
    one = replace(cfg, epochs=1)
    warm = train_model(x_small, y_small, x_val, y_val, TINY, one, init_state=backbone_features(backbone.state_dict))
    cold = train_model(x_small, y_small, x_val, y_val, TINY, one)
    assert warm.best_val_macro_f1 > cold.best_val_macro_f1 + 0.1


def _tiny_backbone(tmp_path) -> tuple:
    from fer_pipeline.ml.checkpoint import save_checkpoint

    x, y = pattern_faces(128, seed=0)
    result, _ = pretrain_backbone(x, y % 3, 3, TINY, replace(FAST, device="cpu", epochs=1))
    path = save_checkpoint(tmp_path / "backbone_tiny.safetensors", result, data_version="pool-v1",
                           classes=("a", "b", "c"), extra={"backbone_identity": "id-1"})
    return path, result


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "nan_weights"])
def test_a_damaged_backbone_is_refused_naming_it_never_a_silent_scratch_start(tmp_path, damage: str) -> None:
    from safetensors.torch import load_file, save_file

    from fer_pipeline.ml.pretrain import starting_point

    path, _ = _tiny_backbone(tmp_path)
    assert starting_point("pretrained", path, TINY).init == "pretrained"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        state = load_file(str(path))
        state["features.0.0.weight"][0, 0, 0, 0] = float("nan")
        save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"backbone_tiny\.safetensors: damaged pretrained backbone"):
        starting_point("pretrained", path, TINY)
    assert starting_point("scratch", path, TINY).init == "scratch"  # scratch never reads it


def test_backbone_start_header_only_and_other_architectures(tmp_path) -> None:
    from fer_pipeline.ml.pretrain import starting_point

    path, _ = _tiny_backbone(tmp_path)
    named = starting_point("pretrained", path, TINY, with_weights=False)
    assert named.init == "pretrained" and named.backbone == "id-1" and named.state is None
    other = starting_point("pretrained", path, replace(TINY, name="wide", channels=(16, 32)))
    assert other.init == "scratch" and "do not fit" in other.reason
    missing = starting_point("pretrained", tmp_path / "absent.safetensors", TINY)
    assert missing.init == "scratch" and "no pretrained backbone" in missing.reason
