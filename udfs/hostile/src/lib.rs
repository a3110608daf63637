//! Hostile fixtures: functions that misbehave on purpose. The host's tests prove each one fails
//! cleanly (a typed error naming the UDF, within its limit) and that the next query on the same
//! host still succeeds, and that the sandbox hides files, the environment, the network and the
//! real clock.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::{SystemTime, UNIX_EPOCH};

use riffle_udf::{AggregateState, Timestamp, aggregate, export_udfs, scalar};

/// Never returns: stopped by the host's CPU deadline.
#[scalar]
pub fn spin(x: i64) -> i64 {
    let mut n = x;
    loop {
        n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// Allocates (and touches) 16 MiB at a time until allocation fails: stopped by the memory cap.
#[scalar]
pub fn balloon(x: i64) -> i64 {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![x as u8; 16 << 20]);
        std::hint::black_box(&hoard);
    }
}

/// Panics for positive inputs (a bug in user code): the whole call fails.
#[scalar]
pub fn boom(x: i64) -> i64 {
    if x > 0 {
        panic!("boom: the UDF panicked on purpose at x = {x}");
    }
    x
}

/// Sleeps for `ms` milliseconds inside a host call, where CPU deadlines cannot interrupt it.
#[scalar]
pub fn nap(ms: i64) -> i64 {
    std::thread::sleep(std::time::Duration::from_millis(ms as u64));
    ms
}

/// Tries to read a file; the sandbox has no preopened directories.
#[scalar]
pub fn read_file(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// Tries to read an environment variable; the sandbox's environment is empty.
#[scalar]
pub fn read_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Number of environment variables visible to the UDF.
#[scalar]
pub fn env_count() -> i64 {
    std::env::vars().count() as i64
}

/// Tries to open a TCP connection to `ip:port`; the sandbox has no network.
#[scalar]
pub fn connect(addr: &str) -> Result<String, String> {
    let addr: std::net::SocketAddrV4 = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    tcp_connect(addr)
}

/// Asks the host for a TCP socket through `wasi:sockets` and connects it.
#[cfg(target_os = "wasi")]
fn tcp_connect(addr: std::net::SocketAddrV4) -> Result<String, String> {
    use wasi::sockets::network::{IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
    let network = wasi::sockets::instance_network::instance_network();
    let socket = wasi::sockets::tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4)
        .map_err(|e| format!("create socket: {e:?}"))?;
    let [a, b, c, d] = addr.ip().octets();
    let remote = IpSocketAddress::Ipv4(Ipv4SocketAddress {
        port: addr.port(),
        address: (a, b, c, d),
    });
    socket
        .start_connect(&network, remote)
        .map_err(|e| format!("connect: {e:?}"))?;
    socket.subscribe().block();
    socket
        .finish_connect()
        .map(|_| "connected".to_string())
        .map_err(|e| format!("connect: {e:?}"))
}

/// Natively (unit tests) this is an ordinary connection attempt.
#[cfg(not(target_os = "wasi"))]
fn tcp_connect(addr: std::net::SocketAddrV4) -> Result<String, String> {
    std::net::TcpStream::connect(addr)
        .map(|_| "connected".to_string())
        .map_err(|e| e.to_string())
}

/// Reads the wall clock; deterministic modules see a frozen clock (the Unix epoch).
#[scalar]
pub fn wall_clock() -> Timestamp {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(-1);
    Timestamp(now)
}

/// A value derived from std's random hash keys; deterministic modules get a fixed seed.
#[scalar]
pub fn random_hash(x: i64) -> i64 {
    RandomState::new().hash_one(x) as i64
}

/// Writes to stdout and stderr; the host captures both into its log.
#[scalar]
pub fn chatty(x: i64) -> i64 {
    println!("chatty says hello on stdout for {x}");
    eprintln!("chatty says hello on stderr for {x}");
    x
}

/// State of `hoard`: everything it was ever given, and then some.
#[derive(Default, AggregateState)]
pub struct Hoard {
    kept: Vec<u8>,
}

/// An aggregate whose state grows without bound (a megabyte per row): stopped by the memory
/// cap when the state no longer fits the sandbox, with the aggregate named.
#[aggregate]
impl Hoard {
    pub fn update(&mut self, x: i64) {
        self.kept.extend(std::iter::repeat_n(x as u8, 1 << 20));
    }

    pub fn merge(&mut self, other: Self) {
        self.kept.extend(other.kept);
    }

    pub fn finish(&self) -> i64 {
        self.kept.len() as i64
    }
}

/// State of `merge_boom`: a count.
#[derive(Default, AggregateState)]
pub struct MergeBoom {
    n: i64,
}

/// Counts rows, and panics when asked to merge two partial counts (a bug in user code):
/// batch plans merge partial states, so a `GROUP BY` over several partitions fails cleanly.
#[aggregate]
impl MergeBoom {
    pub fn update(&mut self, _x: i64) {
        self.n += 1;
    }

    pub fn merge(&mut self, other: Self) {
        panic!(
            "merge_boom: the aggregate panicked on purpose merging {} rows",
            other.n
        );
    }

    pub fn finish(&self) -> i64 {
        self.n
    }
}

export_udfs!(
    hoard,
    merge_boom,
    spin,
    balloon,
    boom,
    nap,
    read_file,
    read_env,
    env_count,
    connect,
    wall_clock,
    random_hash,
    chatty,
);
