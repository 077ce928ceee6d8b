"""Test helper: run a server on a free loopback port in its own process group, stop it by PID.

`start_server` starts the command in a new session (so its process group id is its PID and
nothing it spawns joins pytest's group), with stdout and stderr going to a log file.
`ServerProcess.stop` signals that PID, waits, and then kills whatever is left of the group,
so a test never leaves a server behind, whatever happened in between. Every started server is
also stopped at interpreter exit, as a last resort.

`unavailable` is the one skip-or-fail decision for a server or tool a test needs but cannot find
(PostgreSQL, Chromium, MkDocs): a skip with the reason on a developer's machine, a failure under
``CI=true``, because CI promises that those tests ran.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

LOOPBACK = "127.0.0.1"
_RUNNING: dict[int, ServerProcess] = {}


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this run is CI (``CI`` set to 1/true/yes, as CI services and `.ci/run` set it)."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() in ("1", "true", "yes")


def unavailable(what: str, reason: str, *, environ: Mapping[str, str] | None = None,
                allow_module_level: bool = False) -> NoReturn:
    """Skip the test because `what` cannot run here, or fail it under ``CI=true``.

    Why one helper: a skipped server test looks green, so CI, which installs every server
    (`make test` runs scripts/install_browser.sh and scripts/install_postgres.sh), must turn a
    missing one into a failure, and every test must decide that the same way."""
    if in_ci(environ):
        pytest.fail(f"CI=true but {what} cannot run: {reason}", pytrace=False)
    pytest.skip(f"{what} cannot run: {reason}", allow_module_level=allow_module_level)


def require_executables(what: str, paths: Sequence[Path], hint: str, *,
                        environ: Mapping[str, str] | None = None, allow_module_level: bool = False) -> None:
    """Return if every path is an executable file; else :func:`unavailable` naming the missing ones."""
    missing = [str(p) for p in paths if not (Path(p).is_file() and os.access(p, os.X_OK))]
    if missing:
        unavailable(what, f"{', '.join(missing)} not found ({hint})", environ=environ,
                    allow_module_level=allow_module_level)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    name: str = "server"
    _log_file: object = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout: float = 30, every: float = 0.2) -> None:
        """Poll `ready()` until it is true; fail at once, with the log, if the server exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} (pid {self.pid}) exited with {self.proc.returncode} "
                                   f"before it was ready; log {self.log}:\n{self.log_tail()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} (pid {self.pid}) not ready after {timeout:.0f}s; "
                                   f"log {self.log}:\n{self.log_tail()}")
            time.sleep(every)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Send `sig` to the server's PID, wait up to `timeout` s, then SIGKILL its process group.

        Returns the exit status (None if it had to be killed). Safe to call twice."""
        code: int | None = None
        try:
            if self.alive():
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    code = self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    code = None
            else:
                code = self.proc.returncode
            # The group id is the server's PID (new session): kill any child it left behind.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is None:
                self.proc.wait(timeout=10)
        finally:
            _RUNNING.pop(self.pid, None)
            if self._log_file is not None:
                self._log_file.close()  # type: ignore[attr-defined]
                self._log_file = None
        return code


def accepts_connections(port: int, host: str = LOOPBACK) -> bool:
    """Whether something listens on ``host:port`` (a server's readiness probe for ``wait_until``)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_server(cmd: Sequence[str], *, port: int, log: Path, name: str = "server",
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 user: int | str | None = None, group: int | str | None = None) -> ServerProcess:
    """Start `cmd` in its own session/process group; output is appended to `log`.

    `user`/`group` run it as another account (only possible as root), with no supplementary
    groups."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - closed by ServerProcess.stop
    extra: dict[str, object] = {}
    if user is not None:
        extra = {"user": user, "group": group, "extra_groups": []}
    try:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, cwd=cwd,
                                start_new_session=True, **extra)  # type: ignore[call-overload]
    except BaseException:
        out.close()
        raise
    server = ServerProcess(proc=proc, port=port, log=log, name=name, _log_file=out)
    _RUNNING[proc.pid] = server
    return server


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING.values()):
        server.stop(signal.SIGTERM, timeout=5)
