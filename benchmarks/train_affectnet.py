"""Real-data benchmark of the shipped model on AffectNet-4class, chosen without the test split.

Protocol: ``../shared/datasets/affectnet-4class.zip`` (relative to the repository root);
folders Anger->Angry, Bored_Tired->Tired, Focused_Engaged->Focused, Neutral->Neutral; files
whose bytes are filed under two classes are dropped, byte-identical copies within one class
kept once; faces preprocessed exactly as the pipeline does (48x48 grayscale, centre crop);
stratified 70/15/15 split with seed 0 (fixed). The pretraining pool is FER2013 (six non-disgust
emotions) minus every face that duplicates an AffectNet face (the manifest's rule).

1. **Recipe choice, on validation.** Each candidate pretraining recipe (pool images x epochs,
   ``--recipes``) pretrains a backbone (seed 0) and fine-tunes the main model on train; the
   recipe with the best *validation* macro-F1 wins. No test prediction is made in this step.
2. **Rows, same run, seeds 0/1/2 with the backbone re-seeded too** (pool sample, pretraining
   and fine-tuning seed all = the seed):

   * ``scratch``: the main model from random weights;
   * ``single``: the main model fine-tuned from the chosen recipe's backbone;
   * ``fold_ensemble``: the k cross-validation fold models over train+validation (each calibrated
     on its own held-out fold), mean of calibrated probabilities, flip TTA as the recipe says;
   * ``shipped``: per seed, ``single`` or ``fold_ensemble`` by the pipeline's own rule
     (:func:`fer_pipeline.analysis.shipping.decide`: the ensemble's out-of-fold macro-F1 on the
     validation images against the single model's validation macro-F1).

   Test accuracy and macro-F1 are reported as mean +- sample std over the seeds; the test split
   is read only after every choice is made.

    .venv/bin/python benchmarks/train_affectnet.py            # full run (GPU: minutes; 2 CPUs: hours)
    .venv/bin/python benchmarks/train_affectnet.py --quick    # a small smoke run of the same protocol

Writes ``benchmarks/results/train_affectnet.json`` (``--quick``: ``train_affectnet_quick.json``:
its figures are not the benchmark's) through :func:`benchmarks.record.write_result`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import time
import zipfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from fer_pipeline.classes import CLASS_TO_INDEX, CLASSES
from fer_pipeline.faces.preprocess import PreprocessSettings, decode_face
from fer_pipeline.ml import (
    ARCHITECTURES,
    MAIN_MODEL,
    TrainConfig,
    evaluate_predictions,
    train_model,
)
from fer_pipeline.ml.calibration import softmax
from fer_pipeline.ml.inference import predict_logits

DEFAULT_ZIP = REPO_ROOT.parent / "shared" / "datasets" / "affectnet-4class.zip"
FOLDER_TO_CLASS = {"Anger": "Angry", "Bored_Tired": "Tired", "Focused_Engaged": "Focused", "Neutral": "Neutral"}


def load_affectnet_zip(
    zip_path: Path = DEFAULT_ZIP, size: tuple[int, int] = (48, 48)
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Faces (N, H, W) uint8, label indices (N,) and member names, sorted by member name.

    Skips anything outside the four class folders (``Gender.zip``, ``datasetReadMe.md``,
    ``.DS_Store``); drops images whose bytes appear under more than one class.
    """
    settings = PreprocessSettings(image_size=size)
    by_hash: dict[str, list[tuple[str, str, bytes]]] = defaultdict(list)
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) != 2 or parts[0] not in FOLDER_TO_CLASS or not parts[1].lower().endswith(".jpg"):
                continue
            data = zf.read(name)
            by_hash[hashlib.sha256(data).hexdigest()].append((name, FOLDER_TO_CLASS[parts[0]], data))

    faces, labels, names = [], [], []
    conflicts = 0
    for entries in by_hash.values():
        if len({label for _, label, _ in entries}) > 1:
            conflicts += 1
            continue
        name, label, data = entries[0]
        decoded = decode_face(data, settings)
        if not decoded.ok:
            print(f"skip {name}: {decoded.reason}", file=sys.stderr)
            continue
        faces.append(decoded.face)
        labels.append(CLASS_TO_INDEX[label])
        names.append(name)
    order = np.argsort(names)
    print(f"loaded {len(names)} faces ({conflicts} cross-class conflicts dropped)")
    return np.stack(faces)[order], np.asarray(labels, dtype=np.int64)[order], [names[i] for i in order]


POOL_ZIP = REPO_ROOT.parent / "shared" / "datasets" / "fer2013-folders.zip"
POOL_LABELS = ("angry", "fear", "happy", "neutral", "sad", "surprise")  # FER2013 without disgust (inflated 9x)


def load_pool_zip(zip_path: Path = POOL_ZIP, labels: tuple[str, ...] = POOL_LABELS,
                  size: tuple[int, int] = (48, 48), limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """FER2013 faces of ``labels`` (all three of its splits) as a pretraining pool, sorted by name;
    ``limit``: a seeded random sample of that many files, decoded alone (quick runs)."""
    settings = PreprocessSettings(image_size=size)
    faces, ys, names = [], [], []
    with zipfile.ZipFile(zip_path) as zf:
        wanted = [n for n in sorted(zf.namelist()) if len(p := n.split("/")) == 3 and p[1] in labels
                  and p[2].lower().endswith(".jpg")]
        if limit and limit < len(wanted):
            wanted = sorted(np.random.default_rng(0).choice(wanted, limit, replace=False).tolist())
        for name in wanted:
            parts = name.split("/")
            decoded = decode_face(zf.read(name), settings)
            if decoded.ok:
                faces.append(decoded.face)
                ys.append(labels.index(parts[1]))
                names.append(name)
    return np.stack(faces), np.asarray(ys, dtype=np.int64), names


def guard_pool(pool: np.ndarray, target: np.ndarray, max_distance: int = 4,
               min_correlation: float = 0.95) -> np.ndarray:
    """Mask of pool faces to keep: drop every one that duplicates a target face (any split).

    The pipeline's leakage guard compares the pool with the validation and test images; here
    the split is fixed but the seeds vary, so the whole target set is the stricter reference.
    Same rule as the manifest's de-duplication (perceptual hash, mirrored too, confirmed by
    pixel correlation)."""
    from fer_pipeline.dedup.groups import duplicates_across
    from fer_pipeline.faces.phash import phashes

    h, m = phashes(pool)
    th, tm = phashes(target)
    return duplicates_across(h, m, pool, th, tm, target, max_distance, min_correlation) < 0


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-class shuffle, then cut each class at the given fractions (train, validation, test)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        parts["train"].append(idx[:n_train])
        parts["validation"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def stratified_subsample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified sample of ``n`` rows (all rows when ``n`` >= len)."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(labels == c))[: max(1, round(n * np.mean(labels == c)))]
           for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


def stored_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """A fold number per row, stratified by class (shuffled per class, dealt round-robin), like
    the ``fold`` column of ``splits.parquet``."""
    folds = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        folds[idx] = np.arange(len(idx)) % k
    return folds


_MEMO: dict[tuple, object] = {}


def _memo(key: tuple, make):
    """Seed 0's backbone and single model of the chosen recipe are the very ones the recipe
    choice trained (same data, recipe, seed and config): train them once."""
    if key not in _MEMO:
        _MEMO[key] = make()
    return _MEMO[key]


def pretrain(px: np.ndarray, py: np.ndarray, max_images: int, epochs: int, seed: int, config: TrainConfig) -> dict:
    """A backbone of the main architecture pretrained on a seeded stratified sample of the pool."""
    return _memo(("backbone", max_images, epochs, seed), lambda: _pretrain(px, py, max_images, epochs, seed, config))


def fine_tune(images, labels, split, state: dict, recipe: tuple[int, int], seed: int, config: TrainConfig):
    """The main model fine-tuned on train from ``recipe``'s backbone of ``seed`` (early stopping on validation)."""
    tr, va = split["train"], split["validation"]
    return _memo(("single", *recipe, seed), lambda: train_model(
        images[tr], labels[tr], images[va], labels[va], ARCHITECTURES[MAIN_MODEL], replace(config, seed=seed),
        init_state=state))


def _pretrain(px: np.ndarray, py: np.ndarray, max_images: int, epochs: int, seed: int, config: TrainConfig) -> dict:
    from fer_pipeline.ml.pretrain import backbone_features, cap_pool, pretrain_backbone

    keep = cap_pool(py, max_images, seed=seed)
    t0 = time.perf_counter()
    cfg = replace(config, epochs=epochs, patience=0, seed=seed)
    result, _ = pretrain_backbone(px[keep], py[keep], len(POOL_LABELS), ARCHITECTURES[MAIN_MODEL], cfg)
    print(f"  pretrained on {len(keep)} pool faces x {epochs} epochs (seed {seed}) in "
          f"{(time.perf_counter() - t0) / 60:.1f} min; pool validation macro-F1 {result.best_val_macro_f1:.3f}",
          flush=True)
    return backbone_features(result.state_dict)


def _scores(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    m = evaluate_predictions(y, probs.argmax(1), probs, classes=CLASSES)
    return {"accuracy": m.accuracy, "macro_f1": m.macro_f1}


def _probs(result, images: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    logits = predict_logits(result.build(), images, result.normalization, tta_flip=result.config.tta_flip)
    return softmax(logits.double().numpy(), temperature)


def choose_recipe(images, labels, split, px, py, recipes, config: TrainConfig) -> tuple[tuple[int, int], list[dict]]:
    """The pretraining recipe (pool images, epochs) with the best validation macro-F1 of the
    fine-tuned main model (seed 0). Reads train and validation only."""
    va = split["validation"]
    rows = []
    for max_images, epochs in recipes:
        print(f"recipe {max_images} pool images x {epochs} epochs:", flush=True)
        state = pretrain(px, py, max_images, epochs, 0, config)
        result = fine_tune(images, labels, split, state, (max_images, epochs), 0, config)
        val = _scores(labels[va], _probs(result, images[va]))
        rows.append({"pool_images": max_images, "pretrain_epochs": epochs, "val_macro_f1": val["macro_f1"],
                     "val_accuracy": val["accuracy"]})
        print(f"  validation macro-F1 {val['macro_f1']:.4f}", flush=True)
    best = max(rows, key=lambda r: (r["val_macro_f1"], r["val_accuracy"], -r["pool_images"], -r["pretrain_epochs"]))
    return (best["pool_images"], best["pretrain_epochs"]), rows


def run_seed(images, labels, split, px, py, recipe: tuple[int, int], seed: int, config: TrainConfig,
             n_folds: int) -> list[dict]:
    """Scratch, single, fold ensemble and shipped rows of one seed (backbone re-seeded too)."""
    from fer_pipeline.analysis.cross_validation import combine_arrays, train_fold
    from fer_pipeline.analysis.shipping import Candidate, decide, oof_scores
    from fer_pipeline.ml.data import SplitArrays
    from fer_pipeline.ml.shipped import ShippedMember

    tr, va, te = split["train"], split["validation"], split["test"]
    arch, cfg = ARCHITECTURES[MAIN_MODEL], replace(config, seed=seed)
    t0 = time.perf_counter()
    scratch = train_model(images[tr], labels[tr], images[va], labels[va], arch, cfg)
    state = pretrain(px, py, recipe[0], recipe[1], seed, config)
    single = fine_tune(images, labels, split, state, recipe, seed, config)
    single_val = _scores(labels[va], _probs(single, images[va]))

    def arrays(rows: np.ndarray, tag: str) -> SplitArrays:
        ids = [f"{tag}{i:05d}" for i in rows]
        return SplitArrays(images[rows], labels[rows], ids, pd.DataFrame({"image_id": ids}))

    pool = combine_arrays([arrays(tr, "t"), arrays(va, "v")])
    pool.frame["fold"] = stored_folds(pool.labels, n_folds, seed=0)
    folds = [train_fold(pool, f, arch, cfg, n_cv_folds=n_folds, train_fn=functools.partial(train_model, init_state=state))
             for f in range(n_folds)]
    oof = oof_scores(folds, {f"v{i:05d}" for i in va})
    # the choice: validation and out-of-fold estimates only
    members = [ShippedMember(f"fold_{r.fold}", "", float(r.calibration["temperature"])) for r in folds]
    decision = decide(Candidate("single", "single", single_val["macro_f1"], "validation", []),
                      Candidate("fold_ensemble", "ensemble", oof["oof_validation_images_macro_f1"],
                                "out-of-fold on the validation images", members))
    # the test split, after every choice
    y = labels[te]
    ensemble = np.mean([_probs(r.trained, images[te], float(r.calibration["temperature"])) for r in folds], axis=0)
    test = {"scratch": _scores(y, _probs(scratch, images[te])),
            "single": _scores(y, _probs(single, images[te], 1.0)),
            "fold_ensemble": _scores(y, ensemble)}
    test["shipped"] = test[decision.chosen.name]
    estimates = {"single": single_val["macro_f1"], "fold_ensemble": oof["oof_validation_images_macro_f1"]}
    rows = [{"seed": seed, "row": name, "test_accuracy": t["accuracy"], "test_macro_f1": t["macro_f1"],
             "selection_macro_f1": estimates.get(decision.chosen.name if name == "shipped" else name),
             "shipped_kind": decision.chosen.kind if name == "shipped" else ""} for name, t in test.items()]
    print(f"seed {seed}: " + ", ".join(f"{r['row']} {r['test_macro_f1']:.4f}" for r in rows)
          + f" (shipped {decision.chosen.name}: {decision.reason}; pooled OOF {oof['oof_macro_f1']:.4f}; "
          f"{(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    return rows


def summarize(runs: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per row: mean and sample std (ddof=1) over seeds of test accuracy and macro-F1."""
    out = {}
    for name, g in runs.groupby("row", sort=False):
        out[str(name)] = {"seeds": len(g), **{f"{col}_{stat}": float(getattr(g[col], stat)(**kw))
                          for col in ("test_accuracy", "test_macro_f1")
                          for stat, kw in (("mean", {}), ("std", {"ddof": 1}))}}
        if name == "shipped":
            out[str(name)]["kinds"] = "/".join(g["shipped_kind"])
    return out


QUICK = {"limit": 400, "pool_limit": 1000, "recipes": [(300, 1), (600, 1)], "epochs": 2, "folds": 3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    p.add_argument("--pool-zip", type=Path, default=POOL_ZIP)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=["12000x15", "24000x15", "24000x25", "35000x15"],
                   help="candidate pretraining recipes, POOL_IMAGESxEPOCHS, chosen among by validation")
    p.add_argument("--folds", type=int, default=5, help="CV folds over train+validation (the ensemble's members)")
    p.add_argument("--epochs", type=int, default=None, help="override TrainConfig.epochs (fine-tuning)")
    p.add_argument("--limit", type=int, default=None, help="stratified sample of this many AffectNet faces")
    p.add_argument("--pool-limit", type=int, default=None, help="read at most this many pool faces")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = args.limit or QUICK["limit"]
        args.pool_limit = args.pool_limit or QUICK["pool_limit"]
        args.epochs = args.epochs or QUICK["epochs"]
        args.folds = QUICK["folds"]
        recipes = QUICK["recipes"]
    else:
        recipes = [tuple(int(v) for v in r.lower().split("x")) for r in args.recipes]
    for path in (args.zip, args.pool_zip):
        if not path.exists():
            print(f"dataset not found: {path}", file=sys.stderr)
            return 2
    config = TrainConfig(num_threads=args.threads)
    if args.epochs is not None:
        config = replace(config, epochs=args.epochs)
    t0 = time.perf_counter()
    images, labels, _ = load_affectnet_zip(args.zip)
    if args.limit:
        keep = stratified_subsample(labels, args.limit)
        images, labels = images[keep], labels[keep]
    split = stratified_split(labels, seed=0)
    print("split sizes: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()), flush=True)
    px, py, _ = load_pool_zip(args.pool_zip, limit=args.pool_limit)
    guard = guard_pool(px, images)
    px, py = px[guard], py[guard]
    print(f"pool: {len(py)} faces after the leakage guard ({int((~guard).sum())} dropped)", flush=True)
    t_load = time.perf_counter() - t0

    recipe, recipe_rows = choose_recipe(images, labels, split, px, py, recipes, config)
    print(f"chosen by validation: {recipe[0]} pool images x {recipe[1]} epochs", flush=True)
    runs = pd.DataFrame([row for seed in args.seeds
                         for row in run_seed(images, labels, split, px, py, recipe, seed, config, args.folds)])
    summary = summarize(runs)
    minutes = (time.perf_counter() - t0) / 60
    print(json.dumps(summary, indent=2))
    print(f"total {minutes:.1f} min (loading {t_load / 60:.1f} min)")

    from benchmarks.record import write_result

    name = "train_affectnet_quick" if args.quick else "train_affectnet"
    path = write_result(name, {
        "mode": "quick (smoke run: not the benchmark's figures)" if args.quick else "full",
        "n_images": len(labels), "split_sizes": {k: len(v) for k, v in split.items()},
        "pool_images_after_guard": len(py), "n_folds": args.folds, "seeds": args.seeds,
        "fine_tune_config": config.to_dict(),
        "recipe_candidates_validation": recipe_rows,
        "recipe_chosen_by_validation": {"pool_images": recipe[0], "pretrain_epochs": recipe[1]},
        "rows": summary, "runs": runs.to_dict(orient="records"), "minutes": round(minutes, 1),
    }, targets={"shipped test_macro_f1_mean": ">= 0.75", "shipped test_macro_f1_std": "<= 0.015"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
