"""Leave one source out: does the main architecture work on a source it never saw?
``held_out_sources`` (which sources can be held out), ``loso_fold`` (one partition per
four-class source of the catalogue, known when the code location loads) and the aggregate
``cross_source_generalisation``. Lineage in the UI::

    splits ──► held_out_sources ──► loso_fold (one partition per source) ──► cross_source_generalisation
"""

import functools

import dagster as dg
import pandas as pd

from fer_pipeline.analysis import generalisation as loso_core
from fer_pipeline.analysis import plots as aplots
from fer_pipeline.analysis.cross_validation import stable_hash
from fer_pipeline.analysis.recipes import loso_recipe, main_start
from fer_pipeline.atomic import write_table
from fer_pipeline.defs.assets.data import splits
from fer_pipeline.defs.assets.inputs import (
    GROUP,
    MAIN_MODEL_ASSET,
    load_data,
    main_test_predictions,
    rounded,
)
from fer_pipeline.defs.assets.pretrain import pretrained_backbone
from fer_pipeline.defs.executors import GPU_OP_TAGS
from fer_pipeline.defs.jobs import (
    HELD_OUT_SOURCES,
    LOSO_FOLD,
    held_out_partitions,
    partition_key_problem,
)
from fer_pipeline.defs.metadata import md_image, md_table
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL
from fer_pipeline.ml.train import train_model


def build_loso_assets(keys: list[str]) -> list[dg.AssetsDefinition]:
    """``held_out_sources`` and ``loso_fold`` (one partition per key: the catalogue's four-class
    sources, read when the code location loads)."""

    @fer_asset(name=HELD_OUT_SOURCES, group_name=GROUP, deps=[splits],
               description="The sources of the published data and whether each can be held out (leave-one-source-"
                           f"out); names a source without a {LOSO_FOLD} partition (the catalogue changed since the "
                           "code location loaded: reload it).")
    def held_out_sources(context: dg.AssetExecutionContext, fer: FerSettings,
                         analysis: AnalysisSettings) -> dg.MaterializeResult:
        _, _, arrays, version = load_data(fer, with_images=False)  # labels and sources only
        sources = loso_core.sources_of(arrays)
        status = (loso_core.eligibility(arrays, analysis.loso_min_classes) if len(sources) > 1
                  else {s: loso_core.NOT_APPLICABLE_ONE_SOURCE for s in sources})
        for source, problem in ((s, partition_key_problem(s)) for s in sources):
            if problem and status[source] == loso_core.ELIGIBLE:
                status[source] = f"skipped: {problem}"
                context.log.warning(f"source {source!r} cannot be held out: {problem}")
        wanted = sorted(s for s, state in status.items() if state == loso_core.ELIGIBLE)
        unplanned = sorted(set(wanted) - set(keys))
        if unplanned:
            context.log.warning(f"held-out sources {unplanned} have no {LOSO_FOLD} partition: the catalogue changed "
                                "since the code location loaded; reload it (UI: Deployment → Reload)")
        context.log.info(f"held-out sources: {wanted or 'none'} (partitions: {keys or 'none'})")
        table = pd.DataFrame({"source": list(status), "status": list(status.values())})
        return dg.MaterializeResult(
            data_version=dg.DataVersion(stable_hash({"data_version": version, "sources": wanted})),
            metadata={"sources": md_table(table), "eligible": wanted, "partitions": list(keys),
                      "without_partition": unplanned, "data_version": version})

    @fer_asset(name=LOSO_FOLD, group_name=GROUP, deps=[held_out_sources, splits, pretrained_backbone],
               partitions_def=held_out_partitions(keys), op_tags=GPU_OP_TAGS,
               description="Leave-one-source-out for one source (partition = source name, one per four-class "
                           "source of the catalogue): the main architecture trained on the other sources' train "
                           "split, early-stopped on their validation split, tested on every image of the held-out "
                           "source. A source that cannot be held out records why.")
    def loso_fold(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                  analysis: AnalysisSettings) -> dg.MaterializeResult:
        source = context.partition_key
        _, _, arrays, version = load_data(fer)
        start = main_start(fer.paths, training.init)
        config = analysis.recipe(training, analysis.loso_epochs)
        recipe = loso_recipe(version, config, start)
        row = loso_core.held_out_row(arrays, source, ARCHITECTURES[MAIN_MODEL], config,
                                     train_fn=functools.partial(train_model, init_state=start.state),
                                     min_classes=analysis.loso_min_classes, run_id=context.run.run_id,
                                     log=context.log.info, train_log=context.log.debug)
        if row["status"] != loso_core.STATUS_DONE:
            context.log.warning(f"held-out source {source}: {row['status']}")
        path = loso_core.LosoStore(fer.paths.report("loso_results")).save(row, recipe)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "run_id"}
        return dg.MaterializeResult(data_version=dg.DataVersion(recipe.identity(source)),
                                    metadata={**shown, "data_version": version,
                                              "recipe_identity": recipe.identity(source),
                                              "file": dg.MetadataValue.path(str(path))})

    return [held_out_sources, loso_fold]


@fer_asset(group_name=GROUP, deps=[dg.AssetKey(LOSO_FOLD), dg.AssetKey(HELD_OUT_SOURCES), MAIN_MODEL_ASSET, splits],
          description="Leave-one-source-out from the loso_fold partitions: per held-out source, the score of the "
                      "main architecture trained without it, beside the main model's in-domain test score on it. "
                      "Rows trained on other data (or another recipe) are refused. Not applicable with one source.",
          check_specs=[dg.AssetCheckSpec("loso_sources_current", asset="cross_source_generalisation",
                                         description="Every eligible source's partition is materialized for the "
                                                     "published data and the current recipe (warning).")])
def cross_source_generalisation(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                                analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    sources = sorted(pd.read_parquet(paths.manifest, columns=["source"])["source"].astype(str).unique())
    missing: list[str] = []
    refused: dict[str, str] = {}
    if len(sources) < 2:  # nothing is trained: only the labels are needed, not the faces or a model
        _, _, _, version = load_data(fer, with_images=False)
        table = loso_core.not_applicable_table(sources)
    else:
        _, _, arrays, version = load_data(fer)
        in_domain = main_test_predictions(context, fer, arrays, version).y_pred
        recipe = loso_recipe(version, analysis.recipe(training, analysis.loso_epochs),
                             main_start(fer.paths, training.init, with_weights=False))
        status = loso_core.eligibility(arrays, analysis.loso_min_classes)
        collected = loso_core.collect_rows(loso_core.LosoStore(paths.report("loso_results")), status, recipe)
        missing, refused = collected.missing, collected.refused
        for source, why in refused.items():
            context.log.warning(f"held-out source {source} refused: {why}; re-materialize partition {source!r} of "
                                f"{LOSO_FOLD}")
        eligible = [s for s, state in status.items() if state == loso_core.ELIGIBLE]
        if eligible and len(missing) + len(refused) == len(eligible):
            raise dg.Failure(
                description=f"no held-out source is materialized for the published data (version {version}) and "
                            f"this recipe: materialize the {LOSO_FOLD} partitions first (UI: {LOSO_FOLD} → "
                            "Materialize; or `make demo`)",
                metadata={"sources_missing": missing, "sources_refused": dg.MetadataValue.json(refused)})
        table = loso_core.loso_table(collected.rows, arrays["test"], in_domain)
    files = write_table(paths.report("loso"), table)
    png = aplots.plot_loso(table, paths.report("loso_png"))
    done = table[table["status"] == loso_core.STATUS_DONE]
    status_text = (f"evaluated {len(done)} held-out source(s)" if len(done)
                   else "no source eligible (see table)" if len(sources) > 1
                   else f"not applicable: only one source ({', '.join(sources)})")
    metadata: dict[str, object] = {
        "status": status_text,
        "table": md_table(rounded(table)),
        "sources": sources,
        "plot": md_image(png, "leave-one-source-out"),
        "epochs_per_source": analysis.recipe(training, analysis.loso_epochs).epochs,
        "sources_missing": missing,
        "sources_refused": dg.MetadataValue.json(refused),
        "files": dg.MetadataValue.json({**files, "plot": str(png)}),
        "data_version": version,
    }
    if len(done):
        metadata["mean_loso_macro_f1"] = float(done["loso_macro_f1"].mean())
        metadata["mean_in_domain_macro_f1"] = float(done["in_domain_macro_f1"].mean())
    return dg.MaterializeResult(metadata=metadata, check_results=[dg.AssetCheckResult(
        check_name="loso_sources_current", passed=not missing and not refused, severity=dg.AssetCheckSeverity.WARN,
        metadata={"sources_evaluated": done["held_out_source"].tolist(), "sources_missing": missing,
                  "sources_refused": dg.MetadataValue.json(refused)})])
