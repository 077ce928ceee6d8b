"""The review loop as assets (the core is :mod:`fer_pipeline.review`; docs/review.md walks through it)::

    label_studio_reviews (data group) ──► manifest ──► … ──► label_issues ──► review_queue ──► label_studio_tasks
          ▲                                                                                         │
          └──────────── a person reviews the tasks in Label Studio; the reviews sensor notices ◄────┘

* ``label_studio_reviews`` pulls every annotation of the review project into the versioned review
  table (``reviews/reviews.parquet``; each distinct version also under ``reviews/versions/``). It is
  in the data group, so every data run pulls first and the manifest applies the decisions.
* ``data_quality_flags`` flags every published face that is blurred, noisy, dark, washed out, of
  low information, near-constant or cropped from an extreme aspect ratio
  (:mod:`fer_pipeline.quality.flags`; ``reports/quality_flags.parquet``), with a warning check of
  the flagged share per source and a grid of the worst faces in its metadata. Flagged faces stay
  in the manifest.
  The unlabelled images (``role: unlabelled`` sources) are flagged too (``label`` null).
* ``face_embeddings`` embeds every kept and unlabelled face with the pretrained backbone
  (:mod:`fer_pipeline.review.embeddings`; ``manifest/embeddings.parquet``, reused by content hash
  and model identity) and writes the faces far from their nearest neighbours
  (``reports/outliers.parquet``). After the splits, for review only: nothing upstream reads it.
* ``review_queue`` ranks what a person should look at first (``reviews/review_queue.parquet``),
  the unlabelled images (``role: unlabelled`` sources) too: the shipped model's least certain first.
* ``label_studio_tasks`` pushes the queue's top N as tasks (never twice the same image).

Without a Label Studio URL (:class:`~fer_pipeline.defs.resources.LabelStudio` unset) the pull and
the push are no-ops that say "no Label Studio configured" (a review table pulled before is kept
and still applied); ``make demo`` runs them that way. An unreachable server or a refused token is
a failed step naming the URL, never an empty review table.
"""

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from fer_pipeline.atomic import read_parquet_meta, write_parquet
from fer_pipeline.defs.assets.ingest import beta_api_ok
from fer_pipeline.defs.jobs import REVIEWS_OBSERVATION
from fer_pipeline.defs.metadata import counts, frame_version, md_image, md_table
from fer_pipeline.defs.resources import NO_LABEL_STUDIO, FerSettings, LabelStudio
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.faces.store import load_faces
from fer_pipeline.publish import read_published, read_unlabelled
from fer_pipeline.quality.flags import flag_stored_faces
from fer_pipeline.quality.plots import plot_face_grid
from fer_pipeline.review.embeddings import (
    EMBEDDING_COLUMNS,
    OUTLIER_COLUMNS,
    OutlierSettings,
    choose_embedder,
    find_outliers,
    refresh_embeddings,
)
from fer_pipeline.review.label_studio import (
    LabelStudioError,
    build_tasks,
    review_table_version,
)
from fer_pipeline.review.queue import build_review_queue, probability_table
from fer_pipeline.review.unlabelled import score_unlabelled
from fer_pipeline.schema import REVIEW_COLUMNS, MetricsReport

DATA_GROUP = "data"
REVIEW_GROUP = "review"
QUEUE_SHOWN = 20
FLAGS_ASSET = "data_quality_flags"
EMBEDDINGS_ASSET = "face_embeddings"
BACKBONE = "pretrained_backbone"  # defs.assets.pretrain.BACKBONE (that module imports the data assets, which import these)
OUTLIER_TABLE_COLUMNS = ["image_id", "source", "source_path", "label", "score", "relative_distance", "reason"]
FACE_COLUMNS = ["image_id", "sha256", "face_index", "face_path", "source", "source_path", "label"]
FLAG_MAX_SHARE = 0.05  # the warning check: a source with more of its faces flagged needs a look
FLAG_TABLE_COLUMNS = ["image_id", "source", "source_path", "label", "flag", "score", "reason"]
GRID_FACES = 24


def _read_reviews(path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


@beta_api_ok(dg.observable_source_asset)(
    name=REVIEWS_OBSERVATION, group_name=DATA_GROUP, required_resource_keys={"label_studio"},
    description="The Label Studio review project's annotations, observed by their ids, update times and decisions "
                "(nothing is downloaded). A new observation with another data version marks label_studio_reviews "
                "and the manifest unsynced, so `fer-pipeline run`, 'Materialize unsynced' and the reviews sensor "
                "agree on when reviews are new. No Label Studio configured: a constant version.")
def label_studio_annotations(context: dg.OpExecutionContext) -> dg.ObserveResult:
    label_studio: LabelStudio = context.resources.label_studio
    if not label_studio.enabled:
        return dg.ObserveResult(data_version=dg.DataVersion("no-label-studio"),
                                metadata={"label_studio": NO_LABEL_STUDIO})
    try:
        client = label_studio.client()
        digest, n = client.fingerprint()
    except (LabelStudioError, ValueError) as exc:
        # not a failed observation: the data half goes on; label_studio_reviews fails naming the URL when it runs
        context.log.warning(f"review project not observed: {exc}")
        problem = hashlib.sha256(str(exc).encode()).hexdigest()[:16]
        return dg.ObserveResult(data_version=dg.DataVersion(f"unreachable-{problem}"),
                                metadata={"problem": str(exc)[:500]})
    return dg.ObserveResult(data_version=dg.DataVersion(digest[:16]),
                            metadata={"annotations": n, "project": client.project_title})


@fer_asset(group_name=DATA_GROUP, deps=[REVIEWS_OBSERVATION],
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


def _source_shares(hits: pd.DataFrame, faces: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per source (the index): its faces, how many distinct ones ``hits`` names (``column``), their share."""
    out = faces.groupby("source").size().rename("faces").to_frame()
    out[column] = hits.groupby("source")["image_id"].nunique().reindex(out.index).fillna(0).astype(int)
    out["share"] = (out[column] / out["faces"].clip(lower=1)).round(4)
    return out


def flag_shares(flags: pd.DataFrame, faces: pd.DataFrame) -> pd.DataFrame:
    """Per source: faces, flagged faces, their share, and the count of each flag."""
    out = _source_shares(flags, faces, "flagged")
    per_flag = flags.groupby(["source", "flag"]).size().unstack(fill_value=0)
    return out.join(per_flag, how="left").fillna(0).reset_index()


@fer_asset(name=FLAGS_ASSET, group_name=DATA_GROUP, deps=[dg.AssetKey("splits")],
           description="Image-quality flags of every published face, kept or unlabelled (blurred, noisy, dark, "
                       "washed out, low information, near-constant, extreme aspect), each with a score and a reason "
                       "(reports/quality_flags.parquet; label null for an unlabelled image); flagged faces stay in "
                       "the manifest and go up the review queue.",
           check_specs=[dg.AssetCheckSpec("flag_shares", asset=FLAGS_ASSET, blocking=False,
                                          description=f"Warning: per source, at most {FLAG_MAX_SHARE:.0%} of its "
                                                      "faces flagged; the metadata gives every source's shares.")])
def data_quality_flags(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    published = read_published(paths)
    unlabelled = read_unlabelled(paths)  # no class yet: a non-face or a blurred one is worth knowing before review
    faces = pd.concat([published.manifest, unlabelled.assign(label=None)], ignore_index=True) if len(unlabelled) \
        else published.manifest.reset_index(drop=True)
    # read a chunk at a time, like the manifest's exclusions (the face check's scores cached: computed once)
    found = flag_stored_faces(paths.root, faces, face_check=fer.face_check_rule, face_check_cache=fer.face_check_cache())
    flags = found.merge(faces.drop(columns=["flag", "score", "reason"], errors="ignore"), on="image_id", how="left")
    flags = flags.sort_values(["score", "image_id"], ascending=[False, True], kind="mergesort").reset_index(drop=True)
    top = flags.drop_duplicates("image_id").head(GRID_FACES)
    flags = flags.reindex(columns=FLAG_TABLE_COLUMNS)
    write_parquet(paths.report("quality_flags"), flags, {"data_version": published.data_version})
    shares = flag_shares(flags, faces) if len(faces) else pd.DataFrame(columns=["source", "faces", "flagged", "share"])
    over = shares[shares["share"] > FLAG_MAX_SHARE]
    grid = plot_face_grid(load_faces(paths.root, top["face_path"].tolist()) if len(top) else np.zeros((0, 1, 1), np.uint8),
                          [f"{r.flag} {r.score:.2f} {r.source}" for r in top.itertuples()],
                          paths.report("flagged_faces"), "Most suspect faces (highest flag score first)")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(flags),
        "faces_checked": len(faces),
        "unlabelled_checked": len(unlabelled),
        "faces_flagged": int(flags["image_id"].nunique()),
        "face_check": (f"on: no_face below detector score {fer.face_check_rule.min_score}" if fer.face_check_rule
                       else "off (fer.face_check: false)"),
        "unlabelled_flagged": int(flags.loc[flags["label"].isna(), "image_id"].nunique()),
        "by_flag": counts(flags["flag"]),
        "flags_by_source": md_table(shares),
        "top_suspects": md_table(flags[["image_id", "source", "source_path", "label", "flag", "score", "reason"]]
                                 .round({"score": 3}), 15),
        "flagged_faces": md_image(grid, "most suspect faces"),
        "data_version": published.data_version,
        "path": dg.MetadataValue.path(str(paths.report("quality_flags"))),
    }, check_results=[dg.AssetCheckResult(
        check_name="flag_shares", passed=over.empty, severity=dg.AssetCheckSeverity.WARN,
        metadata={"flag_max_share": FLAG_MAX_SHARE, "sources_over": over["source"].tolist(),
                  "shares": md_table(shares)})],
        data_version=frame_version(flags))


def _read_previous_embeddings(path: Path, log: Callable[[str], None]) -> pd.DataFrame | None:
    """The stored embeddings (None: none yet, or unreadable: then every face is embedded again, saying so)."""
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 -- a damaged table is recomputed, not fatal
        log(f"{path} is not readable ({type(exc).__name__}: {exc}): every face is embedded again")
        return None
    missing = [c for c in EMBEDDING_COLUMNS if c not in table.columns]
    if missing:
        log(f"{path} lacks {missing}: every face is embedded again")
        return None
    return table


def outlier_shares(outliers: pd.DataFrame, faces: pd.DataFrame) -> pd.DataFrame:
    """Per source: embedded faces, outliers and their share."""
    return _source_shares(outliers, faces, "outliers").reset_index()


@fer_asset(name=EMBEDDINGS_ASSET, group_name=REVIEW_GROUP, deps=[dg.AssetKey("splits"), dg.AssetKey(BACKBONE)],
           description="An embedding per kept and unlabelled face (manifest/embeddings.parquet): the pretrained "
                       "backbone's pooled features (the shipped or main model where there is no backbone, saying "
                       "why), reused by content hash and model identity; and the outliers among them, faces far "
                       "from their nearest neighbours by cleanlab's kNN score (reports/outliers.parquet), which go "
                       "up the review queue. Computed after the splits and used for review only: it decides no "
                       "duplicate and no split.")
def face_embeddings(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    start = time.perf_counter()
    paths = fer.paths
    published = read_published(paths)
    unlabelled = read_unlabelled(paths)
    faces = pd.concat([published.manifest[FACE_COLUMNS], unlabelled[FACE_COLUMNS].assign(label=None)],
                      ignore_index=True)
    choice = choose_embedder(paths)
    settings = OutlierSettings()
    meta = {"data_version": published.data_version, "manifest_version": published.manifest_version}
    if choice.embedder is None:
        context.log.warning(f"no model to embed with: {choice.reason}; no embeddings and no outliers this run")
        table = pd.DataFrame(columns=EMBEDDING_COLUMNS)
        refreshed = None
        outliers, note = pd.DataFrame(columns=OUTLIER_COLUMNS), f"no embeddings: {choice.reason}"
        model, kind = "none", "none"
    else:
        embedder = choice.embedder
        model, kind = embedder.identity, embedder.kind
        if kind != "backbone":
            context.log.warning(f"embedding with the {kind}: {choice.reason}")
        previous = _read_previous_embeddings(paths.embeddings, context.log.warning)
        refreshed = refresh_embeddings(paths.root, faces, embedder, previous, log=context.log.info)
        table = refreshed.table
        if len(refreshed.failed):
            context.log.warning(f"{len(refreshed.failed)} face(s) not embedded: "
                                + "; ".join(f"{r.image_id}: {r.reason}" for r in refreshed.failed.head(10).itertuples()))
        outliers, note = find_outliers(table, settings, kind)
    meta = {**meta, "model": model, "model_kind": kind, "model_why": choice.reason}
    write_parquet(paths.embeddings, table, meta)
    info = faces.drop(columns=["sha256", "face_index", "face_path"])
    outliers = outliers.merge(info, on="image_id", how="left").reindex(columns=OUTLIER_TABLE_COLUMNS).astype(
        {"score": "float64", "relative_distance": "float64", "reason": "object"})  # typed even when empty
    write_parquet(paths.report("outliers"), outliers, meta)
    shares = outlier_shares(outliers, faces[faces["image_id"].isin(table["image_id"])]) if len(table) \
        else pd.DataFrame(columns=["source", "faces", "outliers", "share"])
    top = outliers.head(GRID_FACES)
    face_path = faces.set_index("image_id")["face_path"]
    grid = plot_face_grid(load_faces(paths.root, top["image_id"].map(face_path).tolist()) if len(top)
                          else np.zeros((0, 1, 1), np.uint8),
                          [f"{r.score:.2f} {r.source}" for r in top.itertuples()], paths.report("outlier_faces"),
                          "Outliers in the embedding (most atypical first)")
    failed = refreshed.failed if refreshed is not None else pd.DataFrame(columns=["image_id", "face_path", "reason"])
    digest = hashlib.sha256("|".join([published.data_version, model, *table["image_id"].astype(str)]).encode())
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(table),
        "faces": len(faces),
        "unlabelled": len(unlabelled),
        "computed": refreshed.computed if refreshed is not None else 0,
        "reused": refreshed.reused if refreshed is not None else 0,
        "dropped": refreshed.dropped if refreshed is not None else 0,
        "not_embedded": len(failed),
        "not_embedded_faces": md_table(failed, 20),
        "model": kind,
        "model_identity": model,
        "model_why": choice.reason,
        "dimensions": len(table["embedding"].iloc[0]) if len(table) else 0,
        "outliers": len(outliers),
        "outlier_threshold": note,
        "outliers_by_source": md_table(shares),
        "top_outliers": md_table(outliers[["image_id", "source", "source_path", "label", "score", "reason"]]
                                 .round({"score": 3}), 15),
        "outlier_faces": md_image(grid, "outliers"),
        "seconds": round(time.perf_counter() - start, 1),
        "data_version": published.data_version,
        "path": dg.MetadataValue.path(str(paths.embeddings)),
        "outliers_path": dg.MetadataValue.path(str(paths.report("outliers"))),
    }, data_version=dg.DataVersion(digest.hexdigest()[:16]))


def _caption(row: object) -> str:
    """Grid caption of a queue row, two short lines: rank and label (-> prediction); the first
    reason's kind (its text before the colon; the table beside the grid has the whole reason)."""
    label = row.label if isinstance(row.label, str) else "unlabelled"
    pred = getattr(row, "predicted", None)
    arrow = f" -> {pred}" if isinstance(pred, str) and pred and pred != label else ""
    reason = str(row.reasons).split(";")[0].split(":")[0].strip()
    return f"#{row.rank} {label}{arrow}\n{reason[:30]}"


@fer_asset(group_name=REVIEW_GROUP, deps=[dg.AssetKey("splits"), dg.AssetKey("label_issues"), dg.AssetKey("model_evaluation"),
                                          dg.AssetKey(FLAGS_ASSET), dg.AssetKey(EMBEDDINGS_ASSET),
                                          dg.AssetKey("shipped_model")],  # scores the unlabelled
           description="What a person should review first, with the reasons: cleanlab's label suspects, quality-flagged "
                       "faces and embedding outliers, the unlabelled images (the shipped model's least certain first), then the rest of the "
                       "label-quality ranking, then the images nothing scored yet; the model's prediction and "
                       "probabilities beside each. Reviewed images are left out.")
def review_queue(context: dg.AssetExecutionContext, fer: FerSettings, label_studio: LabelStudio) -> dg.MaterializeResult:
    paths = fer.paths
    published = read_published(paths)
    issues_path = paths.report("label_issues").with_suffix(".parquet")
    issues = pd.read_parquet(issues_path) if issues_path.is_file() else None
    test_path = paths.report("test_predictions")
    best = MetricsReport.read(paths.metrics_json).best_model if paths.metrics_json.is_file() else None
    tests = pd.read_parquet(test_path) if test_path.is_file() else None
    oof_path = paths.report("cv_oof")
    oof = pd.read_parquet(oof_path) if oof_path.is_file() else None
    flags_path = paths.report("quality_flags")
    flags = pd.read_parquet(flags_path) if flags_path.is_file() else None
    outliers_path = paths.report("outliers")
    outliers = pd.read_parquet(outliers_path) if outliers_path.is_file() else None
    unlabelled = read_unlabelled(paths)
    scores = score_unlabelled(unlabelled, paths)
    if len(unlabelled) and scores.probabilities is None:
        context.log.warning(f"{len(unlabelled)} unlabelled image(s) listed unscored: {scores.unscored_reason}")
    queue = build_review_queue(published.manifest, issues, probability_table(tests, best, oof), flags=flags,
                               unlabelled=unlabelled, unlabelled_probabilities=scores.probabilities,
                               unlabelled_unscored_reason=scores.unscored_reason, outliers=outliers)
    write_parquet(paths.review_queue, queue, {"data_version": published.data_version})
    if issues is None:
        context.log.warning("no label-issue ranking yet (reports/label_issues.parquet): the queue lists the kept "
                            "images unscored, in manifest order")
    version = review_table_version(queue)
    shown = queue.head(QUEUE_SHOWN)[["rank", "image_id", "source", "source_path", "label", "predicted", "score",
                                     "reasons"]]
    first = queue.head(GRID_FACES)
    face_path = published.manifest.set_index("image_id")["face_path"]
    if len(unlabelled):
        face_path = pd.concat([face_path, unlabelled.set_index("image_id")["face_path"]])
    grid = plot_face_grid(load_faces(paths.root, first["image_id"].map(face_path).tolist()) if len(first)
                          else np.zeros((0, 1, 1), np.uint8), [_caption(r) for r in first.itertuples()],
                          paths.report("review_queue_top"), "Review first (queue order, with the reasons)")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(queue),
        "label_suspects": int(queue["reasons"].str.startswith("cleanlab label suspect").sum()),
        "quality_flagged": int(queue["image_id"].isin(flags["image_id"]).sum()) if flags is not None else 0,
        "outliers": int(queue["image_id"].isin(outliers["image_id"]).sum()) if outliers is not None else 0,
        "with_prediction": int(queue["predicted"].notna().sum()),
        "unlabelled": int(queue["label"].isna().sum()),
        "unlabelled_scored": int((queue["label"].isna() & queue["predicted"].notna()).sum()),
        "top": md_table(shown.round({"score": 3}), QUEUE_SHOWN),
        "top_faces": md_image(grid, "the queue's first faces"),
        # the server is not contacted here (the queue does not need it): label_studio_tasks links the project itself
        "label_studio": (dg.MetadataValue.url(label_studio.base_url) if label_studio.enabled else NO_LABEL_STUDIO),
        "label_studio_project": label_studio.project_title,
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


REVIEW_ASSETS = [data_quality_flags, face_embeddings, review_queue, label_studio_tasks]
"""The review loop's assets but ``label_studio_reviews``, which joins the data assets (every data run
pulls first); ``data_quality_flags`` is in the data group too (the data job computes it)."""
__all__ = ["REVIEW_ASSETS", "REVIEW_COLUMNS", "data_quality_flags", "face_embeddings", "label_studio_reviews",
           "label_studio_tasks", "review_queue"]
