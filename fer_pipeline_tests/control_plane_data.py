"""Shared by the one-control-plane tests (issue 17): a fresh data root (two small image-folder
sources that both hold the four classes, so ``loso_fold`` has two partitions, and a
``settings.yaml`` with tiny budgets, so the whole graph, model card included, runs in a few
minutes on 2 cores), ``make demo``'s command run as a user runs it, and what two equivalent
launches must publish alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from fer_pipeline.classes import CLASSES
from fer_pipeline.demo.synthetic_faces import generate_demo_source
from fer_pipeline_tests.conftest import REPO

SOURCES = ("a", "b")
TEST_SETTINGS = {
    "cv_folds": 2,
    "training": {"epochs": 1, "patience": 0},
    "analysis": {"min_group_size": 5},
}


def build_control_plane_root(root: Path, n_images: int = 240, seed: int = 5,
                             settings: dict | None = None) -> dict[str, int]:
    """Write ``raw/a`` and ``raw/b`` (one generated set, each class's files dealt alternately to
    the two sources; the generator's planted defects go with the file they are named after, so
    the manifest has exclusions to show), ``sources.yaml`` and ``settings.yaml`` under ``root``.
    Returns the number of files per source."""
    root.mkdir(parents=True, exist_ok=True)
    gen = root.parent / f".generated-{root.name}"
    generate_demo_source(gen, n_images=n_images, seed=seed)
    demo = pd.read_csv(gen / "demographics.csv", dtype=str)
    rows: dict[str, list[dict[str, str]]] = {name: [] for name in SOURCES}
    dealt = {c: 0 for c in CLASSES}
    for rec in demo.sort_values("file").to_dict("records"):
        path = gen / rec["file"]
        label = rec["file"].split("/")[0]
        if not path.is_file() or label not in dealt:
            continue
        name = SOURCES[dealt[label] % len(SOURCES)]
        dealt[label] += 1
        dest = root / "raw" / name / rec["file"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        rows[name].append(rec)
    for name, recs in rows.items():
        for label in CLASSES:  # every class folder exists in every source
            (root / "raw" / name / label).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(recs).to_csv(root / "raw" / name / "demographics.csv", index=False)
    shutil.rmtree(gen)
    label_map = {c.lower(): c for c in CLASSES}
    demographics = {"csv": "demographics.csv", "key": "file",
                    "columns": {"gender": "gender", "age_group": "age_group"}}
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": n, "kind": "image_folders", "path": f"raw/{n}", "label_map": label_map,
         "demographics": demographics} for n in SOURCES]}))
    (root / "settings.yaml").write_text(yaml.safe_dump(settings if settings is not None else TEST_SETTINGS))
    return {name: len(recs) for name, recs in rows.items()}


def copy_root(root: Path, to: Path) -> Path:
    """The same sources, catalogue and settings in a new data root (nothing built)."""
    shutil.copytree(root / "raw", to / "raw")
    for name in ("sources.yaml", "settings.yaml"):
        shutil.copyfile(root / name, to / name)
    return to


def new_home(path: Path) -> Path:
    """A fresh Dagster instance with the project's instance config."""
    path.mkdir(parents=True)
    shutil.copyfile(REPO / "fer_pipeline" / "instance" / "dagster.yaml", path / "dagster.yaml")
    return path


def cli_env(root: Path, home: Path, **extra: str) -> dict[str, str]:
    """This environment without outside FER_/DAGSTER_ settings, on ``root`` and ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FER_", "DAGSTER_"))}
    env.update(FER_DATA_DIR=str(root), DAGSTER_HOME=str(home), GX_ANALYTICS_ENABLED="false",
               DAGSTER_DISABLE_TELEMETRY="1", **extra)
    return env


def refresh(root: Path, home: Path, *args: str) -> str:
    """``make demo``'s command (``fer-pipeline run``), as a user runs it; its output."""
    done = subprocess.run([sys.executable, "-m", "fer_pipeline.cli", "run", *args], cwd=REPO,
                          env=cli_env(root, home), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def published(root: Path) -> dict[str, pd.DataFrame]:
    """What two equivalent launches must publish alike: the manifest (but where the face store
    keeps the pixels: ``phash`` says what they are), the splits and the models' test scores."""
    manifest = pd.read_parquet(root / "manifest" / "manifest.parquet").sort_values("image_id").reset_index(drop=True)
    splits = pd.read_parquet(root / "manifest" / "splits.parquet").sort_values("image_id").reset_index(drop=True)
    metrics = pd.read_csv(root / "reports" / "metrics.csv")
    scores = metrics[[c for c in metrics.columns if "seconds" not in c and "per_second" not in c]]
    return {"manifest": manifest.drop(columns=["face_path"]), "splits": splits,
            "metrics": scores.sort_values("model").reset_index(drop=True)}


def assert_same_publication(ours: Path, theirs: Path) -> None:
    a, b = published(ours), published(theirs)
    for table in a:
        pd.testing.assert_frame_equal(a[table], b[table], obj=table)
