"""A real PostgreSQL-backed Dagster instance (docs/operations.md, "Using PostgreSQL").

Starts Debian's PostgreSQL (installed by scripts/install_postgres.sh, which `make test` runs) as
a throw-away cluster: initdb into a temporary folder, `postgres` on a free loopback port with its
socket in that folder, in its own process group, as the unprivileged `postgres` user when the
tests run as root (PostgreSQL refuses to run as root). A temporary DAGSTER_HOME holds the
project's instance config (fer_pipeline/instance/dagster.yaml) plus the README's
`storage: postgres:` block. The data half of the pipeline is materialized with that instance;
then the instance is disposed, PostgreSQL is stopped and started again, and a fresh instance
must find the run (SUCCESS), every data asset's materialization and every check result
(passed) there, in Postgres tables, with no SQLite storage written to DAGSTER_HOME.

Run it alone: `.venv/bin/python -m pytest -q fer_pipeline_tests/defs/test_postgres_instance.py`.
Skipped (with the reason) only when the PostgreSQL server binaries are absent, and then only outside
CI: under ``CI=true`` that is a failure (``servers.unavailable``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fer_pipeline_tests.conftest import REPO
from fer_pipeline_tests.servers import (
    LOOPBACK,
    ServerProcess,
    free_port,
    start_server,
    unavailable,
)

INSTALL_NOTE = REPO / "test-output" / "postgres-install.txt"

DATA_ASSETS = ["label_studio_reviews", "raw_sources", "faces", "deduplicated_faces", "manifest", "splits", "data_plots",
               "data_quality_flags"]
SUPERUSER, SUPERUSER_PASSWORD = "postgres", "fer-pg-super"
DB_NAME, DB_USER, DB_PASSWORD = "fer_dagster", "fer_dagster", "fer-dagster-secret"

pytestmark = [pytest.mark.timeout(300)]


def server_bindir() -> Path | None:
    """Newest /usr/lib/postgresql/<version>/bin with initdb + postgres, else the ones on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")],
                        reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        return Path(initdb).resolve().parent
    return None


BINDIR = server_bindir()
if BINDIR is None:  # a skip here, a failure (collection error) under CI=true
    why = INSTALL_NOTE.read_text().strip() if INSTALL_NOTE.exists() else "run `bash scripts/install_postgres.sh`"
    unavailable("the PostgreSQL test", f"server binaries (initdb, postgres) not found in "
                f"/usr/lib/postgresql/*/bin or on PATH ({why})", allow_module_level=True)

# psycopg2: dagster-postgres depends on psycopg2-binary.
import dagster as dg
import psycopg2
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecordStatus,
)

from fer_pipeline.definitions import defs


@dataclass
class PgCluster:
    """One throw-away PostgreSQL cluster under `base`, run as `account` (None: this user)."""

    bindir: Path
    base: Path
    account: pwd.struct_passwd | None
    port: int = 0
    server: ServerProcess | None = None

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def sockets(self) -> Path:
        return self.base / "sockets"

    def _as_account(self) -> dict[str, object]:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        return {"PATH": f"{self.bindir}:/usr/bin:/bin", "HOME": str(self.base), "LANG": "C", "LC_ALL": "C",
                "TZ": "UTC"}

    def initdb(self) -> None:
        self.sockets.mkdir()
        pwfile = self.base / "superuser-password"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if self.account is not None:
            for path in (self.base, self.sockets, pwfile):
                os.chown(path, self.account.pw_uid, self.account.pw_gid)
        result = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
             "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"],
            check=False, cwd=self.base, env=self._env(), capture_output=True, text=True, timeout=120,
            **self._as_account())
        assert result.returncode == 0, f"initdb failed:\n{result.stdout}\n{result.stderr}"

    def start(self) -> ServerProcess:
        """Start `postgres` on 127.0.0.1:<port> (a free one the first time) and wait until it
        accepts password logins over TCP."""
        assert self.server is None or not self.server.alive()
        for attempt in range(3):
            port = self.port or free_port()
            server = start_server(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-k", str(self.sockets),
                 "-h", LOOPBACK, "-p", str(port),
                 # a test cluster: durability off, small footprint
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=40", "-c", "shared_buffers=32MB", "-c", "logging_collector=off"],
                port=port, log=self.base / "postgres.log", name="postgres", env=self._env(), cwd=self.base,
                user=self.account.pw_uid if self.account else None,
                group=self.account.pw_gid if self.account else None)
            try:
                server.wait_until(lambda port=port: self._accepts(port), timeout=60)
            except BaseException as exc:
                server.stop()
                # it exited early: the port may have been taken between free_port() and bind()
                if self.port or attempt == 2 or not isinstance(exc, RuntimeError):
                    raise
                continue
            self.port, self.server = port, server
            return server
        raise AssertionError("unreachable")

    def _accepts(self, port: int) -> bool:
        try:
            psycopg2.connect(host=LOOPBACK, port=port, user=SUPERUSER, password=SUPERUSER_PASSWORD,
                             dbname="postgres", connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster's PID), then SIGKILL its group if needed."""
        if self.server is not None:
            code = self.server.stop(signal.SIGINT, timeout=30)
            assert code == 0, f"postgres did not shut down cleanly ({code}):\n{self.server.log_tail()}"

    def connect(self, dbname: str = "postgres", user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD):  # type: ignore[no-untyped-def]
        return psycopg2.connect(host=LOOPBACK, port=self.port, user=user, password=password, dbname=dbname,
                                connect_timeout=5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    assert BINDIR is not None
    account = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the package's system user
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            account = pwd.getpwnam("nobody")
    # Not under pytest's tmp_path: that is private to this user, and the server's user must
    # be able to reach its data directory.
    base = Path(tempfile.mkdtemp(prefix="fer-pg-"))
    pg = PgCluster(BINDIR, base, account)
    try:
        pg.initdb()
        pg.start()
        conn = pg.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {DB_USER} LOGIN PASSWORD %s", (DB_PASSWORD,))
            cur.execute(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
        conn.close()
        yield pg
    finally:
        try:
            if pg.server is not None:
                pg.server.stop(signal.SIGINT, timeout=30)
        finally:
            shutil.rmtree(base, ignore_errors=True)


@dataclass
class Persisted:
    run_id: str
    result: dg.ExecuteInProcessResult
    home: Path
    pids: tuple[int, int]
    instance: dg.DagsterInstance  # the fresh instance opened after the restart


@pytest.fixture(scope="module")
def persisted(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Persisted]:
    root = tmp_path_factory.mktemp("pg_data")
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 240, "seed": 3}]}))
    home = tmp_path_factory.mktemp("pg_dagster_home")
    config = yaml.safe_load((REPO / "fer_pipeline" / "instance" / "dagster.yaml").read_text()) or {}
    # The README's block, verbatim apart from the port (env too, since this cluster's is not 5432).
    # `scheme` names the driver dagster-postgres installs (psycopg2): SQLAlchemy 2.1 maps a bare
    # postgresql:// URL to psycopg 3, which is not installed.
    config["storage"] = {"postgres": {"postgres_db": {
        "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"},
        "db_name": {"env": "DAGSTER_PG_DB"}, "username": {"env": "DAGSTER_PG_USER"},
        "password": {"env": "DAGSTER_PG_PASSWORD"}, "scheme": "postgresql+psycopg2"}}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    mp = pytest.MonkeyPatch()
    try:
        for key, value in {"DAGSTER_HOME": str(home), "FER_DATA_DIR": str(root), "DAGSTER_PG_HOST": LOOPBACK,
                           "DAGSTER_PG_PORT": str(cluster.port), "DAGSTER_PG_DB": DB_NAME,
                           "DAGSTER_PG_USER": DB_USER, "DAGSTER_PG_PASSWORD": DB_PASSWORD}.items():
            mp.setenv(key, value)

        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            result = defs.resolve_job_def("data_pipeline").execute_in_process(instance=instance,
                                                                              raise_on_error=False)
            assert result.success, [e.message for e in result.all_events if e.is_failure]
        first_pid = cluster.server.pid  # type: ignore[union-attr]

        cluster.stop()
        cluster.start()
        with dg.DagsterInstance.get() as fresh:  # from $DAGSTER_HOME, as `dagster dev` would
            yield Persisted(result.run_id, result, home, (first_pid, cluster.server.pid), fresh)  # type: ignore[union-attr]
    finally:
        mp.undo()


def test_server_really_restarted(persisted: Persisted) -> None:
    before, after = persisted.pids
    assert before != after


def test_run_is_in_postgres_after_restart(persisted: Persisted) -> None:
    instance = persisted.instance
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    run = instance.get_run_by_id(persisted.run_id)
    assert run is not None, "the run is gone after the restart"
    assert run.job_name == "data_pipeline"
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert persisted.run_id in {r.run_id for r in instance.get_runs(dg.RunsFilter(job_name="data_pipeline"))}


def test_materializations_are_in_postgres_after_restart(persisted: Persisted) -> None:
    instance = persisted.instance
    for name in DATA_ASSETS:
        event = instance.get_latest_materialization_event(dg.AssetKey(name))
        assert event is not None, f"no materialization of {name} after the restart"
        assert event.run_id == persisted.run_id
    manifest = instance.get_latest_materialization_event(dg.AssetKey("manifest"))
    stored = manifest.asset_materialization.metadata  # type: ignore[union-attr]
    produced = next(e.materialization.metadata for e in persisted.result.get_asset_materialization_events()
                    if e.asset_key == dg.AssetKey("manifest"))
    assert stored.keys() == produced.keys() and stored


def test_check_results_are_in_postgres_after_restart(persisted: Persisted) -> None:
    instance = persisted.instance
    produced = {e.asset_check_key: e for e in persisted.result.get_asset_check_evaluations()}
    assert {k.name for k in produced} >= {"sources_have_images", "rejection_rate", "manifest_schema",
                                          "manifest_accounting", "split_folds", "split_no_group_leakage"}
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(list(produced))
    assert set(records) == set(produced), "check results missing after the restart"
    for key, record in records.items():
        assert record.run_id == persisted.run_id, key
        assert record.status == AssetCheckExecutionRecordStatus.SUCCEEDED, (key, record.status)
        evaluation = record.event.asset_check_evaluation if record.event else None
        assert evaluation is not None and evaluation.passed, key
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("manifest"), "manifest_schema"), limit=5)
    assert [r.run_id for r in history] == [persisted.run_id]


def test_rows_are_in_postgres_tables_and_nothing_in_sqlite(persisted: Persisted, cluster: PgCluster) -> None:
    conn = cluster.connect(DB_NAME, DB_USER, DB_PASSWORD)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_id = %s", (persisted.run_id,))
            assert cur.fetchall() == [("SUCCESS",)]
            cur.execute("SELECT count(DISTINCT asset_key) FROM event_logs "
                        "WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'", (persisted.run_id,))
            assert cur.fetchone() == (len(DATA_ASSETS),)
            cur.execute("SELECT check_name, execution_status FROM asset_check_executions WHERE run_id = %s",
                        (persisted.run_id,))
            rows = dict(cur.fetchall())
            assert rows and set(rows.values()) == {"SUCCEEDED"}, rows
            assert {"manifest_schema", "split_folds", "sources_have_images"} <= set(rows)
    finally:
        conn.close()
    sqlite = [p.relative_to(persisted.home) for p in persisted.home.rglob("*.db")]
    assert not sqlite, f"SQLite storage written to DAGSTER_HOME: {sqlite}"
