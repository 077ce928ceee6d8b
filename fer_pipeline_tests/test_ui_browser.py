"""The Dagster UI, tested as a user uses it, in a real headless Chromium (Debian's ``chromium``,
driven by Playwright; nothing downloads a browser).

``scripts/ui.sh start`` starts the webserver and the daemon (``dagster dev``) on a free loopback
port with a temporary instance and data root (a small synthetic source). The browser then opens
the data group's asset graph and finds every data asset, launches "Materialize all", waits on
the runs page for success, opens the manifest asset (metadata, then the Checks tab), and, after
new images are dropped into the source, turns the sources sensor on and sees exactly one new run
that decoded only the new files. Screenshots go to ``test-output/ui/``. ``scripts/ui.sh stop``
ends every process the test started (checked), with a process-session kill as a safety net.
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
import yaml

from fer_pipeline_tests.conftest import REPO

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

CHROMIUM = Path(os.environ.get("FER_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = REPO / "test-output" / "ui"
INSTALL_NOTE = REPO / "test-output" / "browser-install.txt"
LOCATION = "fer_pipeline.definitions"  # the code location's name (workspace.yaml)
DATA_ASSETS = ["raw_sources", "faces", "deduplicated_faces", "manifest", "splits", "data_plots"]
MANIFEST_CHECKS = ["manifest_accounting", "manifest_class_balance", "manifest_class_counts",
                   "manifest_image_size", "manifest_schema"]
SENSOR = "source_files_sensor"
RUN_ROW = "[class*='RunsFeedRow_row']"  # a row of the runs page (a virtualized table of divs)
SENSOR_INTERVAL = 3  # seconds, instead of 30, so the test does not wait long
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
            return json.loads(resp.read())

    def instance(self):  # type: ignore[no-untyped-def]
        import dagster as dg

        return dg.DagsterInstance.from_config(str(self.home))  # the server's SQLite storage, read alongside it


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    home, data_root = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    data_root.mkdir()
    shutil.copy(REPO / "fer_pipeline" / "instance" / "dagster.yaml", home / "dagster.yaml")
    (data_root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 320, "seed": 3}]}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_")}
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
    return bool(box) and box["y"] >= 170 and box["y"] + box["height"] <= size["height"] \
        and box["x"] >= 0 and box["x"] + box["width"] <= size["width"]


def metadata_value(page, key: str) -> str:  # type: ignore[no-untyped-def]
    """The value cell of a row of an asset's metadata table (Key | Timestamp | Value)."""
    row = page.locator("tr", has=page.get_by_text(key, exact=True)).first
    row.wait_for()
    row.scroll_into_view_if_needed()
    return row.locator("td").last.inner_text().strip()


def test_ui_materialize_inspect_and_sensor(server: Server, page) -> None:  # type: ignore[no-untyped-def]
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    _T0[0] = server.started
    mark("server up")
    try:
        _user_session(server, page)
    except BaseException:
        try:
            shot(page, "99_failure")
        except Exception:  # noqa: BLE001 - the page may be gone
            pass
        raise
    # stopping is clean: no process of this test's server survives
    _stop_and_check(server)
    mark("stopped cleanly")
    # a restart finds the runs, the check results and the sensor's state where they were (SQLite)
    restarted = server.ui_sh("start")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    server.leader = int((server.home / "ui.pid").read_text().strip())
    mark("restarted")
    _after_restart(server, page)
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


def _after_restart(server: Server, page) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    url = server.url
    page.goto(f"{url}/runs")
    expect(page.locator(RUN_ROW).nth(1)).to_be_visible(timeout=60_000)
    assert page.locator(RUN_ROW).count() == 2
    page.goto(f"{url}/assets/manifest?view=checks")
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible(timeout=60_000)
    page.goto(f"{url}/locations/{LOCATION}/sensors/{SENSOR}")
    expect(page.locator("input[type=checkbox]").first).to_be_checked(timeout=60_000)
    shot(page, "10_sensor_still_on_after_restart")


def _user_session(server: Server, page) -> None:  # type: ignore[no-untyped-def]
    import dagster as dg
    from playwright.sync_api import expect

    from fer_pipeline.dataset.preprocess import PreprocessSettings, decode_face
    from fer_pipeline.dataset.synthetic_faces import generate_demo_source

    url = server.url
    # the "join the community" dialog a first-time user dismisses once (stored in the instance)
    assert server.graphql("mutation { setNuxSeen }")["data"]["setNuxSeen"] is True

    # 1. the asset graph of the data group shows every data asset
    page.goto(f"{url}/locations/{LOCATION}/asset-groups/data")
    expect(page.get_by_text("raw_sources", exact=True).first).to_be_visible(timeout=60_000)
    missing = list(DATA_ASSETS)
    for _ in range(10):  # the graph draws only the nodes in view: zoom out until every data asset is there
        page.wait_for_timeout(700)
        missing = [n for n in DATA_ASSETS if not _in_view(page, page.get_by_text(n, exact=True))]
        if not missing:
            break
        page.get_by_role("button", name="zoom_out").click()
    assert not missing, f"asset graph lacks {missing}"
    shot(page, "01_asset_graph")

    # 2. materialize all data assets from the UI
    page.get_by_role("button", name="Materialize all").click()
    launch = page.get_by_role("button", name=re.compile(r"^(Launch run|Materialize)$"))
    try:  # a launchpad only opens when config is required; ours has defaults
        launch.last.click(timeout=3000)
    except Exception:  # noqa: BLE001 - no launchpad: the run was launched directly
        pass
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    expect(toast.first).to_be_visible(timeout=30_000)
    first_run = re.search(r"Launched run ([0-9a-f]{8})", toast.first.inner_text()).group(1)
    shot(page, "02_materialize_launched")

    # 3. wait for its success on the runs page
    assert wait_for_run_row(page, url, first_run) == "Success"
    shot(page, "03_runs_first_success")

    # 4. the manifest asset: its metadata, then its passing checks
    page.goto(f"{url}/assets/manifest")
    assert metadata_value(page, "accounting_balanced") == "true"
    kept = int(metadata_value(page, "kept"))
    assert kept > 250
    assert int(metadata_value(page, "excluded")) > 0
    shot(page, "04_manifest_metadata")
    page.get_by_role("tab", name=re.compile("^Checks")).click()
    for check in MANIFEST_CHECKS:
        expect(page.get_by_text(check, exact=True).first).to_be_visible()
    checks_panel = page.locator("body").inner_text()
    assert checks_panel.count("Succeeded") >= len(MANIFEST_CHECKS), checks_panel[:2000]
    assert "Failed" not in checks_panel
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
    shot(page, "05_manifest_checks")

    # 5. new images arrive in the demo source
    source = server.data_root / "raw" / "demo"
    before = {hashlib.sha256(p.read_bytes()).digest() for p in source.rglob("*") if p.is_file()}
    extra = generate_demo_source(server.data_root.parent / "extra", n_images=60, seed=99)
    faces_ok = [p for p in sorted((extra.root / "Angry").glob("*.png"))  # real faces, not the planted defects
                if decode_face(p.read_bytes(), PreprocessSettings()).ok]
    added = faces_ok[:N_NEW]
    for i, path in enumerate(added):
        shutil.copy(path, source / "Angry" / f"new_{i}.png")
    new_contents = {hashlib.sha256(p.read_bytes()).digest() for p in added} - before
    assert len(new_contents) == N_NEW

    # 6. turn the sensor on in the UI (it is off by default)
    page.goto(f"{url}/automation")
    page.get_by_text(SENSOR, exact=True).first.click()
    expect(page.get_by_text("Running", exact=True).first).to_be_visible()
    toggle = page.locator("input[type=checkbox]").first
    expect(toggle).not_to_be_checked()
    page.locator("label", has=toggle).first.click()  # the visible switch (the input itself is hidden)
    expect(toggle).to_be_checked(timeout=15_000)
    shot(page, "06_sensor_on")

    # 7. exactly one new run, from the sensor, which decoded only the new files
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
        assert run.job_name == "data_pipeline" and run.tags.get("fer/trigger") == "source_change"
        assert wait_for_run_row(page, url, run.run_id[:8], timeout=60) == "Success"
        time.sleep(4 * SENSOR_INTERVAL)  # more ticks, no more runs: nothing changed since
        page.goto(f"{url}/runs")
        expect(page.locator(RUN_ROW, has_text=run.run_id[:8]).first).to_be_visible()
        expect(page.locator(RUN_ROW, has_text=first_run).first).to_be_visible()
        page.wait_for_timeout(1000)
        rows = page.locator(RUN_ROW).count()
        shot(page, "07_runs_after_sensor")
        assert rows == 2, f"runs page lists {rows} runs"
        assert len(instance.get_runs()) == 2
        state = next(s for s in instance.all_instigator_state() if s.instigator_name == SENSOR)
        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id)
        assert sum(len(t.run_ids) for t in ticks) == 1 and len(ticks) >= 2
        assert any("no change" in (t.skip_reason or "") for t in ticks)

        faces = next(r for r in instance.fetch_materializations(dg.AssetKey("faces"), limit=10).records
                     if r.run_id == run.run_id)
        meta = faces.asset_materialization.metadata
        assert meta["decoded_this_run"].value == len(new_contents)
        assert meta["reused_from_cache"].value > 250
    finally:
        instance.dispose()
    import pandas as pd

    listed = pd.concat([pd.read_parquet(server.data_root / "manifest" / f"{t}.parquet", columns=["source_path"])
                        for t in ("manifest", "excluded")])
    assert {f"Angry/new_{i}.png" for i in range(N_NEW)} <= set(listed["source_path"])

    # the same figure in the UI: the faces asset's latest materialization
    page.goto(f"{url}/assets/faces")
    assert int(metadata_value(page, "decoded_this_run")) == len(new_contents)
    shot(page, "08_faces_decoded_only_new")
    page.goto(f"{url}/locations/{LOCATION}/sensors/{SENSOR}")
    page.get_by_text("Cursor", exact=True).first.wait_for()
    page.wait_for_timeout(1500)
    shot(page, "09_sensor_ticks")

