"""The review loop as assets (the core is :mod:`fer_pipeline.review`; docs/review.md walks through it)::

    label_studio_reviews (data group) ──► manifest ──► … ──► label_issues ──► review_queue ──► label_studio_tasks
          ▲                                                                                         │
          └──────────── a person reviews the tasks in Label Studio; the reviews sensor notices ◄────┘

* ``label_studio_reviews`` pulls every annotation of the review project into the versioned review
  table (``reviews/reviews.parquet``; each distinct version also under ``reviews/versions/``). It is
  in the data group, so every data run pulls first and the manifest applies the decisions.
* ``review_queue`` ranks what a person should look at first (``reviews/review_queue.parquet``).
* ``label_studio_tasks`` pushes the queue's top N as tasks (never twice the same image).

Without a Label Studio URL (:class:`~fer_pipeline.defs.resources.LabelStudio` unset) the pull and
the push are no-ops that say "no Label Studio configured" (a review table pulled before is kept
and still applied); ``make demo`` runs them that way. An unreachable server or a refused token is
a failed step naming the URL, never an empty review table.
"""

import dagster as dg
import pandas as pd

from fer_pipeline.atomic import read_parquet_meta, write_parquet
from fer_pipeline.defs.metadata import counts, md_table
from fer_pipeline.defs.resources import NO_LABEL_STUDIO, FerSettings, LabelStudio
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.publish import read_published
from fer_pipeline.review.label_studio import (
    LabelStudioError,
    build_tasks,
    review_table_version,
)
from fer_pipeline.review.queue import build_review_queue, probability_table
from fer_pipeline.schema import REVIEW_COLUMNS, MetricsReport

DATA_GROUP = "data"
REVIEW_GROUP = "review"
QUEUE_SHOWN = 20


def _read_reviews(path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


@fer_asset(group_name=DATA_GROUP,
           description="Every review of the Label Studio review project (decision, reviewer, time, task), keyed by "
                       "the image's content hash: the versioned table the manifest applies. No Label Studio "
                       "configured: a no-op that keeps the table pulled before.")
def label_studio_reviews(context: dg.AssetExecutionContext, fer: FerSettings,
                         label_studio: LabelStudio) -> dg.MaterializeResult:
    paths = fer.paths
    previous = _read_reviews(paths.reviews)
    if not label_studio.enabled:
        kept = len(previous) if previous is not None else 0
        context.log.info(f"{NO_LABEL_STUDIO}: the review table is left as it is ({kept} row(s))")
        version = review_table_version(previous) if previous is not None else "none"
        return dg.MaterializeResult(metadata={"label_studio": NO_LABEL_STUDIO, "reviews": kept,
                                              "review_version": version},
                                    data_version=dg.DataVersion(version))
    client = label_studio.client()  # a setting that cannot work fails here, naming the field
    try:
        table, project_id = client.pull()
    except LabelStudioError as exc:
        raise dg.Failure(str(exc)) from exc
    version = review_table_version(table)
    snapshot = paths.review_versions_dir / f"{version}.parquet"
    meta = {"review_version": version, "project": client.project_title, "url": client.url}
    if not snapshot.is_file():
        write_parquet(snapshot, table, meta)
    write_parquet(paths.reviews, table, meta)
    usable, refused = table[table["refused"].isna()], table[table["refused"].notna()]
    gone = 0
    if previous is not None and "annotation_id" in previous.columns:
        gone = len(set(previous["annotation_id"]) - set(table["annotation_id"]))
        if gone:
            context.log.warning(f"{gone} review(s) of the previous pull are no longer in Label Studio: the table now "
                                f"holds what the project holds; the earlier version stays in {paths.review_versions_dir}")
    if len(refused):
        context.log.warning(f"{len(refused)} review row(s) refused: " + "; ".join(refused["refused"].head(10)))
    project_url = client.project_url(project_id) if project_id is not None else client.url
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(table),
        "usable_reviews": len(usable),
        "refused": len(refused),
        "refused_rows": md_table(refused[["task_id", "annotation_id", "sha256", "decision", "refused"]], 30),
        "by_decision": counts(usable["decision"]),
        "by_reviewer": counts(usable["reviewer"]),
        "no_longer_in_label_studio": gone,
        "project": client.project_title,
        "project_url": dg.MetadataValue.url(project_url),
        "review_version": version,
        "path": dg.MetadataValue.path(str(paths.reviews)),
    }, data_version=dg.DataVersion(version))


@fer_asset(group_name=REVIEW_GROUP, deps=[dg.AssetKey("splits"), dg.AssetKey("label_issues"), dg.AssetKey("model_evaluation")],
           description="What a person should review first, with the reasons: cleanlab's label suspects, then the rest "
                       "of the label-quality ranking, then the images nothing scored yet; the model's prediction and "
                       "probabilities beside each. Reviewed images are left out.")
def review_queue(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    published = read_published(paths)
    issues_path = paths.report("label_issues").with_suffix(".parquet")
    issues = pd.read_parquet(issues_path) if issues_path.is_file() else None
    test_path = paths.report("test_predictions")
    best = MetricsReport.read(paths.metrics_json).best_model if paths.metrics_json.is_file() else None
    tests = pd.read_parquet(test_path) if test_path.is_file() else None
    oof_path = paths.report("cv_oof")
    oof = pd.read_parquet(oof_path) if oof_path.is_file() else None
    queue = build_review_queue(published.manifest, issues, probability_table(tests, best, oof))
    write_parquet(paths.review_queue, queue, {"data_version": published.data_version})
    if issues is None:
        context.log.warning("no label-issue ranking yet (reports/label_issues.parquet): the queue lists the kept "
                            "images unscored, in manifest order")
    version = review_table_version(queue)
    shown = queue.head(QUEUE_SHOWN)[["rank", "image_id", "source", "source_path", "label", "predicted", "score",
                                     "reasons"]]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(queue),
        "label_suspects": int(queue["reasons"].str.startswith("cleanlab label suspect").sum()),
        "with_prediction": int(queue["predicted"].notna().sum()),
        "top": md_table(shown.round({"score": 3}), QUEUE_SHOWN),
        "data_version": published.data_version,
        "path": dg.MetadataValue.path(str(paths.review_queue)),
    }, data_version=dg.DataVersion(version))


@fer_asset(group_name=REVIEW_GROUP, deps=[review_queue],
           description="Pushes the review queue's top N images to the Label Studio review project as tasks (face, "
                       "current label as a pre-annotation, the model's prediction and probabilities); an image already "
                       "there is not pushed again. No Label Studio configured: a no-op.")
def label_studio_tasks(context: dg.AssetExecutionContext, fer: FerSettings,
                       label_studio: LabelStudio) -> dg.MaterializeResult:
    if not label_studio.enabled:
        context.log.info(f"{NO_LABEL_STUDIO}: nothing pushed")
        return dg.MaterializeResult(metadata={"label_studio": NO_LABEL_STUDIO, "pushed": 0})
    paths = fer.paths
    client = label_studio.client()
    queue = pd.read_parquet(paths.review_queue)
    top = queue.head(label_studio.push_top_n)
    tasks = build_tasks(top, paths.root, client.project_title)
    try:
        report = client.push(tasks)
    except LabelStudioError as exc:
        raise dg.Failure(str(exc)) from exc
    context.log.info(f"{report.created} task(s) created, {report.already_there} already in {report.project_url}")
    return dg.MaterializeResult(metadata={
        "pushed": report.created,
        "already_in_project": report.already_there,
        "queue_rows": len(queue),
        "top_n": label_studio.push_top_n,
        "project": client.project_title,
        "project_url": dg.MetadataValue.url(report.project_url),
        "queue_version": str(read_parquet_meta(paths.review_queue).get("data_version", "")),
    })


REVIEW_ASSETS = [review_queue, label_studio_tasks]
"""The review group (``label_studio_reviews`` joins the data assets: every data run pulls first)."""
__all__ = ["REVIEW_ASSETS", "REVIEW_COLUMNS", "label_studio_reviews", "label_studio_tasks", "review_queue"]
