"""The skip-or-fail decision for a missing server or tool (`servers.unavailable`): a skip on a
developer's machine, a failure under ``CI=true``, so CI cannot pass with the PostgreSQL, browser
or documentation tests silently skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from fer_pipeline_tests.servers import in_ci, require_executables, unavailable


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                                 ("", False), ("false", False), ("0", False)])
def test_in_ci_reads_the_ci_variable(value: str, expected: bool) -> None:
    assert in_ci({"CI": value}) is expected
    assert in_ci({}) is False


def test_a_missing_binary_fails_under_ci(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "initdb"
    with pytest.raises(pytest.fail.Exception, match=r"CI=true but the PostgreSQL test cannot run: .*no-such-dir/initdb"):
        require_executables("the PostgreSQL test", [missing], "run scripts/install_postgres.sh",
                            environ={"CI": "true"})


def test_a_missing_binary_skips_outside_ci(tmp_path: Path) -> None:
    missing = tmp_path / "chromium"
    with pytest.raises(pytest.skip.Exception, match="the browser test cannot run: .*chromium"):
        require_executables("the browser test", [missing], "run scripts/install_browser.sh", environ={"CI": "false"})


def test_a_non_executable_file_counts_as_missing(tmp_path: Path) -> None:
    plain = tmp_path / "postgres"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(pytest.fail.Exception):
        require_executables("the PostgreSQL test", [plain], "hint", environ={"CI": "1"})
    plain.chmod(0o755)
    require_executables("the PostgreSQL test", [plain], "hint", environ={"CI": "1"})  # present: returns


def test_unavailable_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        unavailable("the documentation build", "mkdocs is not installed")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        unavailable("the documentation build", "mkdocs is not installed")
