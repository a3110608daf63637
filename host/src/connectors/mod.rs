//! Sources and sinks: the demo data generator, files, streaming sources and sinks.

pub mod clickstream;
pub mod delta;
pub mod files;
pub mod generator;
pub mod kafka;
pub mod sink;
pub mod source;
pub mod static_table;
