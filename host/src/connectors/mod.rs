//! Sources and sinks. For now: a deterministic demo-data generator and file writers; the
//! streaming sources (Kafka, directories) and transactional sinks (Delta) join them here.

pub mod files;
pub mod generator;
