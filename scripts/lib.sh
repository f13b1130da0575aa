# Helpers shared by scripts/*.sh. Sourced, not run.
# shellcheck shell=bash

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_pg_bindir() { [[ -n "$1" && -x "$1/initdb" && -x "$1/postgres" && -x "$1/psql" && -x "$1/pgbench" ]]; }

# Prints the directory of the PostgreSQL server programs, or fails. Same order
# as tests/proxy/support/pg.rs: pg_config --bindir (if it has the server;
# Debian's may come from libpq-dev alone), the highest
# /usr/lib/postgresql/*/bin, then PATH.
pg_bindir() {
    local dir
    if command -v pg_config >/dev/null 2>&1; then
        dir="$(pg_config --bindir 2>/dev/null || true)"
        if is_pg_bindir "$dir"; then echo "$dir"; return 0; fi
    fi
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5,5nr); do
        if is_pg_bindir "$dir"; then echo "$dir"; return 0; fi
    done
    dir="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
    if is_pg_bindir "$dir"; then echo "$dir"; return 0; fi
    return 1
}

# apt-get install "$@" (Debian package names), as root or through sudo.
apt_install() {
    local sudo=()
    [[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
    say "installing with apt-get: $*"
    if [[ " $* " == *" postgresql "* && ! -e /etc/postgresql-common ]]; then
        # We run our own throwaway clusters: keep the package from creating
        # and starting a system cluster on port 5432.
        "${sudo[@]}" mkdir -p /etc/postgresql-common/createcluster.d
        echo 'create_main_cluster = false' |
            "${sudo[@]}" tee /etc/postgresql-common/createcluster.d/pgstash-no-main.conf >/dev/null
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# Installs the PostgreSQL server + clients (incl. pgbench) and redis-server
# if missing.
ensure_servers() {
    local missing=()
    pg_bindir >/dev/null || missing+=(postgresql postgresql-contrib)
    command -v redis-server >/dev/null 2>&1 || [[ -x /usr/bin/redis-server ]] || missing+=(redis-server)
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
        pg_bindir >/dev/null || die "PostgreSQL server programs still not found after installing ${missing[*]}"
    fi
}
