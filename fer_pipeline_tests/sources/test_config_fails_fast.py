"""Issue 19, part 4: configuration fails fast, and small. Every hostile input is built here and
its exact outcome asserted: alias bombs, huge values quoted in errors, synthetic and detection
parameters out of bounds, a sources.yaml that is a folder or a FIFO, a full disk."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fer_pipeline import atomic
from fer_pipeline.config_yaml import MAX_EXPANDED_VALUES, SHORT_REPR
from fer_pipeline.demo.synthetic_faces import (
    generate_demo_pool,
    generate_demo_scenes,
    generate_demo_source,
)
from fer_pipeline.settings import SettingsError, load_settings
from fer_pipeline.sources.catalog import (
    MAX_CATALOG_BYTES,
    SYNTHETIC_BOUNDS,
    CatalogError,
    load_catalog,
    parse_catalog,
)

MAX_MESSAGE = 400  # no catalogue error is longer than this, whatever the file holds


def _catalogue(root: Path, text: str) -> Path:
    path = root / "sources.yaml"
    path.write_text(text)
    return path


def _refused(root: Path, text: str) -> str:
    with pytest.raises(CatalogError) as err:
        load_catalog(_catalogue(root, text), check_paths=False)
    return str(err.value)


def _bomb(levels: int) -> str:
    """The alias bomb of the issue: 9 aliases per level, ``levels`` levels (9**levels strings)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ YAML aliases


@pytest.mark.parametrize("field", ["kind", "label_map", "n_images", "pretrain_labels"])
def test_an_alias_bomb_in_a_catalogue_field_is_refused_small_and_fast(data_root: Path, field: str) -> None:
    text = _bomb(9) + f"sources:\n  - {{name: s, kind: synthetic, path: p, {field}: *a9}}\n"
    assert len(text) < 1000
    start = time.perf_counter()
    message = _refused(data_root, text)
    assert time.perf_counter() - start < 2.0  # was 65 s and 2.8 GB
    assert message == (f"{data_root / 'sources.yaml'}: line 7: YAML aliases expand this document past "
                       f"{MAX_EXPANDED_VALUES} values (an alias bomb?)")


def test_an_alias_that_contains_itself_is_refused(data_root: Path) -> None:
    message = _refused(data_root, "sources: &s [{name: s, kind: synthetic, path: p, n_images: *s}]\n")
    assert message.endswith("line 1: a YAML alias refers to the value that contains it")


def test_the_aliases_yaml_dump_writes_for_shared_values_are_read(data_root: Path) -> None:
    labels = {"angry": "Angry"}
    (data_root / "a").mkdir()
    (data_root / "b").mkdir()
    text = yaml.safe_dump({"sources": [{"name": "a", "kind": "image_folders", "path": "a", "label_map": labels},
                                       {"name": "b", "kind": "image_folders", "path": "b", "label_map": labels}]})
    assert "&id001" in text and "*id001" in text
    catalog = load_catalog(_catalogue(data_root, text))
    assert [s.label_map for s in catalog.sources] == [{"angry": "Angry"}, {"angry": "Angry"}]


def test_the_settings_file_still_refuses_every_alias(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("a: &a {epochs: 1}\ntraining: *a\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert str(err.value) == f"{path}: line 2: YAML aliases are not allowed (anchors '&' and aliases '*')"


# ------------------------------------------------------------------ bounded messages

HUGE = "x" * 1_000_000


@pytest.mark.parametrize(("entry", "start"), [
    ({"kind": HUGE}, "sources.yaml: source 's', field 'kind': unknown kind 'xxxx"),
    ({"label_map": {"angry": HUGE}}, "sources.yaml: source 's', field 'label_map.angry': maps to 'xxx"),
    ({"label_map": {HUGE: "Nope"}}, "sources.yaml: source 's', field 'label_map.xxx"),
    ({"faces": list(range(100_000))}, "sources.yaml: source 's', field 'faces': must be 'crop' or 'detect', "
                                      "not <list of 100000 items>"),
    ({"licence": {"k": HUGE}}, "sources.yaml: source 's', field 'licence': must be text"),
    ({"role": HUGE}, "sources.yaml: source 's', field 'role': must be 'train', 'pretrain' or 'unlabelled', not 'xxx"),
    ({"name": HUGE}, "sources.yaml: source 'xxx"),
    ({"name": "n" * 101}, "sources.yaml: source 'nnn"),
    ({"path": HUGE}, "sources.yaml: source 's', field 'path': must be a file or folder name"),
    ({"path": "a\0b"}, "sources.yaml: source 's', field 'path': must be a file or folder name"),
    ({"path": ["a"]}, "sources.yaml: source 's', field 'path': must be a file or folder name (text without NUL, "
                      "at most 4096 characters), not ['a']"),
])
def test_catalogue_errors_quote_a_value_short(data_root: Path, entry: dict[str, Any], start: str) -> None:
    base = {"name": "s", "kind": "image_folders", "path": "p", "label_map": {"angry": "Angry"}}
    with pytest.raises(CatalogError) as err:
        parse_catalog({"sources": [{**base, **entry}]}, data_root, check_paths=False)
    message = str(err.value)
    assert message.startswith(start)
    assert len(message) < MAX_MESSAGE


def test_a_huge_value_read_from_a_file_is_quoted_short(data_root: Path) -> None:
    message = _refused(data_root, f"sources:\n  - {{name: s, kind: synthetic, path: p, n_images: '{HUGE[:500_000]}'}}\n")
    assert message == f"sources.yaml: source 's', field 'n_images': must be an integer, not '{'x' * 56}..."
    assert len(f"'{'x' * 56}...") == SHORT_REPR


def test_a_repeated_key_names_both_lines(data_root: Path) -> None:
    message = _refused(data_root, "sources:\n  - name: s\n    name: t\n")
    assert message.endswith("line 3: key 'name' appears twice in the same mapping (first on line 2); keep one of them")


# ------------------------------------------------------------------ synthetic and detection parameters

SYNTHETIC_CASES = [
    ("n_images", 39, "train", "must be between 40 and 1000000, not 39"),
    ("n_images", 1_000_001, "train", "must be between 40 and 1000000, not 1000001"),
    ("n_images", 5, "pretrain", "must be between 6 and 1000000, not 5"),
    ("n_images", "many", "train", "must be an integer, not 'many'"),
    ("n_images", True, "train", "must be an integer, not True"),
    ("n_images", 40.0, "train", "must be an integer, not 40.0"),
    ("seed", -1, "train", "must be between 0 and 4294967295, not -1"),
    ("seed", 2**32, "train", "must be between 0 and 4294967295, not 4294967296"),
    ("image_size", 31, "train", "must be between 32 and 1024, not 31"),
    ("image_size", 100_000, "train", "must be between 32 and 1024, not 100000"),  # was a 6 GiB MemoryError
    ("image_size", None, "train", "must be an integer, not None"),
    ("scenes", 3, "train", "must be between 4 and 100000, not 3"),
    ("scenes", 10**400, "train", "must be between 4 and 100000, not 1" + "0" * 56 + "..."),
]


@pytest.mark.parametrize(("field", "value", "role", "message"), SYNTHETIC_CASES,
                         ids=[f"{c[0]}={str(c[1])[:12]}-{c[2]}" for c in SYNTHETIC_CASES])
def test_synthetic_parameters_are_bounded_in_the_catalogue(data_root: Path, field: str, value: Any, role: str,
                                                           message: str) -> None:
    entry = {"name": "s", "kind": "synthetic", "path": "p", "role": role, field: value}
    with pytest.raises(CatalogError) as err:
        parse_catalog({"sources": [entry]}, data_root, check_paths=False)
    assert str(err.value) == f"sources.yaml: source 's', field '{field}': {message}"


@pytest.mark.parametrize(("field", "value", "role"), [
    ("n_images", 40, "train"), ("n_images", 6, "pretrain"), ("seed", 0, "train"), ("image_size", 32, "train"),
    ("image_size", 1024, "train"), ("scenes", 4, "train"), ("n_images", 1_000_000, "train")])
def test_synthetic_parameters_at_their_bounds_pass(data_root: Path, field: str, value: int, role: str) -> None:
    entry = {"name": "s", "kind": "synthetic", "path": "p", "role": role, field: value}
    assert parse_catalog({"sources": [entry]}, data_root, check_paths=False).sources[0].options == {field: value}


def test_the_catalogue_minima_are_the_generators_minima(tmp_path: Path) -> None:
    """Each least bound is what the generator needs: one less is the generator's own ValueError."""
    with pytest.raises(ValueError, match="n_images must be at least 40"):
        generate_demo_source(tmp_path / "a", n_images=SYNTHETIC_BOUNDS["n_images"][0] - 1)
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        generate_demo_source(tmp_path / "a", image_size=SYNTHETIC_BOUNDS["image_size"][0] - 1)
    with pytest.raises(ValueError, match="n_images must be at least 6"):
        generate_demo_pool(tmp_path / "b", n_images=5)
    with pytest.raises(ValueError, match="n_scenes must be at least 4"):
        generate_demo_scenes(tmp_path / "c", n_scenes=SYNTHETIC_BOUNDS["scenes"][0] - 1)


DETECT_CASES = [
    ("keep", "biggest", "must be 'largest' or 'all', not 'biggest'"),
    ("keep", ["largest"] * 1000, "must be 'largest' or 'all', not <list of 1000 items>"),
    ("margin", -0.1, "must be between 0.0 and 1.0, not -0.1"),
    ("margin", float("inf"), "must be between 0.0 and 1.0, not inf"),
    ("margin", 10**400, "must be between 0.0 and 1.0, not 1" + "0" * 56 + "..."),  # was a bare OverflowError
    ("min_score", 1.0, "must be between 0.0 and 1.0 (exclusive), not 1.0"),
    ("min_score", float("nan"), "must be a number, not nan"),
    ("min_score", "high", "must be a number, not 'high'"),
    ("min_face_size", 11, "must be between 12 and 4096, not 11"),
    ("min_face_size", 4097, "must be between 12 and 4096, not 4097"),
    ("min_face_size", 40.5, "must be an integer, not 40.5"),
]


@pytest.mark.parametrize(("field", "value", "message"), DETECT_CASES,
                         ids=[f"{c[0]}={str(c[1])[:12]}" for c in DETECT_CASES])
def test_detection_parameters_are_bounded_in_the_catalogue(data_root: Path, field: str, value: Any,
                                                           message: str) -> None:
    entry = {"name": "s", "kind": "image_folders", "path": "p", "label_map": {"angry": "Angry"},
             "faces": "detect", "detect": {field: value}}
    with pytest.raises(CatalogError) as err:
        parse_catalog({"sources": [entry]}, data_root, check_paths=False)
    assert str(err.value) == f"sources.yaml: source 's', field 'detect.{field}': {message}"


# ------------------------------------------------------------------ what sources.yaml is


def test_a_sources_yaml_that_is_a_directory_says_so(data_root: Path) -> None:
    (data_root / "sources.yaml").mkdir()
    with pytest.raises(CatalogError) as err:
        load_catalog(data_root / "sources.yaml")
    assert str(err.value) == f"{data_root / 'sources.yaml'}: is a directory, not a sources.yaml file"


def test_a_missing_sources_yaml_is_not_found(data_root: Path) -> None:
    with pytest.raises(CatalogError) as err:
        load_catalog(data_root / "sources.yaml")
    assert str(err.value) == f"sources.yaml not found at {data_root / 'sources.yaml'}"


def _load_within(path: Path, seconds: float) -> BaseException | None:
    """What ``load_catalog(path)`` raises, run in a thread so a blocking open fails the test."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load_catalog(path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, "load_catalog blocked on a FIFO"
    return outcome[0]


def test_a_fifo_sources_yaml_is_refused_unread(data_root: Path) -> None:
    fifo = data_root / "sources.yaml"
    os.mkfifo(fifo)
    exc = _load_within(fifo, 5.0)
    assert isinstance(exc, CatalogError)
    assert str(exc) == f"{fifo}: not a regular file (a FIFO, socket or device): refused unread"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_sources_yaml_is_refused_unread(data_root: Path) -> None:
    (data_root / "sources.yaml").symlink_to("/dev/zero")
    exc = _load_within(data_root / "sources.yaml", 5.0)
    assert isinstance(exc, CatalogError) and "not a regular file" in str(exc)


def test_an_oversized_or_binary_sources_yaml_is_refused(data_root: Path) -> None:
    path = data_root / "sources.yaml"
    path.write_bytes(b"#" * (MAX_CATALOG_BYTES + 1))
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    assert str(err.value) == f"{path}: larger than {MAX_CATALOG_BYTES} bytes: not a sources.yaml file"
    path.write_bytes(b"sources: []\n\xff\xfe")
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    assert str(err.value) == f"{path}: not UTF-8 text"


def test_a_byte_order_mark_is_still_read(data_root: Path) -> None:
    (data_root / "sources.yaml").write_bytes("\ufeffsources: []\n".encode())
    assert load_catalog(data_root / "sources.yaml").sources == ()


# ------------------------------------------------------------------ a full disk


def _disk_full(exc: OSError, target: Path) -> None:
    """The error says the disk is full, naming the target; nothing was written."""
    assert exc.errno == errno.ENOSPC
    assert str(exc) == f"[Errno {errno.ENOSPC}] disk full writing {target}"
    _untouched(target)


def _untouched(target: Path) -> None:
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left


def test_numpys_short_write_is_reported_as_a_full_disk(tmp_path: Path) -> None:
    target = tmp_path / "shard.npy"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as err, atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"\0" * 44928)  # what reached the disk before it filled
        raise OSError("69120 requested and 44928 written")  # numpy's tofile: no errno
    _disk_full(err.value, target)


def test_enospc_from_fsync_is_reported_as_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.json"
    target.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError) as err:
        atomic.write_json(target, {"a": 1})
    _disk_full(err.value, target)


def test_a_real_numpy_write_to_a_full_device_is_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """np.save into the temp file, with every write of the process failing as on a full disk."""
    target = tmp_path / "shard.npy"
    target.write_bytes(b"old")
    real_open = open

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return real_open("/dev/full", mode, *args, **kwargs) if "w" in mode and str(file).endswith(".tmp") \
            else real_open(file, mode, *args, **kwargs)

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(OSError) as err, atomic.atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.zeros((30, 48, 48), dtype=np.uint8))
    _disk_full(err.value, target)


def test_other_write_errors_pass_through_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(PermissionError, match="denied"), atomic.atomic_path(target):
        raise PermissionError(errno.EACCES, "denied")
    _untouched(target)
