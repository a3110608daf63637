//! Seeing inside a running query: `riffle run --http ADDR` serves Prometheus metrics, a JSON
//! API and a web dashboard from the process that runs the query, with nothing else to install.
//!
//! - [`Monitor`] is the run's live view: the streaming driver reports each committed epoch
//!   (its progress record, the same one `progress.jsonl` gets), the start of each run and
//!   failures; UDF counters are read from the modules themselves.
//! - `metrics` turns those reports into Prometheus metric families.
//! - [`HttpServer`] answers `/metrics`, `/api/...` and the dashboard (`/`) on its own thread.
//!
//! Everything is updated per committed epoch, so what the server shows is always a committed
//! state, the one a restart would resume from.

mod http;
mod metrics;
mod monitor;

pub use http::HttpServer;
pub use monitor::{GraphView, HISTORY, Monitor, NodeView};
