#!/usr/bin/env bash
# Local Vigil stack: PostgreSQL + RabbitMQ as plain processes (no Docker).
#
#   scripts/stack.sh up     [postgres|rabbitmq]...  start (idempotent), provision roles/users
#   scripts/stack.sh down   [postgres|rabbitmq]...  stop what `up` started; data is kept
#   scripts/stack.sh status                         one line per server (exit 3 if one is down)
#   scripts/stack.sh env                            `export VIGIL_...=...` connection settings
#   scripts/stack.sh clean                          down + delete all local data
#   scripts/stack.sh psql [args]                    psql as the vigil role
#   scripts/stack.sh rabbitmqctl [args]             rabbitmqctl against the local node
#
# Everything lives in .vigil/ at the repo root (git-ignored). Every listener binds to
# 127.0.0.1. This file is the single source of truth for the servers' settings; the
# Makefile exports `scripts/stack.sh env` into the test/demo/bench processes.
#
# Settings (environment, with defaults):
#   VIGIL_DB_PORT=55432  VIGIL_DB_USER=vigil  VIGIL_DB_PASSWORD=vigil  VIGIL_DB_NAME=vigil
#   VIGIL_AMQP_PORT=5672  (vhost: vigil)
#   VIGIL_AMQP_ADMIN_USER=vigil-admin  VIGIL_AMQP_ADMIN_PASSWORD=vigil-admin
#   VIGIL_AMQP_EXECUTOR_USER=vigil-executor  VIGIL_AMQP_EXECUTOR_PASSWORD=vigil-executor
#   VIGIL_AMQP_WORKER_USER=vigil-worker  VIGIL_AMQP_WORKER_PASSWORD=vigil-worker
#   (this script creates the administrator; `vigil broker setup`, run by `make up`,
#   creates the executor and worker users with their permissions: common/broker_access.py)
#   VIGIL_AMQP_MANAGEMENT_PORT=15672  VIGIL_RABBITMQ_PROMETHEUS_PORT=15692
#   VIGIL_RABBITMQ_DIST_PORT=25672  ERL_EPMD_PORT=4369  RABBITMQ_NODENAME=vigil@localhost
#   VIGIL_STACK_TIMEOUT=60 (seconds per server)  VIGIL_PG_OS_USER=postgres (when run as root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
STATE="$ROOT/.vigil"

# ----------------------------------------------------------------------------- settings
VIGIL_DB_HOST=127.0.0.1
: "${VIGIL_DB_PORT:=55432}"
: "${VIGIL_DB_USER:=vigil}"
: "${VIGIL_DB_PASSWORD:=vigil}"
: "${VIGIL_DB_NAME:=vigil}"

VIGIL_AMQP_HOST=127.0.0.1
VIGIL_AMQP_VHOST=vigil
: "${VIGIL_AMQP_PORT:=5672}"
: "${VIGIL_AMQP_EXECUTOR_USER:=vigil-executor}"
: "${VIGIL_AMQP_EXECUTOR_PASSWORD:=vigil-executor}"
: "${VIGIL_AMQP_WORKER_USER:=vigil-worker}"
: "${VIGIL_AMQP_WORKER_PASSWORD:=vigil-worker}"
: "${VIGIL_AMQP_ADMIN_USER:=vigil-admin}"
: "${VIGIL_AMQP_ADMIN_PASSWORD:=vigil-admin}"
: "${VIGIL_AMQP_MANAGEMENT_PORT:=15672}"
: "${VIGIL_RABBITMQ_PROMETHEUS_PORT:=15692}"
: "${VIGIL_RABBITMQ_DIST_PORT:=25672}"
: "${ERL_EPMD_PORT:=4369}"
: "${RABBITMQ_NODENAME:=vigil@localhost}"
: "${VIGIL_STACK_TIMEOUT:=60}"

RMQ_PREFIX="${VIGIL_RABBITMQ_PREFIX:-/usr/lib/rabbitmq}"
RMQ_BASE="$STATE/rabbitmq"
RMQ_LOG_DIR="$RMQ_BASE/log"
RMQ_LOG="$RMQ_LOG_DIR/rabbit.log"
RMQ_CONSOLE="$RMQ_LOG_DIR/console.out"
RMQ_PID_FILE="$RMQ_BASE/rabbitmq.pid"
RMQ_LAUNCHER_PID_FILE="$RMQ_BASE/launcher.pid"
RMQ_EPMD_MARK="$RMQ_BASE/epmd.started-by-vigil"
MGMT_URL="http://127.0.0.1:${VIGIL_AMQP_MANAGEMENT_PORT}"

# ----------------------------------------------------------------------------- helpers
say() { printf 'vigil: %s\n' "$*"; }
warn() { printf 'vigil: %s\n' "$*" >&2; }
die() { printf 'vigil: ERROR: %s\n' "$*" >&2; exit 1; }
rel() { local p="$1"; printf '%s' "${p#"$ROOT"/}"; }

now() { printf '%s' "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# $1: deadline as epoch seconds (integer)
before() { [ "$(date +%s)" -lt "$1" ]; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Zombies count as dead (in containers PID 1 may never reap orphans).
pid_alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null \
        && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

read_pid() { [ -s "$1" ] && head -n1 "$1" | tr -dc '0-9' || true; }

file_size() { if [ -f "$1" ]; then stat -c %s "$1"; else echo 0; fi; }

# Show what a server wrote to $2 since byte offset $3: its first error lines (the cause is
# usually near the top of a boot failure) and its last lines.
show_log_tail() { # $1 label, $2 file, [$3 offset]
    local f="$2" off="${3:-0}" new errs
    [ -s "$f" ] || return 0
    new="$(tail -c +"$((off + 1))" "$f")"
    if [ -z "$new" ]; then
        printf -- '----- %s: nothing new in %s -----\n' "$1" "$(rel "$f")" >&2
        return 0
    fi
    errs="$(grep -m 25 -E '\[(error|critical|alert|emergency)\]|BOOT FAILED|FATAL|PANIC|ERROR:' <<<"$new" || true)"
    if [ -n "$errs" ]; then
        printf -- '----- first error lines of %s (%s) -----\n%s\n' "$(rel "$f")" "$1" "$errs" >&2
    fi
    printf -- '----- last 30 lines of %s (%s) -----\n' "$(rel "$f")" "$1" >&2
    tail -n 30 <<<"$new" >&2
    printf -- '----- end of %s -----\n' "$(rel "$f")" >&2
}

urlencode() { # percent-encodes bytes (LC_ALL=C) for use in URLs
    local LC_ALL=C s="$1" out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in
            [a-zA-Z0-9._~-]) out+="$c" ;;
            *) out+="$(printf '%%%02X' "'$c")" ;;
        esac
    done
    printf '%s' "$out"
}

json_str() {
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$s"
}

lock_state() {
    mkdir -p "$STATE"
    chmod 0755 "$STATE"
    exec 9>"$STATE/stack.lock"
    flock -w 120 9 || die "another scripts/stack.sh is running (lock $(rel "$STATE/stack.lock"))"
}

# ----------------------------------------------------------------------------- postgres
find_pg_bin() {
    if [ -n "${VIGIL_PG_BIN:-}" ]; then
        PG_BIN="$VIGIL_PG_BIN"
    elif [ -x /usr/lib/postgresql/15/bin/initdb ]; then
        PG_BIN=/usr/lib/postgresql/15/bin
    else
        PG_BIN="$(printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -V | tail -n1 || true)"
    fi
    [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] \
        || die "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin); run scripts/install.sh"
}

# Postgres refuses to run as root: as root we run it as an unprivileged OS user.
pg_setup_user() {
    if [ "$(id -u)" = 0 ]; then
        PG_OS_USER="${VIGIL_PG_OS_USER:-postgres}"
        if ! id -u "$PG_OS_USER" >/dev/null 2>&1 && [ "${PG_CREATE_USER:-0}" = 1 ]; then
            say "postgres: creating system user $PG_OS_USER"
            useradd --system --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin "$PG_OS_USER" \
                || die "could not create system user $PG_OS_USER"
        fi
    else
        PG_OS_USER="$(id -un)"
    fi
}

as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$PG_OS_USER" -- "$@"
    else
        "$@"
    fi
}

# Decide where the cluster lives: .vigil/postgres if the postgres OS user can reach it and
# the socket path fits in sun_path (107 bytes), otherwise /tmp/vigil-<hash of repo path>.
pg_layout() {
    find_pg_bin
    pg_setup_user
    PG_SUPERUSER="$PG_OS_USER"
    local preferred="$STATE/postgres" fallback reason=""
    fallback="/tmp/vigil-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)/postgres"
    PG_AREA="$preferred"
    if [ -s "$fallback/data/PG_VERSION" ] && [ ! -s "$preferred/data/PG_VERSION" ]; then
        PG_AREA="$fallback"
        reason="existing cluster there"
    elif [ $(( ${#preferred} + 25 )) -gt 107 ]; then
        PG_AREA="$fallback"
        reason="socket path under $(rel "$preferred") would be too long"
    elif [ "$(id -u)" = 0 ] && [ -d "$STATE" ] && ! as_pg test -x "$STATE"; then
        PG_AREA="$fallback"
        reason="user $PG_OS_USER cannot traverse every parent directory of $STATE"
    fi
    PGDATA="$PG_AREA/data"
    PG_SOCK="$PG_AREA/run"
    PG_LOG="$PG_AREA/postgres.log"
    PG_FALLBACK_REASON="$reason"
}

pg_prepare_area() {
    if [ -n "$PG_FALLBACK_REASON" ]; then
        say "postgres: using $PG_AREA ($PG_FALLBACK_REASON)"
        mkdir -p "$(dirname "$PG_AREA")"
        chmod 0755 "$(dirname "$PG_AREA")"
    fi
    mkdir -p "$PG_AREA" "$PG_SOCK"
    if [ "$(id -u)" = 0 ]; then
        chown "$PG_OS_USER:" "$PG_AREA" "$PG_SOCK"
        if [ -d "$PGDATA" ] && [ "$(stat -c %U "$PGDATA")" != "$PG_OS_USER" ]; then
            chown -R "$PG_OS_USER:" "$PGDATA"
        fi
    fi
    chmod 0700 "$PG_AREA" "$PG_SOCK"
    touch "$PG_LOG" 2>/dev/null || true
    [ "$(id -u)" = 0 ] && chown "$PG_OS_USER:" "$PG_LOG"
    return 0
}

pg_pid() { read_pid "$PGDATA/postmaster.pid"; }

# A live postgres process whose pid is in postmaster.pid. (Not `pg_ctl status`: it, like
# postgres' own lock-file check, takes a zombie for a live server, and in containers whose
# PID 1 never reaps orphans a kill -9'd postmaster stays a zombie.)
pg_pid_is_postgres() {
    pid_alive "$1" && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = postgres ]
}
pg_running() {
    [ -s "$PGDATA/PG_VERSION" ] || return 1
    local pid; pid="$(pg_pid)"
    [ -n "$pid" ] && pg_pid_is_postgres "$pid"
}

# After a crash (kill -9), lock files naming a dead or zombie pid would make postgres
# refuse to start; remove them.
pg_clear_stale_locks() {
    local f pid
    for f in "$PGDATA/postmaster.pid" "$PG_SOCK"/.s.PGSQL.*.lock; do
        [ -f "$f" ] || continue
        pid="$(read_pid "$f")"
        if [ -z "$pid" ] || ! pg_pid_is_postgres "$pid"; then
            say "postgres: removing stale $(rel "$f") (pid ${pid:-?} is gone)"
            rm -f "$f"
        fi
    done
}

pg_conf_quote() { printf "'%s'" "${1//\'/\'\'}"; }

pg_write_conf() {
    # Regenerated on every `up` so port changes apply; included from postgresql.conf.
    cat >"$PGDATA/vigil.conf" <<EOF
# Generated by scripts/stack.sh on every \`up\` -- edit the script, not this file.
listen_addresses = '127.0.0.1'
port = ${VIGIL_DB_PORT}
unix_socket_directories = $(pg_conf_quote "$PG_SOCK")
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
EOF
    cat >"$PGDATA/pg_hba.conf" <<EOF
# Generated by scripts/stack.sh. Unix socket (0700 dir inside the data area): trust for
# local administration. TCP: loopback only, passwords required.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   scram-sha-256
EOF
    if ! grep -q "^include_if_exists = 'vigil.conf'" "$PGDATA/postgresql.conf"; then
        printf "\n# Vigil local stack settings\ninclude_if_exists = 'vigil.conf'\n" >>"$PGDATA/postgresql.conf"
    fi
    if [ "$(id -u)" = 0 ]; then
        chown "$PG_OS_USER:" "$PGDATA/vigil.conf" "$PGDATA/pg_hba.conf"
    fi
    chmod 0600 "$PGDATA/vigil.conf" "$PGDATA/pg_hba.conf"
}

pg_initdb() {
    # A data dir without PG_VERSION is a failed/partial initdb: start over.
    [ -d "$PGDATA" ] && rm -rf "$PGDATA"
    say "postgres: initdb $(rel "$PGDATA") (superuser role: $PG_SUPERUSER)"
    if ! (cd "$PG_AREA" && as_pg "$PG_BIN/initdb" -D "$PGDATA" -U "$PG_SUPERUSER" \
        --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-locale --no-sync \
        >"$PG_AREA/initdb.log" 2>&1); then
        show_log_tail initdb "$PG_AREA/initdb.log"
        die "postgres: initdb failed"
    fi
}

psql_admin() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$VIGIL_DB_PORT" \
        -U "$PG_SUPERUSER" -d postgres "$@"
}

pg_provision() {
    [ "$VIGIL_DB_USER" != "$PG_SUPERUSER" ] \
        || die "VIGIL_DB_USER must not be the bootstrap superuser ($PG_SUPERUSER)"
    local out
    if ! out="$(psql_admin -v "db_user=$VIGIL_DB_USER" -v "db_password=$VIGIL_DB_PASSWORD" \
        -v "db_name=$VIGIL_DB_NAME" 2>&1 <<'SQL'
SELECT format('CREATE ROLE %I', :'db_user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'db_user') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER CREATEDB NOCREATEROLE PASSWORD %L',
              :'db_user', :'db_password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db_name', :'db_user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db_name') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db_name', :'db_user') \gexec
SQL
    )"; then
        printf '%s\n' "$out" >&2
        die "postgres: could not provision role/database"
    fi
}

pg_up() {
    local t0; t0="$(now)"
    PG_CREATE_USER=1 pg_layout
    pg_prepare_area
    if pg_running; then
        pg_write_conf
        say "postgres: already running (pid $(pg_pid)) on 127.0.0.1:${VIGIL_DB_PORT}"
    else
        [ -s "$PGDATA/PG_VERSION" ] || pg_initdb
        pg_clear_stale_locks
        pg_write_conf
        if port_open "$VIGIL_DB_PORT"; then
            die "postgres: port 127.0.0.1:${VIGIL_DB_PORT} is already in use by another process (set VIGIL_DB_PORT)"
        fi
        say "postgres: starting on 127.0.0.1:${VIGIL_DB_PORT} (data $(rel "$PGDATA"))"
        printf '\n===== %s vigil stack.sh up =====\n' "$(date -u +%FT%TZ)" >>"$PG_LOG"
        local log_off; log_off="$(file_size "$PG_LOG")"
        # 9>&-: the server must not inherit (and hold) the stack lock.
        if ! (cd "$PG_AREA" && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -w \
            -t "$VIGIL_STACK_TIMEOUT" start >/dev/null 2>&1 9>&-); then
            (cd / && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 10 stop >/dev/null 2>&1) || true
            show_log_tail postgres "$PG_LOG" "$log_off"
            die "postgres: did not come up within ${VIGIL_STACK_TIMEOUT}s"
        fi
    fi
    pg_provision
    say "postgres: ready (pid $(pg_pid)) postgresql://${VIGIL_DB_USER}@127.0.0.1:${VIGIL_DB_PORT}/${VIGIL_DB_NAME} [$(elapsed "$t0")]"
}

pg_down() {
    pg_layout
    if ! pg_running; then
        say "postgres: not running"
        return 0
    fi
    local pid; pid="$(pg_pid)"
    say "postgres: stopping (pid $pid)"
    if ! (cd / && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t "$VIGIL_STACK_TIMEOUT" stop >/dev/null 2>&1); then
        warn "postgres: fast shutdown timed out, using immediate"
        (cd / && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 10 stop >/dev/null 2>&1) || true
    fi
    say "postgres: stopped"
}

pg_status() {
    pg_layout
    if pg_running; then
        local ok="accepting TCP"; port_open "$VIGIL_DB_PORT" || ok="NOT accepting TCP"
        say "postgres: running (pid $(pg_pid)) 127.0.0.1:${VIGIL_DB_PORT} ${ok}, data $(rel "$PGDATA")"
    elif [ -s "$PGDATA/PG_VERSION" ]; then
        say "postgres: stopped (data $(rel "$PGDATA"))"
        return 3
    else
        say "postgres: not initialized"
        return 3
    fi
}

# ----------------------------------------------------------------------------- rabbitmq
rmq_check_installed() {
    [ -x "$RMQ_PREFIX/bin/rabbitmq-server" ] && [ -x "$RMQ_PREFIX/bin/rabbitmqctl" ] \
        || die "RabbitMQ not found in $RMQ_PREFIX/bin; run scripts/install.sh"
}

# Environment for rabbitmq-server and rabbitmqctl (they must agree on node name, HOME
# for the Erlang cookie, and the epmd port). Nothing is read from /etc/rabbitmq.
rmq_export() {
    export HOME="$RMQ_BASE/home"
    export RABBITMQ_NODENAME
    export RABBITMQ_CONF_ENV_FILE="$RMQ_BASE/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$RMQ_BASE/rabbitmq.conf"
    export RABBITMQ_CONFIG_FILES="$RMQ_BASE/conf.d"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_BASE/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_BASE/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$RMQ_BASE/mnesia"
    export RABBITMQ_LOG_BASE="$RMQ_LOG_DIR"
    export RABBITMQ_LOGS="$RMQ_LOG"
    export RABBITMQ_PID_FILE="$RMQ_PID_FILE"
    export RABBITMQ_DIST_PORT="$VIGIL_RABBITMQ_DIST_PORT"
    export RABBITMQ_CTL_DIST_PORT_MIN=$((VIGIL_RABBITMQ_DIST_PORT + 10000))
    export RABBITMQ_CTL_DIST_PORT_MAX=$((VIGIL_RABBITMQ_DIST_PORT + 10010))
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export ERL_EPMD_ADDRESS=127.0.0.1
    export ERL_EPMD_PORT
    unset RABBITMQ_NODE_IP_ADDRESS RABBITMQ_NODE_PORT RABBITMQ_USE_LONGNAME RABBITMQ_ERLANG_COOKIE
}

# rabbitmqctl against our node, bounded by RMQCTL_TIMEOUT seconds (default 60).
rmqctl() {
    # 9>&-: rabbitmqctl may spawn epmd, which must not inherit the stack lock.
    (exec 9>&- && rmq_export && cd "$RMQ_BASE" \
        && exec timeout "${RMQCTL_TIMEOUT:-60}" "$RMQ_PREFIX/bin/rabbitmqctl" -n "$RABBITMQ_NODENAME" "$@")
}

rmq_pid() {
    local pid; pid="$(read_pid "$RMQ_PID_FILE")"
    if pid_alive "$pid" && grep -qa beam "/proc/$pid/cmdline" 2>/dev/null; then
        printf '%s' "$pid"
    fi
}
rmq_launcher_pid() {
    local pid; pid="$(read_pid "$RMQ_LAUNCHER_PID_FILE")"
    if pid_alive "$pid"; then printf '%s' "$pid"; fi
}
rmq_running() { [ -n "$(rmq_pid)" ] || [ -n "$(rmq_launcher_pid)" ]; }

epmd_names() { epmd -port "$ERL_EPMD_PORT" -names 2>/dev/null || true; }

rmq_write_conf() {
    mkdir -p "$RMQ_BASE" "$RMQ_LOG_DIR" "$RMQ_BASE/home" "$RMQ_BASE/mnesia" "$RMQ_BASE/conf.d"
    chmod 0700 "$RMQ_BASE/home"
    : >"$RMQ_BASE/rabbitmq-env.conf"
    cp "$ROOT/rabbitmq/enabled_plugins" "$RMQ_BASE/enabled_plugins"
    {
        printf '## Generated by scripts/stack.sh from rabbitmq/rabbitmq.conf + local overrides.\n'
        printf '## Do not edit: regenerated on every "stack.sh up".\n\n'
        cat "$ROOT/rabbitmq/rabbitmq.conf"
        cat <<EOF

## ---------------------------------------------------------------------------
## Local overrides (scripts/stack.sh). In the new-style format the last
## occurrence of a key wins, so these replace the committed values above.
listeners.tcp.default = 127.0.0.1:${VIGIL_AMQP_PORT}
management.tcp.ip = 127.0.0.1
management.tcp.port = ${VIGIL_AMQP_MANAGEMENT_PORT}
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = ${VIGIL_RABBITMQ_PROMETHEUS_PORT}
distribution.listener.interface = 127.0.0.1
distribution.listener.port_range.min = ${VIGIL_RABBITMQ_DIST_PORT}
distribution.listener.port_range.max = ${VIGIL_RABBITMQ_DIST_PORT}
definitions.import_backend = local_filesystem
definitions.local.path = ${ROOT}/rabbitmq/definitions.json
## the local node logs to ${RMQ_LOG} only (console.out keeps early boot errors)
log.console = false
EOF
    } >"$RMQ_BASE/rabbitmq.conf"
}

# HTTP API as the admin user. Prints the status code; body goes to $RMQ_BASE/http.out.
mgmt() { # method path [json-body]
    local args=(-sS -o "$RMQ_BASE/http.out" -w '%{http_code}' --max-time 10
        -u "$VIGIL_AMQP_ADMIN_USER:$VIGIL_AMQP_ADMIN_PASSWORD" -X "$1")
    [ $# -ge 3 ] && args+=(-H 'content-type: application/json' --data-binary "$3")
    local code
    code="$(curl "${args[@]}" "$MGMT_URL$2" 2>/dev/null || true)"
    printf '%s' "${code:-000}"
}

mgmt_ok() { # method path [body]  -> dies unless 2xx
    local code; code="$(mgmt "$@")"
    case "$code" in
        2??) return 0 ;;
        *) warn "rabbitmq: HTTP $1 $2 -> $code: $(head -c 400 "$RMQ_BASE/http.out" 2>/dev/null)"; return 1 ;;
    esac
}

rmq_wait_ready() { # $1 deadline (epoch s)
    local deadline="$1" remaining
    while before "$deadline"; do
        if [ -z "$(rmq_pid)" ] && [ -z "$(rmq_launcher_pid)" ]; then
            return 2 # died
        fi
        remaining=$(( deadline - $(date +%s) ))
        [ "$remaining" -lt 1 ] && remaining=1
        [ "$remaining" -gt 10 ] && remaining=10
        if rmqctl -q await_startup --timeout "$remaining" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    return 1
}

rmq_wait_http() { # $1 deadline; the static UI page answers without credentials
    while before "$1"; do
        curl -sf -o /dev/null --max-time 5 "$MGMT_URL/" && return 0
        sleep 0.3
    done
    return 1
}

rmq_fail() { # message  (uses RMQ_CONSOLE_OFF / RMQ_LOG_OFF set by rmq_up)
    show_log_tail "rabbitmq console" "$RMQ_CONSOLE" "${RMQ_CONSOLE_OFF:-0}"
    show_log_tail rabbitmq "$RMQ_LOG" "${RMQ_LOG_OFF:-0}"
    die "$1"
}

rmq_provision() {
    local users line tags_col name tags code
    # 1. the admin user, through rabbitmqctl (Erlang distribution, no HTTP credentials yet)
    users="$(rmqctl -s list_users 2>&1)" || { printf '%s\n' "$users" >&2; die "rabbitmq: list_users failed"; }
    tags=""; name=""
    while IFS=$'\t' read -r line tags_col; do
        if [ "$line" = "$VIGIL_AMQP_ADMIN_USER" ]; then name="$line"; tags="$tags_col"; fi
    done <<<"$users"
    if [ -z "$name" ]; then
        rmqctl -q add_user "$VIGIL_AMQP_ADMIN_USER" "$VIGIL_AMQP_ADMIN_PASSWORD" >/dev/null \
            || die "rabbitmq: could not create admin user"
        tags=""
    fi
    case "$tags" in *administrator*) ;; *)
        rmqctl -q set_user_tags "$VIGIL_AMQP_ADMIN_USER" administrator >/dev/null \
            || die "rabbitmq: could not tag admin user" ;;
    esac
    code="$(mgmt GET /api/whoami)"
    if [ "$code" = 401 ]; then
        rmqctl -q change_password "$VIGIL_AMQP_ADMIN_USER" "$VIGIL_AMQP_ADMIN_PASSWORD" >/dev/null \
            || die "rabbitmq: could not reset admin password"
        code="$(mgmt GET /api/whoami)"
    fi
    [ "$code" = 200 ] || die "rabbitmq: admin user cannot use the management API (HTTP $code)"

    # 2. the vhost, through the HTTP API. The executor and worker users are made by
    # `vigil broker setup` (run by `make up`), which holds their permissions.
    local vh a
    vh="$(urlencode "$VIGIL_AMQP_VHOST")"
    a="$(urlencode "$VIGIL_AMQP_ADMIN_USER")"
    mgmt_ok PUT "/api/vhosts/$vh" '{}' || die "rabbitmq: could not ensure vhost $VIGIL_AMQP_VHOST"
    mgmt_ok PUT "/api/permissions/$vh/$a" '{"configure":".*","write":".*","read":".*"}' \
        || die "rabbitmq: could not grant $VIGIL_AMQP_ADMIN_USER on vhost $VIGIL_AMQP_VHOST"
    if [ "$VIGIL_AMQP_ADMIN_USER" != guest ]; then
        code="$(mgmt DELETE /api/users/guest)"
        case "$code" in 2??|404) ;; *) warn "rabbitmq: could not delete guest (HTTP $code)" ;; esac
    fi
}

rmq_up() {
    local t0 deadline was_running=0 rc=0
    t0="$(now)"
    rmq_check_installed
    mkdir -p "$RMQ_BASE" "$RMQ_LOG_DIR"
    RMQ_LOG_OFF="$(file_size "$RMQ_LOG")"
    RMQ_CONSOLE_OFF="$(file_size "$RMQ_CONSOLE")"
    if rmq_running; then
        was_running=1
        say "rabbitmq: already running (pid $(rmq_pid)) node $RABBITMQ_NODENAME"
    else
        rmq_write_conf
        local p
        for p in "$VIGIL_AMQP_PORT" "$VIGIL_AMQP_MANAGEMENT_PORT" "$VIGIL_RABBITMQ_PROMETHEUS_PORT" "$VIGIL_RABBITMQ_DIST_PORT"; do
            port_open "$p" && die "rabbitmq: port 127.0.0.1:$p is already in use by another process (see VIGIL_AMQP_*/VIGIL_RABBITMQ_* port settings)"
        done
        local node_short="${RABBITMQ_NODENAME%@*}"
        if epmd_names | grep -q "^name ${node_short} at port"; then
            die "rabbitmq: a node named $node_short is already registered in epmd :$ERL_EPMD_PORT but is not ours (no live pid in $(rel "$RMQ_PID_FILE")); stop it or set RABBITMQ_NODENAME"
        fi
        # Remember whether our node is the one starting epmd (an existing mark means an
        # earlier start of ours left it running).
        port_open "$ERL_EPMD_PORT" || date -u +%FT%TZ >"$RMQ_EPMD_MARK"
        rm -f "$RMQ_PID_FILE"
        printf '\n===== %s vigil stack.sh up =====\n' "$(date -u +%FT%TZ)" >>"$RMQ_CONSOLE"
        say "rabbitmq: starting node $RABBITMQ_NODENAME (amqp 127.0.0.1:${VIGIL_AMQP_PORT}, management :${VIGIL_AMQP_MANAGEMENT_PORT}, data $(rel "$RMQ_BASE"))"
        (
            rmq_export
            cd "$RMQ_BASE"
            exec 9>&- # the node must not inherit (and hold) the stack lock
            exec setsid nohup "$RMQ_PREFIX/bin/rabbitmq-server" </dev/null >>"$RMQ_CONSOLE" 2>&1
        ) &
        printf '%s\n' "$!" >"$RMQ_LAUNCHER_PID_FILE"
    fi
    deadline=$(( $(date +%s) + VIGIL_STACK_TIMEOUT ))
    rmq_wait_ready "$deadline" || rc=$?
    case "$rc" in
        0) ;;
        2)
            rm -f "$RMQ_LAUNCHER_PID_FILE"; epmd_cleanup
            rmq_fail "rabbitmq: node exited during startup" ;;
        *)
            if [ "$was_running" = 0 ]; then rmq_kill; rm -f "$RMQ_LAUNCHER_PID_FILE"; epmd_cleanup; fi
            rmq_fail "rabbitmq: did not come up within ${VIGIL_STACK_TIMEOUT}s" ;;
    esac
    rmq_wait_http "$deadline" || rmq_fail "rabbitmq: management API did not answer on $MGMT_URL"
    rmq_provision
    if [ "$was_running" = 1 ]; then
        # Apply edits of rabbitmq/definitions.json without a restart (the boot import
        # covers fresh starts).
        mgmt_ok POST /api/definitions "$(cat "$ROOT/rabbitmq/definitions.json")" \
            || die "rabbitmq: could not import rabbitmq/definitions.json"
    fi
    say "rabbitmq: ready (pid $(rmq_pid)) amqp://127.0.0.1:${VIGIL_AMQP_PORT}/${VIGIL_AMQP_VHOST}, management $MGMT_URL [$(elapsed "$t0")]"
}

rmq_kill() { # last resort: TERM then KILL our beam and launcher
    local pid p deadline
    pid="$(rmq_pid)"
    for p in $pid $(rmq_launcher_pid); do kill -TERM "$p" 2>/dev/null || true; done
    deadline=$(( $(date +%s) + 15 ))
    while before "$deadline" && { pid_alive "$pid" || [ -n "$(rmq_launcher_pid)" ]; }; do sleep 0.2; done
    for p in $pid $(rmq_launcher_pid); do kill -KILL "$p" 2>/dev/null || true; done
    rm -f "$RMQ_PID_FILE"
}

rmq_down() {
    if ! rmq_running; then
        say "rabbitmq: not running"
    else
        local pid; pid="$(rmq_pid)"
        say "rabbitmq: stopping node $RABBITMQ_NODENAME (pid ${pid:-?})"
        # `stop <pid_file>` returns once the OS process has exited.
        if [ -n "$pid" ] && RMQCTL_TIMEOUT="$VIGIL_STACK_TIMEOUT" rmqctl -q stop "$RMQ_PID_FILE" >/dev/null 2>&1; then
            :
        else
            warn "rabbitmq: rabbitmqctl stop failed or timed out; sending SIGTERM"
            rmq_kill
        fi
        local deadline=$(( $(date +%s) + 15 ))
        while before "$deadline" && [ -n "$(rmq_launcher_pid)" ]; do sleep 0.2; done
        say "rabbitmq: stopped"
    fi
    rm -f "$RMQ_LAUNCHER_PID_FILE"
    epmd_cleanup
}

# epmd is started by the first Erlang node; stop it only if our node started it and no
# other node is registered with it any more.
epmd_cleanup() {
    if [ -f "$RMQ_EPMD_MARK" ] && port_open "$ERL_EPMD_PORT"; then
        if epmd_names | grep -q '^name '; then
            return 0 # still in use by another node: keep the mark, try again next time
        fi
        epmd -port "$ERL_EPMD_PORT" -kill >/dev/null 2>&1 || true
    fi
    rm -f "$RMQ_EPMD_MARK"
}

rmq_status() {
    if ! [ -x "$RMQ_PREFIX/bin/rabbitmq-server" ]; then
        say "rabbitmq: not installed (run scripts/install.sh)"
        return 3
    fi
    local pid; pid="$(rmq_pid)"
    if [ -n "$pid" ]; then
        local amqp="amqp up" http="management up"
        port_open "$VIGIL_AMQP_PORT" || amqp="amqp DOWN"
        port_open "$VIGIL_AMQP_MANAGEMENT_PORT" || http="management DOWN"
        say "rabbitmq: running (pid $pid) node $RABBITMQ_NODENAME 127.0.0.1:${VIGIL_AMQP_PORT} ${amqp}, ${MGMT_URL} ${http}"
    elif [ -n "$(rmq_launcher_pid)" ]; then
        say "rabbitmq: starting (launcher pid $(rmq_launcher_pid))"
        return 3
    elif [ -d "$RMQ_BASE/mnesia" ]; then
        say "rabbitmq: stopped (data $(rel "$RMQ_BASE"))"
        return 3
    else
        say "rabbitmq: not initialized"
        return 3
    fi
}

# ----------------------------------------------------------------------------- commands
servers_from_args() {
    SERVERS=()
    [ $# -eq 0 ] && set -- postgres rabbitmq
    local s
    for s in "$@"; do
        case "$s" in
            postgres|pg|postgresql) SERVERS+=(postgres) ;;
            rabbitmq|rabbit|rmq|amqp) SERVERS+=(rabbitmq) ;;
            *) die "unknown server '$s' (expected postgres or rabbitmq)" ;;
        esac
    done
}

# Where the Postgres cluster is, without side effects (no user creation, no mkdir).
pg_data_dir_guess() {
    local fallback
    fallback="/tmp/vigil-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)/postgres/data"
    if [ ! -s "$STATE/postgres/data/PG_VERSION" ] && [ -s "$fallback/PG_VERSION" ]; then
        printf '%s' "$fallback"
    else
        printf '%s' "$STATE/postgres/data"
    fi
}

cmd_env() {
    local dbu dbp
    dbu="$(urlencode "$VIGIL_DB_USER")"; dbp="$(urlencode "$VIGIL_DB_PASSWORD")"
    local kv=(
        VIGIL_DB_HOST="$VIGIL_DB_HOST"
        VIGIL_DB_PORT="$VIGIL_DB_PORT"
        VIGIL_DB_USER="$VIGIL_DB_USER"
        VIGIL_DB_PASSWORD="$VIGIL_DB_PASSWORD"
        VIGIL_DB_NAME="$VIGIL_DB_NAME"
        VIGIL_DATABASE_URL="postgresql://$dbu:$dbp@$VIGIL_DB_HOST:$VIGIL_DB_PORT/$(urlencode "$VIGIL_DB_NAME")"
        VIGIL_AMQP_HOST="$VIGIL_AMQP_HOST"
        VIGIL_AMQP_PORT="$VIGIL_AMQP_PORT"
        VIGIL_AMQP_EXECUTOR_USER="$VIGIL_AMQP_EXECUTOR_USER"
        VIGIL_AMQP_EXECUTOR_PASSWORD="$VIGIL_AMQP_EXECUTOR_PASSWORD"
        VIGIL_AMQP_WORKER_USER="$VIGIL_AMQP_WORKER_USER"
        VIGIL_AMQP_WORKER_PASSWORD="$VIGIL_AMQP_WORKER_PASSWORD"
        VIGIL_AMQP_VHOST="$VIGIL_AMQP_VHOST"
        VIGIL_AMQP_EVENT_VHOST="$VIGIL_AMQP_VHOST" # rabbitmq.conf: event_exchange.vhost
        VIGIL_AMQP_ADMIN_USER="$VIGIL_AMQP_ADMIN_USER"
        VIGIL_AMQP_ADMIN_PASSWORD="$VIGIL_AMQP_ADMIN_PASSWORD"
        VIGIL_AMQP_MANAGEMENT_PORT="$VIGIL_AMQP_MANAGEMENT_PORT"
        VIGIL_AMQP_MANAGEMENT_URL="$MGMT_URL"
        VIGIL_RABBITMQ_PROMETHEUS_PORT="$VIGIL_RABBITMQ_PROMETHEUS_PORT"
        VIGIL_RABBITMQ_DIST_PORT="$VIGIL_RABBITMQ_DIST_PORT"
        VIGIL_RABBITMQ_NODENAME="$RABBITMQ_NODENAME"
        VIGIL_RABBITMQ_PID_FILE="$RMQ_PID_FILE"
        VIGIL_PG_PID_FILE="$(pg_data_dir_guess)/postmaster.pid"
        VIGIL_STACK="$ROOT/scripts/stack.sh"
        VIGIL_STATE_DIR="$STATE"
    )
    local item
    for item in "${kv[@]}"; do
        printf 'export %s=%q\n' "${item%%=*}" "${item#*=}"
    done
}

cmd_up() {
    local t0; t0="$(now)"
    servers_from_args "$@"
    lock_state
    local s
    for s in "${SERVERS[@]}"; do
        case "$s" in postgres) pg_up ;; rabbitmq) rmq_up ;; esac
    done
    say "stack up (${SERVERS[*]}) in $(elapsed "$t0")"
}

cmd_down() {
    local t0; t0="$(now)"
    servers_from_args "$@"
    [ -d "$STATE" ] || { say "nothing to stop (no $(rel "$STATE"))"; return 0; }
    lock_state
    local s i
    # stop in reverse order of start
    for ((i = ${#SERVERS[@]} - 1; i >= 0; i--)); do
        s="${SERVERS[$i]}"
        case "$s" in postgres) pg_down ;; rabbitmq) rmq_down ;; esac
    done
    say "stack down in $(elapsed "$t0")"
}

cmd_status() {
    local rc=0
    pg_status || rc=$?
    rmq_status || rc=$?
    return "$rc"
}

cmd_clean() {
    cmd_down
    pg_layout
    local fallback_root=""
    case "$PG_AREA" in /tmp/vigil-*/postgres) fallback_root="$(dirname "$PG_AREA")" ;; esac
    rm -rf "$STATE"
    [ -n "$fallback_root" ] && rm -rf "$fallback_root"
    say "removed $(rel "$STATE")${fallback_root:+ and $fallback_root}"
}

cmd_psql() {
    pg_layout
    PGPASSWORD="$VIGIL_DB_PASSWORD" exec "$PG_BIN/psql" -h 127.0.0.1 -p "$VIGIL_DB_PORT" \
        -U "$VIGIL_DB_USER" -d "$VIGIL_DB_NAME" "$@"
}

cmd_rabbitmqctl() {
    rmq_check_installed
    rmqctl "$@"
}

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd="${1:-}"
    [ $# -gt 0 ] && shift
    case "$cmd" in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status ;;
        env) cmd_env ;;
        clean) cmd_clean ;;
        psql) cmd_psql "$@" ;;
        rabbitmqctl|ctl) cmd_rabbitmqctl "$@" ;;
        -h|--help|help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
