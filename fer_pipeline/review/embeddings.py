"""Face embeddings and the outliers among them. Plain Python + torch, no Dagster: the
``face_embeddings`` asset calls it.

**Which model embeds.** The pretrained backbone (``models/backbone_<main>.safetensors``): the main
architecture trained on the pretraining pool's own labels, a pool the leakage guard has already
cleared of every four-class image whatever its split. An embedding is its penultimate activation
(the pooled convolutional features, before the classifier): what the network has learnt to tell
faces apart by, not its answer. Where there is no backbone (no pool, or too small a one) the
shipped model embeds (its first member when it is an ensemble), else the main model's checkpoint;
the choice and why are recorded. The embeddings are computed after the splits and used only to
find outliers and rank the review queue, never to de-duplicate or split, so even the fallback's
four-class training cannot feed back into what it was trained on (no ordering cycle).

**Reuse.** A face's embedding is keyed by its file's content hash (``sha256``), its face index,
the face store folder (the preprocessing fingerprint: other settings make other pixels) and the
embedding model's identity (:attr:`Embedder.identity`: the checkpoint file's SHA-256 and how the
embedding is taken). A rerun embeds only the faces whose key is not in the stored table; faces
no longer published are dropped; another model recomputes everything.

**Outliers.** cleanlab's :class:`~cleanlab.outlier.OutOfDistribution` scores each face by its
mean cosine distance to its ``k`` nearest neighbours among all embedded faces (score
``exp(-distance / median distance)`` in (0, 1], lower = more atypical). See :func:`find_outliers`
for the threshold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fer_pipeline.faces.store import load_faces
from fer_pipeline.paths import FACES_DIR, DataPaths

if TYPE_CHECKING:
    from fer_pipeline.ml.checkpoint import LoadedModel

EMBEDDING_METHOD = "penultimate-v1"
"""How an embedding is taken (the head up to its classifier, no flip averaging): part of the
model identity, so a change here recomputes every embedding."""
KEY = ["sha256", "face_index", "face_store"]
EMBEDDING_COLUMNS = ["image_id", *KEY, "model", "embedding"]
FAILED_COLUMNS = ["image_id", "face_path", "reason"]
OUTLIER_COLUMNS = ["image_id", "score", "relative_distance", "reason"]
READ_CHUNK = 4096  # faces read from the store at once (4096 x 48 x 48 bytes = 9 MB)
BATCH = 512  # faces through the network at once
SEED = 0

BACKBONE, SHIPPED, MAIN = "backbone", "shipped model", "main model"


@dataclass(frozen=True)
class Embedder:
    """A loaded network that embeds, what it is (``kind``: backbone, shipped model or main model)
    and its identity (changes when its weights or the embedding method do)."""

    model: LoadedModel
    kind: str
    identity: str
    why: str

    def embed(self, faces: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
        """Penultimate activations (N, D) float32 of uint8 faces (N, H, W)."""
        return embed_faces(self.model, faces, batch_size)


@dataclass(frozen=True)
class Choice:
    """The embedder, or None and why there is none; ``notes``: earlier candidates passed over."""

    embedder: Embedder | None
    reason: str
    notes: tuple[str, ...] = ()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load(path: Path, kind: str, why: str, model: LoadedModel | None = None) -> Embedder:
    from fer_pipeline.ml.checkpoint import load_checkpoint

    model = model if model is not None else load_checkpoint(path)
    identity = f"{kind.replace(' ', '_')}:{model.name}:{file_sha256(path)[:16]}:{EMBEDDING_METHOD}"
    return Embedder(model, kind, identity, why)


def choose_embedder(paths: DataPaths, arch_name: str | None = None) -> Choice:
    """The model that embeds: the pretrained backbone of ``arch_name`` (default: the main
    architecture) when there is one; else the shipped model (first member); else the main model's
    checkpoint; else none. A candidate that cannot be loaded is passed over, and the note says why."""
    from fer_pipeline.ml.architectures import MAIN_MODEL

    arch_name = arch_name or MAIN_MODEL
    notes: list[str] = []
    backbone = paths.backbone(arch_name)
    if backbone.is_file():
        try:
            embedder = _load(backbone, BACKBONE, f"the pretrained backbone {backbone.name}: trained on the "
                                                 "guarded pool's own labels, it saw no four-class label")
            return Choice(embedder, embedder.why)
        except Exception as exc:  # noqa: BLE001 -- reported in the choice, never silent
            notes.append(f"the backbone {backbone} cannot be loaded ({exc})")
    else:
        notes.append("no pretrained backbone (no pretraining pool, or pretrained_backbone not materialized)")
    if paths.shipped_json.is_file():
        try:
            from fer_pipeline.ml.shipped import load_members
            from fer_pipeline.schema import ShippedSpec

            spec = ShippedSpec.read(paths.shipped_json)  # the first member, checked like predict checks it
            (first,) = load_members(spec.members[:1], paths, spec.data_version, str(paths.shipped_json))
            assert first.path is not None
            embedder = _load(first.path, SHIPPED, f"{'; '.join(notes)}: the shipped model's {spec.members[0].name} "
                                             "instead (computed after the splits; used for outliers only)", first)
            return Choice(embedder, embedder.why, tuple(notes))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"the shipped model cannot be loaded ({exc})")
    main = paths.checkpoint(arch_name)
    if main.is_file():
        try:
            embedder = _load(main, MAIN, f"{'; '.join(notes)}: the main model {main.name} instead (computed "
                                         "after the splits; used for outliers only)")
            return Choice(embedder, embedder.why, tuple(notes))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"the main model {main} cannot be loaded ({exc})")
    else:
        notes.append("no shipped or main model yet")
    return Choice(None, "; ".join(notes), tuple(notes))


def embed_faces(model: LoadedModel, faces: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """The activations just before ``model``'s classifier (for the GAP head: the pooled last conv
    block) of uint8 faces (N, H, W), float32 (N, D); eval mode, no gradients, fixed seed."""
    import torch

    from fer_pipeline.ml.data import normalize, to_unit_tensor

    net = model.model
    trunk = torch.nn.Sequential(net.features, *list(net.head.children())[:-1])  # all but the last Linear
    faces = np.asarray(faces)
    if faces.ndim != 3 or tuple(faces.shape[1:]) != tuple(model.input_size):
        raise ValueError(f"the model takes {tuple(model.input_size)} faces, got {tuple(faces.shape[1:])}")
    torch.manual_seed(SEED)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    outs = []
    try:
        with torch.no_grad():
            for start in range(0, len(faces), batch_size):
                x = normalize(to_unit_tensor(faces[start:start + batch_size]).to(device), model.normalization)
                outs.append(trunk(x).float().cpu().numpy())
    finally:
        net.train(was_training)
    if not outs:
        return np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)


def face_store_of(face_path: str) -> str:
    """The face store folder of a face ref (``faces/<settings key>``: the preprocessing
    fingerprint); a plain image file: its own path."""
    parts = str(face_path).split("/")
    return "/".join(parts[:2]) if parts[0] == FACES_DIR and len(parts) > 2 else str(face_path).partition("#")[0]


@dataclass
class EmbeddingRefresh:
    """The new table (``EMBEDDING_COLUMNS``, in ``faces`` order) and what it took."""

    table: pd.DataFrame
    computed: int
    reused: int
    dropped: int  # rows of the previous table not carried over (faces gone, or another model)
    failed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FAILED_COLUMNS))


def _read_chunk(root: Path, part: pd.DataFrame, shape: tuple[int, int]) -> tuple[np.ndarray, list[int], list[str]]:
    """The faces of ``part`` (rows that read, their positions, and why the others did not): one
    read for the chunk, face by face only when that fails, so one bad shard costs only its faces."""
    refs = part["face_path"].astype(str).tolist()
    try:
        whole: np.ndarray | None = load_faces(root, refs)
    except Exception:  # noqa: BLE001 -- a bad shard or face: found face by face below
        whole = None
    if whole is not None and tuple(whole.shape[1:]) == shape:
        return whole, list(range(len(refs))), [""] * len(refs)
    good, ok, why = [], [], []
    for i, ref in enumerate(refs):
        try:
            face = load_faces(root, [ref])[0]
        except Exception as exc:  # noqa: BLE001 -- reported per face
            why.append(f"unreadable face ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        if tuple(face.shape) != shape:
            why.append(f"the face is {tuple(face.shape)}, the model takes {shape}")
            continue
        good.append(face)
        ok.append(i)
        why.append("")
    faces = np.stack(good) if good else np.zeros((0, *shape), np.uint8)
    return faces, ok, why


def refresh_embeddings(root: str | Path, faces: pd.DataFrame, embedder: Embedder,
                       previous: pd.DataFrame | None = None, chunk: int = READ_CHUNK,
                       log: Callable[[str], None] | None = None) -> EmbeddingRefresh:
    """Embeddings of ``faces`` (``image_id``, ``sha256``, ``face_index``, ``face_path``): those whose
    key (:data:`KEY` + model identity) is in ``previous`` are reused, the rest read from the face
    store ``chunk`` at a time and embedded. A face that cannot be read or embedded is left out and
    listed in ``failed`` with the reason (the run goes on)."""
    root = Path(root)
    log = log or (lambda _m: None)
    frame = faces[["image_id", "sha256", "face_index", "face_path"]].reset_index(drop=True).copy()
    frame["face_index"] = frame["face_index"].fillna(0).astype("int64")
    frame["face_store"] = frame["face_path"].astype(str).map(face_store_of)
    identity = embedder.identity
    stored: dict[tuple, np.ndarray] = {}
    if previous is not None and len(previous):
        same = previous[previous["model"] == identity]
        for key, vec in zip(same[KEY].itertuples(index=False, name=None), same["embedding"]):
            stored.setdefault((str(key[0]), int(key[1]), str(key[2])), np.asarray(vec, np.float32))
    keys = list(zip(frame["sha256"].astype(str), frame["face_index"].astype(int), frame["face_store"].astype(str)))
    vectors: list[np.ndarray | None] = [stored.get(k) for k in keys]
    todo = [i for i, v in enumerate(vectors) if v is None]
    reused = len(frame) - len(todo)
    failed: list[tuple[str, str, str]] = []
    shape = tuple(embedder.model.input_size)
    for start in range(0, len(todo), chunk):
        rows = todo[start:start + chunk]
        part = frame.iloc[rows]
        read, ok, why = _read_chunk(root, part, shape)  # type: ignore[arg-type]
        for i, reason in zip(rows, why):
            if reason:
                failed.append((str(frame.at[i, "image_id"]), str(frame.at[i, "face_path"]), reason))
        if not len(read):
            continue
        try:
            emb = embedder.embed(read)
        except Exception as exc:  # noqa: BLE001 -- the chunk is reported, the run goes on
            for j in ok:
                i = rows[j]
                failed.append((str(frame.at[i, "image_id"]), str(frame.at[i, "face_path"]),
                               f"not embedded ({type(exc).__name__}: {str(exc)[:200]})"))
            continue
        finite = np.isfinite(emb).all(axis=1)
        for j, vec, fine in zip(ok, emb, finite):
            i = rows[j]
            if fine:
                vectors[i] = vec
            else:
                failed.append((str(frame.at[i, "image_id"]), str(frame.at[i, "face_path"]),
                               "non-finite embedding"))
        log(f"embedded {min(start + chunk, len(todo))} of {len(todo)} face(s)")
    have = [v is not None for v in vectors]
    table = frame.loc[have, ["image_id", *KEY]].reset_index(drop=True)
    table["model"] = identity
    table["embedding"] = [v for v in vectors if v is not None]
    carried = {(*k, identity) for k, h in zip(keys, have) if h}
    dropped = 0 if previous is None or not len(previous) else sum(
        (str(a), int(b), str(c), str(m)) not in carried
        for a, b, c, m in previous[[*KEY, "model"]].itertuples(index=False, name=None))
    computed = int(sum(have)) - reused
    return EmbeddingRefresh(table[EMBEDDING_COLUMNS], computed, reused, int(dropped),
                            pd.DataFrame(failed, columns=FAILED_COLUMNS))


def embedding_matrix(table: pd.DataFrame) -> np.ndarray:
    """The ``embedding`` column as one float32 (N, D) array."""
    if not len(table):
        return np.zeros((0, 0), np.float32)
    return np.stack([np.asarray(v, np.float32) for v in table["embedding"]])


@dataclass(frozen=True)
class OutlierSettings:
    """``k`` neighbours; a face is an outlier when its mean distance to them, relative to the
    median face's, exceeds the median by ``z`` robust standard deviations (1.4826 x MAD), and at
    most ``max_share`` of the faces are flagged (the most atypical first). ``min_faces``: fewer
    faces get no scores (a kNN distance among a handful means nothing)."""

    k: int = 10
    z: float = 4.0
    max_share: float = 0.02
    min_faces: int = 50


def find_outliers(table: pd.DataFrame, settings: OutlierSettings = OutlierSettings(),
                  model_kind: str = BACKBONE) -> tuple[pd.DataFrame, str]:
    """The outliers among the embedded faces (``OUTLIER_COLUMNS``: ``score`` cleanlab's outlier
    score in (0, 1], lower = more atypical; ``relative_distance`` the mean kNN distance over the
    median face's), most atypical first, and a note on how the threshold came out.

    Why a robust z and a cap: cleanlab's scores are relative (the median face scores e^-1), so a
    fixed score threshold would flag a fixed share of any dataset, outliers or not. The robust z
    flags only faces far beyond the spread of typical ones; the cap keeps a strange dataset from
    flooding the queue."""
    n = len(table)
    if n < settings.min_faces:
        return pd.DataFrame(columns=OUTLIER_COLUMNS), (f"{n} embedded face(s): outliers need at least "
                                                       f"{settings.min_faces}")
    from cleanlab.outlier import OutOfDistribution

    x = embedding_matrix(table).astype(np.float64)
    scores = OutOfDistribution(params={"k": settings.k}).fit_score(features=x)
    scores = np.clip(np.asarray(scores, np.float64), 1e-300, 1.0)
    rel = -np.log(scores)  # t = 1: mean kNN distance / median mean kNN distance
    med = float(np.median(rel))
    mad = float(np.median(np.abs(rel - med))) * 1.4826
    cut = med + settings.z * max(mad, 1e-9)
    hit = np.flatnonzero(rel > cut)
    cap = int(np.floor(settings.max_share * n))
    order = hit[np.lexsort((table["image_id"].to_numpy()[hit].astype(str), -rel[hit]))]
    capped = len(order) > cap
    order = order[:cap]
    where = {BACKBONE: "the backbone's", SHIPPED: "the shipped model's", MAIN: "the main model's"}.get(
        model_kind, f"the {model_kind}'s")
    out = pd.DataFrame({
        "image_id": table["image_id"].to_numpy()[order],
        "score": scores[order],
        "relative_distance": rel[order],
        "reason": [f"outlier: far from its {settings.k} nearest neighbours in {where} embedding "
                   f"(score {scores[i]:.2f}, {rel[i]:.1f}x the median face's distance)" for i in order],
    })
    note = (f"relative kNN distance > {cut:.2f} (median {med:.2f} + {settings.z} x robust sd {mad:.3f}): "
            f"{len(hit)} face(s)" + (f", capped at {settings.max_share:.0%} ({cap})" if capped else ""))
    return out.reset_index(drop=True), note
