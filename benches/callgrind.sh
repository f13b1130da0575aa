#!/usr/bin/env bash
# Instructions pgstash spends per pgbench transaction, counted by callgrind.
#
# Timings on a small shared machine move by tens of percent from run to run; instruction
# counts do not, so this is how a change to the hot path is judged before the harness
# (benches/run.sh) measures throughput. The count is divided by the transactions of all clients.
#
# Usage:
#   UPSTREAM=postgres://postgres@127.0.0.1:5432/postgres benches/callgrind.sh [options] [-- pgbench args]
# Options:
#   --cache on|off   cache enabled (default on)
#   --warm N         transactions run before counting starts (default 300)
#   --tx N           transactions counted per client (default 2000)
#   --clients N      pgbench clients (default 1; two pgbench threads from 2 on). At one client
#                    the runtime parks after every message, which inflates the runtime's share;
#                    at 32 clients, where the benchmark targets are, it rarely parks
#   --out FILE       callgrind output (default callgrind.pgstash.out); read it with
#                    `callgrind_annotate --inclusive=yes FILE`
# pgbench args default to `-M simple` (pgbench's tpcb-like, W4); the database must have been
# initialised with `pgbench -i`. Environment: BENCH_PGSTASH_BIN (default target/release/pgstash;
# not PGSTASH_..., which pgstash reads as configuration),
# PORT (default 6499). Needs valgrind (callgrind_control) and pgbench.
set -euo pipefail

cache=on warm=300 tx=2000 clients=1 out=callgrind.pgstash.out
while (($#)); do
  case "$1" in
    --cache) cache=$2; shift 2 ;;
    --warm) warm=$2; shift 2 ;;
    --tx) tx=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "callgrind.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
args=("$@")
((${#args[@]})) || args=(-M simple)
: "${UPSTREAM:?set UPSTREAM to the postgres:// URL of a database initialised with pgbench -i}"
bin=${BENCH_PGSTASH_BIN:-target/release/pgstash}
port=${PORT:-6499}
[[ "$clients" =~ ^[1-9][0-9]*$ ]] || { echo "--clients takes a positive number" >&2; exit 2; }
jobs=$((clients > 1 ? 2 : 1))
case "$cache" in on) enabled=true ;; off) enabled=false ;; *) echo "--cache on|off" >&2; exit 2 ;; esac
for tool in valgrind callgrind_control pgbench pg_isready; do
  command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is not installed" >&2; exit 1; }
done
[[ -x "$bin" ]] || { echo "callgrind.sh: $bin is not executable (cargo build --release?)" >&2; exit 1; }

log=$(mktemp)
PGSTASH_CACHE__ENABLED=$enabled PGSTASH_LOG__LEVEL=warn PGSTASH_POOL__MAX_SIZE=40 \
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
  "$bin" --upstream "$UPSTREAM" --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.3
done
user=$(sed -E 's|^[a-z]+://([^:@/]*).*|\1|' <<<"$UPSTREAM")
db=$(sed -E 's|^.*/([^/?]*)(\?.*)?$|\1|' <<<"$UPSTREAM")
bench() { pgbench -h 127.0.0.1 -p "$port" -U "$user" -n -c "$clients" -j "$jobs" -t "$1" "${args[@]}" "$db"; }
bench "$warm" >/dev/null
callgrind_control -i on "$pid" >/dev/null 2>&1
bench "$tx" | grep -E '^(tps|number of failed)' || true
callgrind_control -i off "$pid" >/dev/null 2>&1
kill -TERM "$pid"
wait "$pid" || true
total=$(sed -nE 's/.*Collected : ([0-9]+).*/\1/p' "$log")
[[ -n "$total" ]] || { echo "callgrind.sh: no count in valgrind's output" >&2; cat "$log" >&2; exit 1; }
echo "instructions per transaction: $((total / (tx * clients))) (cache $cache; $total over $tx transactions x $clients clients; $out)"
