"""The review queue's ranking and contract, the tasks built from it, the refusal of unusable
annotations row by row, and the review assets without (or with an unreachable) Label Studio."""

from __future__ import annotations

import base64
import io

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_pipeline.classes import CLASSES
from fer_pipeline.defs.assets.review import label_studio_reviews, label_studio_tasks
from fer_pipeline.defs.automation import build_review_sensor
from fer_pipeline.defs.resources import (
    NO_LABEL_STUDIO,
    FerSettings,
    LabelStudio,
    LabelStudioSettingError,
)
from fer_pipeline.faces.store import FaceStore
from fer_pipeline.review.label_studio import (
    annotations_fingerprint,
    build_tasks,
    parse_reviews,
    task_key,
)
from fer_pipeline.review.queue import (
    UNLABELLED_UNSCORED_REASON,
    UNSCORED_REASON,
    build_review_queue,
    probability_table,
)
from fer_pipeline.schema import REVIEW_COLUMNS, REVIEW_QUEUE_COLUMNS
from fer_pipeline_tests.servers import free_port

PROBS = [f"p_{c}" for c in CLASSES]


def _manifest(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"id{i}" for i in range(n)], "sha256": [f"{i:064x}" for i in range(n)],
                         "face_index": 0, "source": "a", "source_path": [f"{i}.png" for i in range(n)],
                         "face_path": [f"faces/x.npy#{i}" for i in range(n)], "label": "Angry",
                         "review_source": [None] * (n - 1) + ["label-studio p task 1"]})


def _issues() -> pd.DataFrame:
    return pd.DataFrame({"rank": [1, 2, 3], "image_id": ["id2", "id0", "id1"], "given_label": "Angry",
                         "predicted_label": ["Tired", "Angry", "Angry"], "self_confidence": [0.1, 0.5, 0.9],
                         "score": [0.1, 0.5, 0.9], "is_label_issue": [True, False, False]})


def test_queue_ranks_suspects_first_then_scored_then_unscored_and_leaves_reviewed_out() -> None:
    oof = pd.DataFrame({"image_id": ["id0", "id1", "id2"], **{c: [0.25] * 3 for c in PROBS}})
    oof["p_Tired"] = [0.1, 0.1, 0.7]
    oof["p_Angry"] = [0.4, 0.4, 0.1]
    tests = pd.DataFrame({"model": ["best", "other"], "image_id": ["id3", "id4"],
                          **{c: [0.1, 0.25] for c in PROBS}})
    tests.loc[0, "p_Neutral"] = 0.7
    queue = build_review_queue(_manifest(), _issues(), probability_table(tests, "best", oof))
    assert list(queue.columns) == list(REVIEW_QUEUE_COLUMNS)
    assert queue["image_id"].tolist() == ["id2", "id0", "id1", "id3", "id4"]  # id5 was reviewed
    assert queue["rank"].tolist() == [1, 2, 3, 4, 5]
    assert queue.loc[0, "reasons"].startswith("cleanlab label suspect: labelled Angry, the model says Tired")
    assert queue["score"].tolist() == pytest.approx([0.9, 0.5, 0.1, 0.0, 0.0])
    assert queue.loc[3, "reasons"] == UNSCORED_REASON
    assert queue["predicted"].tolist() == ["Tired", "Angry", "Angry", "Neutral", None]
    assert queue.loc[3, "probabilities"] == "calibrated (best)" and queue.loc[0, "probabilities"].startswith("out")
    assert queue.loc[4, PROBS].isna().all()  # another model's row is not the best model's prediction
    assert queue.loc[0, "image"] == "faces/x.npy#2"


def test_quality_flagged_faces_come_right_after_the_label_suspects() -> None:
    """id4 (unscored) and id1 (scored, high label quality) are flagged: both move up to just after
    the suspect id2, worst flag first, with the flags' reasons; a flag on the suspect only adds its
    reason; a flag on the reviewed id5 changes nothing."""
    flags = pd.DataFrame({"image_id": ["id4", "id1", "id1", "id2", "id5"], "score": [0.8, 0.3, 0.6, 0.2, 0.9],
                          "reason": ["dark: 90th percentile intensity 20 < 50", "blurred: x", "noisy: y",
                                     "washed out: z", "dark: w"]})
    queue = build_review_queue(_manifest(), _issues(), flags=flags)
    assert queue["image_id"].tolist() == ["id2", "id4", "id1", "id0", "id3"]
    assert queue.loc[1, "reasons"] == "dark: 90th percentile intensity 20 < 50" and queue.loc[1, "score"] == 0.8
    assert queue.loc[2, "reasons"].endswith("; noisy: y; blurred: x")  # worst flag first
    assert queue.loc[2, "score"] == pytest.approx(0.6)
    assert queue.loc[0, "reasons"].startswith("cleanlab label suspect") and queue.loc[0, "reasons"].endswith(
        "; washed out: z")
    assert queue.loc[4, "reasons"] == UNSCORED_REASON


def test_outliers_and_flags_of_unlabelled_images_join_the_flagged_tier() -> None:
    """An embedding outlier (cleanlab score 0.1: queue score 0.9) ranks with the quality-flagged
    faces, its reason beside a quality flag's; an unlabelled image with a quality flag moves from
    its own tier up to the flagged one, keeping its unlabelled reason first."""
    flags = pd.DataFrame({"image_id": ["id1", "u1"], "score": [0.5, 0.4],
                          "reason": ["dark: d", "blurred: b"]})
    outliers = pd.DataFrame({"image_id": ["id3", "id1"], "score": [0.1, 0.3],
                             "reason": ["outlier: far (score 0.10)", "outlier: far (score 0.30)"]})
    unl = pd.DataFrame({"image_id": ["u0", "u1"], "sha256": ["e" * 64, "f" * 64], "face_index": 0,
                        "source": "new", "source_path": ["u0.png", "u1.png"], "face_path": ["faces/x.npy#7"] * 2,
                        "label": None})
    queue = build_review_queue(_manifest(), _issues(), flags=flags, outliers=outliers, unlabelled=unl)
    assert queue["image_id"].tolist() == ["id2", "id3", "id1", "u1", "u0", "id0", "id4"]
    by = queue.set_index("image_id")
    assert by.loc["id3", "reasons"] == "outlier: far (score 0.10)" and by.loc["id3", "score"] == pytest.approx(0.9)
    assert by.loc["id1", "reasons"].endswith("; outlier: far (score 0.30); dark: d")
    assert by.loc["u1", "reasons"] == f"{UNLABELLED_UNSCORED_REASON}; blurred: b" and pd.isna(by.loc["u1", "label"])
    assert by.loc["u0", "reasons"] == UNLABELLED_UNSCORED_REASON


def test_queue_without_any_model_lists_every_unreviewed_image() -> None:
    queue = build_review_queue(_manifest())
    assert len(queue) == 5 and (queue["reasons"] == UNSCORED_REASON).all() and queue["predicted"].isna().all()


def test_tasks_show_face_label_and_prediction(tmp_path) -> None:
    faces = np.stack([np.full((48, 48), 40 * i, np.uint8) for i in range(3)])
    refs = FaceStore(tmp_path, "k").write_shard("s", faces)
    queue = build_review_queue(_manifest(3).assign(face_path=refs, review_source=None))
    queue.loc[0, PROBS] = [0.1, 0.2, 0.3, 0.4]
    queue.loc[0, ["predicted", "probabilities"]] = ["Angry", "calibrated (m)"]
    queue.loc[1, "label"] = None  # an unlabelled image: no pre-annotation
    tasks = build_tasks(queue, tmp_path, "p")
    assert [t["data"]["key"] for t in tasks] == [task_key(f"{i:064x}", 0) for i in range(3)]
    with Image.open(io.BytesIO(base64.b64decode(tasks[2]["data"]["image"].split(",", 1)[1]))) as im:
        assert np.array_equal(np.asarray(im), faces[2])
    assert tasks[0]["data"]["model"] == ("model: Angry (Neutral 0.10 · Focused 0.20 · Tired 0.30 · Angry 0.40; "
                                         "calibrated (m))")
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["Angry"]
    assert "predictions" not in tasks[1] and tasks[1]["data"]["label"].startswith("current label: none")
    assert tasks[2]["data"]["model"] == "model: no prediction yet"


def _task(task_id: int, sha: str, *choices_per_annotation, key: str | None = None, cancelled: bool = False) -> dict:
    data = {"sha256": sha, "face_index": 0, "source": "a", "source_path": "x.png",
            "key": key if key is not None else task_key(sha, 0)}
    anns = [{"id": task_id * 10 + i, "completed_by": 1, "updated_at": "2026-05-01T10:00:00Z",
             "was_cancelled": cancelled,
             "result": [{"from_name": "decision", "to_name": "image", "type": "choices", "value": {"choices": c}}]}
            for i, c in enumerate(choices_per_annotation)]
    return {"id": task_id, "data": data, "annotations": anns}


def test_hostile_export_is_refused_row_by_row() -> None:
    good = "a" * 64
    tasks = [
        _task(1, good, ["Tired"]),
        _task(2, good, ["Angry"]),  # a second task for the same image
        _task(3, "3" * 64, ["Happy"]),  # not a decision we offer
        _task(4, "not-a-hash", ["Tired"]),
        _task(5, "5" * 64, ["Tired", "Angry"]),  # two choices in one answer
        _task(6, "6" * 64, ["Tired"], key="c" * 64 + ":0"),  # key and hash disagree
        _task(7, "7" * 64, ["exclude"], cancelled=True),
        _task(8, "8" * 64, ["not a face"]),
    ]
    table = parse_reviews(tasks, "p", {1: "r@example.com"})
    assert list(table.columns) == list(REVIEW_COLUMNS) and len(table) == 8
    refused = table.set_index("task_id")["refused"]
    assert pd.isna(refused[1]) and pd.isna(refused[8])
    assert refused[2] == "duplicate task: the image already has task 1"
    assert refused[3].startswith("unknown label 'Happy'")
    assert refused[4] == "task 4: image hash 'not-a-hash' is not a SHA-256"
    assert refused[5] == "2 decisions, expected one"
    assert refused[6].startswith("task 6: its key")
    assert refused[7].startswith("skipped by the reviewer")
    assert table.set_index("task_id").loc[8, "decision"] == "not a face"
    assert (table["reviewer"] == "r@example.com").all() and table.loc[0, "time"] == "2026-05-01T10:00:00+00:00"


def test_fingerprint_changes_with_a_new_or_updated_annotation() -> None:
    sha = "a" * 64
    base = annotations_fingerprint([_task(1, sha, ["Tired"])])
    assert base[1] == 1
    assert annotations_fingerprint([_task(1, sha, ["Tired"])]) == base
    assert annotations_fingerprint([_task(1, sha, ["Angry"])]) != base
    assert annotations_fingerprint([_task(1, sha, ["Tired"], ["Angry"])])[1] == 2


def test_without_label_studio_the_review_assets_are_no_ops(tmp_path, monkeypatch) -> None:
    for var in ("FER_LABEL_STUDIO_URL", "FER_LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    resources = {"fer": FerSettings(data_root=str(tmp_path)), "label_studio": LabelStudio()}
    result = dg.materialize([label_studio_reviews, label_studio_tasks], resources=resources)
    assert result.success
    for event in result.get_asset_materialization_events():
        assert event.materialization.metadata["label_studio"].value == NO_LABEL_STUDIO
    assert not (tmp_path / "reviews").exists()
    with dg.build_sensor_context(resources={"label_studio": LabelStudio()}) as ctx:
        skipped = build_review_sensor()(ctx)
    assert isinstance(skipped, dg.SkipReason) and skipped.skip_message == NO_LABEL_STUDIO


def test_unreachable_label_studio_fails_the_step_naming_the_url(tmp_path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    resources = {"fer": FerSettings(data_root=str(tmp_path)), "label_studio": LabelStudio(url=url, api_key="t")}
    result = dg.materialize([label_studio_reviews], resources=resources, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert f"Label Studio at {url} is unreachable" in str(failure.event_specific_data.error.message)
    assert not (tmp_path / "reviews" / "reviews.parquet").exists()


@pytest.mark.parametrize(("settings", "field"), [
    ({"url": "localhost:8080", "api_key": "t"}, "label_studio.url"),
    ({"url": "http://127.0.0.1:8080", "api_key": ""}, "label_studio.api_key"),
])
def test_bad_connection_settings_fail_fast_naming_the_field(settings, field, monkeypatch) -> None:
    monkeypatch.delenv("FER_LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(LabelStudioSettingError, match=field.replace(".", r"\.")):
        LabelStudio(**settings).checked()
