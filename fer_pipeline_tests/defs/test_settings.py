"""The settings file: one home for what every launch path computes with (issue 17).

Where it is found, both formats, every refusal naming the file and the field (a directory, a
FIFO, an alias bomb, unknown sections and fields, bad values), how it binds the resources and
the number of CV folds, how it shapes the code versions Dagster compares (recipe changes mark
assets unsynced, operational ones do not), and a run-config override recorded on the run and
on its materialization."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest
import yaml

from fer_pipeline import settings as core
from fer_pipeline.defs.definitions import build_definitions
from fer_pipeline.defs.jobs import held_out_source_keys
from fer_pipeline.defs.resources import TrainSettings
from fer_pipeline.defs.settings import OVERRIDES_TAG, bind_resources, code_version, fer_asset, run_overrides
from fer_pipeline.settings import Settings, SettingsError, install_settings, load_settings, settings_path
from fer_pipeline_tests.conftest import REPO


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_where_the_file_is(tmp_path: Path) -> None:
    assert settings_path({"FER_DATA_DIR": str(tmp_path)}) == tmp_path / "settings.yaml"
    named = tmp_path / "elsewhere.yaml"
    assert settings_path({"FER_DATA_DIR": str(tmp_path), "FER_SETTINGS": str(named)}) == named
    assert settings_path({"FER_DATA_DIR": "s3://bucket/prefix"}) is None  # an object store: FER_SETTINGS
    assert load_settings(tmp_path / "absent.yaml") == Settings()  # no file: every default


def test_both_formats_give_the_same_settings(tmp_path: Path) -> None:
    plain = load_settings(write(tmp_path / "a.yaml", "cv_folds: 3\ntraining: {epochs: 6}\nanalysis: {cv_epochs: 2}\n"))
    run_config = load_settings(write(tmp_path / "b.yaml", yaml.safe_dump(
        {"cv_folds": 3, "resources": {"training": {"config": {"epochs": 6}}, "analysis": {"config": {"cv_epochs": 2}}}})))
    assert plain.sections == run_config.sections and plain.cv_folds == run_config.cv_folds == 3
    assert plain.section("training") == {"epochs": 6} and plain.section("fer") == {}


def test_the_repository_demo_settings_load() -> None:
    demo = load_settings(REPO / "configs" / "demo.yaml")
    assert demo.cv_folds == 3 and demo.section("training")["epochs"] == 6
    bound = bind_resources(demo)
    assert bound["training"].epochs == 6 and bound["fer"].image_size == 48  # unset values keep their defaults


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2]", "expected a mapping of sections"),
    ("tranining: {epochs: 1}\n", "unknown section.*'tranining'"),
    ("training: 5\n", "section 'training' must be a mapping"),
    ("cv_folds: 1\n", "cv_folds must be a whole number of folds, 2 or more"),
    ("cv_folds: three\n", "cv_folds must be a whole number"),
    ("cv_folds: true\n", "cv_folds must be a whole number"),
    ("training: {epochs: 1}\ntraining: {epochs: 2}\n", "line 2: key 'training' appears twice"),
    ("training: {epochs: [1\n", "not valid YAML at line"),
    ("resources: {training: {epochs: 1}}\n", "resources.training must be a mapping with one key, 'config'"),
])
def test_bad_files_are_refused_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "settings.yaml", text)
    with pytest.raises(SettingsError, match=message) as err:
        load_settings(path)
    assert str(path) in str(err.value)


def test_an_alias_bomb_is_refused_small_and_fast(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 10)]
    path = write(tmp_path / "settings.yaml", "\n".join(lines) + "\ntraining: {epochs: *a9}\n")
    with pytest.raises(SettingsError, match="aliases are not allowed") as err:
        load_settings(path)
    assert len(str(err.value)) < 300


def test_special_files_are_refused_unread(tmp_path: Path) -> None:
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(SettingsError, match="is a directory"):
        load_settings(folder)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SettingsError, match="not a regular file"):
        load_settings(fifo)  # would block forever if opened
    dangling = tmp_path / "link.yaml"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(SettingsError, match="not a regular file"):
        load_settings(dangling)
    big = write(tmp_path / "big.yaml", "# " + "x" * (core.MAX_SETTINGS_BYTES + 10))
    with pytest.raises(SettingsError, match="larger than"):
        load_settings(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"training:\xff\xfe")
    with pytest.raises(SettingsError, match="not UTF-8"):
        load_settings(binary)


@pytest.mark.parametrize(("sections", "message"), [
    ({"training": {"epoch": 3}}, r"training\.epoch: unknown setting"),
    ({"fer": {"image_size": "big"}}, r"fer\.image_size: .*integer.*got 'big'"),
    ({"fer": {"exclude_flags": ["blurred", "darkk"]}}, r"fer\.exclude_flags: .*unknown quality flag.*'darkk'"),
    ({"analysis": {"min_group_size": "x" * 500}}, r"analysis\.min_group_size: .*\.\.\.\)$"),
])
def test_bad_values_fail_when_the_code_location_loads(tmp_path: Path, sections: dict, message: str) -> None:
    bad = Settings(path=tmp_path / "settings.yaml", sections=sections)
    with pytest.raises(SettingsError, match=message) as err:
        build_definitions(settings=bad, held_out=[])
    assert str(tmp_path / "settings.yaml") in str(err.value) and len(str(err.value)) < 600


def test_code_versions_follow_the_recipe_not_the_machine() -> None:
    base = Settings()
    recipe = Settings(sections={"training": {"epochs": 7}})
    machine = Settings(sections={"training": {"device": "cpu", "num_threads": 1}, "fer": {"workers": 1}})
    bound = {name: bind_resources(s) for name, s in (("base", base), ("recipe", recipe), ("machine", machine))}
    assert code_version(bound["base"], ["training"]) != code_version(bound["recipe"], ["training"])
    assert code_version(bound["base"], ["fer", "training"]) == code_version(bound["machine"], ["fer", "training"])

    def versions(s: Settings, folds: int = 2) -> dict[str, str | None]:
        graph = build_definitions(dg.in_process_executor, folds, settings=s, held_out=["a"]).resolve_asset_graph()
        return {k.to_user_string(): graph.get(k).code_version for k in graph.materializable_asset_keys}

    v0, v1, v2 = versions(base), versions(recipe), versions(base, folds=3)
    assert v0["splits"] == v1["splits"]  # the data half does not compute with the training recipe
    assert v0["model_cnn4"] != v1["model_cnn4"] and v0["cv_fold"] != v1["cv_fold"]
    assert v0["cv_fold"] != v2["cv_fold"] and v0["model_cnn4"] == v2["model_cnn4"]  # the fold count is the folds'
    analysis = versions(Settings(sections={"analysis": {"cv_epochs": 2}}))
    assert analysis["model_cnn4"] == v0["model_cnn4"] and analysis["cv_fold"] != v0["cv_fold"]


def test_definitions_bind_the_file_and_its_fold_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "settings.yaml", "cv_folds: 4\ntraining: {epochs: 2}\n")
    write(tmp_path / "sources.yaml", yaml.safe_dump({"sources": [
        {"name": n, "kind": "image_folders", "path": f"raw/{n}", "label_map": {"calm": "Neutral"}} for n in ("b", "a")]
        + [{"name": "pool", "kind": "image_folders", "path": "raw/pool", "role": "pretrain", "pretrain_labels": "all"}]}))
    monkeypatch.setenv("FER_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FER_SETTINGS", raising=False)
    monkeypatch.delenv("FER_CV_FOLDS", raising=False)
    defs = build_definitions(dg.in_process_executor)
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("cv_fold")).partitions_def.get_partition_keys() == ["0", "1", "2", "3"]
    # the catalogue's four-class sources, not the pool-only one, known before any run
    assert graph.get(dg.AssetKey("loso_fold")).partitions_def.get_partition_keys() == ["a", "b"]
    assert defs.resources["training"].epochs == 2
    monkeypatch.setenv("FER_CV_FOLDS", "2")  # the variable still overrides the file for one process
    graph = build_definitions(dg.in_process_executor).resolve_asset_graph()
    assert graph.get(dg.AssetKey("cv_fold")).partitions_def.get_partition_keys() == ["0", "1"]


def test_every_downstream_asset_is_automated_and_the_data_half_is_not() -> None:
    graph = build_definitions(dg.in_process_executor, 2, settings=Settings(), held_out=["a"]).resolve_asset_graph()
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        assert (node.automation_condition is None) == (node.group_name == "data"), key
        assert node.code_version, key


def test_a_run_config_override_is_recorded_on_the_run_and_the_materialization(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "settings.yaml", "training: {epochs: 6}\n")
    monkeypatch.setenv("FER_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FER_SETTINGS", raising=False)
    settings = load_settings(tmp_path / "settings.yaml")
    assert run_overrides({"resources": {"training": {"config": {"epochs": 6, "lr": 0.1}}}}, settings) == \
        {"training": {"lr": 0.1}}  # the same value as the file is no override

    def probe_fn(context, training: TrainSettings):  # type: ignore[no-untyped-def]
        return dg.MaterializeResult(metadata={"epochs": training.epochs})

    probe_fn.__annotations__ = {"training": TrainSettings}  # not strings: Dagster reads them at definition time
    probe = fer_asset(name="probe")(probe_fn)

    resources = bind_resources(settings)
    instance = dg.DagsterInstance.ephemeral()
    plain = dg.materialize([probe], resources=resources, instance=instance)
    meta = plain.asset_materializations_for_node("probe")[0].metadata
    assert meta["epochs"].value == 6 and meta["settings_overrides"].value == {}
    assert meta["settings_file"].value == str(tmp_path / "settings.yaml")
    override = dg.materialize([probe], resources=resources, instance=instance,
                              run_config={"resources": {"training": {"config": {"epochs": 2}}}})
    meta = override.asset_materializations_for_node("probe")[0].metadata
    assert meta["epochs"].value == 2 and meta["settings_overrides"].value == {"training": {"epochs": 2}}
    tags = instance.get_run_by_id(override.run_id).tags
    assert json.loads(tags[OVERRIDES_TAG]) == {"training": {"epochs": 2}}
    assert OVERRIDES_TAG not in instance.get_run_by_id(plain.run_id).tags


@pytest.mark.parametrize(("catalogue", "why"), [
    ("sources: [", "not valid YAML"),  # truncated
    ("a: &a [1]\nb: *a\nsources: *b\n", "alias"),  # an alias to nothing
    (None, "is a directory"),
    ("fifo", "not a regular file"),
])
def test_a_broken_catalogue_still_loads_the_code_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         catalogue: str | None, why: str) -> None:
    """The held-out-source partitions are read from sources.yaml when the code location loads: a
    broken catalogue gives no partitions and says why (the data run names the problem), never a
    code location that cannot load (the UI would show nothing) nor one that hangs on a FIFO."""
    path = tmp_path / "sources.yaml"
    if catalogue is None:
        path.mkdir()
    elif catalogue == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(catalogue)
    keys, note = held_out_source_keys(tmp_path)
    assert keys == [] and note is not None and why in note
    graph = build_definitions(dg.in_process_executor, 2, settings=Settings(), held_out=keys).resolve_asset_graph()
    assert graph.get(dg.AssetKey("loso_fold")).partitions_def.get_partition_keys() == []


def test_installing_settings_refuses_a_bad_file_and_keeps_the_good_one(tmp_path: Path) -> None:
    target = write(tmp_path / "settings.yaml", "cv_folds: 3\n")
    bad = write(tmp_path / "bad.yaml", "cv_folds: [\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        install_settings(bad, target)
    assert target.read_text() == "cv_folds: 3\n"
    good = write(tmp_path / "good.yaml", "cv_folds: 4\n")
    assert install_settings(good, target) and load_settings(target).cv_folds == 4
    assert not install_settings(good, target)  # unchanged: nothing rewritten
