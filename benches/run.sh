#!/usr/bin/env bash
# benches/run.sh — pgstash benchmark harness.
#
# Measures pgbench throughput, latency and CPU cost through several "targets"
# (Postgres directly, pgstash, pgbouncer, ...) against one throwaway Postgres
# cluster, and writes a markdown report (BENCHMARKS.md by default).
#
# This is a measurement, not a test: it exits 0 even when some target is
# unavailable or a run fails; those show up in the report instead.
#
# Knobs (environment variables):
#   WORKLOADS  workloads to run            (default "W2 W4"; known: W1..W5)
#   MODES      pgbench query modes         (default "simple extended")
#   CLIENTS    client counts               (default "1 32")
#   DURATION   seconds per pgbench run     (default 10)
#   TARGETS    what to benchmark           (default "direct pgstash pgbouncer")
#   SCALE      pgbench scale factor        (default 10)
#   OUT        report path                 (default <repo>/BENCHMARKS.md)
#   KEEP_TMP=1 keep the temp dir (pgbench logs, server logs) for debugging
#   BENCH_PGSTASH_BIN use this pgstash binary instead of `cargo build --release`
#   PGSTASH_*  passed through to pgstash (its own config variables) and
#              recorded in the report; POOL__MAX_SIZE and LOG__LEVEL are fixed.
#              (Hence BENCH_PGSTASH_BIN: pgstash rejects unknown PGSTASH_ keys.)
#
# Example: TARGETS="direct pgbouncer" DURATION=3 benches/run.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

WORKLOADS="${WORKLOADS:-W2 W4}"
MODES="${MODES:-simple extended}"
CLIENTS="${CLIENTS:-1 32}"
DURATION="${DURATION:-10}"
TARGETS="${TARGETS:-direct pgstash pgbouncer}"
SCALE="${SCALE:-10}"
OUT="${OUT:-$ROOT/BENCHMARKS.md}"
KEEP_TMP="${KEEP_TMP:-0}"
BENCH_PGSTASH_BIN="${BENCH_PGSTASH_BIN:-}"

# The exact command line, recorded in the report so a run can be reproduced.
PASSTHROUGH="$(compgen -e | grep '^PGSTASH_' | grep -v -e '^PGSTASH_POOL__MAX_SIZE$' -e '^PGSTASH_LOG__LEVEL$' |
  while read -r v; do printf '%s=%q ' "$v" "${!v}"; done || true)"
COMMAND="${PASSTHROUGH}WORKLOADS=\"$WORKLOADS\" MODES=\"$MODES\" CLIENTS=\"$CLIENTS\" DURATION=$DURATION TARGETS=\"$TARGETS\" SCALE=$SCALE${BENCH_PGSTASH_BIN:+ BENCH_PGSTASH_BIN=$BENCH_PGSTASH_BIN} benches/run.sh"

CLK_TCK="$(getconf CLK_TCK)"
IS_ROOT=0; [[ "$(id -u)" -eq 0 ]] && IS_ROOT=1
SUDO=""; [[ $IS_ROOT -eq 0 ]] && SUDO="sudo"

WORK=""            # temp dir, created in main
PG_BIN=""          # directory with initdb/postgres/pg_ctl/pgbench/psql
PGDATA=""
PGPORT=""
PG_PID=""          # postmaster pid
USED_PORTS=()      # ports handed out by free_port (not yet listening maybe)
declare -A T_PORT=() T_PID=() T_STATUS=()   # per target: port, pid, "ok"/reason
NOTES=()           # free-form lines for the report's notes section
CHILD_PID=""       # long-running foreground job (pgbench, cargo), see run_child

log()  { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die()  { log "FATAL: $*"; exit 1; }
note() { NOTES+=("$*"); log "note: $*"; }
has()  { [[ " $1 " == *" $2 "* ]]; }   # has "list words" word

# ---------------------------------------------------------------------------
# Cleanup: everything we start is recorded so that an error or ^C anywhere
# still leaves no stray servers or temp dirs behind.
# ---------------------------------------------------------------------------
cleanup() {
  local rc=$? t pid
  set +e
  [[ -n "$CHILD_PID" ]] && stop_pid "$CHILD_PID"
  for t in "${!T_PID[@]}"; do
    [[ "$t" == direct ]] && continue      # direct is Postgres, stopped below
    pid="${T_PID[$t]}"
    [[ -n "$pid" ]] && stop_pid "$pid"
  done
  if [[ -n "$PGDATA" && -f "$PGDATA/postmaster.pid" ]]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >/dev/null 2>&1 \
      || { [[ -n "$PG_PID" ]] && stop_pid "$PG_PID"; }
  fi
  if [[ -n "$WORK" && -d "$WORK" ]]; then
    if [[ "$KEEP_TMP" == 1 ]]; then log "kept temp dir $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
# set -e exits silently; say where (errtrace: also inside functions).
set -E
trap 'log "error: exit status $? near line $LINENO ($BASH_COMMAND)"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

# Terminate one process we started: TERM, wait up to 5s, then KILL.
stop_pid() {
  local pid=$1 _
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

# Run a long command in the background and wait for it: bash defers traps
# until a foreground child exits, but `wait` returns at once on a signal, so
# ^C / TERM clean up immediately instead of after a whole pgbench run.
# Returns the command's exit status.
run_child() {
  local rc=0
  "$@" &
  CHILD_PID=$!
  wait "$CHILD_PID" || rc=$?
  CHILD_PID=""
  return "$rc"
}

# Postgres and pgbouncer refuse to run as root; when we are root, run them as
# the OS user "postgres" (created by the postgresql package). cd into WORK
# first so the unprivileged user doesn't trip over root's cwd.
as_pg() {
  if [[ $IS_ROOT -eq 1 ]]; then
    (cd "${WORK:-/tmp}" && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# Pick a free TCP port on 127.0.0.1 and store it in the variable named $1.
# Uses printf -v rather than $(...) so USED_PORTS persists across calls (two
# targets may be handed ports before either is listening).
free_port() {
  local __var=$1 p _
  for _ in $(seq 1 500); do
    p=$(( 20000 + RANDOM % 40000 ))
    has "${USED_PORTS[*]:-}" "$p" && continue
    ss -Hltn "sport = :$p" 2>/dev/null | grep -q . && continue
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
    USED_PORTS+=("$p")
    printf -v "$__var" '%s' "$p"
    return 0
  done
  die "no free port found"
}

# Retry `psql select 1` against a port until it answers or $2 seconds pass.
# If $3 is a pid, give up early when that process dies.
wait_for_port() {
  local port=$1 timeout=$2 pid=${3:-}
  local deadline=$(( SECONDS + timeout ))
  while (( SECONDS < deadline )); do
    if "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
         -c 'select 1' >/dev/null 2>&1; then
      return 0
    fi
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.2
  done
  return 1
}

# psql against our Postgres directly.
pg_sql() {
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres "$@"
}

# ---------------------------------------------------------------------------
# Tool installation
# ---------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
  if [[ $APT_UPDATED -eq 0 ]]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq >&2 || return 1
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >&2
}

find_pg_bin() {
  local d
  if command -v pg_config >/dev/null; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -x "$d/postgres" && -x "$d/pgbench" ]]; then PG_BIN="$d"; return 0; fi
  fi
  # Debian layout; pick the newest installed major version.
  # shellcheck disable=SC2012  # version-sorted glob of plain directory names
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
  if [[ -n "$d" && -x "$d/postgres" && -x "$d/pgbench" ]]; then PG_BIN="$d"; return 0; fi
  return 1
}

install_tools() {
  if ! find_pg_bin; then
    log "installing postgresql"
    apt_install postgresql postgresql-contrib || die "could not install postgresql"
    find_pg_bin || die "postgresql installed but binaries not found"
  fi
  log "postgres binaries: $PG_BIN"
  # pgbouncer is optional: without it we just report it as unavailable.
  if has "$TARGETS" pgbouncer && ! command -v pgbouncer >/dev/null; then
    log "installing pgbouncer"
    if ! apt_install pgbouncer || ! command -v pgbouncer >/dev/null; then
      T_STATUS[pgbouncer]="apt-get install pgbouncer failed"
    fi
  fi
  # Hooks for future targets (pgpool2 for pgpool-II's query cache, redis for
  # an application-side cache) go here, following the pgbouncer pattern.
}

# ---------------------------------------------------------------------------
# Postgres: a private cluster, so results don't depend on (or disturb) any
# system cluster, and so we can use benchmark-friendly durability settings.
# ---------------------------------------------------------------------------
start_postgres() {
  PGDATA="$WORK/pgdata"
  free_port PGPORT
  log "initdb in $PGDATA"
  as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C -N \
    >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
  # fsync/synchronous_commit off: we measure the proxy, not the disk.
  # max_connections covers 32 direct clients + 2 pools of 40 + slack.
  cat >>"$PGDATA/postgresql.conf" <<EOF

# --- added by benches/run.sh ---
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$WORK/sock'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 256MB
EOF
  # initdb -A trust already trusts every local and 127.0.0.1 connection.
  log "starting postgres on port $PGPORT"
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w -t 60 start >/dev/null \
    || { tail -n 30 "$WORK/postgres.log" >&2; die "postgres failed to start"; }
  PG_PID="$(head -n1 "$PGDATA/postmaster.pid")"
  wait_for_port "$PGPORT" 30 || die "postgres not accepting connections"

  log "pgbench -i -s $SCALE"
  "$PG_BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PGPORT" -U postgres postgres \
    >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
  # Runs use -n (no per-run vacuum, which proxies may not pass through), so
  # vacuum/analyze once here. Then prewarm so the first run isn't the only
  # one paying for cold buffers.
  pg_sql -c 'VACUUM ANALYZE' >/dev/null
  pg_sql -c "CREATE EXTENSION IF NOT EXISTS pg_prewarm" \
         -c "SELECT pg_prewarm(c) FROM unnest(array['pgbench_accounts','pgbench_accounts_pkey','pgbench_branches','pgbench_tellers']) c" \
         >/dev/null 2>&1 || note "pg_prewarm unavailable; first runs may see cold buffers"
  PG_VERSION="$(pg_sql -At -c 'show server_version')"
}

# ---------------------------------------------------------------------------
# Targets. Each start_<name> sets T_PORT[name] and T_PID[name] (the process
# whose CPU we attribute to the proxy) and returns 0, or sets
# T_STATUS[name] to a reason and returns 1. To add a target (pgpool2, redis),
# write start_<name>, add an install step, and put it in TARGETS.
# ---------------------------------------------------------------------------

# direct: pgbench talks to Postgres itself. Its "proxy CPU" is Postgres's CPU.
start_direct() {
  T_PORT[direct]="$PGPORT"
  T_PID[direct]="$PG_PID"
}

PGSTASH_BUILT=0
build_pgstash() {
  [[ $PGSTASH_BUILT -eq 1 ]] && return 0
  if [[ -n "$BENCH_PGSTASH_BIN" ]]; then
    [[ -x "$BENCH_PGSTASH_BIN" ]] || { T_STATUS[pgstash]="BENCH_PGSTASH_BIN=$BENCH_PGSTASH_BIN is not executable"; return 1; }
    PGSTASH_BUILT=1; return 0
  fi
  BENCH_PGSTASH_BIN="$ROOT/target/release/pgstash"
  log "cargo build --release (log: $WORK/cargo-build.log)"
  # shellcheck disable=SC2016  # $1 is expanded by the inner bash
  if ! run_child bash -c 'cd "$1" && exec cargo build --release' _ "$ROOT" >"$WORK/cargo-build.log" 2>&1; then
    tail -n 40 "$WORK/cargo-build.log" >&2
    T_STATUS[pgstash]="cargo build --release failed"
    return 1
  fi
  if [[ ! -x "$BENCH_PGSTASH_BIN" ]]; then
    T_STATUS[pgstash]="target/release/pgstash missing after build"
    return 1
  fi
  PGSTASH_BUILT=1
}

start_pgstash() {
  local port
  [[ $PGSTASH_BUILT -eq 1 ]] || build_pgstash || return 1
  free_port port
  log "starting pgstash on port $port"
  # Pool of 40 to match pgbouncer's default_pool_size; transaction pooling is
  # pgstash's default. warn-level logs so logging doesn't skew the numbers.
  # Started from the empty temp dir so nothing in the caller's cwd matters;
  # exec keeps $! the pgstash pid.
  (cd "$WORK" && PGSTASH_POOL__MAX_SIZE=40 PGSTASH_LOG__LEVEL=warn exec \
    "$BENCH_PGSTASH_BIN" --listen "127.0.0.1:$port" \
      --upstream "postgres://postgres@127.0.0.1:$PGPORT/postgres") \
      >>"$WORK/pgstash.log" 2>&1 &
  T_PID[pgstash]=$!
  T_PORT[pgstash]=$port
  if ! wait_for_port "$port" 30 "${T_PID[pgstash]}"; then
    tail -n 30 "$WORK/pgstash.log" >&2
    if kill -0 "${T_PID[pgstash]}" 2>/dev/null; then
      stop_pid "${T_PID[pgstash]}"
      T_STATUS[pgstash]="pgstash did not accept connections within 30s"
    else
      T_STATUS[pgstash]="pgstash exited before accepting connections"
    fi
    T_STATUS[pgstash]+="; log tail: $(tail -n 3 "$WORK/pgstash.log" | tr '\n' ' ' | cut -c1-300)"
    return 1
  fi
}

start_pgbouncer() {
  local port dir="$WORK/pgbouncer" pid="" _
  command -v pgbouncer >/dev/null || { T_STATUS[pgbouncer]="${T_STATUS[pgbouncer]:-pgbouncer not installed}"; return 1; }
  free_port port
  mkdir -p "$dir"
  echo '"postgres" ""' >"$dir/userlist.txt"
  cat >"$dir/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PGPORT dbname=postgres user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
admin_users = postgres
pool_mode = transaction
default_pool_size = 40
max_client_conn = 500
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
EOF
  [[ $IS_ROOT -eq 1 ]] && chown -R postgres: "$dir"
  log "starting pgbouncer on port $port"
  # -d daemonizes; the real pid comes from the pidfile (runuser would
  # otherwise be the pid we see).
  if ! as_pg pgbouncer -d "$dir/pgbouncer.ini" >>"$dir/stderr.log" 2>&1; then
    tail -n 20 "$dir/stderr.log" "$dir/pgbouncer.log" >&2 2>/dev/null || true
    T_STATUS[pgbouncer]="pgbouncer failed to start"
    return 1
  fi
  for _ in $(seq 1 50); do
    [[ -s "$dir/pgbouncer.pid" ]] && { pid="$(cat "$dir/pgbouncer.pid")"; break; }
    sleep 0.1
  done
  T_PID[pgbouncer]="$pid"
  T_PORT[pgbouncer]=$port
  if [[ -z "$pid" ]] || ! wait_for_port "$port" 30 "$pid"; then
    tail -n 20 "$dir/pgbouncer.log" >&2 2>/dev/null || true
    T_STATUS[pgbouncer]="pgbouncer did not accept connections"
    return 1
  fi
}

start_target() {
  local t=$1
  if ! declare -F "start_$t" >/dev/null; then
    T_STATUS[$t]="unknown target"; return 1
  fi
  if [[ -n "${T_STATUS[$t]:-}" && "${T_STATUS[$t]}" != ok ]]; then return 1; fi
  if "start_$t"; then T_STATUS[$t]=ok; return 0; fi
  T_STATUS[$t]="${T_STATUS[$t]:-failed to start}"
  return 1
}

# A proxy may crash mid-benchmark. Restart it once per run so one crash
# doesn't wipe out every later row, and record that it happened.
ensure_alive() {
  local t=$1
  [[ "${T_STATUS[$t]:-}" == ok ]] || return 1
  kill -0 "${T_PID[$t]}" 2>/dev/null && return 0
  note "$t (pid ${T_PID[$t]}) had died before a run; restarted it"
  T_STATUS[$t]=""
  start_target "$t"
}

# ---------------------------------------------------------------------------
# CPU accounting.
# tree_ticks PID: CPU clock ticks used by PID and all its descendants, live
# or exited-and-reaped: utime+stime+cutime+cstime of each live process in
# the tree (/proc/<pid>/stat fields 14-17). Postgres backends exit when
# pgbench disconnects and their time moves into the postmaster's cutime/
# cstime, so counting only live children would lose them. For a
# single-process proxy this is just its own utime+stime (all threads).
# ---------------------------------------------------------------------------
tree_ticks() {
  local root=$1
  # Processes may vanish between the glob and the read: cat then fails for
  # that file, which must not fail the pipeline (pipefail + set -e). awk
  # parses after the last ')' because comm may contain spaces or parens.
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$root" '
    {
      i = 0; s = $0
      while ((j = index(substr(s, i + 1), ")")) > 0) i += j
      split(substr(s, i + 2), f, " ")
      # f[1]=state(3) f[2]=ppid(4) f[12]=utime(14) f[13]=stime(15) f[14]=cutime(16) f[15]=cstime(17)
      pid = substr(s, 1, index(s, " ") - 1)
      ppid[pid] = f[2]; t[pid] = f[12] + f[13] + f[14] + f[15]
    }
    END {
      if (!(root in t)) { print 0; exit }
      # Walk the tree: repeatedly add processes whose parent is in the set.
      in_tree[root] = 1; total = t[root]; changed = 1
      while (changed) {
        changed = 0
        for (p in ppid) if (!(p in in_tree) && (ppid[p] in in_tree)) {
          in_tree[p] = 1; total += t[p]; changed = 1
        }
      }
      print total
    }'
}

# ---------------------------------------------------------------------------
# Workloads (pgbench scale $SCALE). Custom ones are script files.
# ---------------------------------------------------------------------------
write_workload_scripts() {
  local d="$WORK/scripts"
  mkdir -p "$d"
  cat >"$d/w1_point_select.sql" <<'EOF'
\set aid random(1, 10000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
EOF
  cat >"$d/w3_aggregate.sql" <<'EOF'
\set n random(1, 20) * 50000
SELECT bid, count(*), sum(abalance) FROM pgbench_accounts WHERE aid <= :n GROUP BY bid;
EOF
  cat >"$d/w5_update.sql" <<'EOF'
\set aid random(1, 10000)
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
EOF
}

# Sets WL_ARGS (pgbench arguments selecting the workload).
workload_args() {
  local d="$WORK/scripts"
  case "$1" in
    W1) WL_ARGS=(-f "$d/w1_point_select.sql") ;;
    W2) WL_ARGS=(-b select-only) ;;
    W3) WL_ARGS=(-f "$d/w3_aggregate.sql") ;;
    W4) WL_ARGS=(-b tpcb-like) ;;
    W5) WL_ARGS=(-f "$d/w1_point_select.sql@95" -f "$d/w5_update.sql@5") ;;
    *)  die "unknown workload $1 (known: W1 W2 W3 W4 W5)" ;;
  esac
}

# Markdown text for the report (backticks are markdown, not substitutions).
# shellcheck disable=SC2016
workload_desc() {
  case "$1" in
    W1) echo 'hot-set point select: `\set aid random(1, 10000)`; `SELECT abalance FROM pgbench_accounts WHERE aid = :aid` (custom script)' ;;
    W2) echo 'pgbench builtin select-only (`-S`): point select over all accounts' ;;
    W3) echo 'aggregate: `\set n random(1,20) * 50000`; `SELECT bid, count(*), sum(abalance) FROM pgbench_accounts WHERE aid <= :n GROUP BY bid` (custom script)' ;;
    W4) echo 'pgbench builtin tpcb-like (read/write transaction of 5 statements)' ;;
    W5) echo 'W1 point select weighted 95 + `UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid` weighted 5' ;;
  esac
}

# ---------------------------------------------------------------------------
# One pgbench run; appends a row to $RESULTS.
# Columns: workload mode clients target tps tx p50_ms p99_ms failed
#          proxy_cpu_us pg_cpu_us status
# ---------------------------------------------------------------------------
RESULTS=""
run_one() {
  local wl=$1 mode=$2 clients=$3 t=$4
  local jobs=1 dir out rc pg0 pg1 px0 px1 tps tx failed p50 p99 pxcpu pgcpu status=ok
  (( clients >= 2 && clients % 2 == 0 )) && jobs=2   # 2 cores on the bench box
  dir="$WORK/runs/${wl}_${mode}_c${clients}_${t}"
  mkdir -p "$dir"
  workload_args "$wl"

  if ! ensure_alive "$t"; then
    printf '%s\t%s\t%s\t%s\t\t\t\t\t\t\t\t%s\n' "$wl" "$mode" "$clients" "$t" "target down" >>"$RESULTS"
    return 0
  fi

  log "run $wl mode=$mode clients=$clients target=$t (${DURATION}s)"
  pg0=$(tree_ticks "$PG_PID"); px0=$(tree_ticks "${T_PID[$t]}")
  # timeout guards against a proxy that hangs; -n everywhere for fairness.
  if run_child timeout $(( DURATION + 60 )) "$PG_BIN/pgbench" -n -M "$mode" -c "$clients" -j "$jobs" \
       -T "$DURATION" "${WL_ARGS[@]}" --log --log-prefix="$dir/tx" \
       -h 127.0.0.1 -p "${T_PORT[$t]}" -U postgres postgres >"$dir/pgbench.out" 2>&1; then
    rc=0
  else
    rc=$?
  fi
  # Give exiting backends a moment to be reaped into the postmaster's cutime.
  sleep 0.5
  pg1=$(tree_ticks "$PG_PID"); px1=$(tree_ticks "${T_PID[$t]}")

  out="$dir/pgbench.out"
  tps=$(awk '/^tps = .*without initial connection time/ {print $3}' "$out")
  tx=$(awk -F': *' '/^number of transactions actually processed/ {split($2, a, "/"); print a[1]+0}' "$out")
  failed=$(awk -F': *' '/^number of failed transactions/ {print $2+0}' "$out")
  [[ -z "$failed" ]] && failed=0
  if [[ $rc -ne 0 ]]; then
    status="pgbench exit $rc"
    [[ $rc -eq 124 ]] && status="pgbench timed out"
    grep -q 'Run was aborted' "$out" && status="aborted (exit $rc)"
    note "$wl/$mode/c$clients/$t: $status; last pgbench lines: $(grep -v '^$' "$out" | tail -n 3 | tr '\n' ' ' | cut -c1-400)"
  fi
  local died=0
  if ! kill -0 "${T_PID[$t]}" 2>/dev/null; then
    status="$status; target died"; died=1
  fi

  # Latency percentiles from the per-transaction log (column 3, µs). Failed
  # or skipped transactions have a word there instead and are excluded.
  read -r p50 p99 < <(cat "$dir"/tx.* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ {print $3}' | sort -n |
    awk '{ v[NR] = $1 }
         function pct(q,  k) { k = int(q * NR); if (k < q * NR) k++; if (k < 1) k = 1; return v[k] / 1000 }
         END { if (NR == 0) print "", ""; else printf "%.3f %.3f\n", pct(0.50), pct(0.99) }')

  if [[ -n "$tx" && "$tx" -gt 0 ]]; then
    pxcpu=$(awk -v a="$px0" -v b="$px1" -v hz="$CLK_TCK" -v n="$tx" 'BEGIN { printf "%.1f", (b - a) * 1e6 / hz / n }')
    pgcpu=$(awk -v a="$pg0" -v b="$pg1" -v hz="$CLK_TCK" -v n="$tx" 'BEGIN { printf "%.1f", (b - a) * 1e6 / hz / n }')
    [[ $died -eq 1 ]] && pxcpu=""   # a dead process's counters are gone
  else
    pxcpu=""; pgcpu=""
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
    "$wl" "$mode" "$clients" "$t" "$tps" "$tx" "${p50:-}" "${p99:-}" "$failed" "$pxcpu" "$pgcpu" "$status" >>"$RESULTS"
  log "  tps=${tps:-?} p50=${p50:-?}ms p99=${p99:-?}ms failed=$failed cpu/tx: target=${pxcpu:-?}us postgres=${pgcpu:-?}us [$status]"
  # pgbench logs can be large (one line per transaction); drop them now.
  [[ "$KEEP_TMP" == 1 ]] || rm -f "$dir"/tx.*
}

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
write_report() {
  local tmp="$OUT.tmp.$$" wl t reason load_end
  load_end="$(cut -d' ' -f1-3 /proc/loadavg)"
  {
    echo "# pgstash benchmarks"
    echo
    echo "Generated by \`benches/run.sh\`; regenerate with:"
    echo
    echo '```sh'
    echo "$COMMAND"
    echo '```'
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- Machine: $(nproc) CPUs, $(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(awk '/^MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo); load average at start $LOAD_START, at end $load_end"
    echo "- PostgreSQL: $PG_VERSION (private cluster: fsync=off, synchronous_commit=off, full_page_writes=off, shared_buffers=256MB, max_connections=200; pgbench scale $SCALE)"
    if has "$TARGETS" pgstash; then
      echo "- pgstash: \`${BENCH_PGSTASH_BIN#"$ROOT/"}\` ($( [[ "${T_STATUS[pgstash]:-}" == ok ]] && echo "source $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo 'with no git commit yet')" || echo "unavailable")), PGSTASH_POOL__MAX_SIZE=40, transaction pooling (default)"
    fi
    if has "$TARGETS" pgbouncer; then
      echo "- pgbouncer: $( [[ "${T_STATUS[pgbouncer]:-}" == ok ]] && pgbouncer --version 2>/dev/null | head -n1 || echo unavailable), pool_mode=transaction, default_pool_size=40"
    fi
    echo "- Each run: \`pgbench -n -T $DURATION -M <mode> -c <clients> -j <1|2>\`, no re-initialisation between runs (W4 modifies data)."
    echo
    for t in $TARGETS; do
      if [[ "${T_STATUS[$t]:-}" != ok ]]; then
        echo "**Unavailable target: $t** — ${T_STATUS[$t]:-not started}."
        echo
      fi
    done
    for wl in $WORKLOADS; do
      echo "## $wl"
      echo
      workload_desc "$wl"
      echo
      echo "| target | mode | clients | TPS | TPS/direct | p50 ms | p99 ms | p50/direct | p99/direct | proxy CPU µs/tx (direct: Postgres) | Postgres CPU µs/tx | failed tx | status |"
      echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
      awk -F'\t' -v wl="$wl" '
        function ratio(a, b) { return (a == "" || b == "" || b + 0 == 0) ? "—" : sprintf("%.2f", a / b) }
        function dash(x) { return x == "" ? "—" : x }
        $1 == wl {
          key = $2 SUBSEP $3
          if ($4 == "direct") { dt[key] = $5; d50[key] = $7; d99[key] = $8 }
          n++; row[n] = $0
        }
        END {
          for (i = 1; i <= n; i++) {
            split(row[i], f, "\t"); key = f[2] SUBSEP f[3]
            tps = f[5] == "" ? "—" : sprintf("%.1f", f[5])
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
              f[4], f[2], f[3], tps, ratio(f[5], dt[key]), dash(f[7]), dash(f[8]),
              ratio(f[7], d50[key]), ratio(f[8], d99[key]), dash(f[10]), dash(f[11]), dash(f[9]), f[12]
          }
        }' "$RESULTS"
      echo
    done
    echo "## Method and caveats"
    echo
    echo "- TPS is pgbench's \"tps (without initial connection time)\". Latencies are p50/p99 over every transaction in pgbench's per-transaction log (\`--log\`), failed/skipped transactions excluded; ratios compare with the \`direct\` row of the same workload, mode and client count."
    echo "- \"proxy CPU µs/tx\" is utime+stime of the proxy process (all threads, from /proc/<pid>/stat, clock ticks of $CLK_TCK Hz) over the run divided by transactions processed; for \`direct\` it is Postgres's CPU. \"Postgres CPU µs/tx\" is the same for the whole Postgres cluster (postmaster plus live children, plus exited backends via the postmaster's cutime/cstime), including background processes."
    echo "- pgbench, the proxy and Postgres share the same $(nproc) CPUs, so a proxy's CPU competes with Postgres's; numbers on a small or busy machine are noisy."
    if [[ ${#NOTES[@]} -gt 0 ]]; then
      echo
      echo "### Notes from this run"
      echo
      for reason in "${NOTES[@]}"; do echo "- $reason"; done
    fi
  } >"$tmp"
  mv "$tmp" "$OUT"
  log "wrote $OUT"
}

# ---------------------------------------------------------------------------
main() {
  local t wl mode c
  LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
  for wl in $WORKLOADS; do case "$wl" in W1|W2|W3|W4|W5) ;; *) die "unknown workload $wl";; esac; done
  for mode in $MODES; do case "$mode" in simple|extended|prepared) ;; *) die "unknown mode $mode";; esac; done

  install_tools
  WORK="$(mktemp -d /tmp/pgstash-bench.XXXXXX)"
  chmod 755 "$WORK"
  mkdir -p "$WORK/sock" "$WORK/runs"
  [[ $IS_ROOT -eq 1 ]] && chown postgres: "$WORK" "$WORK/sock"
  RESULTS="$WORK/results.tsv"; : >"$RESULTS"
  log "temp dir $WORK"

  # Build before starting Postgres: a long compile shouldn't overlap anything.
  if has "$TARGETS" pgstash; then build_pgstash || log "pgstash unavailable: ${T_STATUS[pgstash]}"; fi

  start_postgres
  write_workload_scripts
  for t in $TARGETS; do
    start_target "$t" || log "target $t unavailable: ${T_STATUS[$t]}"
  done

  # Targets innermost, so the rows compared with each other ran back to back
  # under the most similar conditions (and direct, if listed first, first).
  for wl in $WORKLOADS; do
    for mode in $MODES; do
      for c in $CLIENTS; do
        for t in $TARGETS; do
          [[ "${T_STATUS[$t]:-}" == ok ]] || continue
          run_one "$wl" "$mode" "$c" "$t"
        done
      done
    done
  done

  write_report
}

main "$@"
