//! Scratch directories for throwaway servers: `$TMPDIR/pgstash-test-<pid>-*`.
//!
//! Drop and the atexit hook remove them; when the test process is killed
//! outright nothing can, so each process first sweeps the directories of
//! processes that no longer exist (and what a killed postmaster leaks).

use std::io;
use std::path::Path;
use std::sync::Once;

/// A fresh scratch directory `$TMPDIR/pgstash-test-<pid>-<kind>-*`.
pub(crate) fn scratch_dir(kind: &str) -> tempfile::TempDir {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(sweep_stale_dirs);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    tempfile::Builder::new()
        .prefix(&format!("pgstash-test-{pid}-{kind}-"))
        .tempdir()
        .unwrap_or_else(|e| {
            panic!(
                "cannot create a scratch dir in {:?}: {e}",
                std::env::temp_dir()
            )
        })
}

/// Removes scratch dirs of test processes that no longer exist (killed too
/// hard for Drop/atexit), including the SysV shared memory segment that a
/// SIGKILLed postmaster leaves behind.
pub fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pgstash-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks for existence.
        let dead = unsafe { libc::kill(pid, 0) } == -1
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if dead {
            remove_orphan_shm(&entry.path().join("data/postmaster.pid"));
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// postmaster.pid line 7 is "<shm key> <shm id>"; remove that segment if it
/// still has the same key (ids are reused, so check before removing).
fn remove_orphan_shm(pidfile: &Path) {
    let Ok(text) = std::fs::read_to_string(pidfile) else {
        return;
    };
    let Some(line) = text.lines().nth(6) else {
        return;
    };
    let mut nums = line.split_whitespace().map(|n| n.parse::<i64>().ok());
    let (Some(Some(key)), Some(Some(id))) = (nums.next(), nums.next()) else {
        return;
    };
    // SAFETY: shmid_ds is plain old data; IPC_STAT fills it or fails.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(id as libc::c_int, libc::IPC_STAT, &mut ds) == 0
            && ds.shm_perm.__key as i64 == key
        {
            libc::shmctl(id as libc::c_int, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}
