import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from fer_pipeline.dedup import groups as dedup
from fer_pipeline.dedup.groups import (
    _cross_pairs,
    deduplicate,
    deduplicate_incremental,
    near_pairs,
)
from fer_pipeline.faces.batch import process_chunk
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.faces.stage import index_frame
from fer_pipeline_tests.conftest import face_png


def _hash_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random hashes with planted near pairs (1..5 bits apart), clusters sharing most bits (big
    band buckets) and 'mirrored' hashes that are near other rows' hashes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, n, dtype=np.uint64)
    flips = [np.bitwise_or.reduce(np.uint64(1) << rng.choice(64, k, replace=False).astype(np.uint64))
             for k in rng.integers(1, 6, n // 3)]
    cluster = (base[: n // 6] & np.uint64(0xFFFF_FFFF_0000_0000)) | np.uint64(0x1234)
    hashes = np.concatenate([base, base[: n // 3] ^ np.array(flips, np.uint64), cluster])
    mirrored = np.roll(hashes, 7) ^ (np.uint64(1) << rng.integers(0, 64, len(hashes)).astype(np.uint64))
    return hashes, mirrored


def _brute(hashes: np.ndarray, d: int, mirrored: np.ndarray | None) -> set[tuple[int, int]]:
    def dist(a: np.uint64, b: np.uint64) -> int:
        return bin(int(a) ^ int(b)).count("1")

    return {(a, b) for a in range(len(hashes)) for b in range(a + 1, len(hashes))
            if dist(hashes[a], hashes[b]) <= d
            or (mirrored is not None and min(dist(hashes[a], mirrored[b]), dist(mirrored[a], hashes[b])) <= d)}


@pytest.mark.parametrize("max_distance", [0, 3, 4, 8, 12])
@pytest.mark.parametrize("use_mirror", [False, True])
def test_near_pairs_equals_brute_force(max_distance: int, use_mirror: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Band join (<= 8 bits) and blockwise fallback (> 8) find exactly the brute-force pairs,
    also when the join has to work in many small steps."""
    monkeypatch.setattr(dedup, "MAX_PAIRS_PER_STEP", 500)
    hashes, mirrored = _hash_set(240, max_distance)
    mir = mirrored if use_mirror else None
    i, j = near_pairs(hashes, max_distance, mir)
    got = list(zip(i.tolist(), j.tolist()))
    assert len(got) == len(set(got)) and set(got) == _brute(hashes, max_distance, mir)
    if max_distance >= 3:
        assert len(got) >= 30  # planted pairs are there: the test is not vacuous


@pytest.mark.parametrize("max_distance", [4, 12])
def test_near_pairs_do_not_depend_on_order(max_distance: int) -> None:
    """Reordering the faces maps the pairs onto the same pairs (the mirror rule is symmetric)."""
    hashes, mirrored = _hash_set(240, 3)
    perm = np.random.default_rng(4).permutation(len(hashes))
    i, j = near_pairs(hashes, max_distance, mirrored)
    pi, pj = near_pairs(hashes[perm], max_distance, mirrored[perm])
    mapped = {tuple(sorted((int(perm[a]), int(perm[b])))) for a, b in zip(pi, pj)}
    assert mapped == set(zip(i.tolist(), j.tolist())) and len(mapped) > 30


@pytest.mark.parametrize("max_distance", [4, 12])
def test_cross_pairs_are_the_cross_part_of_all_pairs(max_distance: int) -> None:
    hashes, mirrored = _hash_set(240, 1)
    rng = np.random.default_rng(2)
    is_new = rng.random(len(hashes)) < 0.3
    new, old = np.nonzero(is_new)[0], np.nonzero(~is_new)[0]
    x, y = _cross_pairs(new, old, hashes, mirrored, max_distance)
    expected = {(a, b) for a, b in _brute(hashes, max_distance, mirrored) if is_new[a] != is_new[b]}
    got = list(zip(x.tolist(), y.tolist()))
    assert len(got) == len(set(got)) and set(got) == expected and len(expected) > 10


def _variants() -> dict[str, bytes]:
    base = face_png(7, size=96, mode="RGB")
    img = Image.open(io.BytesIO(base))

    def enc(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
        b = io.BytesIO()
        im.save(b, format=fmt, **kw)
        return b.getvalue()

    return {
        "orig.png": base,
        "copy.png": base,  # exact duplicate
        "reencoded.jpg": enc(img, "JPEG", quality=80),
        "resized.png": enc(img.resize((80, 80))),
        "brighter.png": enc(ImageEnhance.Brightness(img).enhance(1.04)),
        "mirrored.png": enc(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "other.png": face_png(99, size=96, mode="RGB"),
    }


def _table(files: dict[str, bytes], labels: dict[str, str]) -> tuple[pd.DataFrame, np.ndarray]:
    import hashlib

    items = [(hashlib.sha256(d).hexdigest() + name, d) for name, d in files.items()]
    res = process_chunk(items, PreprocessSettings())
    df = index_frame([res])
    df["source"] = "s"
    df["source_path"] = list(files)
    df["image_id"] = [f"id_{n}" for n in files]
    df["label"] = [labels.get(n, "Angry") for n in files]
    df["bytes"] = [len(d) for d in files.values()]
    return df, res.faces


def test_groups_exact_near_and_mirrored_duplicates() -> None:
    files = _variants()
    table, pixels = _table(files, {})
    report = deduplicate(table, max_distance=4, match_mirrored=True, pixels=pixels)
    df = report.table.set_index("source_path")
    group = df.loc["orig.png", "dup_group"]
    members = set(df.index[df["dup_group"] == group])
    assert members == {"orig.png", "copy.png", "reencoded.jpg", "resized.png", "brighter.png", "mirrored.png"}
    assert df.loc["other.png", "dup_group"] != group
    reps = df[df["dup_group"] == group]
    assert reps["is_representative"].sum() == 1
    # rule: largest resolution, then largest file, then first path -> one of the 96x96 files
    rep = reps[reps["is_representative"]].index[0]
    assert df.loc[rep, "width"] == 96
    assert (reps.loc[~reps["is_representative"], "duplicate_of"] == df.loc[rep, "image_id"]).all()
    assert report.n_exact_links >= 1 and not df["conflict"].any()


def test_mirrored_copy_not_grouped_when_disabled() -> None:
    files = _variants()
    df = deduplicate(_table(files, {})[0], max_distance=4, match_mirrored=False).table.set_index("source_path")
    assert df.loc["mirrored.png", "dup_group"] != df.loc["orig.png", "dup_group"]


def test_label_conflict_flags_whole_group() -> None:
    files = {"a.png": face_png(1), "b.png": face_png(1), "c.png": face_png(2)}
    df = deduplicate(_table(files, {"b.png": "Tired"})[0], 4).table.set_index("source_path")
    assert df.loc["a.png", "conflict"] and df.loc["b.png", "conflict"]
    assert not df.loc["c.png", "conflict"]


def test_pixel_check_rejects_phash_collisions() -> None:
    files = {f"f{i}.png": face_png(100 + i) for i in range(30)}
    files["f0_copy.jpg"] = _variants()["reencoded.jpg"]
    files["f0_src.png"] = _variants()["orig.png"]
    table, pixels = _table(files, {})
    everything = deduplicate(table, max_distance=64)  # every pair is a phash candidate
    assert everything.n_groups_with_duplicates == 1 and everything.table["dup_group"].nunique() == 1
    checked = deduplicate(table, max_distance=64, pixels=pixels, min_correlation=0.95)
    assert checked.n_near_candidates == len(files) * (len(files) - 1) // 2
    df = checked.table.set_index("source_path")
    assert df.loc["f0_copy.jpg", "dup_group"] == df.loc["f0_src.png", "dup_group"]
    assert df["dup_group"].nunique() == len(files) - 1  # only the planted pair is grouped


def test_groups_do_not_depend_on_row_order_or_on_incremental_runs(tmp_path: Path) -> None:
    """The mirror rule is symmetric, so shuffled rows, the all-at-once function and the
    incremental one (half the faces cached first) give the same groups."""
    files = {**_variants(), **{f"r{i}.png": face_png(200 + i) for i in range(20)}}
    files["mirror_of_r3.png"] = _mirror(files["r3.png"])
    table, pixels = _table(files, {})
    table["sha256"] = [f"{i:064x}" for i in range(len(table))]

    def partition(df: pd.DataFrame) -> set[frozenset[str]]:
        return {frozenset(g["source_path"]) for _, g in df.groupby("dup_group")}

    reference = partition(deduplicate(table, 4, True, pixels).table)
    assert frozenset({"r3.png", "mirror_of_r3.png"}) in reference
    rng = np.random.default_rng(0)
    for _ in range(3):
        order = rng.permutation(len(table))
        shuffled = deduplicate(table.iloc[order], 4, True, pixels[order]).table
        assert partition(shuffled) == reference
    first_half = table.iloc[order[: len(order) // 2]]
    cache = tmp_path / "links.npz"
    deduplicate_incremental(first_half, 4, True, lambda rows: pixels[order[: len(order) // 2]][rows], cache_path=cache)
    report, stats = deduplicate_incremental(table, 4, True, lambda rows: pixels[rows], cache_path=cache)
    assert stats.faces_cached == len(order) // 2 and partition(report.table) == reference


def _mirror(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, format="PNG")
    return out.getvalue()
