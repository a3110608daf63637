//! Seeing inside a running query: `riffle run --http ADDR` serves Prometheus metrics, a JSON
//! API and a web dashboard from the process that runs the query, with nothing else to install.
//!
//! - [`Monitor`] is the run's live view: the streaming driver reports each committed epoch
//!   (its progress record, the same one `progress.jsonl` gets), the start of each run and
//!   failures; UDF counters are read from the modules themselves.
//! - `metrics` turns those reports into Prometheus metric families.
//! - [`HttpServer`] answers `/metrics`, `/api/...` and the dashboard (`/`) on its own thread.
//!
//! Rows, epochs, phases, watermarks, state and source figures are updated per committed epoch:
//! they show a committed state, the one a restart would resume from. UDF counters are read
//! live from the modules, so they include the epoch in flight.

mod http;
mod metrics;
mod monitor;

pub use http::HttpServer;
pub use monitor::{GraphView, HISTORY, Monitor, NodeView};
