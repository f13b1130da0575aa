#!/usr/bin/env bash
# Runs pgstash for real, for trying it by hand.
#
# Without an upstream (--upstream, PGSTASH_UPSTREAM, or pgstash's own
# PGSTASH_UPSTREAM__URL), it first starts a
# throwaway PostgreSQL with pgbench's tables (`pgbench -i -s 1`) and a
# throwaway redis-server, each on a free loopback port under
# ${TMPDIR:-/tmp}/pgstash-run, and stops them again when pgstash exits
# (or on Ctrl-C / SIGTERM). Missing PostgreSQL/redis-server packages are
# installed with apt-get. Other arguments are passed through to pgstash:
#
#   scripts/run.sh
#   scripts/run.sh --listen 127.0.0.1:7432
#   PGSTASH_UPSTREAM=postgres://me@db.example:5432/app scripts/run.sh
set -euo pipefail

cd "$(dirname "$0")/.."
source scripts/lib.sh

listen=127.0.0.1:6432
upstream="${PGSTASH_UPSTREAM:-}"
# pgstash reads PGSTASH_* itself (PGSTASH_UPSTREAM would clash with its
# `upstream` table), so this script's own variable becomes --upstream.
unset PGSTASH_UPSTREAM
pass=("$@")
have_listen="" have_upstream=""
while (($#)); do
    case "$1" in
        --listen) listen="${2:-}"; have_listen=1; shift ;;
        --listen=*) listen="${1#*=}"; have_listen=1 ;;
        --upstream) upstream="${2:-}"; have_upstream=1; shift ;;
        --upstream=*) upstream="${1#*=}"; have_upstream=1 ;;
    esac
    shift || true
done

base="${TMPDIR:-/tmp}/pgstash-run"
pgdir="$base/pg"
redisdir="$base/redis"
as_pg=()
pg_started="" redis_started="" proxy_pid=""

# A port that nothing on 127.0.0.1 accepts connections on right now.
free_port() {
    # From 20000 up to the kernel's ephemeral range, as benches/run.sh picks them: a port
    # inside that range may be the local end of some outgoing connection, which the probe
    # below cannot see and which makes the server's bind fail.
    local port eph="" hi=32768
    read -r eph _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    [[ "$eph" =~ ^[0-9]+$ ]] && ((eph > 22000)) && hi=$eph
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % (hi - 20000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return 0; fi
    done
    die "no free port found"
}

stop_servers() {
    if [[ -n "$pg_started" ]]; then
        say "stopping the throwaway PostgreSQL"
        "${as_pg[@]}" "$bindir/pg_ctl" -D "$pgdir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [[ -n "$redis_started" && -s "$redisdir/redis.pid" ]]; then
        say "stopping the throwaway redis-server"
        local pid
        pid="$(cat "$redisdir/redis.pid")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
}

cleanup() {
    trap - EXIT INT TERM
    if [[ -n "$proxy_pid" ]]; then
        kill -TERM "$proxy_pid" 2>/dev/null || true
        wait "$proxy_pid" 2>/dev/null || true
    fi
    stop_servers
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_postgres() {
    bindir="$(pg_bindir)"
    if [[ "$(id -u)" -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' OS user (PostgreSQL refuses to run as root)"
        as_pg=(runuser -u postgres --)
    fi
    # A previous run that was killed hard may have left its server running.
    if [[ -f "$pgdir/data/postmaster.pid" ]]; then
        "${as_pg[@]}" "$bindir/pg_ctl" -D "$pgdir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$pgdir"
    mkdir -p "$pgdir"
    [[ ${#as_pg[@]} -eq 0 ]] || chown postgres: "$pgdir"
    pgport="$(free_port)"
    say "initdb into $pgdir/data (trust auth on loopback)"
    "${as_pg[@]}" "$bindir/initdb" -D "$pgdir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$base/initdb.log" 2>&1 ||
        { cat "$base/initdb.log" >&2; die "initdb failed"; }
    say "starting PostgreSQL on 127.0.0.1:$pgport (log: $pgdir/postgres.log)"
    pg_started=1
    "${as_pg[@]}" "$bindir/pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $pgport -k $pgdir -c max_connections=300" start >/dev/null ||
        { tail -n 30 "$pgdir/postgres.log" >&2; die "PostgreSQL did not start"; }
    say "loading pgbench tables (pgbench -i -s 1)"
    "$bindir/pgbench" -i -s 1 -q -h 127.0.0.1 -p "$pgport" -U postgres postgres >"$base/pgbench-init.log" 2>&1 ||
        { cat "$base/pgbench-init.log" >&2; die "pgbench -i failed"; }
    upstream="postgres://postgres@127.0.0.1:$pgport/postgres"
}

start_redis() {
    if [[ -s "$redisdir/redis.pid" ]] && kill -0 "$(cat "$redisdir/redis.pid")" 2>/dev/null; then
        kill "$(cat "$redisdir/redis.pid")" || true
        sleep 0.5
    fi
    rm -rf "$redisdir"
    mkdir -p "$redisdir"
    redisport="$(free_port)"
    say "starting redis-server on 127.0.0.1:$redisport (log: $redisdir/redis.log)"
    redis_started=1
    redis-server --port "$redisport" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$redisdir" --daemonize yes --pidfile "$redisdir/redis.pid" --logfile "$redisdir/redis.log" ||
        die "redis-server did not start"
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$redisport") 2>/dev/null && return 0
        sleep 0.1
    done
    die "redis-server is not accepting connections on $redisport"
}

args=()
if [[ -z "$upstream" && -n "${PGSTASH_UPSTREAM__URL:-}" ]]; then
    upstream="$PGSTASH_UPSTREAM__URL"
    have_upstream=1 # pgstash takes it from its environment
fi
if [[ -z "$upstream" ]]; then
    mkdir -p "$base"
    ensure_servers
    start_postgres
    start_redis
    # The throwaway Redis is the shared tier (L2 and invalidations between instances).
    [[ -n "${PGSTASH_REDIS__URL:-}" ]] || export PGSTASH_REDIS__URL="redis://127.0.0.1:$redisport"
fi
[[ -n "$have_listen" ]] || args+=(--listen "$listen")
[[ -n "$have_upstream" ]] || args+=(--upstream "$upstream")

pgbench_bin="$(command -v pgbench || echo "$(pg_bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)/pgbench")"
cat >&2 <<MSG

  upstream:       $upstream
  connect with:   psql "postgres://postgres@$listen/postgres"
  redis (L2):     ${PGSTASH_REDIS__URL:-none}
  benchmark with: $pgbench_bin -n -S -c 4 -T 10 "postgres://postgres@$listen/postgres"
  (Ctrl-C stops pgstash$( [[ -n "$pg_started" ]] && echo " and the throwaway servers"))

MSG
say "running: cargo run --release -- ${args[*]} ${pass[*]}"
cargo run --release -- "${args[@]}" "${pass[@]}" &
proxy_pid=$!
wait "$proxy_pid"
