import io

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from fer_pipeline.dedup import deduplicate, near_pairs
from fer_pipeline.faces import process_chunk
from fer_pipeline.preprocess import PreprocessSettings
from fer_pipeline_tests.conftest import face_png


def test_near_pairs_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, 300).astype(np.uint64)
    hashes = np.concatenate([base, base[:100] ^ flips[:100]])  # 100 planted near pairs
    i, j = near_pairs(hashes, 3, block=64)
    got = set(zip(i.tolist(), j.tolist()))
    brute = {(a, b) for a in range(len(hashes)) for b in range(a + 1, len(hashes))
             if bin(int(hashes[a]) ^ int(hashes[b])).count("1") <= 3}
    assert got == brute and len(got) >= 100


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
    df = res.index.copy()
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
