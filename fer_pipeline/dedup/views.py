"""Re-cropped copies that perceptual hashes miss: a multi-view descriptor and a margin test.

A copy of a face whose crop window moved by 8 %, was scaled by 0.9, rotated 5°, brightened and
re-saved as JPEG is the same picture to a person, but its pHash is far from the original's
(``benchmarks/bench_view_duplicates.py``: pHash finds none of 200 such copies). A learned
embedding would have to come from a model trained before the splits exist, and the expression
backbone puts two people with one expression closer than a copy and its original. So this is
model-free, and cannot leak: no label, no split, no training.

* **descriptor**: a face's blurred, contrast-normalised centre (the border cut, box-reduced to
  12 x 12, mean removed, unit length), at 54 *views*: shifted -9/0/+9 % both ways x zoomed 1 or
  1.11 x rotated -5/0/+5°. A copy that moved within those bounds lines up with one view of its
  original (or the other way round);
* **similarity** of two faces: the best cosine of any view of one with the plain other, both ways;
* **margin test** (a nearest-neighbour ratio test, as for SIFT matches): a pair is a duplicate
  when its similarity beats every *third* face's similarity to either of them by ``margin``, and
  reaches ``min_similarity``. Small grayscale faces of one pose look alike, so a fixed similarity
  threshold either links strangers or misses copies; a copy stands out from its original's
  other neighbours.

The search is a k-nearest-neighbour query of every view against the plain descriptors (faiss:
exact inner products below ``EXACT_MAX`` faces, an HNSW graph above, so never all pairs): the
top ``k`` per view, merged per face, hold every face's top ``k`` by similarity exactly (for the
exact index), which is all the margin test needs. Plain Python and torch (batched affine grids),
no Dagster.
"""

from __future__ import annotations

import hashlib
import itertools
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fer_pipeline.atomic import atomic_path

SHIFTS = (-0.09, 0.0, 0.09)
ZOOMS = (1.0, 1.11)
DEGREES = (-5.0, 0.0, 5.0)
VIEWS: tuple[tuple[float, float, float, float], ...] = tuple(itertools.product(SHIFTS, SHIFTS, ZOOMS, DEGREES))
PLAIN = VIEWS.index((0.0, 0.0, 1.0, 0.0))
DESCRIPTOR_SIDE = 12
BLUR_SIGMA = 1.5 / 48  # of the face's side: 1.5 px on the 48 px faces the descriptor was measured on
BORDER = 1 / 8  # of the side, cut on each edge: the background a re-crop changes most
NEIGHBOURS = 8  # per face: the margin test needs the best and second-best third faces
EXACT_MAX = 20_000  # faces: up to here the neighbours are exact (54 x N^2 dot products by BLAS), above HNSW
CHUNK = 64  # faces described and searched at once: their 54 views, grids and samples take ~100 MB at 48 px
CACHE_VERSION = 1


@dataclass(frozen=True)
class ViewRule:
    """When two faces are view duplicates (``FerSettings``: ``view_*``), measured on AffectNet by
    ``benchmarks/bench_view_duplicates.py``."""

    margin: float = 0.018
    min_similarity: float = 0.94


def _grids(side: int) -> torch.Tensor:
    """(V, c, c, 2) sampling grids of every view's centre (``c`` = the side less the borders):
    output pixel -> input position. Sampling only the centre is the crop, done by the grid."""
    inner = 1 - 2 * BORDER
    c = side - 2 * int(round(BORDER * side))
    thetas = []
    for dx, dy, zoom, deg in VIEWS:
        a = np.deg2rad(deg)
        cos, sin = inner * np.cos(a) / zoom, inner * np.sin(a) / zoom
        thetas.append([[cos, -sin, 2 * dx], [sin, cos, 2 * dy]])  # normalised coordinates span 2 per side
    theta = torch.tensor(thetas, dtype=torch.float32)
    return F.affine_grid(theta, [len(VIEWS), 1, c, c], align_corners=False)


def _blurred(faces: np.ndarray) -> torch.Tensor:
    """(N, 1, side, side) float: the faces blurred (a Gaussian of ``BLUR_SIGMA`` x side). Blurring
    before the views (it commutes with shifts and rotations) costs N convolutions, not 54 N."""
    side = faces.shape[-1]
    sigma = BLUR_SIGMA * side
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = torch.from_numpy(np.asarray(faces, dtype=np.float32))[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """(M, 1, c, c) centres -> (M, D) descriptors: box-reduced, mean removed (brightness does not
    count), unit length (neither does contrast)."""
    x = F.adaptive_avg_pool2d(x, DESCRIPTOR_SIDE).flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def view_descriptors(faces: np.ndarray) -> np.ndarray:
    """(N, V, D) float32: every face at every view (``VIEWS``), described."""
    faces = np.asarray(faces)
    n, side = len(faces), faces.shape[-1]
    if n == 0:
        return np.zeros((0, len(VIEWS), DESCRIPTOR_SIDE ** 2), np.float32)
    grids = _grids(side)
    with torch.no_grad():
        x = _blurred(faces)
        views = F.grid_sample(x.repeat_interleave(len(VIEWS), 0), grids.repeat(n, 1, 1, 1),
                              mode="bilinear", padding_mode="border", align_corners=False)
        return _unit(views).reshape(n, len(VIEWS), -1).numpy()


def plain_descriptors(faces: np.ndarray) -> np.ndarray:
    """(N, D) float32: the faces as they are (view ``PLAIN``), described (callers pass ``CHUNK``
    faces at a time: the blur's buffers grow with the batch)."""
    faces = np.asarray(faces)
    if len(faces) == 0:
        return np.zeros((0, DESCRIPTOR_SIDE ** 2), np.float32)
    grid = _grids(faces.shape[-1])[PLAIN:PLAIN + 1]
    with torch.no_grad():  # the plain view through the same sampling grid, so it equals view PLAIN exactly
        x = F.grid_sample(_blurred(faces), grid.repeat(len(faces), 1, 1, 1), mode="bilinear",
                          padding_mode="border", align_corners=False)
        return _unit(x).numpy()


def _index(plain: np.ndarray):  # noqa: ANN202 (a faiss index)
    """Inner-product index over the plain descriptors: exact up to ``EXACT_MAX``, else HNSW
    (built on one thread, so the graph, and the groups, do not depend on thread timing)."""
    import faiss  # a compiled library: imported where it is used

    d = plain.shape[1]
    if len(plain) <= EXACT_MAX:
        index = faiss.IndexFlatIP(d)
        index.add(plain)
        return index
    index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.hnsw.efSearch = 96
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(plain)
    finally:
        faiss.omp_set_num_threads(threads)
    return index


def nearest_by_views(load: Callable[[np.ndarray], np.ndarray], n: int, plain: np.ndarray,
                     k: int = NEIGHBOURS, chunk: int = CHUNK,
                     same_set: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed pairs (i, j, s): each face i's ``k`` best other faces j by the best cosine of a
    view of i with plain j. ``load(idx)`` gives the pixels of faces ``idx`` (a chunk at a time:
    only ``plain`` (N x D) and one chunk's views are ever in memory). ``same_set=False``: ``plain``
    describes another set of faces (j indexes it), so no pair is a face with itself."""
    if n < (2 if same_set else 1) or not len(plain):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = _index(np.ascontiguousarray(plain, dtype=np.float32))
    kk = min(k + int(same_set), len(plain))  # + the face itself
    out_i, out_j, out_s = [], [], []
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        views = view_descriptors(load(idx))  # (c, V, D)
        sims, nbrs = index.search(np.ascontiguousarray(views.reshape(-1, views.shape[-1])), kk)
        face = np.repeat(idx, len(VIEWS) * kk)
        j, s = nbrs.reshape(-1).astype(np.int64), sims.reshape(-1).astype(np.float32)
        ok = (j >= 0) & ((j != face) | (not same_set))  # -1: the index found fewer than asked
        face, j, s = face[ok], j[ok], s[ok]
        if not len(face):
            continue
        # per (face, neighbour): the best view; then per face its k best neighbours
        order = np.lexsort((-s, j, face))
        face, j, s = face[order], j[order], s[order]
        first = np.r_[True, (face[1:] != face[:-1]) | (j[1:] != j[:-1])]
        face, j, s = face[first], j[first], s[first]
        order = np.lexsort((j, -s, face))
        face, j, s = face[order], j[order], s[order]
        rank = np.arange(len(face)) - np.searchsorted(face, face, "left")
        keep = rank < k
        out_i.append(face[keep])
        out_j.append(j[keep])
        out_s.append(s[keep])
        del views
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def margin_pairs(i: np.ndarray, j: np.ndarray, s: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray,
                                                                              np.ndarray, np.ndarray]:
    """(a, b, similarity, margin) for every undirected pair in the directed lists (a < b):
    similarity = the better direction; margin = similarity - the best similarity either face
    has to any third face (+inf when neither has one listed)."""
    a, b = np.minimum(i, j), np.maximum(i, j)
    key = a * n + b
    order = np.lexsort((-s, key))
    key, s = key[order], s[order]
    first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
    key, s = key[first], s[first]
    a, b = key // n, key % n
    # per face: best and second-best similarity, and who the best is
    face = np.concatenate([a, b])
    other = np.concatenate([b, a])
    sim = np.concatenate([s, s])
    order = np.lexsort((other, -sim, face))
    face, other, sim = face[order], other[order], sim[order]
    starts = np.searchsorted(face, np.arange(n), "left")
    ends = np.searchsorted(face, np.arange(n), "right")
    best = np.full(n, -np.inf, np.float32)
    second = np.full(n, -np.inf, np.float32)
    best_of = np.full(n, -1, np.int64)
    has1 = ends > starts
    best[has1], best_of[has1] = sim[starts[has1]], other[starts[has1]]
    has2 = ends > starts + 1
    second[has2] = sim[starts[has2] + 1]

    def third(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.where(best_of[x] == y, second[x], best[x])

    rival = np.maximum(third(a, b), third(b, a))
    return a, b, s, (s - rival).astype(np.float32)


def view_links(load: Callable[[np.ndarray], np.ndarray], n: int, rule: ViewRule = ViewRule(),
               plain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, similarity, margin) of the pairs among ``n`` faces that pass ``rule``.

    ``plain`` (N x D) may come from a cache (:class:`DescriptorCache`); it is computed from
    ``load`` otherwise."""
    if plain is None:
        plain = _plain_of(load, n)
    i, j, s = nearest_by_views(load, n, plain)
    a, b, sim, margin = margin_pairs(i, j, s, n)
    ok = (margin >= rule.margin) & (sim >= rule.min_similarity)
    return a[ok], b[ok], sim[ok], margin[ok]


def _plain_of(load: Callable[[np.ndarray], np.ndarray], n: int) -> np.ndarray:
    """(n, D) plain descriptors, ``CHUNK`` faces at a time (the blur's convolution buffers grow with
    the batch: 6,000 faces at once took 1 GB)."""
    step = CHUNK
    parts = [plain_descriptors(load(np.arange(s, min(s + step, n)))) for s in range(0, n, step)]
    return np.concatenate(parts) if parts else np.zeros((0, DESCRIPTOR_SIDE ** 2), np.float32)


def view_matches_across(load: Callable[[np.ndarray], np.ndarray], n: int, ref: Callable[[np.ndarray], np.ndarray],
                        n_ref: int, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n`` faces: the reference face it is a view copy of (the most similar one at
    ``min_similarity`` or more), else -1, and that similarity. Both ways: the faces' views against
    the reference's plain descriptors and the reference's views against the faces'. No margin test:
    what this guards (a pretraining pool against the four classes) loses little by one face too many."""
    match, best = np.full(n, -1, np.int64), np.full(n, -np.inf, np.float32)
    if not n or not n_ref:
        return match, best
    i1, j1, s1 = nearest_by_views(load, n, _plain_of(ref, n_ref), k=1, same_set=False)
    j2, i2, s2 = nearest_by_views(ref, n_ref, _plain_of(load, n), k=NEIGHBOURS, same_set=False)
    face, other, sim = np.concatenate([i1, i2]), np.concatenate([j1, j2]), np.concatenate([s1, s2])
    order = np.lexsort((other, -sim, face))
    face, other, sim = face[order], other[order], sim[order]
    first = np.r_[True, face[1:] != face[:-1]] if len(face) else np.zeros(0, bool)
    face, other, sim = face[first], other[first], sim[first]
    ok = sim >= min_similarity
    match[face[ok]], best[face[ok]] = other[ok], sim[ok]
    return match, best


def descriptor_cache_name(settings_key: str) -> str:
    payload = f"v{CACHE_VERSION}|{settings_key}|{DESCRIPTOR_SIDE}|{BLUR_SIGMA}|{BORDER}"
    return f"view_descriptors-{hashlib.sha1(payload.encode()).hexdigest()[:12]}.npz"


@dataclass
class DescriptorCache:
    """Plain descriptors by face content hash: a rerun describes only faces not seen before (the
    views are recomputed from the pixels when searching: storing 54 per face would cost 31 KB a face)."""

    shas: np.ndarray  # (K,) str, sorted
    plain: np.ndarray  # (K, D) float32 (as computed: a cached run groups exactly like a fresh one)

    @classmethod
    def load(cls, path: Path) -> DescriptorCache | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != CACHE_VERSION:
                    return None
                shas, plain = z["shas"].astype(str).astype(object), z["plain"].astype(np.float32)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        if plain.ndim != 2 or len(plain) != len(shas) or plain.shape[1] != DESCRIPTOR_SIDE ** 2:
            return None
        return cls(shas, plain)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, version=np.int64(CACHE_VERSION), shas=np.asarray(self.shas, dtype=str),
                         plain=self.plain.astype(np.float32))


def cached_plain(shas: np.ndarray, load: Callable[[np.ndarray], np.ndarray], cache_path: Path | None,
                 ignore_cache: bool = False) -> tuple[np.ndarray, int]:
    """(plain descriptors of faces ``shas`` in that order, how many were described this time);
    the cache at ``cache_path`` is read and rewritten with exactly these faces."""
    cache = None if ignore_cache or cache_path is None else DescriptorCache.load(cache_path)
    out = np.zeros((len(shas), DESCRIPTOR_SIDE ** 2), np.float32)
    known = np.zeros(len(shas), bool)
    if cache is not None and len(cache.shas):
        pos = np.searchsorted(cache.shas.astype(str), np.asarray(shas, dtype=str))
        pos = np.minimum(pos, len(cache.shas) - 1)
        known = cache.shas[pos] == np.asarray(shas, dtype=object)
        out[known] = cache.plain[pos[known]].astype(np.float32)
    todo = np.flatnonzero(~known)
    for s in range(0, len(todo), CHUNK):  # CHUNK at a time: see _plain_of
        idx = todo[s:s + CHUNK]
        out[idx] = plain_descriptors(load(idx))
    if cache_path is not None and (len(todo) or cache is None or len(cache.shas) != len(shas)):
        order = np.argsort(np.asarray(shas, dtype=str), kind="stable")
        DescriptorCache(np.asarray(shas, dtype=object)[order], out[order]).save(cache_path)
    return out, len(todo)
