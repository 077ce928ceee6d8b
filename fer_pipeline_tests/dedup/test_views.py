"""Re-cropped copies (fer_pipeline.dedup.views): found where pHash misses them, joined to the
de-duplication groups, cached by content, and guarded against across the pretraining pool."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from fer_pipeline.dedup import views
from fer_pipeline.dedup.groups import deduplicate, deduplicate_incremental
from fer_pipeline.faces.preprocess import preprocess_image
from fer_pipeline_tests.dedup.test_groups import _table

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def _photo(seed: int, side: int = 120) -> bytes:
    """A distinct 'photograph': smooth random structure at several scales, as PNG."""
    rng = np.random.default_rng(seed)
    img = sum(ndimage.gaussian_filter(rng.normal(size=(side, side, 3)), s) * s for s in (2, 5, 12))
    img = (img - img.min()) / (img.max() - img.min()) * 255
    out = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def _recrop(data: bytes, shift: float = 0.08, scale: float = 0.9, degrees: float = 5.0) -> bytes:
    """The issue's copy: crop shifted 8 %, scaled 0.9, rotated 5°, brightness +20, JPEG 40."""
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    img = img.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
    cw, ch = scale * w, scale * h
    left, top = (w - cw) / 2 + shift * w, (h - ch) / 2
    img = img.crop((round(left), round(top), round(left + cw), round(top + ch)))
    arr = np.clip(np.asarray(img, np.int16) + 20, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=40)
    return out.getvalue()


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return preprocess_image(im, (48, 48))


def _planted(n: int = 60, copies: int = 6) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    files = {f"p{k:03d}.png": _photo(k) for k in range(n)}
    plants = []
    for k in range(copies):
        files[f"copy{k}.jpg"] = _recrop(files[f"p{k:03d}.png"])
        plants.append((f"p{k:03d}.png", f"copy{k}.jpg"))
    return files, plants


def test_view_descriptor_plain_view_is_the_face_itself() -> None:
    faces = np.stack([_decode(_photo(k)) for k in range(3)])
    both = views.view_descriptors(faces)
    assert both.shape == (3, len(views.VIEWS), views.DESCRIPTOR_SIDE ** 2)
    np.testing.assert_allclose(both[:, views.PLAIN], views.plain_descriptors(faces), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(both, axis=-1), 1.0, atol=1e-5)
    brighter = np.clip(faces.astype(int) + 30, 0, 255).astype(np.uint8)  # brightness does not count
    assert (np.einsum("nd,nd->n", views.plain_descriptors(brighter), views.plain_descriptors(faces)) > 0.99).all()


def test_recropped_copies_are_linked_where_phash_is_not() -> None:
    files, plants = _planted()
    table, pixels = _table(files, {})
    names = list(files)
    a, b, sim, margin = views.view_links(lambda idx: pixels[idx], len(pixels))
    found = {tuple(sorted((names[x], names[y]))) for x, y in zip(a, b)}
    assert found == {tuple(sorted(p)) for p in plants}  # every copy, and no distinct pair
    assert (sim >= views.ViewRule().min_similarity).all() and (margin >= views.ViewRule().margin).all()
    phash = deduplicate(table, 4, True, pixels, 0.95).table.set_index("source_path")["dup_group"]
    assert not any(phash[x] == phash[y] for x, y in plants)  # what the views add: pHash misses all


def test_exact_search_and_hnsw_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = _planted(80, 8)
    _, pixels = _table(files, {})
    exact = views.view_links(lambda idx: pixels[idx], len(pixels))
    monkeypatch.setattr(views, "EXACT_MAX", 0)  # what a catalogue above EXACT_MAX faces uses
    approx = views.view_links(lambda idx: pixels[idx], len(pixels))
    assert set(zip(*exact[:2])) == set(zip(*approx[:2])) and len(exact[0]) == 8


def test_copies_join_groups_conflicts_and_cache(tmp_path: Path) -> None:
    """A re-crop joins its original's group (duplicate or label conflict), also behind an exact
    twin; a cached rerun describes nothing and groups the same; one new face is one description."""
    files, plants = _planted(40, 3)
    with Image.open(io.BytesIO(files["p000.png"])) as im:  # same pixels, other bytes: an exact twin
        out = io.BytesIO()
        im.save(out, "PNG", compress_level=1)
    files["twin.png"] = out.getvalue()
    assert files["twin.png"] != files["p000.png"]
    labels = {"copy1.jpg": "Tired"}  # p001 is Angry: a label conflict
    table, pixels = _table(files, labels)
    cache = tmp_path / "views.npz"

    def run(frame, px, **kw):
        return deduplicate_incremental(frame, 4, True, lambda rows: px[rows], 0.95, cache_path=tmp_path / "l.npz",
                                       view_rule=views.ViewRule(), view_cache_path=cache, **kw)[0]

    report = run(table, pixels)
    df = report.table.set_index("source_path")
    assert report.n_view_links == 3 and report.n_view_described == len(files) - 1  # the twin shares a head
    assert df.loc["copy0.jpg", "dup_group"] == df.loc["p000.png", "dup_group"] == df.loc["twin.png", "dup_group"]
    assert df.loc["copy2.jpg", "duplicate_of"] == df.loc["p002.png", "image_id"]  # the larger original represents
    assert df.loc["copy1.jpg", "conflict"] and df.loc["p001.png", "conflict"]
    assert not df.loc["p010.png", "conflict"] and df.loc["p010.png", "dup_group_size"] == 1
    again = run(table, pixels)
    assert again.n_view_described == 0
    assert (again.table["dup_group"] == report.table["dup_group"]).all()
    more = dict(files, **{"new.png": _photo(500)})
    table2, pixels2 = _table(more, labels)
    assert run(table2, pixels2).n_view_described == 1
    without = deduplicate_incremental(table, 4, True, lambda rows: pixels[rows], 0.95)[0]
    assert without.n_view_links == 0 and without.table.loc[without.table["source_path"] == "copy0.jpg",
                                                            "dup_group_size"].item() == 1


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not a zip", b"\x00" * 100])
def test_damaged_descriptor_cache_is_recomputed(tmp_path: Path, damage: bytes) -> None:
    files, _ = _planted(20, 2)
    table, pixels = _table(files, {})
    cache = tmp_path / "views.npz"
    cache.write_bytes(damage)
    shas = table["sha256"].to_numpy(dtype=object)
    plain, described = views.cached_plain(shas, lambda idx: pixels[idx], cache)
    assert described == len(shas)
    np.testing.assert_allclose(plain, views.plain_descriptors(pixels), atol=1e-6)
    again, described = views.cached_plain(shas, lambda idx: pixels[idx], cache)
    assert described == 0 and np.array_equal(again, plain)  # exactly, so cached runs group like fresh ones


def test_view_matches_across_finds_a_pool_copy_of_a_heldout_face() -> None:
    ref = np.stack([_decode(_photo(k)) for k in range(30)])
    pool = np.stack([_decode(_recrop(_photo(3))), _decode(_photo(100)), _decode(_photo(101))])
    match, sim = views.view_matches_across(lambda idx: pool[idx], len(pool), lambda idx: ref[idx], len(ref),
                                           views.ViewRule().min_similarity)
    assert match.tolist() == [3, -1, -1] and sim[0] >= views.ViewRule().min_similarity


@pytest.mark.skipif(not (DATASETS / "affectnet-4class.zip").is_file(),
                    reason="../shared/datasets/affectnet-4class.zip is absent")
def test_real_faces_copies_found_and_few_strangers_linked() -> None:
    """300 real AffectNet faces with 30 planted re-crops: at least 90 % found, at most 1 % false
    pairs (the benchmark measures this on 1,214 faces; here a small sample keeps it quick)."""
    with zipfile.ZipFile(DATASETS / "affectnet-4class.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".png")) and "__MACOSX" not in n
                       and "Gender" not in n)[::8][:300]
        data = [zf.read(n) for n in names]
    faces = [_decode(d) for d in data]
    keep = np.unique(np.stack(faces).reshape(len(faces), -1), axis=0, return_index=True)[1]
    faces = [faces[k] for k in sorted(keep)]
    data = [data[k] for k in sorted(keep)]
    n = len(faces)
    rng = np.random.default_rng(0)
    originals = rng.choice(n, 30, replace=False)
    faces += [_decode(_recrop(data[o], degrees=float(rng.choice([-5, 5])))) for o in originals]
    px = np.stack(faces)
    a, b, _, _ = views.view_links(lambda idx: px[idx], len(px))
    pairs = set(zip(a.tolist(), b.tolist()))
    found = sum((int(o), n + k) in pairs for k, o in enumerate(originals))
    assert found >= 27
    assert sum(y < n for _, y in pairs) <= 0.01 * n and n >= 250


def test_data_job_links_recrops_and_the_guard_drops_a_pool_recrop(tmp_path: Path) -> None:
    """The real data job with the rule on (the default): a re-crop with its original's label is a
    ``duplicate of`` it, one with another label makes a label conflict, a re-crop in the pretraining
    pool leaves the pool (leakage guard), and every file is still accounted for."""
    from fer_pipeline.dataset.manifest import accounting_items
    from fer_pipeline_tests.conftest import asset_metadata, run_data_pipeline, write, write_catalogue

    classes = {"angry": "Angry", "neutral": "Neutral", "focused": "Focused", "tired": "Tired"}
    photos = {}
    for c, folder in enumerate(classes):
        for k in range(10):
            photos[f"{folder}/p{k}.png"] = _photo(1000 + 20 * c + k)
            write(tmp_path / "raw" / "four" / folder / f"p{k}.png", photos[f"{folder}/p{k}.png"])
    write(tmp_path / "raw" / "four" / "angry" / "same_label_copy.jpg", _recrop(photos["angry/p0.png"]))
    write(tmp_path / "raw" / "four" / "tired" / "other_label_copy.jpg", _recrop(photos["neutral/p1.png"]))
    write(tmp_path / "raw" / "pool" / "happy" / "pool_copy.jpg", _recrop(photos["focused/p2.png"], shift=-0.08))
    for k in range(3):
        write(tmp_path / "raw" / "pool" / "happy" / f"q{k}.png", _photo(5000 + k))
    write_catalogue(tmp_path, [
        {"name": "four", "kind": "image_folders", "path": "raw/four", "label_map": classes},
        {"name": "pool", "kind": "image_folders", "path": "raw/pool", "role": "pretrain"}])
    result = run_data_pipeline(tmp_path, {"resources": {"fer": {"config": {"min_images_per_class": 1, "n_folds": 2}}}})
    assert result.success, [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
    assert asset_metadata(result, "deduplicated_faces")["view_links"] == 2  # the two copies and nothing else
    manifest = pd.read_parquet(tmp_path / "manifest" / "manifest.parquet")
    excluded = pd.read_parquet(tmp_path / "manifest" / "excluded.parquet").set_index(["source", "source_path"])
    pool = pd.read_parquet(tmp_path / "manifest" / "pool.parquet")
    ids = manifest.set_index("source_path")["image_id"]
    assert excluded.loc[("four", "angry/same_label_copy.jpg"), "duplicate_of"] == ids["angry/p0.png"]
    conflict = excluded.loc[[("four", "tired/other_label_copy.jpg"), ("four", "neutral/p1.png")], "reason"]
    assert conflict.str.startswith("label conflict").all()
    guard = excluded.loc[("pool", "happy/pool_copy.jpg")]
    assert guard["stage"] == "leakage_guard" and guard["duplicate_of"] == ids["focused/p2.png"]
    assert sorted(pool["source_path"]) == [f"happy/q{k}.png" for k in range(3)]
    items = accounting_items(pd.read_parquet(tmp_path / "manifest" / "raw_inventory.parquet"),
                             pd.read_parquet(tmp_path / "manifest" / "faces.parquet"))
    seen = (len(manifest) + len(excluded) + len(pool))
    assert seen == len(items) == 46  # 42 four-class files, 4 pool files


def test_blank_and_identical_faces_link_nothing_and_never_fail() -> None:
    """Constant faces have no descriptor (zero after the mean is removed): similarity 0, no link,
    no NaN; two faces only, or one, are handled."""
    blank = np.full((5, 48, 48), 128, np.uint8)
    a, b, sim, margin = views.view_links(lambda idx: blank[idx], len(blank))
    assert len(a) == 0 and not np.isnan(views.plain_descriptors(blank)).any()
    one = np.stack([_decode(_photo(1))])
    assert len(views.view_links(lambda idx: one[idx], 1)[0]) == 0
    two = np.stack([_decode(_photo(1)), _decode(_recrop(_photo(1)))])  # nothing else to beat: the floor decides
    assert len(views.view_links(lambda idx: two[idx], 2)[0]) == 1
