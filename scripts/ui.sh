#!/usr/bin/env bash
# The Dagster UI (webserver) and daemon (sensors, schedules, run queue) on a persistent,
# project-local instance.
#
#   scripts/ui.sh start     start in the background (own session), wait until it answers, print the URL
#   scripts/ui.sh stop      stop it: SIGTERM to its whole session, wait, SIGKILL what is left; no orphans
#   scripts/ui.sh status    running or not (exit 0 when running, 3 when not)
#   scripts/ui.sh restart   stop, then start
#   scripts/ui.sh run       in the foreground; Ctrl-C stops everything
#
# Environment: DAGSTER_HOME (default ./dagster_home; runs, check results, sensor cursors and
# schedules live there in SQLite, so they survive a restart), UI_HOST (127.0.0.1), UI_PORT (3000),
# UI_START_TIMEOUT (seconds to wait for the server, 240), FER_DATA_DIR and the FER_* switches of
# fer_pipeline/defs/automation.py, passed through to the code location.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
HOME_DIR="${DAGSTER_HOME:-$REPO/dagster_home}"
mkdir -p "$HOME_DIR"
export DAGSTER_HOME="$(cd "$HOME_DIR" && pwd)"  # Dagster wants an absolute path
export GX_ANALYTICS_ENABLED=false DAGSTER_DISABLE_TELEMETRY=1
HOST="${UI_HOST:-127.0.0.1}"
PORT="${UI_PORT:-3000}"
BIN="${VENV_BIN:-$REPO/.venv/bin}"
PY="$BIN/python"
PIDFILE="$DAGSTER_HOME/ui.pid"
LOG="$DAGSTER_HOME/ui.log"
URL="http://$HOST:$PORT"
TIMEOUT="${UI_START_TIMEOUT:-240}"

die() { echo "ui.sh: $*" >&2; exit 1; }

[ -x "$BIN/dagster" ] || die "$BIN/dagster not found: run 'make setup' first"
if [ ! -f "$DAGSTER_HOME/dagster.yaml" ]; then
    cp "$REPO/fer_pipeline/instance/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"
fi

# PIDs of the live processes in session $1 (from /proc: no procps needed); with a second
# argument, only those outside process group $2.
session_pids() {
    local sid="$1" not_group="${2:-}" d stat rest state pgrp session
    for d in /proc/[0-9]*; do
        stat="$(cat "$d/stat" 2>/dev/null)" || continue
        rest="${stat##*) }"  # fields after "pid (comm) ": state ppid pgrp session ...
        read -r state _ pgrp session _ <<<"$rest"
        [ "$session" = "$sid" ] && [ "$state" != "Z" ] || continue
        [ -n "$not_group" ] && [ "$pgrp" = "$not_group" ] && continue
        echo "${d#/proc/}"
    done
    return 0
}

is_ours() {  # $1 pid: alive and a dagster process (not a recycled PID)
    [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q dagster
}

running_pid() {  # the leader's PID when our server is running, else nothing
    local pid
    [ -f "$PIDFILE" ] || return 0
    pid="$(head -n1 "$PIDFILE" 2>/dev/null | tr -dc '0-9')"
    if [ -n "$pid" ] && is_ours "$pid"; then echo "$pid"; fi
}

answers() {  # the webserver answers /server_info
    "$PY" - "$URL/server_info" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

start() {
    local pid waited=0
    pid="$(running_pid)"
    if [ -n "$pid" ]; then
        echo "Dagster UI already running (pid $pid): $URL"
        return 0
    fi
    rm -f "$PIDFILE"
    if answers; then die "something already answers on $URL: choose another UI_PORT"; fi
    echo "--- $(date -Is) starting dagster dev on $URL (DAGSTER_HOME=$DAGSTER_HOME)" >>"$LOG"
    # New session (so stop can signal every process it starts, and a closing terminal does not
    # kill it) with default signal handling (a plain '&' would leave SIGINT ignored, and dagster
    # dev maps SIGTERM onto SIGINT's handler, so it would ignore both).
    pid="$("$PY" - "$LOG" "$BIN/dagster" dev -h "$HOST" -p "$PORT" -w "$REPO/workspace.yaml" <<'EOF'
import signal, subprocess, sys

def default_signals():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)

log = open(sys.argv[1], "ab")
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True, preexec_fn=default_signals, close_fds=True)
print(proc.pid)
EOF
)"
    echo "$pid" >"$PIDFILE"
    printf 'Starting the Dagster UI (pid %s, log %s) ' "$pid" "$LOG"
    until answers; do
        if ! is_ours "$pid"; then
            echo
            tail -n 20 "$LOG" >&2
            rm -f "$PIDFILE"
            die "dagster dev exited during start-up (log above: $LOG)"
        fi
        if [ "$waited" -ge "$TIMEOUT" ]; then
            echo
            tail -n 20 "$LOG" >&2
            stop >/dev/null
            die "no answer from $URL/server_info after ${TIMEOUT}s (log: $LOG)"
        fi
        sleep 1
        waited=$((waited + 1))
        printf '.'
    done
    echo
    echo "Dagster UI: $URL   (stop with 'make ui-stop' or 'scripts/ui.sh stop')"
}

stop() {
    local pid left waited=0
    pid="$(running_pid)"
    if [ -z "$pid" ]; then
        rm -f "$PIDFILE"
        echo "Dagster UI not running"
        return 0
    fi
    # the leader started its own session (start), or runs in the foreground (run): signal the
    # session's processes, or the leader alone, which then stops its webserver and daemon
    local sid
    sid="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $4}')" || sid=""
    if [ "$sid" = "$pid" ]; then
        kill -TERM -- "-$pid" 2>/dev/null || true  # once: a second signal would cut dagster dev's own shutdown short
        # processes of the session that left the process group get it too
        for left in $(session_pids "$pid" "$pid"); do kill -TERM "$left" 2>/dev/null || true; done
    else
        kill -TERM "$pid" 2>/dev/null || true
    fi
    printf 'Stopping the Dagster UI (pid %s) ' "$pid"
    local orphaned=0
    while :; do
        if [ "$sid" = "$pid" ]; then left="$(session_pids "$pid")"; else left="$(is_ours "$pid" && echo "$pid" || true)"; fi
        [ -z "$left" ] && break
        # dagster dev waits for its webserver and daemon; a code server still loading code may only
        # notice its parent is gone at its heartbeat timeout (30 s): 5 s after dagster dev has
        # exited, or 30 s in all, what is left is killed
        if [ -d "/proc/$pid" ] && is_ours "$pid"; then orphaned=0; else orphaned=$((orphaned + 1)); fi
        if [ "$waited" -ge 30 ] || [ "$orphaned" -ge 5 ]; then
            printf ' forcing'
            for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
            sleep 1
            break
        fi
        sleep 1
        waited=$((waited + 1))
        printf '.'
    done
    rm -f "$PIDFILE"
    echo " stopped"
}

status() {
    local pid
    pid="$(running_pid)"
    if [ -n "$pid" ]; then
        if answers; then echo "Dagster UI running (pid $pid): $URL"; else echo "Dagster UI starting (pid $pid): $URL"; fi
        return 0
    fi
    echo "Dagster UI not running"
    return 3
}

run() {
    local pid
    pid="$(running_pid)"
    [ -z "$pid" ] || die "already running in the background (pid $pid): 'scripts/ui.sh stop' first"
    echo "$$" >"$PIDFILE"  # exec keeps this PID: 'scripts/ui.sh stop' from another shell works too
    echo "Dagster UI on $URL (DAGSTER_HOME=$DAGSTER_HOME); Ctrl-C stops it"
    trap - INT TERM
    exec "$BIN/dagster" dev -h "$HOST" -p "$PORT" -w "$REPO/workspace.yaml"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    run) run ;;
    *) echo "usage: $0 start|stop|status|restart|run" >&2; exit 2 ;;
esac
