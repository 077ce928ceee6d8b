"""The round trip through Label Studio: push the review queue as tasks, pull the reviews back.

* :func:`build_tasks` turns queue rows into Label Studio tasks. Each task shows the face (a PNG
  data URI of the processed 48×48 face: nothing to serve, no storage to configure, works offline),
  the pipeline's current label (also as a pre-annotation, so the reviewer confirms with one
  click), and the model's prediction with its probabilities. The choices are the four classes,
  "not a face" and "exclude" (:data:`fer_pipeline.schema.REVIEW_DECISIONS`).
* Tasks are keyed by the image's content hash and face index (``key`` in the task data):
  :meth:`ReviewClient.push` skips keys the project already has, so pushing again never
  duplicates a task.
* :func:`parse_reviews` turns the project's annotations into the review table
  (:data:`fer_pipeline.schema.REVIEW_COLUMNS`), refusing row by row, each with a reason, what is
  not a usable review: an unknown label, no decision, a malformed image hash, a second task for
  the same image, an annotation the reviewer skipped.
* :func:`annotations_fingerprint` is what the sensor compares between ticks.

An unreachable server, or one that refuses the token, raises :class:`LabelStudioError` naming
the URL: never an empty review table.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd
from PIL import Image

from fer_pipeline.classes import CLASSES
from fer_pipeline.faces.store import load_faces
from fer_pipeline.schema import REVIEW_COLUMNS, REVIEW_DECISIONS

FROM_NAME = "decision"
TO_NAME = "image"
PIPELINE_LABEL_VERSION = "pipeline label"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
UNLABELLED = "unlabelled"


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a request; the message names the URL."""


def label_config(decisions: Sequence[str] = REVIEW_DECISIONS) -> str:
    """The project's labelling interface: the face, what the pipeline and the model say, one choice."""
    choices = "\n".join(f"    <Choice value={quoteattr(d)}/>" for d in decisions)
    return f"""<View>
  <Image name="{TO_NAME}" value="$image" zoom="true"/>
  <Header value="$label"/>
  <Text name="model" value="$model"/>
  <Text name="reasons" value="$reasons"/>
  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true" required="true">
{choices}
  </Choices>
</View>"""


def task_key(sha256: str, face_index: int) -> str:
    return f"{sha256}:{int(face_index)}"


def face_data_uri(face: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(face, dtype=np.uint8), "L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _model_text(row: Mapping[str, Any], classes: Sequence[str]) -> str:
    if row.get("predicted") is None or pd.isna(row.get("predicted")):
        return "model: no prediction yet"
    probs = " · ".join(f"{c} {float(row[f'p_{c}']):.2f}" for c in classes)
    return f"model: {row['predicted']} ({probs}; {row.get('probabilities') or 'probabilities'})"


def build_tasks(queue: pd.DataFrame, data_root: str | Path, project: str,
                classes: Sequence[str] = CLASSES) -> list[dict[str, Any]]:
    """Label Studio tasks (data + the current label as a prediction) for the queue rows, in order."""
    if not len(queue):
        return []
    faces = load_faces(data_root, queue["image"].astype(str).tolist())
    tasks = []
    for face, row in zip(faces, queue.to_dict("records")):
        label = row.get("label")
        labelled = label is not None and not pd.isna(label)
        data = {
            "image": face_data_uri(face),
            "key": task_key(row["sha256"], row["face_index"]),
            "sha256": row["sha256"], "face_index": int(row["face_index"]), "image_id": row["image_id"],
            "source": row["source"], "source_path": row["source_path"],
            "label": f"current label: {label}" if labelled else f"current label: none ({UNLABELLED})",
            "model": _model_text(row, classes),
            "reasons": f"queue rank {int(row['rank'])}, score {float(row['score']):.2f}: {row['reasons']}",
            "pipeline_project": project,
        }
        task: dict[str, Any] = {"data": data}
        if labelled:
            task["predictions"] = [{"model_version": PIPELINE_LABEL_VERSION, "result": [
                {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}]}]
        tasks.append(task)
    return tasks


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def _when(value: Any) -> str:
    if value is None or value == "":
        return ""
    return pd.Timestamp(value).tz_convert("UTC").isoformat() if pd.Timestamp(value).tzinfo else \
        pd.Timestamp(value).tz_localize("UTC").isoformat()


def parse_reviews(tasks: Iterable[Any], project: str, users: Mapping[int, str] | None = None) -> pd.DataFrame:
    """The review table (:data:`REVIEW_COLUMNS`) from a project's tasks with their annotations
    (SDK objects or exported JSON dicts). Every annotation gives one row; ``refused`` says why a
    row is not a usable review (null when it is)."""
    users = users or {}
    first_task: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for task in sorted(tasks, key=lambda t: int(_field(t, "id", 0))):
        task_id = int(_field(task, "id", 0))
        data = _field(task, "data", {}) or {}
        sha = str(data.get("sha256", ""))
        try:
            face_index = int(data.get("face_index", 0))
        except (TypeError, ValueError):
            face_index = -1
        problem = None
        if not SHA256.match(sha):
            problem = f"task {task_id}: image hash {sha[:80]!r} is not a SHA-256"
        elif face_index < 0:
            problem = f"task {task_id}: face index {str(data.get('face_index'))[:40]!r} is not a number >= 0"
        elif data.get("key") not in (None, task_key(sha, face_index)):
            problem = f"task {task_id}: its key {str(data.get('key'))[:80]!r} does not match its image hash"
        else:
            key = task_key(sha, face_index)
            first = first_task.setdefault(key, task_id)
            if first != task_id:
                problem = f"duplicate task: the image already has task {first}"
        for ann in _field(task, "annotations", None) or []:
            choices = [c for r in (_field(ann, "result", None) or []) if _field(r, "from_name") == FROM_NAME
                       for c in ((_field(r, "value", {}) or {}).get("choices") or [])]
            refused = problem
            if refused is None and _field(ann, "was_cancelled", False):
                refused = "skipped by the reviewer (no decision)"
            elif refused is None and len(choices) != 1:
                refused = f"{len(choices)} decisions, expected one"
            elif refused is None and choices[0] not in REVIEW_DECISIONS:
                refused = f"unknown label {str(choices[0])[:80]!r} (expected one of {', '.join(REVIEW_DECISIONS)})"
            who = _field(ann, "completed_by")
            who_id = who.get("id") if isinstance(who, Mapping) else who
            reviewer = users.get(int(who_id)) if who_id is not None else None
            reviewer = reviewer or str(_field(ann, "created_username", "") or "").strip(" ,") or f"user {who_id}"
            rows.append({"sha256": sha[:64], "face_index": max(face_index, 0), "image_id": data.get("image_id"),
                         "source": data.get("source"), "source_path": data.get("source_path"),
                         "decision": choices[0] if len(choices) == 1 else None, "reviewer": reviewer,
                         "time": _when(_field(ann, "updated_at") or _field(ann, "created_at")),
                         "task_id": task_id, "annotation_id": int(_field(ann, "id", 0)), "project": project,
                         "refused": refused})
    table = pd.DataFrame(rows, columns=list(REVIEW_COLUMNS))
    table = table.astype({"face_index": "int64", "task_id": "int64", "annotation_id": "int64"})
    for col in ("decision", "refused", "image_id", "source", "source_path"):
        table[col] = table[col].astype("object")
    return table.sort_values(["task_id", "annotation_id"], kind="mergesort").reset_index(drop=True)


def review_table_version(table: pd.DataFrame) -> str:
    """Content hash of a review table (what its Dagster data version and its stored copy are named by)."""
    digest = hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    digest.update(",".join(table.columns).encode())
    return digest.hexdigest()[:16]


def annotations_fingerprint(tasks: Iterable[Any]) -> tuple[str, int]:
    """(digest of every annotation's id, update time and result, number of annotations): what
    changes when a reviewer submits, updates or deletes a review."""
    digest = hashlib.sha256()
    n = 0
    for task in sorted(tasks, key=lambda t: int(_field(t, "id", 0))):
        for ann in sorted(_field(task, "annotations", None) or [], key=lambda a: int(_field(a, "id", 0))):
            n += 1
            digest.update(f"{_field(task, 'id')}|{_field(ann, 'id')}|{_when(_field(ann, 'updated_at'))}|"
                          f"{_field(ann, 'result')}|{_field(ann, 'was_cancelled')}\n".encode())
    return digest.hexdigest()[:32], n


@dataclass
class PushReport:
    project_id: int
    created: int
    already_there: int
    project_url: str


class ReviewClient:
    """The few Label Studio calls the loop makes, through the ``label-studio-sdk`` client. Every
    failure to reach the server, or a refused request, becomes :class:`LabelStudioError` naming
    the URL."""

    def __init__(self, url: str, api_key: str, project: str, timeout: float = 30.0) -> None:
        from label_studio_sdk import LabelStudio  # only where the loop is configured

        self.url = url.rstrip("/")
        self.project_title = project
        self.client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout, max_retries=1)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            result = fn(*args, **kwargs)
            return list(result) if what.startswith("list") else result
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"Label Studio at {self.url} is unreachable ({what}): "
                                   f"{type(exc).__name__}: {exc}") from exc
        except ApiError as exc:
            raise LabelStudioError(f"Label Studio at {self.url} refused {what}: HTTP {exc.status_code} "
                                   f"{str(exc.body)[:300]}") from exc

    def find_project(self) -> int | None:
        projects = self._call("list projects", self.client.projects.list, title=self.project_title)
        ids = sorted(int(p.id) for p in projects if p.title == self.project_title)
        return ids[0] if ids else None

    def ensure_project(self) -> int:
        """The project's id, created with the review interface when absent (its interface is
        brought up to date when present)."""
        found = self.find_project()
        config = label_config()
        if found is None:
            created = self._call("create project", self.client.projects.create, title=self.project_title,
                                 label_config=config, show_collab_predictions=True,
                                 description="Images the fer-pipeline review queue ranks first.")
            return int(created.id)
        project = self._call("get project", self.client.projects.get, found)
        if (project.label_config or "").strip() != config.strip():
            self._call("update project", self.client.projects.update, found, label_config=config)
        return found

    def project_url(self, project_id: int) -> str:
        return f"{self.url}/projects/{project_id}/data"

    def tasks(self, project_id: int, with_annotations: bool = True) -> list[Any]:
        return self._call("list tasks", self.client.tasks.list, project=project_id,
                          fields="all" if with_annotations else "task_only", page_size=500)

    def users(self) -> dict[int, str]:
        found = self._call("list users", self.client.users.list)
        return {int(u.id): (u.email or u.username or f"user {u.id}") for u in found}

    def push(self, tasks: Sequence[dict[str, Any]]) -> PushReport:
        """Import the tasks whose key the project does not have yet."""
        project_id = self.ensure_project()
        have = {str((t.data or {}).get("key")) for t in self.tasks(project_id, with_annotations=False)}
        new = [t for t in tasks if t["data"]["key"] not in have]
        if new:
            self._call("import tasks", self.client.projects.import_tasks, project_id, request=new,
                       return_task_ids=True)
        return PushReport(project_id, len(new), len(tasks) - len(new), self.project_url(project_id))

    def pull(self) -> tuple[pd.DataFrame, int | None]:
        """(the review table of the project, its id); an empty table when the project does not exist yet."""
        project_id = self.find_project()
        if project_id is None:
            return parse_reviews([], self.project_title), None
        return parse_reviews(self.tasks(project_id), self.project_title, self.users()), project_id

    def fingerprint(self) -> tuple[str, int]:
        project_id = self.find_project()
        return annotations_fingerprint(self.tasks(project_id) if project_id is not None else [])
