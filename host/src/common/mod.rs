//! Small shared types every other module may use, and which use nothing above them: durable
//! file writes, event time and durations, output modes and file formats.
//!
//! Keeping these in one low module is what keeps the module graph acyclic: connectors, the
//! planner, the operators and the driver all need (say) [`OutputMode`] or
//! [`fs::write_atomic`], and none of them should have to import another to get it.

pub mod format;
pub mod fs;
pub mod memory;
pub mod time;

pub use format::FileFormat;
pub use time::{OutputMode, Watermark, parse_duration, to_micros};
