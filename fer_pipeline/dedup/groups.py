"""Group exact and near-duplicate faces, keep one representative per group, flag label conflicts.

* exact duplicates: identical processed pixels (same ``pixel_sha``);
* near-duplicates: perceptual hashes within ``max_distance`` bits (Hamming), optionally also
  against the mirrored image's hash, in both directions (flipped copies);
* a perceptual-hash match is only a *candidate*: it is confirmed when the two processed faces
  also correlate (Pearson, over pixels; brightness/contrast invariant) at ``min_correlation``
  or more. Small grayscale faces share a lot of low-frequency structure, so phash alone links
  different people (on the demo data, a quarter of the phash matches at distance 4 are
  different faces, many with different labels); the pixel check removes those;
* groups are connected components of the confirmed links (so near-duplicate chains end up
  together, which is the conservative choice against leakage between splits).

Representative rule (documented in docs/data.md): the member with the largest original
resolution (width × height), then the largest file, then the first by (source, source_path).
A group whose members carry different target labels is a *label conflict*: all its members are
excluded, because nothing says which label is right.

Near pairs are found by multi-index hashing, never pair by pair in Python: the 64-bit hash is
cut into ``max_distance + 1`` bands, and two hashes within ``max_distance`` bits must agree on at
least one band exactly, so a sorted join per band yields the candidates and one vectorised
XOR + popcount verifies them (40,000 FER2013 hashes: about 6 million candidates instead of
800 million pairs). :func:`deduplicate_incremental` (what the asset uses) caches the candidate
pairs by content hash and compares only faces not seen before against all, so adding 1% more
images costs about 1%.
"""

from __future__ import annotations

import hashlib
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fer_pipeline.atomic import atomic_path
from fer_pipeline.faces.phash import from_hex

BLOCK = 256  # rows per block of the all-pairs fallback: cache-friendly temporaries
MAX_PAIRS_PER_STEP = 2_000_000  # candidate pairs generated at once by the band join (bounds memory)
MIH_MAX_DISTANCE = 8  # up to here bands are >= 7 bits wide and the band join beats all pairs


def _bands(max_distance: int) -> list[tuple[np.uint64, np.uint64]]:
    """(shift, mask) of ``max_distance + 1`` bands that tile the 64 bits."""
    n = max_distance + 1
    widths = [64 // n + (1 if k < 64 % n else 0) for k in range(n)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(np.uint64(sh), np.uint64((1 << w) - 1)) for sh, w in zip(shifts, widths)]


def _merge_pairs(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Union of pair lists (``0 <= j < n``), each pair once, sorted."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n = max(n, 1)
    key = np.unique(np.concatenate([i.astype(np.int64) * n + j for i, j in parts]))
    return key // n, key % n


def _band_join(left: np.ndarray, right: np.ndarray, max_distance: int,
               keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j) with ``popcount(left[i] ^ right[j]) <= max_distance`` (and ``keep(i, j)``), each once.

    Multi-index hashing: cut the 64 bits into ``max_distance + 1`` bands. Two hashes that differ
    in at most ``max_distance`` bits agree exactly on at least one band (pigeonhole), so only
    pairs that share a band value are compared: a sorted join per band instead of all pairs."""
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    for shift, mask in _bands(max_distance):
        lk, rk = (left >> shift) & mask, (right >> shift) & mask
        r_order = np.argsort(rk, kind="stable")
        r_sorted = rk[r_order]
        lo = np.searchsorted(r_sorted, lk, "left")
        counts = np.searchsorted(r_sorted, lk, "right") - lo
        ends = np.cumsum(counts)
        start = 0
        while start < len(left):  # steps of left rows whose pairs fit MAX_PAIRS_PER_STEP
            base = ends[start - 1] if start else 0
            stop = max(int(np.searchsorted(ends, base + MAX_PAIRS_PER_STEP, "right")), start + 1)
            c = counts[start:stop]
            i = np.repeat(np.arange(start, stop), c)
            offset = np.arange(len(i)) - np.repeat(np.cumsum(c) - c, c)
            j = r_order[np.repeat(lo[start:stop], c) + offset]
            ok = np.bitwise_count(left[i] ^ right[j]) <= max_distance
            if keep is not None:
                ok &= keep(i, j)
            found_i.append(i[ok])
            found_j.append(j[ok])
            start = stop
    return _merge_pairs(list(zip(found_i, found_j)), len(right))  # a pair can share several bands


def _all_pairs_blockwise(hashes: np.ndarray, max_distance: int, mirrored: np.ndarray | None,
                         block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The same result as the band join by brute force (XOR + popcount of every pair, in
    blocks): for thresholds so large that the bands would be too narrow to prune anything."""
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for start in range(0, len(hashes), block):
        a = hashes[start:start + block, None]
        close = np.bitwise_count(a ^ hashes[None, start:]) <= max_distance  # only j >= start
        if mirrored is not None:
            close |= np.bitwise_count(a ^ mirrored[None, start:]) <= max_distance
            close |= np.bitwise_count(mirrored[start:start + block, None] ^ hashes[None, start:]) <= max_distance
        i, j = np.nonzero(close)
        keep = j > i
        rows.append(i[keep] + start)
        cols.append(j[keep] + start)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def near_pairs(hashes: np.ndarray, max_distance: int, mirrored: np.ndarray | None = None,
               block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) whose hashes differ in at most ``max_distance`` bits.

    With ``mirrored``, a pair also matches when either face's hash is close to the other's
    mirrored hash (both directions: the rule must not depend on which face comes first).
    Uses the band join (multi-index hashing) up to ``MIH_MAX_DISTANCE`` bits, brute force above.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    mir = None if mirrored is None else np.ascontiguousarray(mirrored, dtype=np.uint64)
    n = len(hashes)
    if max_distance < 0 or n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if max_distance > MIH_MAX_DISTANCE:
        return _all_pairs_blockwise(hashes, max_distance, mir, block)
    parts = [_band_join(hashes, hashes, max_distance, lambda i, j: i < j)]
    if mir is not None:  # hashes[i] ~ mirrored[j] for any i != j covers both directions
        i, j = _band_join(hashes, mir, max_distance, lambda i, j: i != j)
        parts.append((np.minimum(i, j), np.maximum(i, j)))
    return _merge_pairs(parts, n)


def pixel_correlation(faces: np.ndarray, i: np.ndarray, j: np.ndarray, mirrored: bool = False,
                      chunk: int = 8192) -> np.ndarray:
    """Pearson correlation of faces[i] and faces[j] (or j's mirror image), pair by pair, in chunks."""
    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), chunk):
        a = faces[i[start:start + chunk]].astype(np.float32)
        b = faces[j[start:start + chunk]].astype(np.float32)
        if mirrored:
            b = b[:, :, ::-1]
        a = a.reshape(len(a), -1)
        b = b.reshape(len(b), -1)
        a -= a.mean(axis=1, keepdims=True)
        b -= b.mean(axis=1, keepdims=True)
        denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1)) + 1e-6
        out[start:start + chunk] = (a * b).sum(axis=1) / denom
    return out


def exact_pairs(keys: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Link every row to the first row with the same key."""
    codes, _ = pd.factorize(keys)
    first = pd.Series(np.arange(len(codes))).groupby(codes).transform("min").to_numpy()
    idx = np.arange(len(codes))
    mask = first != idx
    return first[mask], idx[mask]


@dataclass
class DedupReport:
    table: pd.DataFrame  # input rows + dup_group, dup_group_size, is_representative, duplicate_of, conflict
    n_groups_with_duplicates: int
    n_exact_links: int
    n_near_links: int
    n_near_candidates: int
    n_conflict_groups: int
    seconds: float


def deduplicate(faces: pd.DataFrame, max_distance: int = 4, match_mirrored: bool = True,
                pixels: np.ndarray | None = None, min_correlation: float = 0.95) -> DedupReport:
    """Group the accepted faces. ``faces`` needs: image_id, source, source_path, label, width,
    height, bytes, pixel_sha, phash, phash_mirror. ``pixels`` (N, H, W) uint8 in the same row
    order enables the correlation check of phash candidates (skipped when None)."""
    start = time.perf_counter()
    df = faces.reset_index(drop=True).copy()
    n = len(df)
    ei, ej = exact_pairs(df["pixel_sha"]) if n else (np.zeros(0, int), np.zeros(0, int))
    ni, nj = (near_pairs(from_hex(df["phash"].tolist()), max_distance,
                         from_hex(df["phash_mirror"].tolist()) if match_mirrored else None)
              if n and max_distance >= 0 else (np.zeros(0, int), np.zeros(0, int)))
    n_candidates = len(ni)
    if pixels is not None and len(ni) and min_correlation > 0:
        corr = pixel_correlation(pixels, ni, nj)
        if match_mirrored:
            corr = np.maximum(corr, pixel_correlation(pixels, ni, nj, mirrored=True))
        ni, nj = ni[corr >= min_correlation], nj[corr >= min_correlation]
    return _group(df, ei, ej, ni, nj, n_candidates, start)


def _group(df: pd.DataFrame, ei: np.ndarray, ej: np.ndarray, ni: np.ndarray, nj: np.ndarray,
           n_candidates: int, start: float) -> DedupReport:
    """Connected components of the exact and confirmed near links, representatives, conflicts."""
    n = len(df)
    i = np.concatenate([ei, ni]).astype(np.int64)
    j = np.concatenate([ej, nj]).astype(np.int64)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False) if n else (0, np.zeros(0, int))
    df["dup_group"] = labels.astype(np.int64)
    df["dup_group_size"] = df.groupby("dup_group")["dup_group"].transform("size").astype(np.int64)
    # representative: largest resolution, then largest file, then first by (source, path)
    df["_area"] = df["width"].astype("int64") * df["height"].astype("int64")
    order = df.sort_values(["dup_group", "_area", "bytes", "source", "source_path"],
                           ascending=[True, False, False, True, True], kind="mergesort")
    reps = order.groupby("dup_group").head(1)
    df["is_representative"] = df.index.isin(reps.index)
    rep_id = reps.set_index("dup_group")["image_id"]
    df["duplicate_of"] = df["dup_group"].map(rep_id).where(~df["is_representative"], None)
    n_labels = df.groupby("dup_group")["label"].transform("nunique")
    df["conflict"] = n_labels > 1
    df = df.drop(columns=["_area"])
    groups_with_dups = int((df.groupby("dup_group").size() > 1).sum())
    conflicts = int(df.loc[df["conflict"], "dup_group"].nunique())
    return DedupReport(df, groups_with_dups, len(ei), len(ni), n_candidates, conflicts, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Incremental de-duplication: near-duplicate candidate pairs are a function of the two faces'
# contents only, so they are cached by raw content hash (SHA-256 of the source file) and only
# faces not seen before are compared, against everything. The cache holds exactly the result of
# an all-pairs comparison over the faces it lists (faces that disappear are dropped from it), so
# a run after a change gives the same groups as a run from scratch.

LINK_CACHE_VERSION = 2  # 2: the mirror rule is symmetric


def link_cache_name(settings_key: str, max_distance: int, match_mirrored: bool) -> str:
    """File name of the candidate-pair cache for these settings: a change of preprocessing
    settings, distance threshold or mirroring uses (and fills) another cache. The correlation
    threshold is applied when reading, so changing it needs no recomputation."""
    payload = f"v{LINK_CACHE_VERSION}|{settings_key}|{max_distance}|{int(bool(match_mirrored))}"
    return f"near_links-{hashlib.sha1(payload.encode()).hexdigest()[:12]}.npz"


@dataclass
class NearLinkCache:
    """Candidate pairs among the distinct faces ``shas`` (sorted): indices ``a < b`` into ``shas``
    and their pixel correlation (NaN when it was not computed)."""

    shas: np.ndarray  # (K,) str, sorted
    a: np.ndarray  # (P,) int64
    b: np.ndarray  # (P,) int64
    corr: np.ndarray  # (P,) float32

    @classmethod
    def load(cls, path: Path) -> "NearLinkCache | None":
        """The cache at ``path``, or None when absent or unreadable (then everything is compared)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != LINK_CACHE_VERSION:
                    return None
                shas = z["shas"].astype(str).astype(object)
                a, b, corr = z["a"].astype(np.int64), z["b"].astype(np.int64), z["corr"].astype(np.float32)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        if not (len(a) == len(b) == len(corr)) or (len(a) and (max(a.max(), b.max()) >= len(shas) or
                                                               min(a.min(), b.min()) < 0)):
            return None
        return cls(shas, a, b, corr)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, version=np.int64(LINK_CACHE_VERSION), shas=np.asarray(self.shas, dtype="S64"),
                         a=self.a.astype(np.int32 if len(self.shas) < 2**31 else np.int64),
                         b=self.b.astype(np.int32 if len(self.shas) < 2**31 else np.int64),
                         corr=self.corr.astype(np.float32))


def _cross_pairs(new: np.ndarray, old: np.ndarray, hashes: np.ndarray, mirrored: np.ndarray | None,
                 max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs between the ``new`` and ``old`` indices (sorted order = content order).

    The same rule as :func:`near_pairs`: the hashes are close, or one face's hash is close to
    the other's mirrored hash."""
    if max_distance > MIH_MAX_DISTANCE:
        return _cross_pairs_blockwise(new, old, hashes, mirrored, max_distance)
    sides = [(hashes, hashes)] + ([(hashes, mirrored), (mirrored, hashes)] if mirrored is not None else [])
    parts = []
    for left, right in sides:
        a, b = _band_join(left[new], right[old], max_distance)
        parts.append((np.minimum(new[a], old[b]), np.maximum(new[a], old[b])))
    return _merge_pairs(parts, len(hashes))


def _cross_pairs_blockwise(new: np.ndarray, old: np.ndarray, hashes: np.ndarray, mirrored: np.ndarray | None,
                           max_distance: int, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_cross_pairs` by brute force, for thresholds above ``MIH_MAX_DISTANCE``."""
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    h_old = hashes[old][None, :]
    m_old = None if mirrored is None else mirrored[old][None, :]
    for start in range(0, len(new), block):
        idx = new[start:start + block]
        h_new = hashes[idx][:, None]
        close = np.bitwise_count(h_new ^ h_old) <= max_distance
        if mirrored is not None and m_old is not None:
            close |= np.bitwise_count(h_new ^ m_old) <= max_distance
            close |= np.bitwise_count(mirrored[idx][:, None] ^ h_old) <= max_distance
        i, j = np.nonzero(close)
        rows.append(idx[i])
        cols.append(old[j])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    x, y = np.concatenate(rows), np.concatenate(cols)
    return np.minimum(x, y), np.maximum(x, y)


@dataclass
class IncrementalStats:
    faces_compared: int  # distinct faces compared against everything this time (not in the cache)
    faces_cached: int  # distinct faces whose pairs came from the cache
    pairs_correlated: int  # candidate pairs whose pixel correlation was computed this time


def deduplicate_incremental(faces: pd.DataFrame, max_distance: int = 4, match_mirrored: bool = True,
                            load_pixels: Callable[[np.ndarray], np.ndarray] | None = None,
                            min_correlation: float = 0.95, cache_path: Path | None = None,
                            ignore_cache: bool = False) -> tuple[DedupReport, IncrementalStats]:
    """:func:`deduplicate` that only compares faces not seen before (by ``sha256``) against all.

    ``faces`` needs the columns of :func:`deduplicate` plus ``sha256`` (raw content hash).
    ``load_pixels(rows)`` returns the processed faces (N, H, W) of those row positions of
    ``faces``; it is called once, only for faces in new candidate pairs. Candidate pairs are
    compared between distinct faces in content-hash order, so the result does not depend on
    row order or on the order in which files arrived. ``cache_path`` keeps the pairs between runs
    (written only when pixels were available, so cached correlations are real ones);
    ``ignore_cache`` recomputes everything (and rewrites the cache).
    """
    start = time.perf_counter()
    df = faces.reset_index(drop=True).copy()
    n = len(df)
    empty = np.zeros(0, np.int64)
    if n == 0:
        return _group(df, empty, empty, empty, empty, 0, start), IncrementalStats(0, 0, 0)
    ei, ej = exact_pairs(df["pixel_sha"])
    first = df.drop_duplicates("sha256")
    order = np.argsort(first["sha256"].to_numpy(dtype=str), kind="stable")
    face_rows = first.index.to_numpy()[order]  # one row per distinct face, in content-hash order
    shas = first["sha256"].to_numpy(dtype=object)[order]
    hashes = from_hex(first["phash"].to_numpy()[order])
    mirrored = from_hex(first["phash_mirror"].to_numpy()[order]) if match_mirrored else None
    u = len(shas)

    cache = None if ignore_cache or cache_path is None else NearLinkCache.load(cache_path)
    known = np.zeros(u, bool)
    old_a = old_b = empty
    old_corr = np.zeros(0, np.float32)
    if cache is not None:
        pos = pd.Index(shas).get_indexer(pd.Index(cache.shas))  # where each cached face is now (-1: gone)
        known[pos[pos >= 0]] = True
        keep = (pos[cache.a] >= 0) & (pos[cache.b] >= 0)
        old_a, old_b, old_corr = pos[cache.a[keep]], pos[cache.b[keep]], cache.corr[keep]
        swap = old_a > old_b  # cannot happen (both orders are content order); be safe anyway
        old_a, old_b = np.where(swap, old_b, old_a), np.where(swap, old_a, old_b)
    new = np.nonzero(~known)[0]
    old = np.nonzero(known)[0]
    new_a = new_b = empty
    if len(new) and max_distance >= 0:
        i, j = near_pairs(hashes[new], max_distance, None if mirrored is None else mirrored[new])
        xa, xb = _cross_pairs(new, old, hashes, mirrored, max_distance) if len(old) else (empty, empty)
        new_a = np.concatenate([new[i], xa]).astype(np.int64)
        new_b = np.concatenate([new[j], xb]).astype(np.int64)
    new_corr = np.full(len(new_a), np.nan, np.float32)
    if load_pixels is not None and len(new_a):
        involved = np.unique(np.concatenate([new_a, new_b]))
        pixels = load_pixels(face_rows[involved])
        ia, ib = np.searchsorted(involved, new_a), np.searchsorted(involved, new_b)
        new_corr = pixel_correlation(pixels, ia, ib)
        if match_mirrored:
            new_corr = np.maximum(new_corr, pixel_correlation(pixels, ia, ib, mirrored=True))
    a = np.concatenate([old_a, new_a]).astype(np.int64)
    b = np.concatenate([old_b, new_b]).astype(np.int64)
    corr = np.concatenate([old_corr, new_corr]).astype(np.float32)
    confirmed = ~(corr < min_correlation) if min_correlation > 0 else np.ones(len(a), bool)  # NaN: trust phash
    report = _group(df, ei, ej, face_rows[a[confirmed]], face_rows[b[confirmed]], len(a), start)
    changed = cache is None or len(new) > 0 or len(cache.shas) != len(old)
    if cache_path is not None and changed and load_pixels is not None:
        NearLinkCache(shas, a, b, corr).save(cache_path)
    report.seconds = time.perf_counter() - start
    return report, IncrementalStats(int(len(new)), int(len(old)), int(len(new_a)))


def duplicates_across(hashes: np.ndarray, mirrored: np.ndarray | None, pixels: np.ndarray | None,
                      ref_hashes: np.ndarray, ref_mirrored: np.ndarray | None, ref_pixels: np.ndarray | None,
                      max_distance: int = 4, min_correlation: float = 0.95) -> np.ndarray:
    """For each row of one set, the index of a row of a reference set it duplicates, else -1.

    The manifest's rule, applied across two sets instead of within one (what keeps a
    pretraining pool from holding a copy of a validation or test face): perceptual hashes
    within ``max_distance`` bits, also against either side's mirror image, confirmed by pixel
    correlation >= ``min_correlation`` when both pixel arrays are given. Exact copies have
    identical hashes, so they are found too. Among several matches the closest by
    correlation (then the lowest index) is named.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    r = np.ascontiguousarray(ref_hashes, dtype=np.uint64)
    out = np.full(len(h), -1, dtype=np.int64)
    if not len(h) or not len(r) or max_distance < 0:
        return out
    # The cross-set join the incremental de-duplication uses: one array, "new" rows = this set,
    # "old" rows = the reference, so every pair comes back as (row, len(h) + reference row).
    both = np.concatenate([h, r])
    mirrors = (np.concatenate([np.ascontiguousarray(mirrored, dtype=np.uint64),
                               np.ascontiguousarray(ref_mirrored, dtype=np.uint64)])
               if mirrored is not None and ref_mirrored is not None else None)
    i, j = _cross_pairs(np.arange(len(h)), np.arange(len(h), len(both)), both, mirrors, max_distance)
    j = j - len(h)
    score = np.ones(len(i), dtype=np.float32)
    if pixels is not None and ref_pixels is not None and len(i) and min_correlation > 0:
        faces = np.concatenate([pixels, ref_pixels])
        score = pixel_correlation(faces, i, j + len(pixels))
        if mirrors is not None:  # as in deduplicate: the mirror image counts only when mirrors match
            score = np.maximum(score, pixel_correlation(faces, i, j + len(pixels), mirrored=True))
        i, j, score = i[score >= min_correlation], j[score >= min_correlation], score[score >= min_correlation]
    order = np.lexsort((j, -score, i))  # per row: best correlation first, then lowest reference index
    i, j = i[order], j[order]
    first = np.r_[True, i[1:] != i[:-1]] if len(i) else np.zeros(0, bool)
    out[i[first]] = j[first]
    return out
