#!/usr/bin/env bash
# Install what the local Vigil stack needs. Idempotent; quiet on success, loud on failure.
#
#   * rabbitmq-server (Debian package) if /usr/lib/rabbitmq/bin/rabbitmq-server is missing;
#     the package's own service is kept from starting/running (scripts/stack.py runs our node)
#   * PostgreSQL server binaries if /usr/lib/postgresql/*/bin/initdb is missing
#   * prometheus (Debian package: the `prometheus` and `promtool` binaries, used by
#     tests/integration/test_compose.py and test_prometheus.py) if either is missing; the
#     package's own service is kept from starting/running, like rabbitmq-server's
#   * .venv (python3.11, or python3 >= 3.11) and `pip install -e '.[dev]'` whenever
#     pyproject.toml is newer than .venv/.installed
#
# VIGIL_VERBOSE=1 shows what is being done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

LOG="$(mktemp "${TMPDIR:-/tmp}/vigil-install.XXXXXX")"
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_OURS=0

cleanup() {
    local rc=$?
    if [ "$POLICY_RC_OURS" = 1 ]; then
        rm -f "$POLICY_RC"
    fi
    if [ "$rc" != 0 ]; then
        {
            printf 'vigil: install FAILED (exit %s). Output of the failing step:\n' "$rc"
            printf -- '-----\n'
            tail -n 80 "$LOG"
            printf -- '-----\n'
        } >&2
    fi
    rm -f "$LOG"
    exit "$rc"
}
trap cleanup EXIT

note() {
    printf 'vigil: %s\n' "$*" >>"$LOG"
    if [ "${VIGIL_VERBOSE:-0}" = 1 ]; then printf 'vigil: %s\n' "$*"; fi
}
fail() { printf 'vigil: ERROR: %s\n' "$*" >>"$LOG"; exit 1; }

# Run a command with its output captured in $LOG (shown only on failure).
run() {
    printf '$ %s\n' "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
}

SUDO=()
as_root() {
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || fail "need root (or sudo) to install system packages: $*"
        SUDO=(sudo -n)
    fi
    run "${SUDO[@]}" "$@"
}

APT_UPDATED=0
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" = 0 ]; then
        note "apt-get update"
        as_root apt-get update -q || fail "apt-get update failed"
        APT_UPDATED=1
    fi
    note "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" \
        || fail "apt-get install $* failed"
}

# Keep Debian maintainer scripts from starting services while we install (Docker-style
# policy-rc.d). An existing policy file is left alone.
block_service_start() {
    if [ ! -e "$POLICY_RC" ] && [ "$(id -u)" = 0 ]; then
        printf '#!/bin/sh\n# temporary, written by vigil scripts/install.sh\nexit 101\n' >"$POLICY_RC"
        chmod 0755 "$POLICY_RC"
        POLICY_RC_OURS=1
    fi
}
unblock_service_start() {
    if [ "$POLICY_RC_OURS" = 1 ]; then
        rm -f "$POLICY_RC"
        POLICY_RC_OURS=0
    fi
}

# The Debian package's node (user rabbitmq, node rabbit@<host>) must not run or hold our
# ports: disable the service and stop it if something started it anyway.
# shellcheck disable=SC2086 # $pids is a whitespace-separated list of pids
neutralize_debian_rabbitmq() {
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable --now rabbitmq-server.service || true
    elif command -v update-rc.d >/dev/null 2>&1; then
        as_root update-rc.d rabbitmq-server disable || true
    fi
    local pids
    pids="$(pgrep -u rabbitmq -f beam 2>/dev/null || true)"
    if [ -n "$pids" ]; then
        note "stopping the Debian rabbitmq-server node (pids: $pids)"
        as_root timeout 60 /usr/sbin/rabbitmqctl stop || as_root kill -TERM $pids || true
        local deadline=$(( $(date +%s) + 30 ))
        while [ -n "$(pgrep -u rabbitmq -f beam 2>/dev/null || true)" ] && [ "$(date +%s)" -lt "$deadline" ]; do
            sleep 0.5
        done
        pids="$(pgrep -u rabbitmq -f beam 2>/dev/null || true)"
        [ -z "$pids" ] || as_root kill -KILL $pids || true
    fi
}

# The Debian package's prometheus service (user prometheus, port 9090, data in
# /var/lib/prometheus) must not run: the tests start their own prometheus processes.
# shellcheck disable=SC2086 # $pids is a whitespace-separated list of pids
neutralize_debian_prometheus() {
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable --now prometheus.service || true
    elif command -v update-rc.d >/dev/null 2>&1; then
        as_root update-rc.d prometheus disable || true
    fi
    local pids
    pids="$(pgrep -u prometheus -x prometheus 2>/dev/null || true)"
    if [ -n "$pids" ]; then
        note "stopping the Debian prometheus service (pids: $pids)"
        as_root kill -TERM $pids || true
        local deadline=$(( $(date +%s) + 30 ))
        while [ -n "$(pgrep -u prometheus -x prometheus 2>/dev/null || true)" ] && [ "$(date +%s)" -lt "$deadline" ]; do
            sleep 0.5
        done
        pids="$(pgrep -u prometheus -x prometheus 2>/dev/null || true)"
        [ -z "$pids" ] || as_root kill -KILL $pids || true
    fi
}

install_system_packages() {
    local pkgs=() need_rabbit=0 need_prometheus=0
    if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        pkgs+=(rabbitmq-server)
        need_rabbit=1
    fi
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        pkgs+=(postgresql)
    fi
    if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
        pkgs+=(prometheus)
        need_prometheus=1
    fi
    command -v curl >/dev/null 2>&1 || pkgs+=(curl ca-certificates)
    command -v flock >/dev/null 2>&1 || pkgs+=(util-linux)
    command -v ss >/dev/null 2>&1 || pkgs+=(iproute2)
    command -v pgrep >/dev/null 2>&1 || pkgs+=(procps)
    [ ${#pkgs[@]} -gt 0 ] || return 0

    block_service_start
    apt_install "${pkgs[@]}"
    unblock_service_start
    if [ "$need_rabbit" = 1 ]; then
        neutralize_debian_rabbitmq
        [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] \
            || fail "rabbitmq-server installed but /usr/lib/rabbitmq/bin/rabbitmq-server is missing"
    fi
    if [ "$need_prometheus" = 1 ]; then
        neutralize_debian_prometheus
        command -v promtool >/dev/null 2>&1 \
            || fail "prometheus installed but promtool is not on PATH"
        command -v prometheus >/dev/null 2>&1 \
            || fail "prometheus installed but the prometheus binary is not on PATH"
    fi
}

pick_python() {
    local c
    for c in python3.11 python3; do
        if command -v "$c" >/dev/null 2>&1 \
            && "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    local venv="$ROOT/.venv" stamp="$ROOT/.venv/.installed" py
    if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
        note "existing .venv is broken, recreating it"
        rm -rf "$venv"
    fi
    if [ ! -x "$venv/bin/python" ]; then
        py="$(pick_python)" || fail "need python3.11 (or python3 >= 3.11) on PATH"
        note "creating .venv with $py"
        if ! run "$py" -m venv "$venv"; then
            # Debian's system python needs the venv package for ensurepip.
            case "$py" in
                /usr/bin/*)
                    rm -rf "$venv"
                    apt_install python3-venv
                    run "$py" -m venv "$venv" || fail "python -m venv failed"
                    ;;
                *) fail "python -m venv failed" ;;
            esac
        fi
        rm -f "$stamp"
    fi
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        note "pip install -e '.[dev]'"
        run "$venv/bin/python" -m pip install --disable-pip-version-check -q -e "${ROOT}[dev]" \
            || fail "pip install -e '.[dev]' failed"
        touch "$stamp"
    fi
}

install_system_packages
ensure_venv
