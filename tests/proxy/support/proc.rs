//! Lifetime management for throwaway server processes.
//!
//! Three layers make sure no postgres/redis outlives the test binary:
//! 1. [`Supervised`]'s Drop stops the process (tests that own a server).
//! 2. An `atexit` hook stops whatever is still registered: servers kept in
//!    statics (`shared_pg`) are never dropped, but `exit()` runs the hook.
//! 3. `PR_SET_PDEATHSIG = SIGKILL` for when the test process dies abruptly
//!    (SIGKILL, abort, timeout). The kernel sends it when the *thread* that
//!    forked the child exits, not the process, so every server is forked by
//!    one dedicated spawner thread that never exits; tests send it requests.
//!
//! Layer 3 cannot remove scratch dirs; `scratch.rs` sweeps those later.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// What the atexit hook needs to know about a live server.
struct Entry {
    pid: Option<libc::pid_t>,
    signal: libc::c_int,
    dir: PathBuf,
}

static REGISTRY: Mutex<BTreeMap<u64, Entry>> = Mutex::new(BTreeMap::new());

fn registry() -> std::sync::MutexGuard<'static, BTreeMap<u64, Entry>> {
    // A test that panicked while holding the lock must not stop cleanup.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static TX: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("test-server-spawner".into())
            .spawn(move || {
                for SpawnRequest { mut cmd, reply } in rx {
                    let _ = reply.send(spawn_with_pdeathsig(&mut cmd));
                }
                // Unreachable while the Sender sits in a static, but if this
                // thread ever exited, PDEATHSIG would kill every server.
                loop {
                    std::thread::park();
                }
            })
            .expect("cannot start the test-server spawner thread");
        // SAFETY: registering a plain extern "C" fn with no captured state.
        if unsafe { libc::atexit(stop_all_at_exit) } != 0 {
            panic!("libc::atexit refused to register the test-server cleanup hook");
        }
        tx
    })
}

fn spawn_with_pdeathsig(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe syscalls. std applies uid/gid *before* pre_exec
    // closures, which matters: a credential change clears PDEATHSIG.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    };
    cmd.spawn()
}

extern "C" fn stop_all_at_exit() {
    // Must not panic (it would abort inside exit()); errors are ignored.
    let entries: Vec<Entry> = std::mem::take(&mut *registry()).into_values().collect();
    for e in &entries {
        if let Some(pid) = e.pid {
            // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
            unsafe { libc::kill(pid, e.signal) };
        }
    }
    for e in &entries {
        if let Some(pid) = e.pid {
            reap_pid(pid, Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&e.dir);
    }
}

/// waitpid with a deadline; SIGKILLs the process when the deadline passes.
fn reap_pid(pid: libc::pid_t, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r != 0 {
            return; // reaped, or not our child (any more)
        }
        if Instant::now() >= deadline {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One server process slot: can be started, stopped and started again.
/// Registered for the atexit hook from creation until Drop.
pub(crate) struct Supervised {
    id: u64,
    /// Human-readable name for panic messages, e.g. "postgres on port 5433".
    pub what: String,
    child: Mutex<Option<Child>>,
    /// Signal used by Drop and at exit: the fastest clean-enough stop.
    hard_signal: libc::c_int,
}

impl Supervised {
    pub fn new(what: String, dir: &Path, hard_signal: libc::c_int) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        registry().insert(
            id,
            Entry {
                pid: None,
                signal: hard_signal,
                dir: dir.to_owned(),
            },
        );
        Supervised {
            id,
            what,
            child: Mutex::new(None),
            hard_signal,
        }
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` from the spawner thread. Panics if already running.
    pub fn spawn(&self, cmd: Command) -> io::Result<()> {
        let mut slot = self.child();
        assert!(slot.is_none(), "{}: spawn while still running", self.what);
        let (reply, rx) = mpsc::channel();
        spawner()
            .send(SpawnRequest { cmd, reply })
            .expect("the test-server spawner thread is gone");
        let child = rx
            .recv()
            .expect("the test-server spawner thread dropped a request")?;
        if let Some(e) = registry().get_mut(&self.id) {
            e.pid = Some(child.id() as libc::pid_t);
        }
        *slot = Some(child);
        Ok(())
    }

    /// Exit status if the process has exited (or was never started).
    pub fn exited(&self) -> Option<String> {
        match self.child().as_mut() {
            None => Some("not running".into()),
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait: {e}")),
            },
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child().as_ref().map(Child::id)
    }

    /// Sends `signal` and waits up to `timeout` before resorting to SIGKILL.
    /// A no-op when not running. Returns the exit status, if there was one.
    pub fn stop(&self, signal: libc::c_int, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child().take()?;
        if let Some(e) = registry().get_mut(&self.id) {
            e.pid = None;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on our unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    eprintln!(
                        "{}: no exit {timeout:?} after signal {signal}, SIGKILL",
                        self.what
                    );
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop(self.hard_signal, Duration::from_secs(10));
        registry().remove(&self.id);
    }
}
