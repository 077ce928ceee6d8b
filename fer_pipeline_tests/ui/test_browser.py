"""The Dagster UI, tested as a user uses it, in a real headless Chromium (Debian's ``chromium``,
driven by Playwright; nothing downloads a browser): issue 17, "one control plane".

On a fresh data root (two small image-folder sources, ``a`` and ``b``, each with the four
classes, and a ``settings.yaml`` with tiny budgets: :mod:`fer_pipeline_tests.control_plane_data`)
``scripts/ui.sh start`` starts the webserver and the daemon (``dagster dev``) on a free loopback
port with a temporary instance. The browser then

1. sees that nothing has run: the catalogue shows every asset as never materialized (the
   partitioned ``cv_fold`` and ``loso_fold`` with 0 of their 2 partitions), ``cv_fold``'s
   partitions page shows "Materialized (0)" / "Missing (2)", the model card "Never materialized";
2. opens the global asset graph and presses "Materialize all": one dialog (a backfill of all
   partitions, no config to paste), "Launch backfill";
3. waits for the backfill (GraphQL) and checks: completed successfully, every run of it
   succeeded, no other run was launched (automation, which is on, adds no second launch), every
   materializable asset (every partition of ``cv_fold`` and ``loso_fold``) is materialized,
   ``reports/model_card.md`` exists; the browser shows the same (catalogue, model card, backfill);
4. opens the manifest asset (metadata, then the Checks tab);
5. drops new images into a source and turns the sources sensor on: exactly one new
   ``data_pipeline`` run, which decoded only the new files (automation then brings the rest up
   to date; not waited for here);
6. stops the servers (no process survives), restarts them and finds the backfill, the check
   results and the sensor's state where they were (SQLite), and stops them again.

Screenshots and a timeline go to ``test-output/ui/``. Without Chromium or Playwright the test
skips with the reason, except under ``CI=true``, where a missing browser fails it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fer_pipeline_tests.conftest import REPO
from fer_pipeline_tests.control_plane_data import (
    assert_same_publication,
    build_control_plane_root,
    copy_root,
    new_home,
    refresh,
)
from fer_pipeline_tests.servers import unavailable

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = Path(os.environ.get("FER_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = REPO / "test-output" / "ui"
INSTALL_NOTE = REPO / "test-output" / "browser-install.txt"
LOCATION = "fer_pipeline.definitions"  # the code location's name (workspace.yaml)
DATA_ASSETS = ["source_files", "raw_sources", "faces", "deduplicated_faces", "manifest", "splits", "data_plots"]
PARTITIONED = {"cv_fold": ["0", "1"], "loso_fold": ["a", "b"]}  # cv_folds: 2; the two four-class sources
GROUPS = ("data", "models", "evaluation", "review")
MANIFEST_CHECKS = ["manifest_accounting", "manifest_class_balance", "manifest_class_counts",
                   "manifest_image_size", "manifest_schema"]
SENSOR = "source_files_sensor"
AUTOMATION_SENSOR = "fer_automation"
DATA_JOB = "data_pipeline"
RUN_ROW = "[class*='RunsFeedRow_row']"  # a row of the runs page (a virtualized table of divs)
SENSOR_INTERVAL = 3  # seconds, instead of 30, so the test does not wait long (both sensors)
BACKFILL_TIMEOUT = 600
N_NEW = 6


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        why = INSTALL_NOTE.read_text().strip() if INSTALL_NOTE.exists() else \
            "run 'bash scripts/install_browser.sh' (make test does)"
        return f"headless Chromium not installed at {CHROMIUM}: {why}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Every live process in session ``sid`` (the session scripts/ui.sh start creates)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@dataclass
class Server:
    url: str
    home: Path
    data_root: Path
    env: dict[str, str]
    leader: int
    started: float = 0.0

    def ui_sh(self, command: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(REPO / "scripts" / "ui.sh"), command], env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            out = json.loads(resp.read())
        assert not out.get("errors"), out["errors"]
        return out["data"]

    def instance(self):  # type: ignore[no-untyped-def]
        import dagster as dg

        return dg.DagsterInstance.from_config(str(self.home))  # the server's SQLite storage, read alongside it


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    reason = _skip_reason()
    if reason:
        unavailable("the browser test", reason)  # a skip here, a failure under CI=true
    home, data_root = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    shutil.copy(REPO / "fer_pipeline" / "instance" / "dagster.yaml", home / "dagster.yaml")
    build_control_plane_root(data_root)  # sources a and b, sources.yaml, settings.yaml (the [test] settings)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_")}  # no FER_SETTINGS etc. from outside
    env.update(DAGSTER_HOME=str(home), FER_DATA_DIR=str(data_root), FER_SENSOR_INTERVAL_SECONDS=str(SENSOR_INTERVAL),
               UI_HOST="127.0.0.1", UI_PORT=str(port), UI_START_TIMEOUT="240", VENV_BIN=str(Path(sys.executable).parent),
               GX_ANALYTICS_ENABLED="false", DAGSTER_DISABLE_TELEMETRY="1")
    srv = Server(f"http://127.0.0.1:{port}", home, data_root, env, leader=0, started=time.monotonic())
    started = srv.ui_sh("start")
    pid_file = home / "ui.pid"
    srv.leader = int(pid_file.read_text().strip()) if pid_file.exists() else 0
    try:
        assert started.returncode == 0, f"scripts/ui.sh start failed:\n{started.stdout}\n{started.stderr}\n" + (
            (home / "ui.log").read_text()[-3000:] if (home / "ui.log").exists() else "")
        yield srv
    finally:
        srv.ui_sh("stop", timeout=120)
        if srv.leader:  # safety net: nothing this test started may survive it
            for pid in _session_pids(srv.leader):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(30_000)
        try:
            yield context.new_page()
        finally:
            context.close()


_T0 = [time.monotonic()]


def mark(what: str) -> None:
    """Append to test-output/ui/timeline.txt: where the test's time goes."""
    with open(SHOTS / "timeline.txt", "a") as fh:
        fh.write(f"{time.monotonic() - _T0[0]:7.1f} s  {what}\n")


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    mark(name)


def wait_for_run_row(page, url: str, run_prefix: str, timeout: float = 240) -> str:  # type: ignore[no-untyped-def]
    """Poll the runs page until the run's row shows a final status; return that status."""
    deadline = time.monotonic() + timeout
    page.goto(f"{url}/runs")
    status = ""
    while time.monotonic() < deadline:
        try:  # the list renders after load: count rows only once the table is there
            page.locator(RUN_ROW).first.wait_for(state="visible", timeout=10_000)
            page.locator(RUN_ROW, has_text=run_prefix).first.wait_for(state="visible", timeout=5_000)
        except Exception:  # noqa: BLE001 - not listed yet: reload and look again
            pass
        row = page.locator(RUN_ROW, has_text=run_prefix)
        if row.count():
            text = row.first.inner_text()
            for final in ("Success", "Failure", "Canceled"):
                if final in text:
                    return final
            status = text
        page.wait_for_timeout(2000)
        page.reload()
    raise AssertionError(f"run {run_prefix} not finished after {timeout:.0f} s (row: {status!r})")


def _in_view(page, locator) -> bool:  # type: ignore[no-untyped-def]
    """Drawn inside the graph's visible area (below the toolbar, inside the window)."""
    if not locator.count():
        return False
    box = locator.first.bounding_box()
    size = page.viewport_size
    return bool(box) and box["y"] >= 100 and box["y"] + box["height"] <= size["height"] \
        and box["x"] >= 0 and box["x"] + box["width"] <= size["width"]


def metadata_value(page, key: str) -> str:  # type: ignore[no-untyped-def]
    """The value cell of a row of an asset's metadata table (Key | Timestamp | Value)."""
    row = page.locator("tr", has=page.get_by_text(key, exact=True)).first
    row.wait_for()
    row.scroll_into_view_if_needed()
    return row.locator("td").last.inner_text().strip()


def catalog_status(page, url: str, names: set[str]) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """The catalogue's Status cell of every asset, as its lines. The table is virtualized: a tall
    window draws every row. An unpartitioned asset reads "Never materialized" (an observable one
    "Never observed") or "Materialized" and a date; a partitioned one its counts of materialized,
    missing, failed and materializing partitions ("All" when every partition) and "N partitions"."""
    page.set_viewport_size({"width": 1600, "height": 2400})
    try:
        page.goto(f"{url}/assets")
        for name in sorted(names):
            page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)  # the status cells fill in after the names
        lines = [ln.strip() for ln in page.locator("body").inner_text().splitlines() if ln.strip()]
    finally:
        page.set_viewport_size({"width": 1600, "height": 1000})
    # a row reads: name (link), name (label), description, location x2, group, status lines
    starts = [i for i in range(len(lines) - 1) if lines[i] in names and lines[i + 1] == lines[i]]
    rows = {lines[i]: lines[i + 2:j] for i, j in zip(starts, [*starts[1:], len(lines)])}
    assert set(rows) == names, f"catalogue rows {sorted(rows)} != assets {sorted(names)}"
    return {name: [ln for ln in cell if ln not in GROUPS and ln != LOCATION][-6:] for name, cell in rows.items()}


def _asset_nodes(server: Server) -> list[dict]:
    return server.graphql("{ assetNodes { assetKey { path } isMaterializable isObservable partitionKeys groupName } }"
                          )["assetNodes"]


def _backfill(server: Server, backfill_id: str) -> dict:
    return server.graphql(
        """query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
             ... on PartitionBackfill { id status numCancelable error { message } }
             ... on PythonError { message } } }""", {"id": backfill_id})["partitionBackfillOrError"]


def test_ui_materialize_all_inspect_and_sensor(server: Server, page) -> None:  # type: ignore[no-untyped-def]
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    _T0[0] = server.started
    mark("server up")
    try:
        backfill_id = _user_session(server, page)
    except BaseException:
        try:
            shot(page, "99_failure")
        except Exception:  # noqa: BLE001 - the page may be gone
            pass
        raise
    # stopping is clean: no process of this test's server survives (automation may be running)
    _stop_and_check(server)
    mark("stopped cleanly")
    # a restart finds the backfill, the check results and the sensor's state where they were (SQLite)
    restarted = server.ui_sh("start")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    server.leader = int((server.home / "ui.pid").read_text().strip())
    mark("restarted")
    _after_restart(server, page, backfill_id)
    _stop_and_check(server)
    mark("stopped cleanly again")


def _stop_and_check(server: Server) -> None:
    stopped = server.ui_sh("stop", timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 10
    while _session_pids(server.leader) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_pids(server.leader), "processes survived scripts/ui.sh stop"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/server_info", timeout=3)


def _after_restart(server: Server, page, backfill_id: str) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    url = server.url
    page.goto(f"{url}/runs/b/{backfill_id}")
    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible(timeout=60_000)
    page.goto(f"{url}/assets/manifest?view=checks")
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible(timeout=60_000)
    page.goto(f"{url}/locations/{LOCATION}/sensors/{SENSOR}")
    expect(page.locator("input[type=checkbox]").first).to_be_checked(timeout=60_000)
    shot(page, "17_backfill_checks_sensor_after_restart")


def _user_session(server: Server, page) -> str:  # type: ignore[no-untyped-def]
    """Everything up to the sensor's run; returns the backfill's id."""
    import dagster as dg
    from playwright.sync_api import expect

    url = server.url
    # the "join the community" dialog a first-time user dismisses once (stored in the instance)
    assert server.graphql("mutation { setNuxSeen }")["setNuxSeen"] is True

    nodes = _asset_nodes(server)
    names = {n["assetKey"]["path"][-1] for n in nodes}
    materializable = {n["assetKey"]["path"][-1]: n["partitionKeys"] for n in nodes if n["isMaterializable"]}
    observable = {n["assetKey"]["path"][-1] for n in nodes if n["isObservable"]}
    # the code location planned the whole graph when it loaded: static partitions from the settings file
    # (cv_folds: 2) and the catalogue (two four-class sources)
    for asset, keys in PARTITIONED.items():
        assert materializable.get(asset) == keys, (asset, materializable.get(asset))
    assert "model_card" in materializable and observable == {"source_files", "label_studio_annotations"}, (sorted(materializable), observable)
    assert {n["groupName"] for n in nodes} == set(GROUPS)

    # 1. nothing has run, and nothing shows as done
    instance = server.instance()
    try:
        assert instance.get_runs() == [], "a run was launched before anybody asked for one"
        for asset in materializable:
            assert instance.get_latest_materialization_event(dg.AssetKey(asset)) is None, asset
    finally:
        instance.dispose()
    status = catalog_status(page, url, names)
    shot(page, "01_catalog_before")
    for asset in names:
        cell = status[asset]
        if asset in PARTITIONED:  # counts: materialized, missing, failed, materializing
            assert cell[-5:] == ["0", "All", "0", "0", f"{len(PARTITIONED[asset])} partitions"], (asset, cell)
        elif asset in observable:
            assert cell[-1] == "Never observed", (asset, cell)
        else:
            assert cell[-1] == "Never materialized", (asset, cell)
    for asset, keys in PARTITIONED.items():
        page.goto(f"{url}/assets/{asset}?view=partitions")
        expect(page.get_by_text(f"Missing ({len(keys)})", exact=True).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Materialized (0)", exact=True).first).to_be_visible()
        shot(page, f"02_{asset}_partitions_before")
    page.goto(f"{url}/assets/model_card")
    expect(page.get_by_text("Never materialized", exact=True).first).to_be_visible(timeout=60_000)
    shot(page, "03_model_card_before")

    # 2. the global asset graph: every group; the data group expanded shows every data asset
    page.goto(f"{url}/asset-groups")
    materialize_all = page.get_by_role("button", name=re.compile(r"Materialize all"))
    expect(materialize_all).to_be_visible(timeout=60_000)
    for group in GROUPS:
        expect(page.get_by_text(group, exact=True).first).to_be_visible()
    shot(page, "04_global_graph")
    page.goto(f"{url}/asset-groups?expanded=global@global:data")
    expect(page.get_by_text("raw_sources", exact=True).first).to_be_visible(timeout=60_000)
    missing = list(DATA_ASSETS)
    for _ in range(4):  # the graph draws only the nodes in view: zoom out until every data asset is there
        page.wait_for_timeout(700)
        missing = [n for n in DATA_ASSETS if not _in_view(page, page.get_by_text(n, exact=True))]
        if not missing:
            break
        page.get_by_role("button", name="zoom_out").click()
    assert not missing, f"asset graph lacks {missing}"
    shot(page, "05_global_graph_data_expanded")

    # 3. "Materialize all": one dialog, a backfill of every partition; nothing to paste
    materialize_all = page.get_by_role("button", name=re.compile(r"Materialize all"))
    expect(materialize_all).to_contain_text(f"Materialize all ({len(materializable)})")
    materialize_all.click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text(f"Launch runs to materialize {len(materializable)} assets")).to_be_visible()
    expect(dialog.get_by_text("All partitions", exact=True)).to_be_visible()
    shot(page, "06_materialize_all_dialog")
    dialog.get_by_role("button", name="Launch backfill").click()
    toast = page.get_by_text(re.compile(r"Created backfill [a-z0-9]{8}"))
    expect(toast.first).to_be_visible(timeout=30_000)
    backfill_id = re.search(r"Created backfill ([a-z0-9]{8})", toast.first.inner_text()).group(1)
    shot(page, "07_backfill_launched")

    # 4. wait for the backfill (GraphQL), looking at its page now and then
    deadline = time.monotonic() + BACKFILL_TIMEOUT
    backfill = _backfill(server, backfill_id)
    while backfill.get("status") in ("REQUESTED", "CANCELING", "FAILING") and time.monotonic() < deadline:
        time.sleep(5)
        backfill = _backfill(server, backfill_id)
    mark(f"backfill {backfill_id}: {backfill.get('status')}")
    page.goto(f"{url}/runs/b/{backfill_id}")
    page.wait_for_timeout(3000)
    shot(page, "08_backfill_page")
    assert backfill.get("status") == "COMPLETED_SUCCESS", backfill

    instance = server.instance()
    try:
        runs = instance.get_runs()
        failed = [(r.run_id[:8], r.status.value, sorted(r.asset_selection or []))
                  for r in runs if r.status != dg.DagsterRunStatus.SUCCESS]
        assert not failed, f"runs not successful: {failed}"
        others = [(r.run_id[:8], r.job_name, dict(r.tags)) for r in runs if r.tags.get("dagster/backfill") != backfill_id]
        assert not others, f"runs outside the backfill: {others}"
        not_done = []
        for asset, keys in materializable.items():
            key = dg.AssetKey(asset)
            if keys:
                done = instance.get_materialized_partitions(key)
                not_done += [f"{asset}[{k}]" for k in keys if k not in done]
            elif instance.get_latest_materialization_event(key) is None:
                not_done.append(asset)
        assert not not_done, f"not materialized after the backfill: {not_done}"
        # no second launch: automation (on by default) ticks on, and requests nothing after the backfill
        finished = max(rec.end_time or 0 for rec in instance.get_run_records())
        auto = next(s for s in instance.all_instigator_state() if s.instigator_name == AUTOMATION_SENSOR)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ticks = [t for t in instance.get_ticks(auto.instigator_origin_id, auto.selector_id, limit=50)
                     if t.timestamp > finished]
            if len(ticks) >= 3:
                break
            time.sleep(SENSOR_INTERVAL)
        assert len(ticks) >= 3, f"{AUTOMATION_SENSOR} did not tick after the backfill ({len(ticks)} ticks)"
        assert all(not t.run_ids for t in ticks), [t.run_ids for t in ticks]
        assert len(instance.get_runs()) == len(runs), "a run was launched after the backfill"
        mark(f"{len(runs)} runs, all of backfill {backfill_id}; {len(ticks)} automation ticks since, no run")
    finally:
        instance.dispose()
    card = server.data_root / "reports" / "model_card.md"
    assert card.is_file() and card.stat().st_size > 0, card
    # equivalence: `make demo`'s CLI path on the same files and settings publishes the same
    twin = copy_root(server.data_root, server.home.parent / "cli-data")
    refresh(twin, new_home(server.home.parent / "cli-home"))
    assert_same_publication(server.data_root, twin)
    mark("the CLI path on a copy of the same files published the same manifest, splits and metrics")

    # ... and the browser shows it: everything materialized, the card first of all
    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible()
    status = catalog_status(page, url, names)
    shot(page, "09_catalog_after")
    for asset in materializable:
        cell = status[asset]
        if asset in PARTITIONED:
            assert cell[-5:] == ["All", "0", "0", "0", f"{len(PARTITIONED[asset])} partitions"], (asset, cell)
        else:
            assert "Materialized" in cell and "Never materialized" not in cell, (asset, cell)
    page.goto(f"{url}/assets/cv_fold?view=partitions")
    expect(page.get_by_text("Materialized (2)", exact=True).first).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Missing (0)", exact=True).first).to_be_visible()
    page.goto(f"{url}/assets/model_card")
    expect(page.get_by_text("Latest materialization", exact=True).first).to_be_visible(timeout=60_000)
    assert metadata_value(page, "path") == str(card)
    expect(page.get_by_text("Never materialized", exact=True)).to_have_count(0)
    shot(page, "10_model_card_materialized")

    # 5. the manifest asset: its metadata, then its passing checks
    page.goto(f"{url}/assets/manifest")
    assert metadata_value(page, "accounting_balanced") == "true"
    kept = int(metadata_value(page, "kept"))
    assert kept > 200
    assert int(metadata_value(page, "excluded")) > 0
    shot(page, "11_manifest_metadata")
    page.get_by_role("tab", name=re.compile("^Checks")).click()
    for check in MANIFEST_CHECKS:
        expect(page.get_by_text(check, exact=True).first).to_be_visible()
    checks_panel = page.locator("body").inner_text()
    assert checks_panel.count("Succeeded") >= len(MANIFEST_CHECKS), checks_panel[:2000]
    assert "Failed" not in checks_panel
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
    shot(page, "12_manifest_checks")

    _sensor_session(server, page, kept)
    return backfill_id


def _sensor_session(server: Server, page, kept: int) -> None:  # type: ignore[no-untyped-def]
    import dagster as dg
    import pandas as pd
    from playwright.sync_api import expect

    from fer_pipeline.faces.preprocess import PreprocessSettings, decode_face
    from fer_pipeline.demo.synthetic_faces import generate_demo_source

    url = server.url
    # 6. new images arrive in source a
    source = server.data_root / "raw" / "a"
    before = {hashlib.sha256(p.read_bytes()).digest() for p in server.data_root.joinpath("raw").rglob("*") if p.is_file()}
    extra = generate_demo_source(server.data_root.parent / "extra", n_images=60, seed=99)
    faces_ok = [p for p in sorted((extra.root / "Angry").glob("*.png"))  # real faces, not the planted defects
                if decode_face(p.read_bytes(), PreprocessSettings()).ok]
    added = faces_ok[:N_NEW]
    for i, path in enumerate(added):
        shutil.copy(path, source / "Angry" / f"new_{i}.png")
    new_contents = {hashlib.sha256(p.read_bytes()).digest() for p in added} - before
    assert len(new_contents) == N_NEW

    # 7. turn the sensor on in the UI (it is off by default)
    page.goto(f"{url}/automation")
    page.get_by_text(SENSOR, exact=True).first.click()
    expect(page.get_by_text("Running", exact=True).first).to_be_visible()
    toggle = page.locator("input[type=checkbox]").first
    expect(toggle).not_to_be_checked()
    page.locator("label", has=toggle).first.click()  # the visible switch (the input itself is hidden)
    expect(toggle).to_be_checked(timeout=15_000)
    shot(page, "13_sensor_on")

    # 8. exactly one new data run, from the sensor, which decoded only the new files
    instance = server.instance()
    try:
        deadline = time.monotonic() + 240
        sensor_runs: list = []
        while time.monotonic() < deadline:
            sensor_runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": SENSOR}))
            if sensor_runs and sensor_runs[0].is_finished:
                break
            time.sleep(2)
        assert len(sensor_runs) == 1, sensor_runs
        run = sensor_runs[0]
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
        assert run.job_name == DATA_JOB and run.tags.get("fer/trigger") == "source_change"
        mark(f"sensor run {run.run_id[:8]}: {run.status.value}")
        assert wait_for_run_row(page, url, run.run_id[:8], timeout=60) == "Success"
        time.sleep(4 * SENSOR_INTERVAL)  # more ticks, no more sensor runs: nothing changed since
        page.goto(f"{url}/runs")
        expect(page.locator(RUN_ROW, has_text=run.run_id[:8]).first).to_be_visible()
        page.wait_for_timeout(1000)
        shot(page, "14_runs_after_sensor")
        data_runs = instance.get_runs(filters=dg.RunsFilter(job_name=DATA_JOB))
        assert [r.run_id for r in data_runs] == [run.run_id], [(r.run_id[:8], r.tags) for r in data_runs]
        assert len(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": SENSOR}))) == 1
        state = next(s for s in instance.all_instigator_state() if s.instigator_name == SENSOR)
        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id)
        assert sum(len(t.run_ids) for t in ticks) == 1 and len(ticks) >= 2
        assert any("no change" in (t.skip_reason or "") for t in ticks)

        faces = next(r for r in instance.fetch_materializations(dg.AssetKey("faces"), limit=10).records
                     if r.run_id == run.run_id)
        meta = faces.asset_materialization.metadata
        assert meta["decoded_this_run"].value == len(new_contents)
        assert meta["reused_from_cache"].value > 200
    finally:
        instance.dispose()
    listed = pd.concat([pd.read_parquet(server.data_root / "manifest" / f"{t}.parquet", columns=["source_path"])
                        for t in ("manifest", "excluded")])
    assert {f"Angry/new_{i}.png" for i in range(N_NEW)} <= set(listed["source_path"])

    # the same figure in the UI: the faces asset's latest materialization
    page.goto(f"{url}/assets/faces")
    assert int(metadata_value(page, "decoded_this_run")) == len(new_contents)
    shot(page, "15_faces_decoded_only_new")
    page.goto(f"{url}/locations/{LOCATION}/sensors/{SENSOR}")
    page.get_by_text("Cursor", exact=True).first.wait_for()
    page.wait_for_timeout(1500)
    shot(page, "16_sensor_ticks")
