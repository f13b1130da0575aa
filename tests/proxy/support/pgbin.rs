//! Where the PostgreSQL programs are, and how to run them: as the `postgres`
//! OS user when we are root (the server refuses root), and without the
//! caller's libpq environment.

use super::{is_executable, which};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Path of a PostgreSQL program (initdb, postgres, psql, pgbench, ...).
pub fn pg_bin(name: &str) -> PathBuf {
    let path = bindir().join(name);
    if !is_executable(&path) {
        panic!(
            "{} is missing: run scripts/test.sh (it installs PostgreSQL)",
            path.display()
        );
    }
    path
}

/// pg_config's bindir if it has the server, else the highest
/// /usr/lib/postgresql/*/bin, else the directory of `initdb` in PATH.
/// (Debian's /usr/bin/pg_config may come from libpq-dev without a server.)
fn bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let has_server = |d: &Path| is_executable(&d.join("initdb"));
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_server(&dir) {
                return dir;
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse().ok()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, d)| has_server(d))
            .collect();
        versions.sort();
        if let Some((_, dir)) = versions.pop() {
            return dir;
        }
        match which("initdb").and_then(|p| p.parent().map(Path::to_owned)) {
            Some(dir) => dir,
            None => panic!(
                "PostgreSQL server binaries (initdb, postgres) not found via pg_config, \
                 /usr/lib/postgresql/*/bin or PATH: run scripts/test.sh (it installs them)"
            ),
        }
    })
}

/// uid/gid of the `postgres` OS user if we are root, None otherwise.
pub(crate) fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    // SAFETY: getpwnam_r with a zeroed passwd, a buffer we own and its length.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            c"postgres".as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            panic!(
                "running as root, but there is no `postgres` OS user to run PostgreSQL as \
                 (it refuses root): run scripts/test.sh (the postgresql package creates it)"
            );
        }
        Some((pw.pw_uid, pw.pw_gid))
    }
}

pub(crate) fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Drops the caller's PG* variables (PGSSLMODE, PGOPTIONS, PGSERVICE, ...):
/// they would change how our client tools reach the throwaway cluster.
pub(crate) fn without_libpq_env(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            cmd.env_remove(name);
        }
    }
    cmd
}
