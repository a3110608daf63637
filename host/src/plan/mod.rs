//! From SQL to plans: event-time window functions, the batch rewrite that lets DataFusion run
//! them, and the compilation of a query into Riffle's incremental streaming plan.

pub mod stream;
pub mod window;

pub use stream::{StatefulNode, StreamPlan};
