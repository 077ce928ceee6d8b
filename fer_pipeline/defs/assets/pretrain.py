"""The pretrained backbone: the main architecture trained on the pretraining pool's own labels
(faces the four classes do not use), which the model assets then fine-tune. Lineage in the UI:
splits (publishes the pool) → pretrained_backbone → model_* / cv_fold / loso_fold."""

import time

import dagster as dg

from fer_pipeline.defs.assets.data import splits
from fer_pipeline.defs.executors import GPU_OP_TAGS
from fer_pipeline.defs.metadata import md_image, md_table
from fer_pipeline.defs.resources import FerSettings, TrainSettings
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL
from fer_pipeline.ml.pretrain import refresh_backbone
from fer_pipeline.publish import pool_version, read_pool

BACKBONE = "pretrained_backbone"


@fer_asset(
    name=BACKBONE, group_name="models", deps=[splits], op_tags=GPU_OP_TAGS,
    description=f"The main architecture ({MAIN_MODEL}) pretrained on the pool's labels (manifest/pool.parquet), "
                "saved like every checkpoint; retrained only when the pool or the pretraining settings change. "
                "Models with init: pretrained start from its features.",
    check_specs=[dg.AssetCheckSpec("backbone_weights_finite", asset=BACKBONE, blocking=True,
                                   description="No NaN/inf in the backbone's weights (else it is not published).")],
)
def pretrained_backbone(context: dg.AssetExecutionContext, fer: FerSettings,
                        training: TrainSettings) -> dg.MaterializeResult:
    start = time.perf_counter()
    paths = fer.paths
    pool = read_pool(paths)
    version = pool_version(paths)
    outcome = refresh_backbone(paths, pool, version, ARCHITECTURES[MAIN_MODEL], training.config(),
                               training.pretrain_config(), fer.preprocess, log=context.log.info)
    context.log.info(f"backbone: {outcome.status} ({outcome.reason})")
    metadata: dict[str, object] = {
        "status": outcome.status, "reason": outcome.reason, "pool_version": version,
        "pool_images": len(pool), "pool_images_used": outcome.used,
        "pool_labels": dg.MetadataValue.json(outcome.labels or {}),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if outcome.checkpoint is not None:
        metadata["checkpoint"] = dg.MetadataValue.path(str(outcome.checkpoint))
    if outcome.result is not None:
        r = outcome.result
        metadata.update({"pool_val_macro_f1": round(r.best_val_macro_f1, 4),
                         "pool_val_accuracy": round(r.best_val_accuracy, 4), "best_epoch": r.best_epoch,
                         "train_images_per_second": round(r.mean_images_per_second, 1),
                         "history": md_table(r.history_frame().round(4), 60)})
    if outcome.curves is not None and outcome.curves.is_file():
        metadata["curves"] = md_image(outcome.curves, "backbone curves")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(outcome.identity or f"none:{version}"),
        metadata=metadata,
        check_results=[dg.AssetCheckResult(check_name="backbone_weights_finite",
                                           passed=outcome.status != "rejected",
                                           metadata={"status": outcome.status, "reason": outcome.reason})],
    )
