"""Print where the pipeline's outputs are (run by `make demo` after the main job)."""

from __future__ import annotations

import sys

import pandas as pd

from fer_pipeline.paths import DataPaths, data_root_setting, is_store_url
from fer_pipeline.schema import MetricsReport, ShippedSpec


def summary(paths: DataPaths) -> str:
    lines = [f"Outputs under the data root {paths.root}:"]
    if paths.manifest.exists():
        kept = pd.read_parquet(paths.manifest, columns=["label"])
        excluded = pd.read_parquet(paths.excluded, columns=["stage"])
        lines.append(f"  manifest      {paths.manifest}  ({len(kept)} kept images: "
                     + ", ".join(f"{k} {v}" for k, v in kept['label'].value_counts().sort_index().items()) + ")")
        lines.append(f"  excluded      {paths.excluded}  ({len(excluded)} files not kept, with reasons)")
        lines.append(f"  splits        {paths.splits}")
        if paths.pool.exists():
            pool = pd.read_parquet(paths.pool, columns=["pool_label"])
            lines.append(f"  pool          {paths.pool}  ({len(pool)} pretraining images: "
                         + ", ".join(f"{k} {v}" for k, v in pool["pool_label"].value_counts().sort_index().items())
                         + ")")
        if paths.unlabelled.exists():
            unlabelled = pd.read_parquet(paths.unlabelled, columns=["image_id"])
            if len(unlabelled):
                lines.append(f"  unlabelled    {paths.unlabelled}  ({len(unlabelled)} images with no class yet: "
                             "the review queue ranks them)")
    else:
        lines.append("  (no manifest yet: run `make demo` or materialize the data assets)")
    for name, path in (("faces", paths.faces_dir), ("models", paths.models_dir), ("reports", paths.reports_dir)):
        if path.exists():
            n = sum(1 for p in path.rglob("*") if p.is_file())
            lines.append(f"  {name:<13} {path}/  ({n} files)")
    if paths.metrics_json.exists():
        report = MetricsReport.read(paths.metrics_json)
        best, f1, val = report.best_model, report.best_macro_f1(), report.best_validation_macro_f1()
        chosen = f"chosen by {report.selected_by}" + (f" {val:.3f}" if val is not None else "")
        lines.append(f"  best model    {best} ({chosen}; test macro-F1 {f1:.3f})" if f1 is not None
                     else f"  best model    {best} ({chosen})")
    if paths.shipped_json.exists():
        try:
            spec = ShippedSpec.read(paths.shipped_json)
            test = (spec.scores.get("test") or {}).get("macro_f1")
            lines.append(f"  shipped model {spec.name} ({spec.kind}, {len(spec.members)} member(s), selected by "
                         f"{spec.selected_by}" + (f"; test macro-F1 {test:.3f}" if test is not None else "")
                         + "); classify images with `.venv/bin/fer-pipeline predict PATH...`")
        except ValueError as exc:
            lines.append(f"  shipped model unreadable: {exc}")
    card = paths.report("model_card")
    if card.exists():
        lines.append(f"  model card    {card}")
    lines.append("Open the UI with `make ui` (http://127.0.0.1:3000) to see lineage, metadata, plots and checks.")
    return "\n".join(lines)


def main() -> int:
    root = data_root_setting()
    if is_store_url(root):  # an object store: summarise its working copy, pulled first (not the face store)
        from fer_pipeline.storage import open_data_root

        paths = open_data_root(root, trees=("manifest_dir", "models_dir", "reports_dir"))
        print(f"Data root {root} (working copy {paths.root})")
        print(summary(paths))
    else:
        print(summary(DataPaths.from_env()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
