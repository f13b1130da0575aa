//! A Python virtualenv with psycopg 3, for tests that drive the proxy with a
//! second, independent PostgreSQL client implementation.
//!
//! The venv lives at `<target dir>/test-venv` and is reused across runs: a
//! marker file records which requirement it was built for, and is written
//! only after a successful install, so a half-built venv is rebuilt. An
//! exclusive `flock` serializes creation between test processes (nextest, or
//! two `cargo test`s); a OnceLock does so between threads.

use super::{hint_for, run_checked};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Bump this to force every checkout's venv to be rebuilt.
const REQUIREMENT: &str = "psycopg[binary]>=3.1,<4";

/// Path of the venv's python interpreter (psycopg importable).
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(ensure_venv).clone()
}

fn venv_dir() -> PathBuf {
    // Cargo sets CARGO_TARGET_TMPDIR (= <target dir>/tmp) when compiling
    // integration tests; unlike a guessed "target" it honours
    // CARGO_TARGET_DIR and --target-dir.
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .expect("CARGO_TARGET_TMPDIR has a parent (the target dir)")
        .join("test-venv")
}

fn ensure_venv() -> PathBuf {
    let dir = venv_dir();
    let py = dir.join("bin").join("python");
    let marker = dir.join(".pgstash-ready");
    let ready = || py.exists() && std::fs::read_to_string(&marker).is_ok_and(|m| m == REQUIREMENT);
    if ready() {
        return py;
    }

    let parent = dir.parent().expect("the venv dir has a parent");
    std::fs::create_dir_all(parent)
        .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    let lock_path = parent.join("test-venv.lock");
    let lock = File::create(&lock_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
    // SAFETY: flock on a file descriptor we own; released when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!(
            "flock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
    }
    if ready() {
        return py; // another process built it while we waited
    }

    eprintln!(
        "creating the test virtualenv {} with {REQUIREMENT} ...",
        dir.display()
    );
    // Outdated or half-built: start over.
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .unwrap_or_else(|e| panic!("removing stale {}: {e}", dir.display()));
    }
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 -m venv: {e}{}", hint_for(&e)));
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let hint = if format!("{stdout}{stderr}").contains("ensurepip")
            || stderr.contains("No module named venv")
        {
            "\nPython's venv module is missing: install the Debian package python3-venv (scripts/test.sh does)"
        } else {
            ""
        };
        panic!(
            "python3 -m venv {} failed ({}):\n{stdout}\n{stderr}{hint}",
            dir.display(),
            out.status
        );
    }
    run_checked(
        "installing psycopg into the test venv (needs PyPI)",
        Command::new(&py).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            REQUIREMENT,
        ]),
    );
    std::fs::write(&marker, REQUIREMENT)
        .unwrap_or_else(|e| panic!("writing {}: {e}", marker.display()));
    py
}
