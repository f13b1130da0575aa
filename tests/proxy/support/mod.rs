//! Test support for the `proxy` integration-test binary: throwaway servers
//! and tools that the end-to-end tests run pgstash against.
//!
//! - [`PgCluster`] / [`shared_pg`]: a private PostgreSQL cluster on a free port
//!   (md5 and SCRAM roles, a second database, logical WAL).
//! - [`RedisServer`] / [`shared_redis`]: a private, non-persistent redis-server.
//! - [`python`]: a cached virtualenv with psycopg, for driving the proxy from a
//!   second, independent client implementation.
//! - [`free_port`]: a loopback port nobody in this process was handed before.
//!
//! Nothing here touches the machine's own services on 5432/6379. Every server
//! is a child of a dedicated spawner thread with `PR_SET_PDEATHSIG`, so it dies
//! with the test process even on SIGKILL; normal exits stop servers via Drop or
//! an `atexit` hook (statics are never dropped). See `proc.rs`, `scratch.rs`.
//!
//! Failures are loud panics naming the command and its output: a missing
//! binary means the machine was not prepared — run `scripts/test.sh`.

// Each test module uses a different subset of these helpers.
#![allow(dead_code)]

mod pg;
mod pgbin;
mod proc;
mod python;
mod redis;
mod scratch;

// Re-exports too may be unused by a given set of tests.
#[allow(unused_imports)]
pub use pg::{PgCluster, shared_pg};
#[allow(unused_imports)]
pub use pgbin::pg_bin;
#[allow(unused_imports)]
pub use python::python;
#[allow(unused_imports)]
pub use redis::{RedisServer, shared_redis};
#[allow(unused_imports)]
pub use scratch::sweep_stale_dirs;

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// A free TCP port on 127.0.0.1.
///
/// The OS picks it (bind to port 0); we additionally never hand the same port
/// out twice in one process, because a port handed to a server that has not
/// bound it yet is still "free" to the kernel and could otherwise be given to
/// a second, parallel test.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("free_port: cannot bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("free_port: local_addr of a bound listener")
            .port();
        if handed.insert(port) {
            return port;
        }
    }
    panic!("free_port: the OS kept returning ports this process already used");
}

/// Runs `cmd` to completion, panicking with its command line, exit status,
/// stdout and stderr unless it succeeded. `what` says why we ran it.
pub(crate) fn run_checked(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}{}", hint_for(&e)));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
    out
}

/// Extra advice for spawn errors: "not found" means a missing install.
pub(crate) fn hint_for(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::NotFound {
        "\n(the program is not installed: run scripts/test.sh, which installs the test dependencies)"
    } else {
        ""
    }
}

/// Looks `name` up in PATH.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The last `lines` lines of a log file, for panic messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
