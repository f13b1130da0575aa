#!/usr/bin/env bash
# benches/run.sh — pgstash benchmark harness.
#
# Measures pgbench throughput, latency and CPU cost through several "targets"
# (Postgres directly, pgstash with and without its cache, pgbouncer, pgpool-II
# with its query cache) against one throwaway Postgres cluster, and writes a
# markdown report (BENCHMARKS.md by default) that starts with a check list of
# the performance targets of DESIGN.md, computed from the run.
#
# This is a measurement, not a test: it exits 0 even when some target is
# unavailable or a run fails; those show up in the report instead.
#
# Knobs (environment variables):
#   WORKLOADS  workloads to run
#              (default "SELECT1 W1 W2 W3 W4 W5 STALE TRIGGERS")
#              W1..W5 as in DESIGN.md; SELECT1 is a reference row: `SELECT 1`
#              against direct only, -M simple only (the cheapest round trip).
#              STALE: staleness of writes that bypass pgstash, per change
#              source (invalidation.source): W5 through a pgstash of that
#              source while a second pgbench writes straight to Postgres;
#              p50/p99 from pgstash's pgstash_staleness_seconds histogram.
#              TRIGGERS: cost of the NOTIFY triggers of `pgstash migrate up`:
#              W4 without and with them, alternated (TRIGGER_ROUNDS).
#              Both run at CHECK_CLIENTS clients only. STALE makes the
#              cluster run with wal_level=logical (for the wal source).
#   MODES      pgbench query modes         (default "simple extended prepared")
#              "prepared" applies to W1 only (DESIGN.md asks -M prepared for
#              W1); the other workloads run the remaining modes. SELECT1
#              always runs -M simple.
#   CLIENTS    client counts               (default "1 32")
#   DURATION   seconds per pgbench run     (default 10)
#   REPEAT     runs per (workload, mode, clients, target) cell (default 1)
#              With REPEAT=N > 1 each cell runs N times, interleaved: for
#              each workload, mode and client count, round 1 goes over the
#              targets in TARGETS order, round 2 in reverse order, round 3
#              in order again, ... (ABBA), so that drift over time affects
#              all targets alike. The targets are still started once; the
#              rounds reuse them. Each table row then reports the median
#              over the N runs of TPS, p50, p99, CPU per transaction and hit
#              ratio (each metric on its own; with N even, the mean of the
#              two middle values), the sum of failed transactions, each
#              run's TPS (column "runs"), and status "ok" only if every run
#              was ok, else the first failing run's status with
#              "(run k of N)". Ratios and the target check list use the
#              medians. STALE and TRIGGERS are not repeated (they have
#              their own rounds: TRIGGER_ROUNDS).
#   TARGETS    what to benchmark
#              (default "direct pgstash pgstash-redis pgstash-nocache pgbouncer pgpool")
#              pgstash-nocache is pgstash with PGSTASH_CACHE__ENABLED=false;
#              pgstash-redis is pgstash with the shared tier, a private
#              redis-server (as scripts/run.sh runs it), whose CPU counts as
#              the target's;
#              pgpool is pgpool-II (apt package pgpool2) with its shmem query cache.
#   SCALE      pgbench scale factor        (default 10)
#   CHECK_CLIENTS client count the target check list looks at (default 32)
#   STALE_SOURCES  change sources STALE measures (default "notify wal")
#   STALE_MODES    -M modes of STALE's W5 load (default simple, or the first
#                  W5 mode of MODES without simple)
#   STALE_RATE     bypassing writes per second, in total (default 100)
#   STALE_WRITERS  clients of the bypassing writer (default 4)
#   STALE_DURATION seconds per STALE run (default DURATION)
#   STALE_SYNC_COMMIT synchronous_commit of the whole cluster during STALE
#                  (default on, Postgres' default; the cluster otherwise runs
#                  with off, and the WAL of an asynchronous commit reaches a
#                  logical replication stream only when the WAL writer flushes
#                  it, every wal_writer_delay = 200 ms: the wal source's
#                  staleness then measures Postgres' flush delay)
#   TRIGGER_ROUNDS rounds of W4 without/with the triggers, per mode (default 3)
#   TRIGGER_TARGETS what TRIGGERS measures: "direct" (Postgres without vs
#                  with the triggers) and "pgstash" (pgstash with source=proxy
#                  and no triggers vs a pgstash with source=notify and the
#                  triggers) (default "direct pgstash" when pgstash is in
#                  TARGETS, else "direct")
#   OUT        report path                 (default <repo>/BENCHMARKS.md)
#   KEEP_TMP=1 keep the temp dir (pgbench logs, server logs) for debugging
#   BENCH_PGSTASH_BIN use this pgstash binary instead of `cargo build --release`
#              (cargo honours CARGO_BUILD_JOBS, e.g. CARGO_BUILD_JOBS=1)
#   BENCH_METRICS how pgstash is told where to serve Prometheus metrics, which
#              the harness scrapes before and after each pgstash run for the
#              cache hit ratio (default "auto"):
#                auto          env:PGSTASH_METRICS__LISTEN if this pgstash
#                              accepts it, else flag:--metrics if accepted,
#                              else no metrics (hit ratio "n/a")
#                env:NAME      pass the address in environment variable NAME
#                flag:--NAME   pass it as `--NAME ADDR`
#                off           don't ask for metrics
#              The address is 127.0.0.1:<free port>, one per pgstash instance.
#   PGSTASH_*  passed through to pgstash (its own config variables) and
#              recorded in the report; POOL__MAX_SIZE, LOG__LEVEL and
#              METRICS__LISTEN are set by the harness.
#              (Hence BENCH_*: pgstash rejects unknown PGSTASH_ keys.)
#
# Example: TARGETS="direct pgbouncer" DURATION=3 benches/run.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

WORKLOADS="${WORKLOADS:-SELECT1 W1 W2 W3 W4 W5 STALE TRIGGERS}"
MODES="${MODES:-simple extended prepared}"
CLIENTS="${CLIENTS:-1 32}"
DURATION="${DURATION:-10}"
REPEAT="${REPEAT:-1}"
TARGETS="${TARGETS:-direct pgstash pgstash-redis pgstash-nocache pgbouncer pgpool}"
SCALE="${SCALE:-10}"
CHECK_CLIENTS="${CHECK_CLIENTS:-32}"
OUT="${OUT:-$ROOT/BENCHMARKS.md}"
KEEP_TMP="${KEEP_TMP:-0}"
BENCH_PGSTASH_BIN="${BENCH_PGSTASH_BIN:-}"
BENCH_METRICS="${BENCH_METRICS:-auto}"
STALE_SOURCES="${STALE_SOURCES:-notify wal}"
STALE_MODES="${STALE_MODES:-}"          # default resolved in main (depends on MODES)
STALE_RATE="${STALE_RATE:-100}"
STALE_WRITERS="${STALE_WRITERS:-4}"
STALE_DURATION="${STALE_DURATION:-$DURATION}"
STALE_SYNC_COMMIT="${STALE_SYNC_COMMIT:-on}"
TRIGGER_ROUNDS="${TRIGGER_ROUNDS:-3}"
if [[ -z "${TRIGGER_TARGETS:-}" ]]; then
  TRIGGER_TARGETS=direct
  [[ " $TARGETS " == *" pgstash "* ]] && TRIGGER_TARGETS="direct pgstash"
fi

# The exact command line, recorded in the report so a run can be reproduced.
PASSTHROUGH="$(compgen -e | grep '^PGSTASH_' |
  grep -v -e '^PGSTASH_POOL__MAX_SIZE$' -e '^PGSTASH_LOG__LEVEL$' -e '^PGSTASH_METRICS__LISTEN$' |
  while read -r v; do printf '%s=%q ' "$v" "${!v}"; done || true)"
COMMAND="${PASSTHROUGH}WORKLOADS=\"$WORKLOADS\" MODES=\"$MODES\" CLIENTS=\"$CLIENTS\" DURATION=$DURATION TARGETS=\"$TARGETS\" SCALE=$SCALE"
[[ "$CHECK_CLIENTS" != 32 ]] && COMMAND+=" CHECK_CLIENTS=$CHECK_CLIENTS"
# REPEAT only when set and only when a workload it repeats runs (not only
# STALE/TRIGGERS).
if [[ -n "$(printenv REPEAT || true)" ]]; then
  for _wl in SELECT1 W1 W2 W3 W4 W5; do
    [[ " $WORKLOADS " == *" $_wl "* ]] && { COMMAND+=" REPEAT=$REPEAT"; break; }
  done
fi
[[ "$BENCH_METRICS" != auto ]] && COMMAND+=" BENCH_METRICS=$BENCH_METRICS"
# The STALE/TRIGGERS knobs only when set and only when those workloads run.
for v in STALE_SOURCES STALE_MODES STALE_RATE STALE_WRITERS STALE_DURATION STALE_SYNC_COMMIT; do
  [[ " $WORKLOADS " == *" STALE "* && -n "$(printenv "$v" || true)" ]] && COMMAND+=" $v=\"${!v}\""
done
for v in TRIGGER_ROUNDS TRIGGER_TARGETS; do
  [[ " $WORKLOADS " == *" TRIGGERS "* && -n "$(printenv "$v" || true)" ]] && COMMAND+=" $v=\"${!v}\""
done
COMMAND+="${BENCH_PGSTASH_BIN:+ BENCH_PGSTASH_BIN=$BENCH_PGSTASH_BIN} benches/run.sh"

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
declare -A T_METRICS=()  # per pgstash target: host:port of its /metrics, if any
NOTES=()           # free-form lines for the report's notes section
declare -A NOTED=() # keys of notes already made (note_once)
CHILD_PID=""       # long-running foreground job (pgbench, cargo), see run_child
BG_PID=""          # a second pgbench running alongside (STALE's bypassing writer)

log()  { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die()  { log "FATAL: $*"; exit 1; }
note() { NOTES+=("$*"); log "note: $*"; }
note_once() { local k=$1; shift; [[ -n "${NOTED[$k]:-}" ]] && return 0; NOTED[$k]=1; note "$*"; }
has()  { [[ " $1 " == *" $2 "* ]]; }   # has "list words" word
KNOWN_WORKLOADS="SELECT1 W1 W2 W3 W4 W5 STALE TRIGGERS"
needs_logical_wal() { has "$WORKLOADS" STALE && has "$STALE_SOURCES" wal; }
# Whether this run needs the pgstash binary.
uses_pgstash() {
  has "$TARGETS" pgstash || has "$TARGETS" pgstash-nocache || has "$TARGETS" pgstash-redis ||
    has "$WORKLOADS" STALE || has "$WORKLOADS" TRIGGERS
}

# ---------------------------------------------------------------------------
# Cleanup: everything we start is recorded so that an error or ^C anywhere
# still leaves no stray servers or temp dirs behind.
# ---------------------------------------------------------------------------
cleanup() {
  local rc=$? t pid
  set +e
  [[ -n "$CHILD_PID" ]] && stop_pid "$CHILD_PID"
  [[ -n "$BG_PID" ]] && stop_pid "$BG_PID"
  [[ -n "$REDIS_PID" ]] && stop_pid "$REDIS_PID"
  for t in "${!T_PID[@]}"; do
    [[ "$t" == direct ]] && continue      # direct is Postgres, stopped below
    pid="${T_PID[$t]}"
    [[ -n "$pid" ]] && stop_target_pid "$t" "$pid"
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

# Stop a target's process: its own stop_<target> if it has one (pgpool needs a
# shutdown that takes its children along), else stop_pid.
stop_target_pid() {
  local fn="stop_${1//-/_}"
  if declare -F "$fn" >/dev/null; then "$fn" "$2"; else stop_pid "$2"; fi
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
# Sessions. With autogroup scheduling (kernel.sched_autogroup_enabled, on in
# many kernels) CPU is shared fairly between sessions first, then between the
# threads of one session. Postgres (pg_ctl makes the postmaster a session
# leader) and pgbouncer (-d daemonizes) run in sessions of their own; pgstash
# and pgpool get one too (setsid), as under a service manager, instead of
# sharing this script's session with pgbench, whose threads would then
# preempt them. Measured on a 2-CPU VM, pgbench -S at 32 clients through
# pgstash with the cache off: ~7 % more TPS in its own session.
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
# Ports come from below the kernel's ephemeral range when there is room
# (20000 up to it), so that no outgoing connection (pgbench's, a pool's) can
# hold the port by the time a server binds it; and no TCP socket at all may
# use it yet.
free_port() {
  local __var=$1 p _ lo=20000 hi=60000 eph=""
  read -r eph _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  [[ "$eph" =~ ^[0-9]+$ ]] && (( eph > lo + 2000 )) && hi=$eph
  for _ in $(seq 1 500); do
    p=$(( lo + RANDOM % (hi - lo) ))
    has "${USED_PORTS[*]:-}" "$p" && continue
    ss -Htan "sport = :$p" 2>/dev/null | grep -q . && continue
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
  # pgpool-II likewise. Debian's pgpool2 package also installs a system
  # service; we never use it (our instance has its own config and ports).
  if has "$TARGETS" pgpool && ! find_pgpool; then
    log "installing pgpool2"
    if ! apt_install pgpool2 || ! find_pgpool; then
      T_STATUS[pgpool]="apt-get install pgpool2 failed"
    fi
  fi
  # curl scrapes pgstash's /metrics; without it hit ratios are just "n/a".
  if uses_pgstash && [[ "$BENCH_METRICS" != off ]] && ! command -v curl >/dev/null; then
    log "installing curl"
    apt_install curl || true
  fi
  # redis-server for pgstash-redis, likewise optional.
  if has "$TARGETS" pgstash-redis && ! command -v redis-server >/dev/null; then
    log "installing redis-server"
    if ! apt_install redis-server || ! command -v redis-server >/dev/null; then
      T_STATUS[pgstash-redis]="apt-get install redis-server failed"
    fi
  fi
}

PGPOOL_BIN=""
find_pgpool() {
  PGPOOL_BIN="$(command -v pgpool || true)"
  [[ -z "$PGPOOL_BIN" && -x /usr/sbin/pgpool ]] && PGPOOL_BIN=/usr/sbin/pgpool
  [[ -n "$PGPOOL_BIN" ]]
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
  # max_connections covers 32 direct clients, pools of 40 for pgstash,
  # pgstash-nocache and pgbouncer, pgpool's children (one connection each)
  # and slack.
  cat >>"$PGDATA/postgresql.conf" <<EOF

# --- added by benches/run.sh ---
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$WORK/sock'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
shared_buffers = 256MB
EOF
  # The wal change source (STALE) streams a logical replication slot. Only
  # then: the other workloads keep the default WAL level.
  if needs_logical_wal; then
    cat >>"$PGDATA/postgresql.conf" <<EOF
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
EOF
  fi
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
PGSTASH_BUILD_ERR=""
build_pgstash() {
  [[ $PGSTASH_BUILT -eq 1 ]] && return 0
  [[ -n "$PGSTASH_BUILD_ERR" ]] && return 1
  if [[ -n "$BENCH_PGSTASH_BIN" ]]; then
    if [[ ! -x "$BENCH_PGSTASH_BIN" ]]; then
      PGSTASH_BUILD_ERR="BENCH_PGSTASH_BIN=$BENCH_PGSTASH_BIN is not executable"; return 1
    fi
    PGSTASH_BUILT=1; return 0
  fi
  BENCH_PGSTASH_BIN="$ROOT/target/release/pgstash"
  log "cargo build --release (log: $WORK/cargo-build.log)"
  # shellcheck disable=SC2016  # $1 is expanded by the inner bash
  if ! run_child bash -c 'cd "$1" && exec cargo build --release' _ "$ROOT" >"$WORK/cargo-build.log" 2>&1; then
    tail -n 40 "$WORK/cargo-build.log" >&2
    PGSTASH_BUILD_ERR="cargo build --release failed"
    return 1
  fi
  if [[ ! -x "$BENCH_PGSTASH_BIN" ]]; then
    PGSTASH_BUILD_ERR="target/release/pgstash missing after build"
    return 1
  fi
  PGSTASH_BUILT=1
}

# How pgstash is asked to serve /metrics, resolved once from BENCH_METRICS:
# METRICS_HOW is "env:NAME", "flag:--NAME" or "" (none; METRICS_WHY says why).
# "auto" asks the binary itself (`check-config` rejects unknown PGSTASH_ keys
# and unknown flags), so the harness starts scraping as soon as pgstash
# accepts the setting, without another change here.
METRICS_HOW=""
METRICS_WHY=""
METRICS_RESOLVED=0
resolve_metrics() {
  [[ $METRICS_RESOLVED -eq 1 ]] && return 0
  METRICS_RESOLVED=1
  local up="postgres://postgres@127.0.0.1:${PGPORT:-5432}/postgres" probe=127.0.0.1:9
  case "$BENCH_METRICS" in
    off) METRICS_WHY="metrics disabled (BENCH_METRICS=off)" ;;
    env:?*|flag:--?*) METRICS_HOW="$BENCH_METRICS" ;;
    auto)
      if ! (cd "$WORK" && "$BENCH_PGSTASH_BIN" --upstream "$up" check-config) >/dev/null 2>&1; then
        METRICS_WHY="\`pgstash check-config\` fails even without a metrics setting, so support for one could not be probed"
      elif (cd "$WORK" && env PGSTASH_METRICS__LISTEN="$probe" "$BENCH_PGSTASH_BIN" --upstream "$up" check-config) >/dev/null 2>&1; then
        METRICS_HOW="env:PGSTASH_METRICS__LISTEN"
      elif (cd "$WORK" && "$BENCH_PGSTASH_BIN" --metrics "$probe" --upstream "$up" check-config) >/dev/null 2>&1; then
        METRICS_HOW="flag:--metrics"
      else
        METRICS_WHY="this pgstash accepts neither PGSTASH_METRICS__LISTEN nor --metrics (no metrics endpoint yet)"
      fi ;;
    *) METRICS_WHY="BENCH_METRICS=$BENCH_METRICS not understood (want auto, off, env:NAME or flag:--NAME)" ;;
  esac
  if [[ -z "$METRICS_HOW" ]]; then
    note "pgstash cache hit ratio n/a: $METRICS_WHY"
  elif ! command -v curl >/dev/null; then
    METRICS_WHY="curl is not installed"; METRICS_HOW=""
    note "pgstash cache hit ratio n/a: $METRICS_WHY"
  else
    log "pgstash metrics via ${METRICS_HOW}"
  fi
}

start_pgstash()         { start_pgstash_as pgstash; }
# The same binary with its cache off: the baseline for "caching must never
# lose" (W2/W4 with the cache on should be within 5 % of this).
start_pgstash_nocache() { start_pgstash_as pgstash-nocache PGSTASH_CACHE__ENABLED=false; }
# With the shared tier, as scripts/run.sh (the README's run command) and
# docker-compose run it: L2 values, generations and invalidations in Redis.
start_pgstash_redis() {
  start_bench_redis || { T_STATUS[pgstash-redis]="$WHY"; return 1; }
  start_pgstash_as pgstash-redis PGSTASH_REDIS__URL="redis://127.0.0.1:$REDIS_PORT"
}

# The private redis-server of pgstash-redis: no persistence, in a session of
# its own (as a service would be), started once and stopped by cleanup.
# Returns 1 with the reason in WHY.
REDIS_PID=""
REDIS_PORT=""
start_bench_redis() {
  local _
  WHY=""
  [[ -n "$REDIS_PID" ]] && kill -0 "$REDIS_PID" 2>/dev/null && return 0
  command -v redis-server >/dev/null || { WHY="redis-server not installed"; return 1; }
  free_port REDIS_PORT
  log "starting redis-server on port $REDIS_PORT"
  (cd "$WORK" && exec setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
     --save "" --appendonly no) >>"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 1 50); do
    [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] && return 0
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
  done
  WHY="redis-server did not answer on port $REDIS_PORT: $(log_tail "$WORK/redis.log")"
  stop_pid "$REDIS_PID"
  REDIS_PID=""
  return 1
}

# CPU ticks of a target: its process tree, plus the redis-server of
# pgstash-redis (a tier of that target, so its cost is the target's).
target_ticks() {
  local t=$1 n
  n=$(tree_ticks "${T_PID[$t]}")
  if [[ "$t" == pgstash-redis && -n "$REDIS_PID" ]]; then
    n=$(( n + $(tree_ticks "$REDIS_PID") ))
  fi
  echo "$n"
}

# start_pgstash_as TARGET [VAR=value...]: one pgstash instance named TARGET,
# with extra environment for it. Should one of its ports be taken by the time
# pgstash binds it, it is tried again (up to 3 times) with other ports.
start_pgstash_as() {
  local t=$1 log="$WORK/$1.log" size _
  for _ in 1 2 3; do
    size=$(stat -c %s "$log" 2>/dev/null || echo 0)
    start_pgstash_try "$@" && return 0
    tail -c +"$(( size + 1 ))" "$log" 2>/dev/null | grep -q 'Address already in use' || return 1
    log "$t: a port was taken; trying other ports"
    T_STATUS[$t]=""
  done
  return 1
}

start_pgstash_try() {
  local t=$1; shift
  local port mport log="$WORK/$t.log" extra_env=("$@") margs=() _
  build_pgstash || { T_STATUS[$t]="$PGSTASH_BUILD_ERR"; return 1; }
  resolve_metrics
  free_port port
  T_METRICS[$t]=""
  if [[ -n "$METRICS_HOW" ]]; then
    free_port mport
    T_METRICS[$t]="127.0.0.1:$mport"
    case "$METRICS_HOW" in
      env:*)  extra_env+=("${METRICS_HOW#env:}=127.0.0.1:$mport") ;;
      flag:*) margs=("${METRICS_HOW#flag:}" "127.0.0.1:$mport") ;;
    esac
  fi
  log "starting $t on port $port${T_METRICS[$t]:+ (metrics ${T_METRICS[$t]})}"
  # Pool of 40 to match pgbouncer's default_pool_size; transaction pooling is
  # pgstash's default. warn-level logs so logging doesn't skew the numbers.
  # Started from the empty temp dir so nothing in the caller's cwd matters;
  # exec setsid env execs pgstash, so $! is the pgstash pid (setsid forks only
  # for a process group leader, which a background job of this script is not).
  # Its own session, like every proxy here (see "Sessions" above as_pg).
  (cd "$WORK" && exec setsid env PGSTASH_POOL__MAX_SIZE=40 PGSTASH_LOG__LEVEL=warn "${extra_env[@]}" \
    "$BENCH_PGSTASH_BIN" --listen "127.0.0.1:$port" \
      --upstream "postgres://postgres@127.0.0.1:$PGPORT/postgres" "${margs[@]}") \
      >>"$log" 2>&1 &
  T_PID[$t]=$!
  T_PORT[$t]=$port
  if ! wait_for_port "$port" 30 "${T_PID[$t]}"; then
    tail -n 30 "$log" >&2
    if kill -0 "${T_PID[$t]}" 2>/dev/null; then
      stop_pid "${T_PID[$t]}"
      T_STATUS[$t]="$t did not accept connections within 30s"
    else
      T_STATUS[$t]="$t exited before accepting connections"
    fi
    T_STATUS[$t]+="; log tail: $(log_tail "$log")"
    return 1
  fi
  if [[ -n "${T_METRICS[$t]}" ]]; then
    # Give the metrics listener up to 5s more; not fatal (runs then say n/a).
    for _ in $(seq 1 25); do
      [[ -n "$(metrics_counters "${T_METRICS[$t]}")" ]] && return 0
      sleep 0.2
    done
    log "$t: no pgstash_cache_* counters at http://${T_METRICS[$t]}/metrics"
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

# pgpool-II as a throwaway instance: raw mode (no replication), one backend
# (our Postgres), no health/streaming checks, no load balancing, pooled
# backend connections, and its in-memory query cache in shared memory.
# Everything (config, pid, sockets, status file, oid maps) lives in
# $WORK/pgpool. pcp is not listened for on TCP (pcp_listen_addresses='').
start_pgpool() {
  local port pcp_port dir="$WORK/pgpool" pid="" c maxc=0 children _ why bg
  find_pgpool || { T_STATUS[pgpool]="${T_STATUS[pgpool]:-pgpool (Debian package pgpool2) not installed}"; return 1; }
  for c in $CLIENTS; do (( c > maxc )) && maxc=$c; done
  # One child per client connection; a client beyond num_init_children waits
  # in the listen queue, so keep headroom over the largest client count.
  children=$(( maxc + 8 > 40 ? maxc + 8 : 40 ))
  free_port port
  free_port pcp_port
  rm -rf "$dir"
  mkdir -p "$dir/sock" "$dir/oiddir"
  : >"$dir/pcp.conf"
  : >"$dir/pool_passwd"
  cat >"$dir/pool_hba.conf" <<EOF
local all all trust
host all all 127.0.0.1/32 trust
EOF
  cat >"$dir/pgpool.conf" <<EOF
# --- written by benches/run.sh ---
backend_clustering_mode = 'raw'
listen_addresses = '127.0.0.1'
port = $port
socket_dir = '$dir/sock'
pcp_listen_addresses = ''
pcp_port = $pcp_port
pcp_socket_dir = '$dir/sock'
wd_ipc_socket_dir = '$dir/sock'
pid_file_name = '$dir/pgpool.pid'
logdir = '$dir'
backend_hostname0 = '127.0.0.1'
backend_port0 = $PGPORT
backend_weight0 = 1
backend_flag0 = 'DISALLOW_TO_FAILOVER'
enable_pool_hba = on
pool_passwd = '$dir/pool_passwd'
num_init_children = $children
max_pool = 1
connection_cache = on
reserved_connections = 0
load_balance_mode = off
use_watchdog = off
sr_check_period = 0
health_check_period = 0
failover_on_backend_error = off
log_destination = 'stderr'
logging_collector = off
log_min_messages = warning
log_connections = off
log_statement = off
memory_cache_enabled = on
memqcache_method = 'shmem'
memqcache_total_size = 64MB
memqcache_expire = 0
memqcache_auto_cache_invalidation = on
memqcache_oiddir = '$dir/oiddir'
EOF
  [[ $IS_ROOT -eq 1 ]] && chown -R postgres: "$dir"
  log "starting pgpool on port $port ($children children)"
  # -n: stay in the foreground (we background it), logging to stderr. Its
  # pid (the parent of all its children) comes from the pidfile: with
  # runuser in between, $! is not pgpool.
  as_pg setsid "$PGPOOL_BIN" -n -f "$dir/pgpool.conf" -F "$dir/pcp.conf" -a "$dir/pool_hba.conf" \
    >>"$dir/pgpool.log" 2>&1 &
  bg=$!
  for _ in $(seq 1 100); do
    # (pgpool may pad the file with NUL bytes: keep digits only)
    [[ -s "$dir/pgpool.pid" ]] && pid="$(head -n1 "$dir/pgpool.pid" | tr -cd '0-9')"
    [[ -n "$pid" ]] && break
    kill -0 "$bg" 2>/dev/null || break   # pgpool exited early
    sleep 0.1
  done
  T_PID[pgpool]="$pid"
  T_PORT[pgpool]=$port
  if [[ -z "$pid" ]] || ! wait_for_port "$port" 30 "$pid"; then
    tail -n 20 "$dir/pgpool.log" >&2 2>/dev/null || true
    why="$(grep -E 'FATAL|ERROR|PANIC' "$dir/pgpool.log" 2>/dev/null | tail -n 2 | tr '\n' ' ' | cut -c1-300 || true)"
    [[ -z "$why" ]] && why="$(tail -n 2 "$dir/pgpool.log" 2>/dev/null | tr '\n' ' ' | cut -c1-300 || true)"
    T_STATUS[pgpool]="pgpool did not accept connections${why:+; log: $why}"
    [[ -n "$pid" ]] && stop_pgpool "$pid"
    return 1
  fi
  # The point of this target is the query cache: say so if it isn't on.
  if [[ -z "$(pgpool_counters "$port")" ]]; then
    note "pgpool answers, but \`SHOW pool_cache\` does not: its query cache may be off, hit ratios are n/a"
  fi
}

# pgpool: SIGINT is its "fast" shutdown, which takes the children along.
# If the parent had to be killed, kill the children it leaves behind too.
stop_pgpool() {
  local pid=$1 _ kids
  kill -0 "$pid" 2>/dev/null || return 0
  kids="$(child_pids "$pid")"
  kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  stop_pid "$pid"
  # shellcheck disable=SC2086  # a list of pids
  [[ -n "$kids" ]] && kill -KILL $kids 2>/dev/null
  return 0
}

# Pids whose parent is $1.
child_pids() {
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v p="$1" '
    { i = 0; s = $0; while ((j = index(substr(s, i + 1), ")")) > 0) i += j
      split(substr(s, i + 2), f, " "); if (f[2] == p) printf "%s ", substr(s, 1, index(s, " ") - 1) }'
}

start_target() {
  local t=$1 fn="start_${1//-/_}"
  if ! declare -F "$fn" >/dev/null; then
    T_STATUS[$t]="unknown target"; return 1
  fi
  if [[ -n "${T_STATUS[$t]:-}" && "${T_STATUS[$t]}" != ok ]]; then return 1; fi
  if "$fn"; then T_STATUS[$t]=ok; return 0; fi
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
  cat >"$d/select1.sql" <<'EOF'
SELECT 1;
EOF
}

# Modes a workload runs in: MODES, except that -M prepared is for W1 only
# (DESIGN.md) and the SELECT1 reference is always -M simple only; STALE runs
# STALE_MODES.
workload_modes() {
  local m out=()
  if [[ "$1" == SELECT1 ]]; then echo simple; return 0; fi
  if [[ "$1" == STALE ]]; then echo "$STALE_MODES"; return 0; fi
  for m in $MODES; do
    [[ "$m" == prepared && "$1" != W1 ]] && continue
    out+=("$m")
  done
  echo "${out[*]}"
}

# The targets in the order of round $1 of a repeated cell (REPEAT): TARGETS
# in odd rounds, reversed in even ones (ABBA: A B, B A, A B, ...).
round_targets() {
  local t out=()
  for t in $TARGETS; do
    if (( $1 % 2 )); then out+=("$t"); else out=("$t" "${out[@]}"); fi
  done
  echo "${out[*]}"
}

# Whether workload $1 runs against target $2 (SELECT1: direct only).
workload_runs_on() {
  [[ "$1" != SELECT1 || "$2" == direct ]]
}

# Sets WL_ARGS (pgbench arguments selecting the workload).
workload_args() {
  local d="$WORK/scripts"
  case "$1" in
    W1) WL_ARGS=(-f "$d/w1_point_select.sql") ;;
    W2) WL_ARGS=(-b select-only) ;;
    W3) WL_ARGS=(-f "$d/w3_aggregate.sql") ;;
    W4) WL_ARGS=(-b tpcb-like) ;;
    W5|STALE) WL_ARGS=(-f "$d/w1_point_select.sql@95" -f "$d/w5_update.sql@5") ;;
    TRIGGERS) WL_ARGS=(-b tpcb-like) ;;
    SELECT1) WL_ARGS=(-f "$d/select1.sql") ;;
    *)  die "unknown workload $1 (known: $KNOWN_WORKLOADS)" ;;
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
    W5) echo 'read-mostly with churn: W1 point select weighted 95 + `UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid` weighted 5 (`-f w1.sql@95 -f w5_update.sql@5`)' ;;
    SELECT1) echo 'reference: `SELECT 1` straight to Postgres (direct only, `-M simple` only), the cheapest possible round trip' ;;
    STALE) echo "staleness of writes that bypass pgstash, per change source (\`invalidation.source\`): for each source, a pgstash of that source (\`pgstash-<source>\`) carries W5 at $CHECK_CLIENTS clients for ${STALE_DURATION}s while a second pgbench writes straight to Postgres, bypassing pgstash: \`UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid\`, \`aid\` in the W1 hot set \`random(1, 10000)\`, \`-R $STALE_RATE\` (transactions per second in total) with $STALE_WRITERS clients, \`-M simple\`. The cluster runs with \`synchronous_commit = $STALE_SYNC_COMMIT\` during these runs (STALE_SYNC_COMMIT)." ;;
    TRIGGERS) echo "cost of the NOTIFY triggers that \`pgstash migrate up\` installs (a statement trigger on every user table, plus event triggers): pgbench builtin tpcb-like (W4) at $CHECK_CLIENTS clients without them and with them, alternated in $TRIGGER_ROUNDS rounds per mode, compared by median TPS." ;;
  esac
}

# ---------------------------------------------------------------------------
# Cache hit counters. Each prints "hits misses" (cumulative since the target
# started) or nothing when they can't be read; never fails.
# ---------------------------------------------------------------------------

# pgstash: Prometheus text from http://ADDR/metrics; sums over label values.
# A sample is `name{labels} value [timestamp]`; label values may hold spaces.
metrics_counters() {
  { curl -fsS --max-time 3 "http://$1/metrics" 2>/dev/null || true; } | awk '
    /^#/ || NF < 2 { next }
    {
      name = $1; sub(/\{.*/, "", name)
      if (name != "pgstash_cache_hits_total" && name != "pgstash_cache_misses_total") next
      rest = $0
      if (index(rest, "}") > 0) { while ((j = index(rest, "}")) > 0) rest = substr(rest, j + 1) }
      else rest = substr(rest, index(rest, " ") + 1)
      split(rest, v, " ")
      if (name == "pgstash_cache_hits_total") h += v[1]; else m += v[1]
      seen = 1
    }
    END { if (seen) printf "%.0f %.0f\n", h, m }'
}

# pgpool: SHOW pool_cache — num_cache_hits, and num_selects (the SELECTs that
# were not hits: cache_hit_ratio = hits / (hits + selects)).
pgpool_counters() {
  { "$PG_BIN/psql" -X -At -F ' ' -h 127.0.0.1 -p "$1" -U postgres -d postgres \
      -c 'SHOW pool_cache' 2>/dev/null || true; } | awk 'NF >= 2 && $1 ~ /^[0-9]+$/ { print $1, $2; exit }'
}

# hit_counters TARGET: the counters of a target that has a cache; returns 1
# (printing nothing) for targets without one.
hit_counters() {
  case "$1" in
    pgstash|pgstash-*) [[ -n "${T_METRICS[$1]:-}" ]] && metrics_counters "${T_METRICS[$1]}"; return 0 ;;
    pgpool) pgpool_counters "${T_PORT[pgpool]}"; return 0 ;;
    *) return 1 ;;
  esac
}

# hit_ratio "h0 m0" "h1 m1": Δhits / (Δhits + Δmisses), or nothing.
hit_ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (split(a, x, " ") < 2 || split(b, y, " ") < 2) exit
    dh = y[1] - x[1]; dm = y[2] - x[2]
    if (dh >= 0 && dm >= 0 && dh + dm > 0) printf "%.4f\n", dh / (dh + dm) }'
}

# ---------------------------------------------------------------------------
# One pgbench run: run_one WORKLOAD MODE CLIENTS TARGET [LABEL]; appends a row
# to $RESULTS, whose target column is LABEL (default TARGET; TRIGGERS uses
# labels like direct.on.2). Runs RUN_DURATION seconds if set, else DURATION.
# RUN_ROUND, if set while REPEAT > 1, is the round (1..REPEAT) of a repeated
# cell: it names the run's directory and the log line, not the row (a cell's
# rows are in RESULTS in round order; see cell_results).
# Columns: workload mode clients target tps tx p50_ms p99_ms failed
#          proxy_cpu_us pg_cpu_us hit_ratio status
# hit_ratio: a fraction; "n/a" for a cache whose counters couldn't be read
# (or that counted no lookups); empty for targets without a cache.
# ---------------------------------------------------------------------------
RESULTS=""
run_one() {
  local wl=$1 mode=$2 clients=$3 t=$4 label=${5:-$4} dur=${RUN_DURATION:-$DURATION}
  local jobs=1 dir out rc pg0 pg1 px0 px1 tps tx failed p50 p99 pxcpu pgcpu status=ok
  local cached=0 c0="" c1="" hit="" round=""
  (( clients >= 2 && clients % 2 == 0 )) && jobs=2   # 2 cores on the bench box
  if (( REPEAT > 1 )); then round=${RUN_ROUND:-}; fi
  dir="$WORK/runs/${wl}_${mode}_c${clients}_${label}${round:+_r$round}"
  mkdir -p "$dir"
  workload_args "$wl"

  if ! ensure_alive "$t"; then
    printf '%s\t%s\t%s\t%s\t\t\t\t\t\t\t\t\t%s\n' "$wl" "$mode" "$clients" "$label" "target down" >>"$RESULTS"
    return 0
  fi

  log "run $wl mode=$mode clients=$clients target=$label (${dur}s${round:+, round $round of $REPEAT})"
  if c0="$(hit_counters "$t")"; then cached=1; fi
  pg0=$(tree_ticks "$PG_PID"); px0=$(target_ticks "$t")
  # timeout guards against a proxy that hangs; -n everywhere for fairness.
  if run_child timeout $(( dur + 60 )) "$PG_BIN/pgbench" -n -M "$mode" -c "$clients" -j "$jobs" \
       -T "$dur" "${WL_ARGS[@]}" --log --log-prefix="$dir/tx" \
       -h 127.0.0.1 -p "${T_PORT[$t]}" -U postgres postgres >"$dir/pgbench.out" 2>&1; then
    rc=0
  else
    rc=$?
  fi
  # Give exiting backends a moment to be reaped into the postmaster's cutime.
  sleep 0.5
  pg1=$(tree_ticks "$PG_PID"); px1=$(target_ticks "$t")
  if [[ $cached -eq 1 ]]; then
    c1="$(hit_counters "$t")"
    hit="$(hit_ratio "$c0" "$c1")"
    if [[ -z "$hit" ]]; then
      hit="n/a"
      if [[ "$t" == pgpool ]]; then
        note_once "hit-$t" "pgpool hit ratio n/a: \`SHOW pool_cache\` gave no usable counters (before: '${c0}', after: '${c1}')"
      elif [[ -n "${T_METRICS[$t]:-}" ]]; then
        if [[ -z "$c0" || -z "$c1" ]]; then
          note_once "hit-$t" "$t hit ratio n/a: no pgstash_cache_hits_total/pgstash_cache_misses_total at http://${T_METRICS[$t]}/metrics"
        else
          note_once "hit0-$t" "$t hit ratio n/a for runs where its metrics counted no cache lookups (first: $wl/$mode/c$clients)"
        fi
      fi
    fi
  fi

  out="$dir/pgbench.out"
  tps=$(awk '/^tps = .*without initial connection time/ {print $3}' "$out")
  tx=$(awk -F': *' '/^number of transactions actually processed/ {split($2, a, "/"); print a[1]+0}' "$out")
  failed=$(awk -F': *' '/^number of failed transactions/ {print $2+0}' "$out")
  [[ -z "$failed" ]] && failed=0
  if [[ $rc -ne 0 ]]; then
    status="pgbench exit $rc"
    [[ $rc -eq 124 ]] && status="pgbench timed out"
    grep -q 'Run was aborted' "$out" && status="aborted (exit $rc)"
    note "$wl/$mode/c$clients/$label: $status; last pgbench lines: $(grep -v '^$' "$out" | tail -n 3 | tr '\n' ' ' | cut -c1-400)"
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
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
    "$wl" "$mode" "$clients" "$label" "$tps" "$tx" "${p50:-}" "${p99:-}" "$failed" "$pxcpu" "$pgcpu" "$hit" "$status" >>"$RESULTS"
  log "  tps=${tps:-?} p50=${p50:-?}ms p99=${p99:-?}ms failed=$failed cpu/tx: target=${pxcpu:-?}us postgres=${pgcpu:-?}us${hit:+ hit ratio=$hit} [$status]"
  # pgbench logs can be large (one line per transaction); drop them now.
  [[ "$KEEP_TMP" == 1 ]] || rm -f "$dir"/tx.*
}

# ---------------------------------------------------------------------------
# Change sources: STALE (staleness of bypassing writes, per source) and
# TRIGGERS (the cost of the NOTIFY triggers). Both use pgstash instances of
# their own, started and stopped here, and leave the cluster as they found
# it: triggers removed (`pgstash migrate down`), the wal source's slot and
# publication dropped.
# ---------------------------------------------------------------------------
WAL_SLOT=pgstash_bench        # slot and publication of pgstash-wal
STALE_RESULTS=""              # TSV, see stale_row
STALE_BUCKETS=""              # the staleness histogram's bucket bounds, for the report

start_pgstash_notify() { start_pgstash_as pgstash-notify PGSTASH_INVALIDATION__SOURCE=notify; }
start_pgstash_wal() {
  start_pgstash_as pgstash-wal PGSTASH_INVALIDATION__SOURCE=wal \
    PGSTASH_INVALIDATION__SLOT="$WAL_SLOT" PGSTASH_INVALIDATION__PUBLICATION="$WAL_SLOT"
}

# Stop a target started for one workload only, and forget it.
stop_target() {
  local t=$1
  [[ -n "${T_PID[$t]:-}" ]] && stop_target_pid "$t" "${T_PID[$t]}"
  unset 'T_PID[$t]'
  T_STATUS[$t]=""
  return 0
}

# The last lines of a log on one line, without terminal colours.
log_tail() { tail -n "${2:-3}" "$1" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ' | cut -c1-300; }

# `pgstash migrate ARGS...` against our Postgres (output in migrate.log).
pgstash_migrate() {
  log "pgstash migrate $*"
  (cd "$WORK" && "$BENCH_PGSTASH_BIN" --upstream "postgres://postgres@127.0.0.1:$PGPORT/postgres" \
     migrate "$@") >>"$WORK/migrate.log" 2>&1
}

# Migrations applied (rows of pgstash.schema_migrations; 0 without it).
migrations_applied() {
  if [[ "$(pg_sql -At -c "SELECT to_regclass('pgstash.schema_migrations') IS NOT NULL")" == t ]]; then
    pg_sql -At -c 'SELECT count(*) FROM pgstash.schema_migrations'
  else
    echo 0
  fi
}

notify_triggers() { pg_sql -At -c "SELECT count(*) FROM pg_trigger WHERE tgname = 'pgstash_notify'"; }

# set_triggers on|off: `pgstash migrate up`, or revert what the harness
# applied (`pgstash migrate down --steps N`, back to the migrations found
# before the first call). Returns 1 with the reason in WHY.
MIGRATIONS_BASE=""
TRIGGERS_ON=0
set_triggers() {
  local n
  WHY=""
  [[ -n "$BENCH_PGSTASH_BIN" && $PGSTASH_BUILT -eq 1 ]] || { WHY="no pgstash binary: $PGSTASH_BUILD_ERR"; return 1; }
  [[ -n "$MIGRATIONS_BASE" ]] || MIGRATIONS_BASE="$(migrations_applied)"
  if [[ "$1" == on ]]; then
    TRIGGERS_ON=1
    if ! pgstash_migrate up; then
      WHY="\`pgstash migrate up\` failed: $(log_tail "$WORK/migrate.log" 2)"; return 1
    fi
    n="$(notify_triggers)"
    (( n > 0 )) || { WHY="\`pgstash migrate up\` installed no pgstash_notify trigger"; return 1; }
    log "$n pgstash_notify triggers installed"
  else
    n=$(( $(migrations_applied) - MIGRATIONS_BASE ))
    if (( n > 0 )) && ! pgstash_migrate down --steps "$n"; then
      WHY="\`pgstash migrate down --steps $n\` failed: $(log_tail "$WORK/migrate.log" 2)"; return 1
    fi
    n="$(notify_triggers)"
    (( n == 0 )) || { WHY="$n pgstash_notify triggers left after \`pgstash migrate down\`"; return 1; }
    TRIGGERS_ON=0
  fi
}

# The text of a pgstash /metrics page, or nothing.
metrics_text() { curl -fsS --max-time 3 "http://$1/metrics" 2>/dev/null || true; }

# Sum of the samples of metric NAME whose labels contain SUBSTRING (may be
# empty) at ADDR: metric_sum ADDR NAME SUBSTRING. Prints 0 when none.
metric_sum() {
  metrics_text "$1" | awk -v name="$2" -v sub_="$3" '
    /^#/ || NF < 2 { next }
    {
      n = $1; sub(/\{.*/, "", n)
      if (n != name || index($0, sub_) == 0) next
      rest = $0
      if (index(rest, "}") > 0) { while ((j = index(rest, "}")) > 0) rest = substr(rest, j + 1) }
      else rest = substr(rest, index(rest, " ") + 1)
      split(rest, v, " "); s += v[1]
    }
    END { printf "%.0f\n", s }'
}

# Whether every pgstash_source_healthy{source=SOURCE,...} sample at ADDR is 1
# (and there is one): source_healthy ADDR SOURCE.
source_healthy() {
  metrics_text "$1" | awk -v s="source=\"$2\"" '
    index($0, "pgstash_source_healthy{") == 1 && index($0, s) > 0 {
      rest = $0; while ((j = index(rest, "}")) > 0) rest = substr(rest, j + 1)
      split(rest, v, " "); n++; if (v[1] + 0 != 1) bad = 1
    }
    END { exit !(n > 0 && !bad) }'
}

# Start pgstash-SOURCE (unless running) and wait up to 30 s for its source to
# vouch for the database. Returns 1 with the reason in WHY.
start_source() {
  local src=$1 t="pgstash-$1" _
  WHY=""
  if [[ "${T_STATUS[$t]:-}" != ok ]] || ! kill -0 "${T_PID[$t]}" 2>/dev/null; then
    T_STATUS[$t]=""
    start_target "$t" || { WHY="${T_STATUS[$t]}"; return 1; }
  fi
  [[ -n "${T_METRICS[$t]:-}" ]] || { WHY="no pgstash metrics: ${METRICS_WHY:-not served}"; return 1; }
  for _ in $(seq 1 150); do
    source_healthy "${T_METRICS[$t]}" "$src" && return 0
    kill -0 "${T_PID[$t]}" 2>/dev/null || { WHY="$t exited: $(log_tail "$WORK/$t.log")"; return 1; }
    sleep 0.2
  done
  WHY="the $src source did not report healthy within 30 s (pgstash_source_healthy); log tail: $(log_tail "$WORK/$t.log")"
  return 1
}

# Drop the wal source's slot and publication (pgstash leaves both behind on
# purpose: they are what lets it resume). The walsender of a pgstash that
# just stopped may hold the slot for a moment.
drop_wal_slot() {
  local left=1 _
  for _ in $(seq 1 100); do
    pg_sql -At -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$WAL_SLOT' AND NOT active" \
      >/dev/null 2>&1 || true
    left="$(pg_sql -At -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$WAL_SLOT'")"
    [[ "$left" == 0 ]] && break
    sleep 0.1
  done
  pg_sql -c "DROP PUBLICATION IF EXISTS $WAL_SLOT" >/dev/null 2>&1 || note "could not drop publication $WAL_SLOT"
  if [[ "$left" != 0 ]]; then
    note "replication slot $WAL_SLOT still there after the wal source stopped (it retains WAL for the rest of the run)"
  else
    log "dropped replication slot and publication $WAL_SLOT"
  fi
}

# staleness_hist ADDR SOURCE: the pgstash_staleness_seconds{source=SOURCE}
# histogram at ADDR as lines "LE COUNT" (cumulative, as exposed), "sum S"
# and "count N"; nothing when absent.
staleness_hist() {
  metrics_text "$1" | awk -v s="source=\"$2\"" '
    function val(line,  r, j, v) { r = line; while ((j = index(r, "}")) > 0) r = substr(r, j + 1); split(r, v, " "); return v[1] }
    index($0, "pgstash_staleness_seconds_") != 1 || index($0, s) == 0 { next }
    /^pgstash_staleness_seconds_bucket\{/ { if (match($0, /le="[^"]*"/)) print substr($0, RSTART + 4, RLENGTH - 5), val($0); next }
    /^pgstash_staleness_seconds_sum\{/ { print "sum", val($0) }
    /^pgstash_staleness_seconds_count\{/ { print "count", val($0) }'
}

# stale_stats BEFORE AFTER: from two staleness_hist snapshots, the run's
# observations (Δ of each cumulative bucket) and
#   "count p50 p99 p99_lo p99_hi max_hi mean" (ms; tab-separated)
# where pNN interpolates linearly inside the bucket holding the rank q × count
# (as Prometheus' histogram_quantile does; the first bucket starts at 0),
# p99_lo/p99_hi are that bucket's bounds, max_hi is the upper bound of the
# highest bucket that gained an observation, and a quantile in the +Inf
# bucket is ">LAST" (LAST = the highest finite bound). Nothing when the
# snapshots are unusable; count 0 when there were no observations.
stale_stats() {
  # FILENAME, not NR == FNR: BEFORE is empty when the source had not
  # observed anything yet (a labelled histogram appears with its first value).
  awk '
    FILENAME == ARGV[1] { b[$1] = $2; next }
    { a[$1] = $2 }
    function ms(x) { return sprintf("%.3f", 1000 * x) }
    function q(p,   r, i, lo, c0) {
      r = p * total
      for (i = 1; i <= n; i++) if (c[i] >= r) break
      lo = (i == 1) ? 0 : key[i - 1]; c0 = (i == 1) ? 0 : c[i - 1]
      qlo = lo; qhi = key[i]
      if (ub[i] == "+Inf") { qhi = "inf"; return ">" ms(lo) }
      return ms(lo + (key[i] - lo) * (c[i] > c0 ? (r - c0) / (c[i] - c0) : 1))
    }
    END {
      n = 0
      for (k in a) {
        if (k == "sum" || k == "count") continue
        n++; ub[n] = k; key[n] = (k == "+Inf") ? 1e300 : k + 0; c[n] = a[k] - ((k in b) ? b[k] : 0)
      }
      if (n == 0) exit
      for (i = 2; i <= n; i++)
        for (j = i; j > 1 && key[j - 1] > key[j]; j--) {
          t = key[j]; key[j] = key[j - 1]; key[j - 1] = t
          t = ub[j]; ub[j] = ub[j - 1]; ub[j - 1] = t
          t = c[j]; c[j] = c[j - 1]; c[j - 1] = t
        }
      total = c[n]
      if (total <= 0) { printf "0\t\t\t\t\t\t\n"; exit }
      p50 = q(0.50)
      p99 = q(0.99); lo99 = ms(qlo); hi99 = (qhi == "inf") ? "inf" : ms(qhi)
      for (i = 1; i <= n; i++) if (c[i] - (i == 1 ? 0 : c[i - 1]) > 0) top = i
      maxhi = (ub[top] == "+Inf") ? "inf" : ms(key[top])
      mean = ("count" in a && a["count"] - b["count"] > 0) ? ms((a["sum"] - b["sum"]) / (a["count"] - b["count"])) : ""
      printf "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", total, p50, p99, lo99, hi99, maxhi, mean
    }' "$1" "$2"
}

# STALE_RESULTS columns: source mode clients w5_tps hit_ratio writer_tx
#   writer_tps w5_updates count p50_ms p99_ms p99_lo_ms p99_hi_ms max_hi_ms
#   mean_ms unhealthy_bypasses status
stale_row() {   # SOURCE MODE CLIENTS STATUS: a row with no measurements
  printf '%s\t%s\t%s\t\t\t\t\t\t\t\t\t\t\t\t\t\t%s\n' "$1" "$2" "$3" "$4" >>"$STALE_RESULTS"
}

# One STALE run: W5 through pgstash-SOURCE (run_one, a STALE row in RESULTS)
# while the bypassing writer runs straight against Postgres; the staleness
# histogram is scraped before and after.
stale_run() {
  local src=$1 mode=$2 c=$3 t="pgstash-$1" dir wdir wrc=0 row stats
  local w5_tps w5_hit w5_status wtx wtps upd u0 u1 status=ok
  dir="$WORK/runs/STALE_${mode}_c${c}_${t}"
  wdir="$WORK/runs/STALE_${mode}_c${c}_${t}_writer"
  mkdir -p "$wdir"
  staleness_hist "${T_METRICS[$t]}" "$src" >"$wdir/hist0"
  u0="$(metric_sum "${T_METRICS[$t]}" pgstash_cache_bypass_total 'reason="source_unhealthy"')"
  log "STALE $src: bypassing writer, $STALE_WRITERS clients at $STALE_RATE tx/s straight to Postgres"
  "$PG_BIN/pgbench" -n -M simple -c "$STALE_WRITERS" -j 1 -R "$STALE_RATE" -T "$STALE_DURATION" \
    -f "$WORK/scripts/w5_update.sql" -h 127.0.0.1 -p "$PGPORT" -U postgres postgres \
    >"$wdir/pgbench.out" 2>&1 &
  BG_PID=$!
  RUN_DURATION=$STALE_DURATION run_one STALE "$mode" "$c" "$t"
  wait "$BG_PID" || wrc=$?
  BG_PID=""
  # Let the source deliver what the last writes sent.
  sleep 1
  staleness_hist "${T_METRICS[$t]}" "$src" >"$wdir/hist1"
  [[ -n "$STALE_BUCKETS" ]] || STALE_BUCKETS="$(awk '$1 != "sum" && $1 != "count" { print $1 }' "$wdir/hist1" | sort -g | paste -sd ' ' -)"
  u1="$(metric_sum "${T_METRICS[$t]}" pgstash_cache_bypass_total 'reason="source_unhealthy"')"

  row="$(tail -n 1 "$RESULTS")"
  w5_tps="$(cut -f5 <<<"$row")"; w5_hit="$(cut -f12 <<<"$row")"; w5_status="$(cut -f13 <<<"$row")"
  [[ "$w5_status" != ok ]] && status="W5: $w5_status"
  wtx=$(awk -F': *' '/^number of transactions actually processed/ {split($2, a, "/"); print a[1]+0}' "$wdir/pgbench.out")
  wtps=$(awk '/^tps = .*without initial connection time/ {print $3}' "$wdir/pgbench.out")
  if [[ $wrc -ne 0 ]]; then
    if [[ "$status" == ok ]]; then status="writer: pgbench exit $wrc"; else status+="; writer: pgbench exit $wrc"; fi
    note "STALE/$src/$mode: the bypassing writer failed (exit $wrc): $(grep -v '^$' "$wdir/pgbench.out" | tail -n 3 | tr '\n' ' ' | cut -c1-300)"
  fi
  # W5's own UPDATEs (script 2), relayed by pgstash: the source reports
  # them as well, so they are observations too.
  upd=$(awk '/^SQL script 2:/ { s = 1 } s && /^ - [0-9]+ transactions/ { print $2; exit }' "$dir/pgbench.out" 2>/dev/null || true)
  stats="$(stale_stats "$wdir/hist0" "$wdir/hist1")"
  if [[ -z "$stats" ]]; then
    stats=$'\t\t\t\t\t\t'
    [[ "$status" == ok ]] && status="no pgstash_staleness_seconds{source=\"$src\"} at http://${T_METRICS[$t]}/metrics"
  elif [[ "${stats%%$'\t'*}" == 0 && "$status" == ok ]]; then
    status="no staleness observations"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$src" "$mode" "$c" "$w5_tps" "$w5_hit" "${wtx:-}" "${wtps:-}" "${upd:-}" \
    "$stats" "$(( u1 - u0 ))" "$status" >>"$STALE_RESULTS"
  log "  staleness ($src): $(awk -F'\t' '{ printf "%s observations, p50 %s ms, p99 %s ms (bucket %s..%s ms), max <= %s ms", $1, $2, $3, $4, $5, $6 }' <<<"$stats"); source_unhealthy bypasses: $(( u1 - u0 ))"
}

# synchronous_commit of the whole cluster: set_sync_commit on|off|reset.
set_sync_commit() {
  if [[ "$1" == reset ]]; then
    pg_sql -c 'ALTER SYSTEM RESET synchronous_commit' -c 'SELECT pg_reload_conf()' >/dev/null
  else
    pg_sql -c "ALTER SYSTEM SET synchronous_commit = $1" -c 'SELECT pg_reload_conf()' >/dev/null
  fi
}

run_stale() {
  local src mode c=$CHECK_CLIENTS t
  set_sync_commit "$STALE_SYNC_COMMIT"
  for src in $STALE_SOURCES; do
    t="pgstash-$src"
    WHY=""
    case "$src" in
      notify) set_triggers on || true ;;
      # The wal source needs the migrations (its DDL hooks), not the NOTIFY row
      # triggers: switched off, as a wal user would.
      wal)
        if [[ "$(pg_sql -At -c 'SHOW wal_level')" != logical ]]; then
          WHY="wal_level is not logical"
        elif set_triggers on; then
          pg_sql -At -c "SELECT pgstash.set_row_triggers(false)" >/dev/null ||
            WHY="SELECT pgstash.set_row_triggers(false) failed"
        fi ;;
    esac
    [[ -z "$WHY" ]] && { start_source "$src" || true; }
    if [[ -n "$WHY" ]]; then
      note "STALE $src: $WHY"
      for mode in $(workload_modes STALE); do stale_row "$src" "$mode" "$c" "$WHY"; done
    else
      for mode in $(workload_modes STALE); do stale_run "$src" "$mode" "$c"; done
    fi
    stop_target "$t"
    case "$src" in
      notify) set_triggers off || note "STALE notify: could not remove the triggers: $WHY" ;;
      wal)
        drop_wal_slot
        set_triggers off || note "STALE wal: could not revert the migrations: $WHY" ;;
    esac
  done
  set_sync_commit reset
}

# ABBA order of the TRIGGERS conditions ("off:1 on:1 on:2 off:2 off:3 on:3"),
# so that neither condition always runs later (W4 slows down as its tables
# grow and bloat), and the triggers are toggled only when the condition
# changes.
trigger_order() {
  local r out=()
  for (( r = 1; r <= TRIGGER_ROUNDS; r++ )); do
    if (( r % 2 )); then out+=("off:$r" "on:$r"); else out+=("on:$r" "off:$r"); fi
  done
  echo "${out[*]}"
}

run_triggers() {
  local mode c=$CHECK_CLIENTS k cond r prev="" t ok
  [[ "${T_STATUS[direct]:-}" == ok ]] || start_target direct
  for mode in $(workload_modes TRIGGERS); do
    for k in $(trigger_order); do
      cond=${k%%:*}; r=${k#*:}
      ok=1
      if [[ "$cond" != "$prev" ]]; then
        stop_target pgstash-notify
        if ! set_triggers "$cond"; then
          note "TRIGGERS: could not switch the triggers $cond: $WHY"
          ok=0; prev=""
        else
          prev=$cond
        fi
      fi
      for t in $TRIGGER_TARGETS; do
        if [[ $ok -eq 0 ]]; then
          printf '%s\t%s\t%s\t%s\t\t\t\t\t\t\t\t\t%s\n' TRIGGERS "$mode" "$c" "$t.$cond.$r" "triggers not switched $cond" >>"$RESULTS"
          continue
        fi
        case "$t:$cond" in
          direct:*) run_one TRIGGERS "$mode" "$c" direct "direct.$cond.$r" ;;
          pgstash:off)
            if [[ "${T_STATUS[pgstash]:-}" == ok ]]; then
              run_one TRIGGERS "$mode" "$c" pgstash "pgstash.off.$r"
            else
              printf '%s\t%s\t%s\t%s\t\t\t\t\t\t\t\t\t%s\n' TRIGGERS "$mode" "$c" "pgstash.off.$r" "pgstash unavailable" >>"$RESULTS"
            fi ;;
          pgstash:on)
            if start_source notify; then
              run_one TRIGGERS "$mode" "$c" pgstash-notify "pgstash.on.$r"
            else
              note_once trig-notify "TRIGGERS: pgstash-notify unavailable: $WHY"
              printf '%s\t%s\t%s\t%s\t\t\t\t\t\t\t\t\t%s\n' TRIGGERS "$mode" "$c" "pgstash.on.$r" "pgstash-notify unavailable" >>"$RESULTS"
            fi ;;
          *) note_once "trig-$t" "TRIGGER_TARGETS: unknown target $t (known: direct pgstash)" ;;
        esac
      done
    done
  done
  stop_target pgstash-notify
  [[ $TRIGGERS_ON -eq 1 ]] && { set_triggers off || note "TRIGGERS: could not remove the triggers: $WHY"; }
  return 0
}

# ---------------------------------------------------------------------------
# Target check list (DESIGN.md "Performance targets", "Caching must never
# lose"), computed from $CELLS at CHECK_CLIENTS clients.
# ---------------------------------------------------------------------------

# One row per cell (workload, mode, clients, target) of the ordinary
# workloads, from RESULTS, which has one row per run: with REPEAT > 1 a cell
# has up to REPEAT rows there, in round order. Writes $CELLS, the cells in
# the order they first ran, with RESULTS' 13 columns plus a 14th, runs:
#   tps, p50_ms, p99_ms, proxy_cpu_us, pg_cpu_us, hit_ratio: the median over
#     the runs that have a value, each column on its own (with an even count,
#     the mean of the two middle values); hit_ratio is "n/a" when no run has
#     a number but one has n/a
#   tx, failed: the sum over the runs
#   status: "ok" when every run was ok, else the first failing run's status,
#     followed by "(run k of REPEAT)" when REPEAT > 1
#   runs: each run's TPS, rounded, in round order ("—" for a run without a
#     TPS, and for rounds that did not run because the target had gone down)
# A cell with one run keeps that run's fields as they are (the same
# strings), so with REPEAT=1 the report is what it was without REPEAT.
# STALE and TRIGGERS rows are left out: their sections read RESULTS.
CELLS=""
cell_results() {
  awk -F'\t' -v OFS='\t' -v rep="$REPEAT" '
    $1 == "STALE" || $1 == "TRIGGERS" { next }
    {
      k = $1 SUBSEP $2 SUBSEP $3 SUBSEP $4
      if (!(k in cnt)) { cnt[k] = 0; order[++ncells] = k }
      i = ++cnt[k]
      for (f = 1; f <= 13; f++) val[k, i, f] = $f
    }
    # median of column f over the runs of cell k that have a number there;
    # the middle string itself for an odd count, else the mean printed by fmt.
    function med(k, f, fmt,   n, i, j, x, v) {
      n = 0
      for (i = 1; i <= cnt[k]; i++) { x = val[k, i, f]; if (x != "" && x != "n/a") v[++n] = x }
      if (n == 0) return ""
      for (i = 2; i <= n; i++)
        for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { x = v[j]; v[j] = v[j - 1]; v[j - 1] = x }
      if (n % 2) return v[(n + 1) / 2]
      return sprintf(fmt, (v[n / 2] + v[n / 2 + 1]) / 2)
    }
    function sum(k, f,   n, i, x, s) {
      if (cnt[k] == 1) return val[k, 1, f]
      n = 0; s = 0
      for (i = 1; i <= cnt[k]; i++) { x = val[k, i, f]; if (x != "") { n++; s += x } }
      return n ? sprintf("%d", s) : ""
    }
    END {
      for (c = 1; c <= ncells; c++) {
        k = order[c]
        hit = med(k, 12, "%.4f")
        if (hit == "") for (i = 1; i <= cnt[k]; i++) if (val[k, i, 12] == "n/a") hit = "n/a"
        status = "ok"
        for (i = 1; i <= cnt[k]; i++) if (val[k, i, 13] != "ok") {
          status = val[k, i, 13] (rep > 1 ? " (run " i " of " rep ")" : ""); break
        }
        runs = ""
        for (i = 1; i <= (cnt[k] > rep ? cnt[k] : rep); i++)
          runs = runs (i > 1 ? ", " : "") (i > cnt[k] || val[k, i, 5] == "" ? "—" : sprintf("%.0f", val[k, i, 5]))
        print val[k, 1, 1], val[k, 1, 2], val[k, 1, 3], val[k, 1, 4], med(k, 5, "%.6f"), sum(k, 6),
          med(k, 7, "%.3f"), med(k, 8, "%.3f"), sum(k, 9), med(k, 10, "%.1f"), med(k, 11, "%.1f"),
          hit, status, runs
      }
    }' "$RESULTS" >"$CELLS"
}

declare -A R_TPS=() R_PXCPU=() R_PGCPU=() R_HIT=() R_STATUS=()
load_results() {
  local wl mode c t tps tx p50 p99 failed pxcpu pgcpu hit status k
  # Unit separator instead of tab: read collapses runs of whitespace IFS
  # characters, which would shift the empty fields of a "target down" row.
  while IFS=$'\037' read -r wl mode c t tps tx p50 p99 failed pxcpu pgcpu hit status _; do
    k="$wl|$mode|$c|$t"
    R_TPS[$k]="$tps"; R_PXCPU[$k]="$pxcpu"; R_PGCPU[$k]="$pgcpu"; R_HIT[$k]="$hit"; R_STATUS[$k]="$status"
  done < <(tr '\t' '\037' <"$CELLS")
}

CHECK_LINES=()
declare -A CHECK_COUNT=([met]=0 ["NOT met"]=0 [n/a]=0)
add_check() {   # VERDICT LABEL DETAIL
  CHECK_LINES+=("- **$1** — $2${3:+ — $3}")
  CHECK_COUNT[$1]=$(( ${CHECK_COUNT[$1]} + 1 ))
}

# fetch FIELD:WORKLOAD:MODE:TARGET — the field (tps, pxcpu, pgcpu, hit) of
# that run at CHECK_CLIENTS clients: sets V, or sets WHY and returns 1.
fetch() {
  local field wl mode t key
  IFS=: read -r field wl mode t <<<"$1"
  key="$wl|$mode|$CHECK_CLIENTS|$t"
  V=""; WHY=""
  if [[ -z "${R_STATUS[$key]+x}" ]]; then
    if ! has "$TARGETS" "$t"; then WHY="$t not in TARGETS"
    elif [[ "${T_STATUS[$t]:-}" != ok ]]; then WHY="$t unavailable"
    else WHY="no $wl -M $mode run with $CHECK_CLIENTS clients"; fi
    return 1
  fi
  if [[ "${R_STATUS[$key]}" != ok ]]; then
    WHY="$wl -M $mode, $CHECK_CLIENTS clients, $t: ${R_STATUS[$key]}"; return 1
  fi
  case "$field" in
    tps)   V="${R_TPS[$key]}" ;;
    pxcpu) V="${R_PXCPU[$key]}" ;;
    pgcpu) V="${R_PGCPU[$key]}" ;;
    hit)   V="${R_HIT[$key]}"; [[ "$V" == n/a ]] && V="" ;;
  esac
  if [[ -z "$V" ]]; then
    WHY="no $field for $wl -M $mode, $CHECK_CLIENTS clients, $t"
    [[ "$field" == hit && "$t" == pgstash* && -n "$METRICS_WHY" ]] && WHY="hit ratio n/a: $METRICS_WHY"
    return 1
  fi
}

# cmp_check LABEL SPEC_A OP FACTOR SPEC_B UNIT: met when A OP FACTOR × B
# (OP is >=, > or <).
cmp_check() {
  local label=$1 sa=$2 op=$3 f=$4 sb=$5 unit=$6 a b v
  fetch "$sa" || { add_check n/a "$label" "$WHY"; return 0; }; a=$V
  fetch "$sb" || { add_check n/a "$label" "$WHY"; return 0; }; b=$V
  if awk -v a="$a" -v b="$b" -v f="$f" -v op="$op" \
       'BEGIN { r = f * b; exit !(op == ">=" ? a >= r : (op == ">" ? a > r : a < r)) }'; then
    v=met
  else
    v="NOT met"
  fi
  add_check "$v" "$label" "$(awk -v a="$a" -v b="$b" -v u="$unit" \
    'BEGIN { printf "%.1f %s vs %.1f %s (%s×)", a, u, b, u, (b + 0 == 0 ? "∞" : sprintf("%.2f", a / b)) }')"
}

# min_check LABEL SPEC MIN: met when the value is at least MIN (a fraction,
# shown as a percentage).
min_check() {
  local label=$1 spec=$2 min=$3 v
  fetch "$spec" || { add_check n/a "$label" "$WHY"; return 0; }
  if awk -v a="$V" -v m="$min" 'BEGIN { exit !(a >= m) }'; then v=met; else v="NOT met"; fi
  add_check "$v" "$label" "$(awk -v a="$V" 'BEGIN { printf "%.1f %%", 100 * a }')"
}

target_checks() {
  local m wl
  for m in simple extended; do
    cmp_check "W1 -M $m: pgstash ≥ 3× direct TPS" "tps:W1:$m:pgstash" ">=" 3 "tps:W1:$m:direct" TPS
  done
  cmp_check "W1 -M prepared: pgstash > direct TPS" "tps:W1:prepared:pgstash" ">" 1 "tps:W1:prepared:direct" TPS
  for m in simple extended prepared; do
    cmp_check "W1 -M $m: pgstash ≥ 1.3× pgpool TPS" "tps:W1:$m:pgstash" ">=" 1.3 "tps:W1:$m:pgpool" TPS
  done
  cmp_check "W1 -M simple: pgstash ≥ \`SELECT 1\` straight to Postgres (SELECT1 reference)" \
    "tps:W1:simple:pgstash" ">=" 1 "tps:SELECT1:simple:direct" TPS
  for m in simple extended; do
    cmp_check "W3 -M $m: pgstash ≥ 1000× direct TPS" "tps:W3:$m:pgstash" ">=" 1000 "tps:W3:$m:direct" TPS
    cmp_check "W3 -M $m: pgstash > pgpool TPS" "tps:W3:$m:pgstash" ">" 1 "tps:W3:$m:pgpool" TPS
  done
  for m in simple extended; do
    min_check "W5 -M $m: pgstash hit ratio ≥ 90 %" "hit:W5:$m:pgstash" 0.9
    cmp_check "W5 -M $m: pgstash ≥ 2× direct TPS" "tps:W5:$m:pgstash" ">=" 2 "tps:W5:$m:direct" TPS
  done
  for wl in W2 W4; do
    for m in simple extended; do
      cmp_check "$wl -M $m: pgstash within 5 % of pgstash-nocache TPS (≥ 0.95×)" \
        "tps:$wl:$m:pgstash" ">=" 0.95 "tps:$wl:$m:pgstash-nocache" TPS
    done
  done
  # The foundation's targets (no cache yet when they were set, so pgstash-nocache is the
  # proxy they speak of; pgstash with its cache is held to them too, as users run it).
  local t
  for t in pgstash-nocache pgstash; do
    for m in simple extended; do
      cmp_check "W4 -M $m: $t ≥ 0.9× direct TPS" "tps:W4:$m:$t" ">=" 0.9 "tps:W4:$m:direct" TPS
      cmp_check "W4 -M $m: $t ≥ pgbouncer TPS" "tps:W4:$m:$t" ">=" 1 "tps:W4:$m:pgbouncer" TPS
      cmp_check "W2 -M $m: $t ≥ pgbouncer TPS" "tps:W2:$m:$t" ">=" 1 "tps:W2:$m:pgbouncer" TPS
    done
  done
  for m in simple extended prepared; do
    cmp_check "W1 -M $m: pgstash CPU per transaction (≈ per hit) < 1/5 of Postgres CPU per query under direct" \
      "pxcpu:W1:$m:pgstash" "<" 0.2 "pgcpu:W1:$m:direct" "µs"
  done
  stale_checks
  trigger_checks
}

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
# median of the numbers on stdin (one a line), or nothing.
median() {
  sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) exit; if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# TPS of the successful TRIGGERS runs of one target and condition, one a line:
# trigger_tps MODE TARGET COND.
trigger_tps() {
  awk -F'\t' -v m="$1" -v c="$CHECK_CLIENTS" -v p="$2.$3." \
    '$1 == "TRIGGERS" && $2 == m && $3 == c && index($4, p) == 1 && $13 == "ok" && $5 != "" { print $5 }' "$RESULTS"
}

stale_checks() {
  local src mode label n p50 p99 lo hi status v
  for src in notify wal; do
    for mode in $STALE_MODES; do
      label="staleness p99 < 50 ms ($src)"
      [[ "$STALE_MODES" == *" "* ]] && label+=", W5 -M $mode"
      if ! has "$WORKLOADS" STALE; then add_check n/a "$label" "STALE not in WORKLOADS"; continue; fi
      if ! has "$STALE_SOURCES" "$src"; then add_check n/a "$label" "$src not in STALE_SOURCES"; continue; fi
      n=""; status="not run"
      IFS=$'\037' read -r _ _ _ _ _ _ _ _ n p50 p99 lo hi _ _ _ status < <(
        awk -F'\t' -v s="$src" -v m="$mode" '$1 == s && $2 == m' "$STALE_RESULTS" | tail -n 1 | tr '\t' '\037') || true
      if [[ "$status" != ok ]]; then add_check n/a "$label" "$status"; continue; fi
      if [[ "$p99" != ">"* ]] && awk -v a="$p99" 'BEGIN { exit !(a < 50) }'; then v=met; else v="NOT met"; fi
      add_check "$v" "$label" "p99 $p99 ms (bucket $lo–$hi ms), p50 $p50 ms, $n observations; W5 -M $mode through pgstash at $CHECK_CLIENTS clients, bypassing writes at $STALE_RATE/s"
    done
  done
}

trigger_checks() {
  local m label off on v
  for m in simple extended; do
    label="W4 -M $m with notify triggers ≥ 0.90× without (direct, median TPS)"
    if ! has "$WORKLOADS" TRIGGERS; then add_check n/a "$label" "TRIGGERS not in WORKLOADS"; continue; fi
    if ! has "$(workload_modes TRIGGERS)" "$m"; then add_check n/a "$label" "$m not in MODES"; continue; fi
    off="$(trigger_tps "$m" direct off | median)"
    on="$(trigger_tps "$m" direct on | median)"
    if [[ -z "$off" || -z "$on" ]]; then add_check n/a "$label" "no successful W4 -M $m runs $([[ -z "$off" ]] && echo without || echo with) the triggers"; continue; fi
    if awk -v a="$on" -v b="$off" 'BEGIN { exit !(a >= 0.9 * b) }'; then v=met; else v="NOT met"; fi
    add_check "$v" "$label" "$(awk -v a="$on" -v b="$off" -v na="$(trigger_tps "$m" direct on | wc -l)" -v nb="$(trigger_tps "$m" direct off | wc -l)" \
      'BEGIN { printf "%.1f TPS with (median of %d) vs %.1f TPS without (median of %d) (%.2f×)", a, na, b, nb, (b + 0 == 0 ? 0 : a / b) }')"
  done
}

stale_section() {
  echo "## STALE"
  echo
  workload_desc STALE
  echo
  echo "Staleness is pgstash's histogram \`pgstash_staleness_seconds{source}\`: the time from a commit to pgstash having applied its invalidation (wal: the commit time the stream carries; notify: the writing transaction's start, \`now()\`, as the row trigger of migration 0004 reports it, so an upper bound that includes the transaction's own run time). Its p50 and p99 come from the Δ of its cumulative buckets over the run (scraped before the run and 1 s after it), interpolated linearly inside the bucket that holds the rank q × count, as Prometheus' \`histogram_quantile\` does (the first bucket starts at 0): estimates within the bucket shown. Buckets (upper bounds, s): ${STALE_BUCKETS:-n/a}. A source cannot tell the bypassing writes from W5's own UPDATEs, which pgstash relayed (and invalidated at commit itself): it reports both, so the observations are both kinds (\"bypassing writes\" + \"relayed W5 UPDATEs\"), going through the same path."
  echo
  echo "| source | mode | clients | W5 TPS through pgstash | hit ratio | bypassing writes (tx, TPS) | relayed W5 UPDATEs | observations | staleness p50 ms | staleness p99 ms | p99 bucket ms | max ≤ ms | mean ms | bypasses: source unhealthy | status |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  awk -F'\t' "$AWK_FMT_HIT"'
    function dash(x) { return x == "" ? "—" : x }
    {
      tps = $4 == "" ? "—" : sprintf("%.1f", $4)
      w = $6 == "" ? "—" : sprintf("%s (%.1f/s)", $6, $7)
      b = $12 == "" ? "—" : $12 "–" $13
      printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
        $1, $2, $3, tps, hitfmt($5), w, dash($8), dash($9), dash($10), dash($11), b, dash($14), dash($15), dash($16), $17
    }' "$STALE_RESULTS"
  echo
}

triggers_section() {
  local t m off on
  echo "## TRIGGERS"
  echo
  workload_desc TRIGGERS
  echo
  echo "Within each mode the runs alternate in the order $(trigger_order | sed -e 's/off:[0-9]*/without/g' -e 's/on:[0-9]*/with/g' -e 's/ /, /g') (ABBA, so that neither condition always runs later while W4's tables grow); the triggers are installed with \`pgstash migrate up\` and removed with \`pgstash migrate down\` when the condition changes. Single runs on a small machine vary by ±20 %: compare medians, not samples. Targets: \`direct\` is Postgres itself without and with the triggers; \`pgstash\` is pgstash with \`invalidation.source = \"proxy\"\` and no triggers, against a pgstash with \`source = \"notify\"\` listening to the triggers (\`pgstash-notify\`, started for the runs with triggers)."
  echo
  echo "| target | mode | clients | without | median TPS | with | median TPS | with ÷ without | TPS without (each run) | TPS with (each run) |"
  echo "|---|---|---:|---|---:|---|---:|---:|---|---|"
  for t in $TRIGGER_TARGETS; do
    for m in $(workload_modes TRIGGERS); do
      off="$(trigger_tps "$m" "$t" off | median)"
      on="$(trigger_tps "$m" "$t" on | median)"
      awk -v t="$t" -v m="$m" -v c="$CHECK_CLIENTS" -v a="$off" -v b="$on" \
        -v sa="$(awk -F'\t' -v m="$m" -v p="$t.off." '$1 == "TRIGGERS" && $2 == m && index($4, p) == 1 { printf "%s%s", n++ ? ", " : "", ($5 == "" ? "—" : sprintf("%.0f", $5)) }' "$RESULTS")" \
        -v sb="$(awk -F'\t' -v m="$m" -v p="$t.on." '$1 == "TRIGGERS" && $2 == m && index($4, p) == 1 { printf "%s%s", n++ ? ", " : "", ($5 == "" ? "—" : sprintf("%.0f", $5)) }' "$RESULTS")" \
        'BEGIN {
          na = t == "direct" ? "no triggers" : "source=proxy, no triggers"
          nb = t == "direct" ? "notify triggers" : "source=notify + triggers"
          r = (a == "" || b == "" || a + 0 == 0) ? "—" : sprintf("%.2f×", b / a)
          printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", t, m, c, na, (a == "" ? "—" : sprintf("%.1f", a)),
            nb, (b == "" ? "—" : sprintf("%.1f", b)), r, (sa == "" ? "—" : sa), (sb == "" ? "—" : sb)
        }'
    done
  done
  echo
  echo "Every run, in the order they ran:"
  echo
  echo "| mode | clients | target | triggers | round | TPS | p50 ms | p99 ms | proxy CPU µs/tx (direct: Postgres) | Postgres CPU µs/tx | failed tx | status |"
  echo "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
  awk -F'\t' '
    function dash(x) { return x == "" ? "—" : x }
    $1 == "TRIGGERS" {
      split($4, l, ".")
      printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, $3, l[1], (l[2] == "on" ? "with" : "without"), l[3],
        ($5 == "" ? "—" : sprintf("%.1f", $5)), dash($7), dash($8), dash($10), dash($11), dash($9), $13
    }' "$RESULTS"
  echo
}

# hit ratio cell: fraction → percentage; "n/a" as is; empty → "—".
AWK_FMT_HIT='function hitfmt(x) { return x == "" ? "—" : (x == "n/a" ? "n/a" : sprintf("%.1f %%", 100 * x)) }'

write_report() {
  local tmp="$OUT.tmp.$$" wl t reason load_end line
  load_end="$(cut -d' ' -f1-3 /proc/loadavg)"
  CELLS="$WORK/cells.tsv"
  cell_results
  load_results
  target_checks
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
    echo "- Machine: $(nproc) CPUs, $(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(awk '/^MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo); load average at start $LOAD_START, at end $load_end; kernel $(uname -r), sched_autogroup_enabled=$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo n/a) (each proxy in a session of its own)"
    echo "- PostgreSQL: $PG_VERSION (private cluster: fsync=off, synchronous_commit=off, full_page_writes=off, shared_buffers=256MB, max_connections=300$(if needs_logical_wal; then echo ", wal_level=logical for STALE's wal source"; fi); pgbench scale $SCALE)"
    if uses_pgstash; then
      echo "- pgstash: \`${BENCH_PGSTASH_BIN#"$ROOT/"}\` ($( [[ $PGSTASH_BUILT -eq 1 ]] && echo "source $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo 'with no git commit yet')" || echo "unavailable")), PGSTASH_POOL__MAX_SIZE=40, transaction pooling (default); \`pgstash-nocache\` is the same binary with PGSTASH_CACHE__ENABLED=false; \`pgstash-redis\` is the same binary with the shared tier (PGSTASH_REDIS__URL) on a private $(redis-server --version 2>/dev/null | awk '{print $1, $2, $3}' || echo redis-server) (no persistence), as scripts/run.sh runs it"
      if [[ -n "$METRICS_HOW" ]]; then
        echo "- pgstash hit ratio: Δpgstash_cache_hits_total / (Δhits + Δpgstash_cache_misses_total) over each run, summed over labels, scraped from \`http://127.0.0.1:<port>/metrics\` (address passed as ${METRICS_HOW/:/ })"
      else
        echo "- pgstash hit ratio: n/a — ${METRICS_WHY:-not measured}"
      fi
    fi
    if has "$TARGETS" pgbouncer; then
      echo "- pgbouncer: $( [[ "${T_STATUS[pgbouncer]:-}" == ok ]] && pgbouncer --version 2>/dev/null | head -n1 || echo unavailable), pool_mode=transaction, default_pool_size=40"
    fi
    if has "$TARGETS" pgpool && [[ "${T_STATUS[pgpool]:-}" != ok ]]; then
      echo "- pgpool: unavailable (see below)"
    elif has "$TARGETS" pgpool; then
      echo "- pgpool: $("$PGPOOL_BIN" --version 2>&1 | head -n1), num_init_children=$(awk -F"= *" '/^num_init_children/ {print $2}' "$WORK/pgpool/pgpool.conf" 2>/dev/null), backend_clustering_mode=raw, one backend, connection_cache=on, max_pool=1, load_balance_mode=off, memory_cache_enabled=on (memqcache_method=shmem, auto invalidation on writes); hit ratio from \`SHOW pool_cache\`: Δnum_cache_hits / (Δnum_cache_hits + Δnum_selects)"
    fi
    echo "- Each run: \`pgbench -n -T $DURATION -M <mode> -c <clients> -j <1|2>\`, no re-initialisation between runs (W4 and W5 modify data). \`-M prepared\` runs for W1 only; SELECT1 runs against direct with \`-M simple\` only.$(
      (( REPEAT > 1 )) && echo " REPEAT=$REPEAT: each value in the workload tables and the CPU table is the median of $REPEAT interleaved runs of its cell (workload, mode, clients, target): for each workload, mode and client count, round 1 over the targets in the order of TARGETS, round 2 in reverse order, and so on (ABBA), so that drift over time affects all targets alike. Each metric's median is taken on its own (with an even count, the mean of the two middle values), so one row's TPS and p99 may come from different runs; \"failed tx\" is the total over the runs; \"runs\" lists each run's TPS in round order; the status is \"ok\" only if every run was, else the first failing run's status with \"(run k of $REPEAT)\". Ratios and the target check list use the medians. Later rounds of a cell may find a cache warmed by its earlier rounds. STALE and TRIGGERS are not repeated (they have rounds of their own).")"
    echo
    for t in $TARGETS; do
      if [[ "${T_STATUS[$t]:-}" != ok ]]; then
        echo "**Unavailable target: $t** — ${T_STATUS[$t]:-not started}."
        echo
      fi
    done
    echo "## Targets"
    echo
    echo "From DESIGN.md, checked against this run at $CHECK_CLIENTS clients$( (( REPEAT > 1 )) && echo " (medians of $REPEAT interleaved runs)"): ${CHECK_COUNT[met]} met, ${CHECK_COUNT["NOT met"]} NOT met, ${CHECK_COUNT[n/a]} n/a (not measured in this run, with the reason)."
    echo
    for line in "${CHECK_LINES[@]}"; do echo "$line"; done
    echo
    for wl in $WORKLOADS; do
      case "$wl" in
        STALE) stale_section; continue ;;
        TRIGGERS) triggers_section; continue ;;
      esac
      echo "## $wl"
      echo
      workload_desc "$wl"
      echo
      if (( REPEAT > 1 )); then
        echo "| target | mode | clients | TPS | TPS/direct | runs | p50 ms | p99 ms | p50/direct | p99/direct | proxy CPU µs/tx (direct: Postgres) | Postgres CPU µs/tx | hit ratio | failed tx | status |"
        echo "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
      else
        echo "| target | mode | clients | TPS | TPS/direct | p50 ms | p99 ms | p50/direct | p99/direct | proxy CPU µs/tx (direct: Postgres) | Postgres CPU µs/tx | hit ratio | failed tx | status |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
      fi
      # f[14] (each run's TPS) only with REPEAT > 1, after TPS/direct.
      awk -F'\t' -v wl="$wl" -v rep="$REPEAT" "$AWK_FMT_HIT"'
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
            printf "| %s | %s | %s | %s | %s |%s %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
              f[4], f[2], f[3], tps, ratio(f[5], dt[key]), (rep > 1 ? " " f[14] " |" : ""), dash(f[7]), dash(f[8]),
              ratio(f[7], d50[key]), ratio(f[8], d99[key]), dash(f[10]), dash(f[11]), hitfmt(f[12]), dash(f[9]), f[13]
          }
        }' "$CELLS"
      echo
    done
    if has "$WORKLOADS" W1; then
      echo "## CPU per query (W1)"
      echo
      echo "CPU time per transaction (one W1 query) of each target's process tree, next to what Postgres itself spends per W1 query when queried directly (the \`direct\` run of the same mode and client count). A cache hit should cost far less than Postgres executing the query (target: pgstash < 1/5). A proxy's own CPU covers hits and misses alike, so for pgstash it is an upper bound on the cost of a hit."
      echo
      echo "| mode | clients | target | target CPU µs/tx | Postgres CPU µs/tx (same run) | target + Postgres µs/tx | target CPU ÷ Postgres CPU per query under direct | hit ratio |"
      echo "|---|---:|---|---:|---:|---:|---:|---:|"
      awk -F'\t' "$AWK_FMT_HIT"'
        function dash(x) { return x == "" ? "—" : x }
        $1 == "W1" {
          key = $2 SUBSEP $3
          if ($4 == "direct") dpg[key] = $11
          n++; row[n] = $0
        }
        END {
          for (i = 1; i <= n; i++) {
            split(row[i], f, "\t"); key = f[2] SUBSEP f[3]
            name = f[4] == "direct" ? "direct (Postgres itself)" : f[4]
            sum = (f[4] == "direct" || f[10] == "" || f[11] == "") ? dash(f[11]) : sprintf("%.1f", f[10] + f[11])
            r = (f[10] == "" || dpg[key] == "" || dpg[key] + 0 == 0) ? "—" : sprintf("%.3f", f[10] / dpg[key])
            printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", f[2], f[3], name, dash(f[10]), dash(f[11]), sum, r, hitfmt(f[12])
          }
        }' "$CELLS"
      echo
    fi
    echo "## Method and caveats"
    echo
    echo "- TPS is pgbench's \"tps (without initial connection time)\". Latencies are p50/p99 over every transaction in pgbench's per-transaction log (\`--log\`), failed/skipped transactions excluded; ratios compare with the \`direct\` row of the same workload, mode and client count."
    echo "- \"proxy CPU µs/tx\" is utime+stime of the proxy's process tree (all threads; for pgpool its parent and all its children; for pgstash-redis plus its redis-server; from /proc/<pid>/stat, clock ticks of $CLK_TCK Hz) over the run divided by transactions processed; for \`direct\` it is Postgres's CPU. \"Postgres CPU µs/tx\" is the same for the whole Postgres cluster (postmaster plus live children, plus exited backends via the postmaster's cutime/cstime), including background processes."
    echo "- Hit ratio: the share of cache lookups that were hits during the run (\"n/a\": the target's counters could not be read or counted no lookups; \"—\": no cache). The target check list compares the runs with $CHECK_CLIENTS clients; \"within 5 %\" is one-sided (the cache may be faster than no cache)."
    echo "- Caches start cold: each target's cache is warmed only by the runs themselves (pgstash entries live 60 s by default, so later modes and client counts of the same workload may find them warm; pgpool's have no expiry). Short runs are dominated by cold misses, W3 most of all (each miss is an aggregate over up to 1M rows, 32 of them at once at 32 clients)."
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
  local t wl mode c r
  LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
  for wl in $WORKLOADS; do has "$KNOWN_WORKLOADS" "$wl" || die "unknown workload $wl (known: $KNOWN_WORKLOADS)"; done
  for mode in $MODES; do case "$mode" in simple|extended|prepared) ;; *) die "unknown mode $mode";; esac; done
  [[ "$CHECK_CLIENTS" =~ ^[0-9]+$ ]] || die "CHECK_CLIENTS must be a number"
  if [[ -z "$STALE_MODES" ]]; then
    STALE_MODES="$(workload_modes W5)"
    if has "$STALE_MODES" simple; then STALE_MODES=simple; else STALE_MODES="${STALE_MODES%% *}"; fi
    [[ -n "$STALE_MODES" ]] || STALE_MODES=simple
  fi
  for mode in $STALE_MODES; do case "$mode" in simple|extended|prepared) ;; *) die "unknown STALE_MODES mode $mode";; esac; done
  for t in $STALE_SOURCES; do case "$t" in notify|wal) ;; *) die "unknown STALE_SOURCES source $t (known: notify wal)";; esac; done
  for t in $TRIGGER_TARGETS; do case "$t" in direct|pgstash) ;; *) die "unknown TRIGGER_TARGETS target $t (known: direct pgstash)";; esac; done
  [[ "$STALE_RATE" =~ ^[0-9]+$ && "$STALE_WRITERS" =~ ^[1-9][0-9]*$ && "$STALE_DURATION" =~ ^[1-9][0-9]*$ ]] \
    || die "STALE_RATE, STALE_WRITERS and STALE_DURATION must be numbers"
  [[ "$TRIGGER_ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "TRIGGER_ROUNDS must be a positive number"
  [[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive number"
  [[ "$STALE_SYNC_COMMIT" == on || "$STALE_SYNC_COMMIT" == off ]] || die "STALE_SYNC_COMMIT must be on or off"

  install_tools
  WORK="$(mktemp -d /tmp/pgstash-bench.XXXXXX)"
  chmod 755 "$WORK"
  mkdir -p "$WORK/sock" "$WORK/runs"
  [[ $IS_ROOT -eq 1 ]] && chown postgres: "$WORK" "$WORK/sock"
  RESULTS="$WORK/results.tsv"; : >"$RESULTS"
  STALE_RESULTS="$WORK/stale.tsv"; : >"$STALE_RESULTS"
  log "temp dir $WORK"

  # Build before starting Postgres: a long compile shouldn't overlap anything.
  if uses_pgstash; then
    build_pgstash || log "pgstash unavailable: $PGSTASH_BUILD_ERR"
  fi
  if has "$WORKLOADS" SELECT1 && ! has "$TARGETS" direct; then
    note "SELECT1 (the reference row) runs only against direct, which is not in TARGETS"
  fi

  start_postgres
  write_workload_scripts
  for t in $TARGETS; do
    start_target "$t" || { log "target $t unavailable: ${T_STATUS[$t]}"; note "target $t unavailable: ${T_STATUS[$t]}"; }
  done

  # Targets innermost, so the rows compared with each other ran back to back
  # under the most similar conditions (and direct, if listed first, first).
  # With REPEAT > 1, rounds of all targets in ABBA order (round_targets)
  # between the client count and the target, so that every target's runs of
  # a cell are spread over the same stretch of time.
  for wl in $WORKLOADS; do
    case "$wl" in
      STALE) run_stale; continue ;;
      TRIGGERS) run_triggers; continue ;;
    esac
    for mode in $(workload_modes "$wl"); do
      for c in $CLIENTS; do
        for (( r = 1; r <= REPEAT; r++ )); do
          for t in $(round_targets "$r"); do
            [[ "${T_STATUS[$t]:-}" == ok ]] || continue
            workload_runs_on "$wl" "$t" || continue
            RUN_ROUND=$r run_one "$wl" "$mode" "$c" "$t"
          done
        done
      done
    done
  done

  write_report
}

main "$@"
