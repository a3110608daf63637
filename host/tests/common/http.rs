//! `riffle run --http 127.0.0.1:0`, driven from a test: the address it announces, plain GETs,
//! and a stop by SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `riffle run --http 127.0.0.1:0` and the address it reported.
pub struct Run {
    child: Child,
    /// Where it serves.
    pub addr: SocketAddr,
    /// Kept so the reader thread goes on draining the pipe.
    _stderr: std::sync::mpsc::Receiver<String>,
}

impl Run {
    /// Starts `pipeline` in stream mode with `--http` and waits for its address.
    pub fn start(pipeline: &Path) -> Run {
        let mut child = super::riffle(pipeline, "stream")
            .args(["--http", "127.0.0.1:0"])
            .spawn()
            .unwrap();
        // Read stderr on a thread for the whole run (a full pipe would stall the process).
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let addr = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("no address announced; stderr: {seen:?}"));
            if let Some(rest) = line.split("serving the dashboard at http://").nth(1) {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
            seen.push(line);
        };
        Run {
            child,
            addr,
            _stderr: rx,
        }
    }

    /// GETs `path`: status, content type, body. A run that stopped answering fails the test
    /// with what it printed.
    pub fn get(&self, path: &str) -> (u16, String, String) {
        match try_get(self.addr, path) {
            Ok(answer) => answer,
            Err(e) => {
                let stderr: Vec<String> = self._stderr.try_iter().collect();
                panic!("GET {path}: {e}; the run printed:\n{}", stderr.join("\n"))
            }
        }
    }

    pub fn json(&self, path: &str) -> Value {
        let (status, _, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until the run has committed epoch `n` (polling the API, bounded by a deadline
    /// far beyond any machine's speed).
    pub fn wait_for_epoch(&self, n: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let q = self.json("/api/query");
            if q["last_epoch"].as_u64().is_some_and(|e| e >= n) {
                return q;
            }
            assert!(Instant::now() < deadline, "epoch {n} never committed: {q}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: `kill` has no memory effects; the pid is our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Run {
    /// A failed assertion must not leave the query running.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.0 GET: status, content type, body.
fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    Ok((status, content_type, body.to_string()))
}
