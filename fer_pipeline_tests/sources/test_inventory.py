import zipfile
from pathlib import Path

import pandas as pd

from fer_pipeline.sources.catalog import parse_catalog
from fer_pipeline.sources.inventory import build_inventory
from fer_pipeline_tests.conftest import face_png, write


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_with_macosx_junk_nested_splits_and_unmapped(data_root: Path) -> None:
    _zip(data_root / "set.zip", {
        "train/angry/a1.jpg": face_png(1, fmt="JPEG"),
        "train/happy/h1.jpg": face_png(2, fmt="JPEG"),
        "test/Neutral/n1.png": face_png(3),
        "__MACOSX/train/angry/._a1.jpg": b"\x00\x05\x16\x07junk",
        "train/angry/.DS_Store": b"junk",
        "Thumbs.db": b"junk",
        "README.md": b"# hello",
        "loose.png": face_png(4),
    })
    cat = parse_catalog({"sources": [{"name": "z", "kind": "image_folders", "path": "set.zip",
                                      "label_map": {"angry": "Angry", "neutral": "Neutral"}}]}, data_root)
    inv = build_inventory(cat, data_root).table.set_index("source_path")
    assert len(inv) == 8  # every file is in the inventory, junk included
    assert inv.loc["train/angry/a1.jpg", ["status", "label", "split_hint", "raw_label"]].tolist() == \
        ["candidate", "Angry", "train", "angry"]
    assert inv.loc["test/Neutral/n1.png", "split_hint"] == "test"
    assert inv.loc["train/happy/h1.jpg", "status"] == "unmapped"
    assert inv.loc["train/happy/h1.jpg", "reason"] == "unmapped label: happy"
    assert inv.loc["__MACOSX/train/angry/._a1.jpg", "status"] == "junk"
    assert inv.loc["train/angry/.DS_Store", "status"] == "junk"
    assert inv.loc["Thumbs.db", "status"] == "junk"
    assert inv.loc["README.md", "status"] == "not_image"
    assert inv.loc["loose.png", "status"] == "no_label"
    assert inv.loc["train/angry/a1.jpg", "sha256"] is not None and len(inv.loc["train/angry/a1.jpg", "sha256"]) == 64


def test_folder_source_and_hash_reuse(data_root: Path) -> None:
    src = data_root / "raw" / "faces"
    write(src / "Angry" / "a.png", face_png(1))
    write(src / "Tired" / "t.png", face_png(2))
    cat = parse_catalog({"sources": [{"name": "f", "kind": "image_folders", "path": "raw/faces",
                                      "label_map": {"angry": "Angry", "tired": "Tired"}}]}, data_root)
    first = build_inventory(cat, data_root)
    assert first.hashed == 2 and first.reused == 0
    write(src / "Angry" / "b.png", face_png(3))
    second = build_inventory(cat, data_root, previous=first.table)
    assert second.hashed == 1 and second.reused == 2  # only the new file is read
    assert sorted(second.table["source_path"]) == ["Angry/a.png", "Angry/b.png", "Tired/t.png"]


def test_fer2013_csv_rows_become_images(data_root: Path) -> None:
    pixels = " ".join(str((i * 7) % 256) for i in range(48 * 48))
    rows = ["emotion,pixels,Usage", f"0,{pixels},Training", f"6,{pixels},PublicTest",
            f"3,{pixels},Training", "0,1 2 3,Training"]
    (data_root / "fer2013.csv").write_text("\n".join(rows) + "\n")
    cat = parse_catalog({"sources": [{"name": "fer", "kind": "fer2013_csv", "path": "fer2013.csv",
                                      "label_map": {"angry": "Angry", "neutral": "Neutral"}}]}, data_root)
    inv = build_inventory(cat, data_root).table
    assert inv["raw_label"].tolist() == ["angry", "neutral", "happy", "angry"]
    # a row with the wrong pixel count is excluded here, saying what is wrong with it (it used to
    # become a candidate that decoding rejected as "not an image")
    assert inv["status"].tolist() == ["candidate", "candidate", "unmapped", "unreadable"]
    assert inv["reason"].iloc[3] == "pixels has 3 values, expected 2304"
    assert inv["split_hint"].tolist()[:2] == ["Training", "PublicTest"]
    assert isinstance(inv, pd.DataFrame) and inv["sha256"].iloc[:3].notna().all()
