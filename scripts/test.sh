#!/usr/bin/env bash
# Prepares this machine for pgstash's tests, then runs them.
#
# The integration tests (tests/proxy) start their own throwaway PostgreSQL
# and redis-server on free ports and drive the proxy with psycopg from a
# virtualenv, so they need: the PostgreSQL server programs (initdb, postgres,
# pg_isready, psql, pgbench), redis-server, and python3 with venv and pip.
# What is missing is installed with apt-get; when everything is present,
# apt-get is not run at all. Extra arguments go to `cargo test`:
#
#   scripts/test.sh                  # everything
#   scripts/test.sh --test proxy     # only the integration tests
set -euo pipefail

cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_servers
python_missing=()
if ! command -v python3 >/dev/null 2>&1; then
    python_missing+=(python3 python3-venv python3-pip)
else
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || python_missing+=(python3-venv)
    python3 -m pip --version >/dev/null 2>&1 || python_missing+=(python3-pip)
fi
((${#python_missing[@]} == 0)) || apt_install "${python_missing[@]}"
say "test dependencies present: PostgreSQL in $(pg_bindir), $(command -v redis-server || echo /usr/bin/redis-server), $(command -v python3)"

# The first run also creates target/test-venv with psycopg (from PyPI).
say "running: cargo test --locked $*"
exec cargo test --locked "$@"
