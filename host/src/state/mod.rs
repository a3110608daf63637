//! Operator state: what every stateful operator keeps between epochs, and how it reaches the
//! checkpoint.
//!
//! Operators never write files. They own *tables* ([`StateTable`]) and the checkpoint asks each
//! table, once per epoch, for its changes since the previous epoch (a *delta*) or, now and then,
//! for all of it (a *snapshot*). Both are Arrow [`RecordBatch`]es encoded by the table, so no
//! operator invents its own changelog format. A large delta or snapshot comes in several
//! batches of bounded size: encoding never reallocates one huge buffer, and no Arrow offset
//! overflows however big the state grows. Two shapes cover every operator:
//!
//! - [`KeyedTable`]: a map from an encoded key (Arrow's row format) to a value, with per-key
//!   expiry by event time (a key goes once the watermark passes its deadline) and change
//!   tracking. Window aggregates (group -> accumulators), de-duplication (key -> event time),
//!   session windows (key -> its open sessions' aggregate states), OVER windows (partition -> frame state) and joins (key
//!   -> buffered rows) all use it.
//! - [`RowBuffer`]: rows waiting for the watermark, held as Arrow batches and released in event
//!   time order. Its delta is the rows added plus one number: the watermark below which rows
//!   were released, which is all a restore needs to drop them again.
//!
//! # Size, and where large state goes next
//!
//! Tables live in memory: a `KeyedTable` costs its keys and values plus about 60 bytes of map
//! and bookkeeping per key, so a million keys of a typical aggregate or OVER partition fit in a
//! few hundred megabytes. Change tracking keeps each epoch's delta proportional to the keys the
//! epoch touched, not to the table. What does not scale past memory is the map itself and the
//! periodic snapshot, which encodes every key. The seam for moving state to disk or object
//! storage is this module's interface: `get`/`get_mut`/`remove`/`take_due` on one side and
//! delta/snapshot batches on the other. An LSM-backed table (the deltas are already sorted runs
//! keyed like an LSM's memtable flushes) can implement the same calls, keep a bounded cache of
//! hot keys in memory, and turn snapshots into compactions, without operators changing.

mod buffer;
pub mod bytes;
mod index;
mod keyed;
mod slab;

use arrow::array::RecordBatch;
use serde::Serialize;

pub use buffer::RowBuffer;
pub use keyed::{EntryId, KeyedTable, StateHasher, ValueCodec, ValueEncoder, entry_keys};

use crate::error::Result;

/// Size of some state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StateSize {
    /// Entries (keys, groups, buffered rows).
    pub rows: u64,
    /// Approximate bytes in memory.
    pub bytes: u64,
}

impl std::ops::Add for StateSize {
    type Output = StateSize;
    fn add(self, other: StateSize) -> StateSize {
        StateSize {
            rows: self.rows + other.rows,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// One table of an operator's state, as the checkpoint sees it.
///
/// The checkpoint calls [`take_delta`](Self::take_delta) once per epoch (or
/// [`snapshot`](Self::snapshot) when a snapshot is due), writes the batch under the operator's
/// id and the table's name, and on restore feeds the files back through
/// [`restore`](Self::restore): the latest snapshot, then every delta after it, in order.
pub trait StateTable: Send {
    /// The table's name, unique within its operator (part of the checkpoint path).
    fn name(&self) -> &str;

    /// Changes since the previous delta or snapshot, in order; empty when nothing changed.
    ///
    /// # Errors
    /// Encoding errors.
    fn take_delta(&mut self) -> Result<Vec<RecordBatch>>;

    /// The whole table, in at least one batch; resets change tracking as `take_delta` does.
    ///
    /// # Errors
    /// Encoding errors.
    fn snapshot(&mut self) -> Result<Vec<RecordBatch>>;

    /// Applies the batches of one snapshot (replacing everything) or one delta (on top of
    /// what is there).
    ///
    /// # Errors
    /// A batch this table did not write (wrong schema) or undecodable values.
    fn restore(&mut self, batches: &[RecordBatch], snapshot: bool) -> Result<()>;

    /// Current size.
    fn size(&self) -> StateSize;

    /// Forgets what changed since the last delta, for a run that never checkpoints (batch
    /// mode runs stream operators over bounded input): change tracking would otherwise hold
    /// every key the run ever saw.
    fn forget_changes(&mut self);
}
