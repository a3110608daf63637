//! Sources and sinks: the demo data generator, files, streaming sources and sinks.

pub mod files;
pub mod generator;
pub mod sink;
pub mod source;
pub mod static_table;
