//! Throwaway redis-server instances on free ports, keeping nothing on disk.
//!
//! Also a tiny blocking RESP client ([`RedisServer::cmd`]) so tests can look
//! at or flush the cache without a redis crate.

use super::proc::Supervised;
use super::scratch::scratch_dir;
use super::{free_port, hint_for, tail, which};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    // Field order matters: the server must stop before its dir is removed.
    proc: Supervised,
    dir: tempfile::TempDir,
}

/// The redis-server shared by all tests of this binary (see `shared_pg`).
pub fn shared_redis() -> &'static RedisServer {
    static REDIS: OnceLock<RedisServer> = OnceLock::new();
    REDIS.get_or_init(RedisServer::start)
}

fn redis_bin() -> PathBuf {
    which("redis-server")
        .or_else(|| Some(PathBuf::from("/usr/bin/redis-server")).filter(|p| p.exists()))
        .unwrap_or_else(|| {
            panic!("redis-server not found: run scripts/test.sh (it installs redis-server)")
        })
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut dir = scratch_dir("redis");
        let mut last_err = String::new();
        // Another process can grab our free port before redis binds it.
        for _attempt in 0..3 {
            let port = free_port();
            let r = RedisServer {
                port,
                proc: Supervised::new(
                    format!("redis-server on port {port}"),
                    dir.path(),
                    libc::SIGTERM,
                ),
                dir,
            };
            match r.launch() {
                Ok(()) => return r,
                Err(e) if e.contains("Address already in use") => {
                    last_err = e;
                    r.proc.stop(libc::SIGKILL, Duration::from_secs(10));
                    let RedisServer { dir: d, .. } = r;
                    dir = d;
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("redis-server could not bind a free port 3 times; last error:\n{last_err}");
    }

    /// Graceful stop (SIGTERM) and wait; all data is lost. No-op if stopped.
    pub fn stop(&self) {
        self.proc.stop(libc::SIGTERM, Duration::from_secs(30));
    }

    /// Stops if running, then starts an empty server on the same port.
    pub fn restart(&self) {
        self.stop();
        if let Err(e) = self.launch() {
            panic!("restarting redis failed: {e}");
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Sends one command and renders the reply as text: simple strings, bulk
    /// strings and integers as themselves, nil as `(nil)`, arrays one element
    /// per line. An error reply panics (use [`try_cmd`](Self::try_cmd) to see it).
    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("redis {args:?} on port {}: {e}", self.port))
    }

    /// Like [`cmd`](Self::cmd), but errors (I/O or `-ERR` replies) are returned.
    pub fn try_cmd(&self, args: &[&str]) -> Result<String, String> {
        self.cmd_with_timeout(args, Duration::from_secs(30))
    }

    fn cmd_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream
            .write_all(req.as_bytes())
            .map_err(|e| e.to_string())?;
        read_reply(&mut BufReader::new(stream))
    }

    fn launch(&self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening redis.log");
        let stderr = log.try_clone().expect("duplicating the log file handle");
        let mut cmd = Command::new(redis_bin());
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        self.proc
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("cannot spawn redis-server: {e}{}", hint_for(&e)));
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.proc.exited() {
                return Err(format!(
                    "{} exited ({status}) while starting; log tail:\n{}",
                    self.proc.what,
                    tail(&self.log_path(), 30)
                ));
            }
            // PING answers -LOADING until the server is really ready.
            // Short timeout: if another process holds the port, notice soon.
            if self
                .cmd_with_timeout(&["PING"], Duration::from_secs(1))
                .is_ok_and(|r| r == "PONG")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} not ready after {timeout:?}; log tail:\n{}",
                    self.proc.what,
                    tail(&self.log_path(), 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn read_reply(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
        return Err("connection closed before a reply".into());
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at_checked(1).ok_or("empty reply line")?;
    let len = || {
        rest.parse::<i64>()
            .map_err(|e| format!("bad length in {line:?}: {e}"))
    };
    match kind {
        "+" | ":" => Ok(rest.to_owned()),
        "-" => Err(rest.to_owned()),
        "$" if len()? < 0 => Ok("(nil)".into()),
        "$" => {
            let mut buf = vec![0; len()? as usize + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(buf.len() - 2);
            String::from_utf8(buf).map_err(|e| e.to_string())
        }
        "*" if len()? < 0 => Ok("(nil)".into()),
        "*" => {
            let items: Result<Vec<String>, String> = (0..len()?).map(|_| read_reply(r)).collect();
            Ok(items?.join("\n"))
        }
        _ => Err(format!("unsupported RESP reply {line:?}")),
    }
}
