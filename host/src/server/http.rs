//! The HTTP endpoint of `riffle run --http`: `/metrics`, the JSON API and the dashboard.
//!
//! A small blocking HTTP/1.1 server on `std::net`, beside the query rather than on its async
//! runtime: a scrape must be answered while an epoch keeps the runtime busy, and must not add
//! to what the query's runtime schedules. Each connection carries one GET and is closed
//! (`Connection: close`), on a thread of its own with read and write deadlines, so a client
//! that stalls holds only its own thread and never the run's exit; past [`MAX_CLIENTS`] at
//! once, a client is told 503. (Hyper, which the stack carries for object stores, would need
//! its server features, which rebuild DataFusion and Delta under new feature sets; `tiny_http`
//! kept idle keep-alive connections on a pool whose hand-off stalled browsers for seconds.)

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::monitor::{HISTORY, Monitor};
use crate::error::{Result, RiffleError};

/// The dashboard page: one file, its script and styles inline, embedded in the binary.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Connections served at once (a browser opens six).
const MAX_CLIENTS: usize = 32;

/// How long a client may take to send its request, or to take the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(10);

/// Longest request head read (a GET has no body).
const MAX_HEAD: u64 = 16 * 1024;

/// A running HTTP server; dropping it stops accepting connections.
pub struct HttpServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
}

impl HttpServer {
    /// Serves `monitor` on `addr`: `host:port`, or a bare port on loopback (port 0 picks a
    /// free one).
    ///
    /// # Errors
    /// [`RiffleError::Config`] for an address that does not resolve or cannot be listened on
    /// (a port in use, a host that is not this machine's).
    pub fn start(addr: &str, monitor: Arc<Monitor>) -> Result<Self> {
        let wanted: SocketAddr = match addr.parse::<u16>() {
            Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            Err(_) => addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    RiffleError::Config(format!(
                        "--http {addr}: not an address; give a port (on loopback) or host:port, \
                         e.g. 9464 or 127.0.0.1:9464"
                    ))
                })?,
        };
        let listener = TcpListener::bind(wanted).map_err(|e| {
            RiffleError::Config(format!(
                "--http {addr}: cannot listen there: {e}{}",
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    " (another process has that port; pick a free one, or port 0 for any)"
                } else {
                    ""
                }
            ))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| RiffleError::Internal(format!("the HTTP listener's address: {e}")))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        std::thread::Builder::new()
            .name("riffle-http".into())
            .spawn(move || accept(listener, monitor, stop))
            .map_err(|e| RiffleError::Internal(format!("starting the HTTP thread: {e}")))?;
        Ok(HttpServer { addr, stopping })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // The accept loop sees the flag at its next connection: make one. Connections in
        // hand finish on their own threads, which are not waited for.
        self.stopping.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn accept(listener: TcpListener, monitor: Arc<Monitor>, stopping: Arc<AtomicBool>) {
    let clients = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut stream) = stream else {
            // A failed accept (out of file descriptors, a client that reset at once) leaves
            // the listener usable; pause a moment in case it is the former.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let _ = stream.set_read_timeout(Some(CLIENT_DEADLINE));
        let _ = stream.set_write_timeout(Some(CLIENT_DEADLINE));
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            let _ = write_response(&mut stream, false, 503, "text/plain", b"busy\n");
            continue;
        }
        let (monitor, clients) = (monitor.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("riffle-http-client".into())
            .spawn(move || {
                serve(&monitor, stream);
                clients.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            tracing::warn!("riffle: no thread for an HTTP client; dropped it");
        }
    }
}

/// Reads one request from `stream` and answers it. A client that sends garbage or nothing is
/// answered 400 or dropped.
fn serve(monitor: &Monitor, mut stream: TcpStream) {
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(std::io::Read::take(reader, MAX_HEAD));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // The headers say nothing this server needs; read them so the client sees its request
    // consumed before the answer.
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => break,
            Ok(_) if header == "\r\n" || header == "\n" => break,
            Ok(_) => {}
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        let _ = write_response(&mut stream, false, 400, "text/plain", b"bad request\n");
        return;
    };
    if !version.starts_with("HTTP/1.") {
        let _ = write_response(&mut stream, false, 505, "text/plain", b"HTTP/1.x only\n");
        return;
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = write_response(&mut stream, false, 405, "text/plain", b"only GET\n");
        return;
    }
    let (status, content_type, body) = route(monitor, target);
    // A client that went away is its own business.
    let _ = write_response(
        &mut stream,
        head_only,
        status,
        content_type,
        body.as_bytes(),
    );
}

fn write_response(
    stream: &mut TcpStream,
    head_only: bool,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "HTTP Version Not Supported",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

fn route(monitor: &Monitor, target: &str) -> (u16, &'static str, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let json = |v: Value| (200, "application/json", v.to_string());
    match path {
        "/" | "/index.html" => (200, "text/html; charset=utf-8", DASHBOARD.to_string()),
        "/metrics" => (
            200,
            // What `prometheus-client` writes; Prometheus scrapes it as it does its own format.
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            monitor.render_metrics(),
        ),
        "/api/query" => json(monitor.overview()),
        "/api/progress" => (200, "application/json", monitor.progress(limit(query))),
        "/api/graph" => json(monitor.graph()),
        "/api/checkpoints" => json(monitor.checkpoints()),
        "/api/udfs" => json(monitor.udfs()),
        "/api/errors" => json(monitor.errors()),
        _ => (
            404,
            "application/json",
            serde_json::json!({
                "error": format!("no such path: {path}"),
                "paths": ["/", "/metrics", "/api/query", "/api/progress?limit=N", "/api/graph",
                          "/api/checkpoints", "/api/udfs", "/api/errors"],
            })
            .to_string(),
        ),
    }
}

/// `limit=N` of a query string (default and most: the whole history kept).
fn limit(query: &str) -> usize {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("limit="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(HISTORY)
        .min(HISTORY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[test]
    fn serves_every_path_and_refuses_a_taken_port() {
        let monitor = Monitor::new("p.toml", "stream");
        monitor.error("failure", "broker unreachable");
        let server = HttpServer::start("127.0.0.1:0", monitor).unwrap();
        let (status, page) = get(server.addr(), "/");
        assert_eq!(status, 200);
        assert!(page.contains("<canvas"));
        let (status, body) = get(server.addr(), "/api/errors");
        assert_eq!(status, 200);
        let errors: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(errors[0]["message"], "broker unreachable");
        let (status, metrics) = get(server.addr(), "/metrics");
        assert_eq!(status, 200);
        assert!(metrics.contains("riffle_errors_total{query=\"\",kind=\"failure\"} 1"));
        assert_eq!(get(server.addr(), "/nope").0, 404);
        // Not HTTP, and not a GET: refused, and the server goes on.
        {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
            s.write_all(b"garbage\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            assert!(text.starts_with("HTTP/1.1 400"), "{text}");
            let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
            s.write_all(b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            assert!(text.starts_with("HTTP/1.1 405"), "{text}");
        }
        assert_eq!(get(server.addr(), "/api/query").0, 200);

        let taken = server.addr().to_string();
        let Err(e) = HttpServer::start(&taken, Monitor::new("p.toml", "stream")) else {
            panic!("a taken port must be refused");
        };
        assert!(e.to_string().contains(&taken), "{e}");
        assert!(matches!(
            HttpServer::start("no-such-host.invalid:80", Monitor::new("p", "batch")),
            Err(RiffleError::Config(_))
        ));
        let named = HttpServer::start("localhost:0", Monitor::new("p", "batch")).unwrap();
        assert!(named.addr().ip().is_loopback());
        let bare = HttpServer::start("0", Monitor::new("p", "batch")).unwrap();
        assert!(bare.addr().ip().is_loopback());
    }
}
