//! The HTTP endpoint of `riffle run --http`: `/metrics`, the JSON API and the dashboard.
//!
//! It runs on its own thread with a blocking server (`tiny_http`) rather than on the query's
//! async runtime: a scrape must be answered while an epoch keeps the runtime busy, and the
//! server must not add to what the query's runtime schedules. (Hyper, which the stack already
//! carries for object stores, would need its server features turned on, and that rebuilds
//! DataFusion and Delta under new feature sets.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;
use tiny_http::{Header, Method, Request, Response, Server};

use super::monitor::{HISTORY, Monitor};
use crate::error::{Result, RiffleError};

/// The dashboard page: one file, its script and styles inline, embedded in the binary.
const DASHBOARD: &str = include_str!("dashboard.html");

/// A running HTTP server; dropping it stops the server.
pub struct HttpServer {
    addr: SocketAddr,
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `monitor` on `addr`: `host:port`, or a bare port on loopback (port 0 picks a
    /// free one).
    ///
    /// # Errors
    /// [`RiffleError::Config`] for an address that does not parse or cannot be listened on
    /// (a port in use, a host that is not this machine's).
    pub fn start(addr: &str, monitor: Arc<Monitor>) -> Result<Self> {
        let wanted: SocketAddr = match addr.parse::<u16>() {
            Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            Err(_) => addr.parse().map_err(|e| {
                RiffleError::Config(format!(
                    "--http {addr}: not an address ({e}); give a port or host:port, e.g. \
                     127.0.0.1:9464"
                ))
            })?,
        };
        let server = Server::http(wanted).map_err(|e| {
            RiffleError::Config(format!(
                "--http {addr}: cannot listen there: {e}{}",
                if e.to_string().contains("in use") {
                    " (another process has that port; pick a free one, or port 0 for any)"
                } else {
                    ""
                }
            ))
        })?;
        let addr = server.server_addr().to_ip().ok_or_else(|| {
            RiffleError::Internal("the HTTP server is not on an IP address".into())
        })?;
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("riffle-http".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    respond(&monitor, request);
                }
            })
            .map_err(|e| RiffleError::Internal(format!("starting the HTTP thread: {e}")))?;
        Ok(HttpServer {
            addr,
            server,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

fn respond(monitor: &Monitor, request: Request) {
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    if !matches!(request.method(), Method::Get | Method::Head) {
        let _ = request.respond(
            Response::from_string("only GET\n")
                .with_status_code(405)
                .with_header(header("Allow", "GET, HEAD")),
        );
        return;
    }
    let json = |v: Value| (200, "application/json", v.to_string());
    let (status, content_type, body) = match path {
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
    };
    let response = Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", content_type))
        .with_header(header("Cache-Control", "no-store"));
    // A client that went away is its own business.
    let _ = request.respond(response);
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

        let taken = server.addr().to_string();
        let Err(e) = HttpServer::start(&taken, Monitor::new("p.toml", "stream")) else {
            panic!("a taken port must be refused");
        };
        assert!(e.to_string().contains(&taken), "{e}");
        assert!(matches!(
            HttpServer::start("localhost", Monitor::new("p", "batch")),
            Err(RiffleError::Config(_))
        ));
        let bare = HttpServer::start("0", Monitor::new("p", "batch")).unwrap();
        assert!(bare.addr().ip().is_loopback());
    }
}
