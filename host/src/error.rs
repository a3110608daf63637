//! The one error type of the Riffle host library.
//!
//! Every error says whose fault it is ([`Blame`]): the user's input, a UDF's code, something
//! outside Riffle (disk, network), or Riffle itself. Operators need that split to know whether to
//! fix a query, page a UDF's author, or retry; a UDF failure always carries the UDF's name and
//! the sha256 of its module so the exact binary can be found.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use datafusion::error::DataFusionError;

/// Result alias for the host library.
pub type Result<T, E = RiffleError> = std::result::Result<T, E>;

/// Who has to act on an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// Bad input: a query, a file name, a configuration value, a malformed module.
    User,
    /// A UDF misbehaved: trapped, ran out of time or memory, or broke the ABI.
    Udf,
    /// Something outside Riffle failed (I/O).
    External,
    /// A Riffle bug.
    Internal,
}

/// How a UDF call failed as a whole (as opposed to a per-row error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UdfFailureKind {
    /// The call ran past its CPU deadline.
    Timeout(Duration),
    /// The instance tried to grow its memory past the cap (bytes).
    OutOfMemory(usize),
    /// The guest trapped: a panic, `unreachable`, an out-of-bounds access...
    Trap,
    /// The module's init hook rejected its configuration.
    Init,
    /// The guest returned a module-level error.
    Guest,
    /// The guest returned something that breaks the contract (wrong type, wrong length).
    AbiViolation,
}

impl fmt::Display for UdfFailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UdfFailureKind::Timeout(limit) => write!(f, "exceeded its CPU deadline of {limit:?}"),
            UdfFailureKind::OutOfMemory(cap) => {
                write!(f, "exceeded its memory cap of {} MiB", cap >> 20)
            }
            UdfFailureKind::Trap => write!(f, "trapped"),
            UdfFailureKind::Init => write!(f, "rejected its configuration"),
            UdfFailureKind::Guest => write!(f, "returned an error"),
            UdfFailureKind::AbiViolation => write!(f, "broke the Riffle UDF ABI"),
        }
    }
}

/// Everything that can go wrong in the Riffle host.
#[derive(Debug, thiserror::Error)]
pub enum RiffleError {
    /// A `.wasm` file is not a usable Riffle UDF module.
    #[error("invalid UDF module {path}: {reason}")]
    InvalidModule {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Bad configuration or command-line input.
    #[error("{0}")]
    Config(String),

    /// A valid query that Riffle cannot run in the requested mode (for example, an OVER
    /// window without ORDER BY on a stream). The message names the rule and what to do.
    #[error("{0}")]
    Unsupported(String),

    /// A checkpoint that cannot be used: written by a different query, incomplete, or
    /// corrupt. The message names what differs or which file is wrong.
    #[error("{0}")]
    Checkpoint(String),

    /// A UDF call failed as a whole.
    #[error("UDF {function} (module {module}, sha256 {hash}) {kind}{}", detail_suffix(.detail))]
    UdfFailure {
        /// SQL name of the function.
        function: String,
        /// Module file name.
        module: String,
        /// sha256 of the module file, hex.
        hash: String,
        /// What happened.
        kind: UdfFailureKind,
        /// Details: the trap message, the guest's own words, captured stderr.
        detail: String,
    },

    /// A UDF rejected one row (`Err` from the function) and the row-error policy is `fail`.
    #[error("UDF {function} (sha256 {hash}) failed on row {row} of a batch: {message}")]
    RowError {
        /// SQL name of the function.
        function: String,
        /// sha256 of the module file, hex.
        hash: String,
        /// Row index within the batch.
        row: usize,
        /// The UDF's message.
        message: String,
    },

    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What Riffle was doing ("reading", "writing").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// Input the query had not read yet is gone from its source (Kafka records deleted by
    /// retention, a recreated topic). The message names what is missing and how to go on.
    #[error("data loss: {0}")]
    DataLoss(String),

    /// An external system (a Kafka broker, a Delta table's storage) failed or refused, in a
    /// way that may go away: a streaming run retries it.
    #[error("{0}")]
    External(String),

    /// An external system answered in a way a retry will not change: a table whose log or
    /// files Riffle cannot use, or an operation the table's library refused for its own
    /// reasons (a merge it could not plan). A streaming run ends at once.
    #[error("{0}")]
    Refused(String),

    /// Query planning or execution failed inside DataFusion.
    #[error(transparent)]
    Query(#[from] DataFusionError),

    /// A Riffle bug.
    #[error("internal error (likely a Riffle bug): {0}")]
    Internal(String),
}

fn transient_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        StorageFull
            | QuotaExceeded
            | ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | TimedOut
            | Interrupted
    ) || e.to_string().contains(DISK_FULL)
}

/// How the OS words ENOSPC, which writers that wrap I/O errors keep only as text.
const DISK_FULL: &str = "No space left on device";

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl RiffleError {
    /// Whose fault this error is.
    pub fn blame(&self) -> Blame {
        match self {
            RiffleError::InvalidModule { .. }
            | RiffleError::Config(_)
            | RiffleError::Unsupported(_) => Blame::User,
            RiffleError::Checkpoint(_) => Blame::External,
            RiffleError::UdfFailure { .. } | RiffleError::RowError { .. } => Blame::Udf,
            RiffleError::Io { .. }
            | RiffleError::External(_)
            | RiffleError::Refused(_)
            | RiffleError::DataLoss(_) => Blame::External,
            RiffleError::Query(e) => match RiffleError::find_in(e) {
                Some(inner) => inner.blame(),
                None => match e.find_root() {
                    DataFusionError::Internal(_) => Blame::Internal,
                    DataFusionError::IoError(_) | DataFusionError::ObjectStore(_) => {
                        Blame::External
                    }
                    _ => Blame::User,
                },
            },
            RiffleError::Internal(_) => Blame::Internal,
        }
    }

    /// Whether the error may go away by itself: an unreachable broker or storage service, a
    /// full disk. A streaming run retries such failures from its checkpoint (as a restart
    /// would) instead of ending; anything else (bad input, data loss, a fenced process) ends it.
    pub fn is_transient(&self) -> bool {
        match self {
            RiffleError::External(_) => true,
            RiffleError::Io { source, .. } => transient_io(source),
            RiffleError::Query(e) => match RiffleError::find_in(e) {
                Some(inner) => inner.is_transient(),
                None => match e.find_root() {
                    DataFusionError::IoError(io) => transient_io(io),
                    // Writers (Arrow IPC, Parquet) carry the OS error as text.
                    root => root.to_string().contains(DISK_FULL),
                },
            },
            _ => false,
        }
    }

    /// A Riffle error carried inside a DataFusion error (UDF failures raised during query
    /// execution travel as `DataFusionError::External`, possibly wrapped in context).
    pub fn find_in(error: &DataFusionError) -> Option<&RiffleError> {
        let mut current: &(dyn std::error::Error + 'static) = error;
        loop {
            if let Some(found) = current.downcast_ref::<RiffleError>() {
                return Some(found);
            }
            if let Some(DataFusionError::External(inner)) = current.downcast_ref()
                && let Some(found) = inner.downcast_ref::<RiffleError>()
            {
                return Some(found);
            }
            current = current.source()?;
        }
    }

    /// This error as a DataFusion error, for code running inside a query plan.
    pub fn into_datafusion(self) -> DataFusionError {
        match self {
            RiffleError::Query(e) => e,
            other => DataFusionError::External(Box::new(other)),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        RiffleError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

impl From<arrow::error::ArrowError> for RiffleError {
    fn from(e: arrow::error::ArrowError) -> Self {
        RiffleError::Query(DataFusionError::ArrowError(Box::new(e), None))
    }
}
