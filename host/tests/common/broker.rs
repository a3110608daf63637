//! A real Kafka-protocol broker for process-level tests.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use riffle::connectors::kafka::KafkaConfig;

/// A broker for one test: the one in `RIFFLE_KAFKA_BOOTSTRAP`, or a fresh noida-db on a free
/// port with its data in a temporary directory, stopped when dropped.
pub struct Broker {
    pub bootstrap: String,
    pub child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    pub fn start() -> Broker {
        if let Ok(b) = std::env::var("RIFFLE_KAFKA_BOOTSTRAP") {
            return Broker {
                bootstrap: b,
                child: None,
                _dir: None,
            };
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        Broker {
            bootstrap: format!("127.0.0.1:{port}"),
            child: Some(Self::launch(port, &dir.path().join("data"))),
            _dir: Some(dir),
        }
    }

    pub fn launch(port: u16, data: &Path) -> Child {
        let child = Command::new(which_noida())
            .args(["start", "--only", "kafka", "--host", "127.0.0.1"])
            .args(["--kafka-port", &port.to_string()])
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "noida-db did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// Freezes the broker (SIGSTOP): connections stay open and nothing answers, as when a
    /// broker host hangs or the network drops. (A SIGTERM restart is no test of exactly-once
    /// with noida-db: it saves its data as a snapshot while still serving, and loses commits it
    /// acknowledged after the snapshot, as this test found.)
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn kafka(&self) -> KafkaConfig {
        KafkaConfig {
            bootstrap: self.bootstrap.clone(),
            properties: BTreeMap::new(),
        }
    }

    /// Lets a frozen broker run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("a broker this test started");
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} {}", child.id());
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn which_noida() -> PathBuf {
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_default());
    let candidates = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("noida-db"))
        .chain([home.join(".cargo/bin/noida-db")])
        .collect::<Vec<_>>();
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .expect("noida-db is not installed: run scripts/kafka-broker.sh install")
}
