//! [`KeyedTable`]: keyed state with change tracking and event-time expiry.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use std::hash::BuildHasher;

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, BooleanArray, Int64Array, RecordBatch,
};
use arrow::datatypes::{DataType, Field, Fields, Int64Type, Schema, SchemaRef};

use super::index::SlotIndex;
use super::slab::Slab;
use super::{StateSize, StateTable};
use crate::common::Watermark;
use crate::common::memory::prefetch;
use crate::error::{Result, RiffleError};

/// How a table's values become Arrow columns and back.
///
/// Encoding is streamed value by value into an [`ValueEncoder`] that builds all the columns at
/// once, so codecs can build typed columns (as the aggregate codec does with accumulator
/// states); codecs for structured values usually write one `Binary` column with
/// [`super::bytes`].
pub trait ValueCodec<V>: Send {
    /// The value columns (they are made nullable in the table's schema: deleted keys have no
    /// value).
    fn fields(&self) -> Fields;

    /// An encoder for about `capacity` values.
    fn encoder(&self, capacity: usize) -> Box<dyn ValueEncoder<V> + '_>;

    /// Decodes row `row` of `columns` (laid out as [`fields`](Self::fields)).
    ///
    /// # Errors
    /// Columns this codec did not write.
    fn decode(&self, columns: &[ArrayRef], row: usize) -> Result<V>;

    /// Approximate bytes a value holds (for the progress's state size); called often, so it
    /// should be cheap.
    fn size(&self, value: &V) -> usize;

    /// Asks the CPU to bring the memory `value` owns outside its slot into cache, a few values
    /// before it is encoded or worked on (see [`crate::common::memory::prefetch`]). Nothing by
    /// default: most values live in their slot.
    fn prefetch(&self, _value: &V) {}
}

/// Builds the value columns of one delta or snapshot.
pub trait ValueEncoder<V> {
    /// Appends one value. Takes `&mut` because some values (DataFusion accumulators) must be
    /// mutated to read their state.
    ///
    /// # Errors
    /// Values that cannot be encoded.
    fn append(&mut self, value: &mut V) -> Result<()>;

    /// Appends a row without a value (a deleted key).
    fn append_null(&mut self);

    /// The columns, one per field.
    ///
    /// # Errors
    /// Encoding errors.
    fn finish(self: Box<Self>) -> Result<Vec<ArrayRef>>;
}

/// A handle to an entry of a [`KeyedTable`] (see [`KeyedTable::entry_of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(u32);

/// The hasher of state maps: fast on short byte keys (foldhash), seeded per process.
pub type StateHasher = hashbrown::DefaultHashBuilder;

/// How many keys ahead [`KeyedTable::entries_of`] asks for index entries.
const LOOKUP_AHEAD: usize = 16;

/// How many changed slots ahead encoding prefetches what their values own.
const ENCODE_PREFETCH: usize = 8;

/// Longest key kept inside its slot.
const INLINE: usize = 22;

/// A key, kept inside its slot when short (most keys are: an id or two in Arrow's row format,
/// 9 bytes for one BIGINT), so that comparing or encoding it does not chase a pointer and a
/// new key costs no allocation.
enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Key {
    fn new(key: &[u8]) -> Key {
        if key.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(key.into())
        }
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Heap(bytes) => bytes,
        }
    }
}

struct Slot<V> {
    key: Key,
    value: V,
    /// The key goes (or its operator is told) once the watermark passes this event time.
    expires: Option<i64>,
    /// Changed since the last delta; the slot is then in `changed`.
    changed: bool,
    /// Bytes at the last encode or insert.
    size: usize,
    /// Tells a timer set for an earlier key of this slot from one set for this key.
    generation: u32,
}

/// A map from encoded keys to values, with change tracking for incremental checkpoints and
/// per-key deadlines in event time.
///
/// Keys are byte strings, normally Arrow's row format of the key columns (it orders and
/// compares like the values and is stable for a given Arrow version). Deadlines are event
/// times: [`take_due`](Self::take_due) returns the keys whose deadline the watermark has
/// passed, and the operator decides what that means (emit and remove a window, evict old
/// join rows and set a new deadline).
///
/// Entries live in a slab of slots; the index ([`SlotIndex`]) holds only slot numbers with
/// 32 bits of their key's hash, so growing it moves eight bytes per key rather than whole
/// values and reads no slot, and change tracking and timers refer to slots without copying
/// keys.
pub struct KeyedTable<V> {
    name: String,
    hasher: StateHasher,
    index: SlotIndex,
    slots: Slab<Slot<V>>,
    free: Vec<u32>,
    /// Slots changed since the last delta (each once while its flag is set; a slot freed and
    /// reused may be listed twice).
    changed: Vec<u32>,
    /// Keys removed since the last delta.
    deleted: Vec<Box<[u8]>>,
    /// Deadlines, earliest first; those whose slot moved on (another key, or another
    /// deadline) are skipped when they come up.
    timers: BinaryHeap<Reverse<Timer>>,
    /// Numbers timers, so that equal deadlines come up in the order they were set.
    next_timer: u64,
    codec: Box<dyn ValueCodec<V>>,
    bytes: usize,
    len: usize,
    /// Numbers slot occupancies, for timers.
    next_generation: u32,
}

/// A deadline set for a slot. A heap of these costs no allocation per deadline (a map from
/// deadlines to slot lists cost one per distinct event time, which is nearly every row's).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: i64,
    seq: u64,
    slot: u32,
    generation: u32,
}

const KEY: &str = "key";
const DELETED: &str = "deleted";
const EXPIRES: &str = "expires";

impl<V: Send> KeyedTable<V> {
    /// An empty table.
    pub fn new(name: impl Into<String>, codec: Box<dyn ValueCodec<V>>) -> Self {
        KeyedTable {
            name: name.into(),
            hasher: StateHasher::default(),
            index: SlotIndex::default(),
            slots: Slab::new(),
            free: Vec::new(),
            changed: Vec::new(),
            deleted: Vec::new(),
            timers: BinaryHeap::new(),
            next_timer: 0,
            codec,
            bytes: 0,
            len: 0,
            next_generation: 0,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn hash(&self, key: &[u8]) -> u32 {
        self.hasher.hash_one(key) as u32
    }

    fn find(&self, key: &[u8]) -> Option<u32> {
        self.find_hashed(key, self.hash(key))
    }

    fn find_hashed(&self, key: &[u8], hash: u32) -> Option<u32> {
        let slots = &self.slots;
        self.index.find(hash, |i| {
            slots[i as usize]
                .as_ref()
                .is_some_and(|s| s.key.as_ref() == key)
        })
    }

    fn slot(&self, i: u32) -> &Slot<V> {
        self.slots[i as usize].as_ref().expect("an occupied slot")
    }

    /// Marks slot `i` changed and returns it.
    fn touch(&mut self, i: u32) -> &mut Slot<V> {
        let slot = self.slots[i as usize].as_mut().expect("an occupied slot");
        if !slot.changed {
            slot.changed = true;
            self.changed.push(i);
        }
        slot
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&V> {
        self.lookup(key).map(|id| self.value(id))
    }

    /// The value of `key`, to change (the key goes into the next delta).
    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let id = self.lookup(key)?;
        Some(self.value_mut(id))
    }

    /// A handle to `key`'s entry, if it has one (not marked changed): for an operator that
    /// reads an entry several times (a join probing a key's rows, then marking some matched)
    /// without hashing the key again each time.
    pub fn lookup(&self, key: &[u8]) -> Option<EntryId> {
        self.find(key).map(EntryId)
    }

    /// The value behind a handle.
    ///
    /// # Panics
    /// If the entry was removed since.
    pub fn value(&self, id: EntryId) -> &V {
        &self.slot(id.0).value
    }

    /// The value behind a handle, to change (the key goes into the next delta).
    ///
    /// # Panics
    /// If the entry was removed since.
    pub fn value_mut(&mut self, id: EntryId) -> &mut V {
        &mut self.touch(id.0).value
    }

    /// Asks the CPU to bring entry `id` into cache, without waiting for it. An operator that
    /// works through entries in an order of its own (the OVER window's partitions, sorted)
    /// asks a few entries ahead: at a million keys each entry is a cache miss, and misses
    /// requested together overlap instead of queueing one behind the other.
    pub fn prefetch(&self, id: EntryId) {
        prefetch(&self.slots[id.0 as usize]);
    }

    /// Asks the CPU to bring what entry `id`'s value owns elsewhere into cache (see
    /// [`ValueCodec::prefetch`]): the second step after [`prefetch`](Self::prefetch), once
    /// the entry itself has arrived.
    pub fn prefetch_value(&self, id: EntryId) {
        if let Some(slot) = &self.slots[id.0 as usize] {
            self.codec.prefetch(&slot.value);
        }
    }

    /// The value of `key`, created with `new` if missing, to change.
    pub fn get_or_insert_with(&mut self, key: &[u8], new: impl FnOnce() -> V) -> &mut V {
        let i = self.entry(key, new);
        &mut self.touch(i).value
    }

    /// A handle to `key`'s entry, created with `new` if missing, and marked changed: for an
    /// operator that looks keys up row by row and then works through them entry by entry
    /// (sorting small handles rather than keys). Valid until the entry is removed.
    pub fn entry_of(&mut self, key: &[u8], new: impl FnOnce() -> V) -> EntryId {
        let i = self.entry(key, new);
        self.touch(i);
        EntryId(i)
    }

    /// [`entry_of`](Self::entry_of) for `n` keys at once (`key(i)` is the `i`th), in order.
    ///
    /// At a million keys each lookup is a cache miss in the index and another in the entry;
    /// knowing the keys in advance, this hashes them all first and asks for the index entries
    /// [`LOOKUP_AHEAD`] keys ahead and for the entries half as far ahead, so that the misses
    /// of several keys overlap instead of queueing.
    pub fn entries_of<'k>(
        &mut self,
        n: usize,
        key: impl Fn(usize) -> &'k [u8],
        mut new: impl FnMut() -> V,
    ) -> Vec<EntryId> {
        let hashes: Vec<u32> = (0..n).map(|i| self.hash(key(i))).collect();
        let mut entries = Vec::with_capacity(n);
        for (i, &hash) in hashes.iter().enumerate() {
            if let Some(&ahead) = hashes.get(i + LOOKUP_AHEAD) {
                self.index.prefetch(ahead);
            }
            if let Some(slot) = hashes
                .get(i + LOOKUP_AHEAD / 2)
                .and_then(|&h| self.index.guess(h))
            {
                prefetch(&self.slots[slot as usize]);
            }
            let slot = self.entry_hashed(key(i), hash, &mut new);
            self.touch(slot);
            entries.push(EntryId(slot));
        }
        entries
    }

    /// The slot of `key`, created with `new` if missing (one probe of the table either way).
    fn entry(&mut self, key: &[u8], new: impl FnOnce() -> V) -> u32 {
        self.entry_hashed(key, self.hash(key), new)
    }

    /// [`entry`](Self::entry) of a key whose hash is known.
    fn entry_hashed(&mut self, key: &[u8], hash: u32, new: impl FnOnce() -> V) -> u32 {
        match self.find_hashed(key, hash) {
            Some(i) => i,
            None => self.add(key, new(), hash),
        }
    }

    /// Adds `key` (of hash `hash`, not in the table) with `value`.
    fn add(&mut self, key: &[u8], value: V, hash: u32) -> u32 {
        let size = key.len() + self.codec.size(&value) + ENTRY_OVERHEAD;
        self.bytes += size;
        self.len += 1;
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let i = match self.free.pop() {
            Some(i) => i,
            None => self.slots.push_empty() as u32,
        };
        self.slots[i as usize] = Some(Slot {
            key: Key::new(key),
            value,
            expires: None,
            changed: false,
            size,
            generation,
        });
        self.index.insert(hash, i);
        i
    }

    /// Sets `key`'s value (keeping its deadline).
    pub fn insert(&mut self, key: &[u8], value: V) {
        let hash = self.hash(key);
        match self.find_hashed(key, hash) {
            Some(i) => self.touch(i).value = value,
            None => {
                let i = self.add(key, value, hash);
                self.touch(i);
            }
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        let hash = self.hash(key);
        let i = self.find_hashed(key, hash)?;
        Some(self.unlink(i, hash))
    }

    /// Removes the entry behind a handle, returning its value.
    ///
    /// # Panics
    /// If the entry was removed already.
    pub fn remove_entry(&mut self, id: EntryId) -> V {
        let hash = self.hash(self.slot(id.0).key.as_ref());
        self.unlink(id.0, hash)
    }

    /// Removes occupied slot `i`, whose key hashes to `hash`.
    fn unlink(&mut self, i: u32, hash: u32) -> V {
        self.index.remove(hash, i);
        let slot = self.slots[i as usize].take().expect("an occupied slot");
        self.free.push(i);
        self.len -= 1;
        self.bytes = self.bytes.saturating_sub(slot.size);
        self.deleted.push(slot.key.as_ref().into());
        slot.value
    }

    /// Sets (or clears) the event time after which `key` is due (see
    /// [`take_due`](Self::take_due)). The deadline is part of the checkpointed state.
    pub fn set_deadline(&mut self, key: &[u8], at: Option<i64>) {
        if let Some(id) = self.lookup(key) {
            self.set_deadline_of(id, at);
        }
    }

    /// [`set_deadline`](Self::set_deadline) of the entry behind a handle.
    pub fn set_deadline_of(&mut self, id: EntryId, at: Option<i64>) {
        let i = id.0;
        if self.slot(i).expires == at {
            return;
        }
        let slot = self.touch(i);
        slot.expires = at;
        let generation = slot.generation;
        if let Some(at) = at {
            self.schedule(at, i, generation);
        }
    }

    /// Moves `key`'s deadline to `at` if that is earlier (or it has none).
    pub fn lower_deadline(&mut self, key: &[u8], at: i64) {
        if let Some(id) = self.lookup(key) {
            self.lower_deadline_of(id, at);
        }
    }

    /// [`lower_deadline`](Self::lower_deadline) of the entry behind a handle.
    pub fn lower_deadline_of(&mut self, id: EntryId, at: i64) {
        if self.slot(id.0).expires.is_some_and(|e| e <= at) {
            return;
        }
        self.set_deadline_of(id, Some(at));
    }

    /// The deadline of `key`.
    pub fn deadline(&self, key: &[u8]) -> Option<i64> {
        self.find(key).and_then(|i| self.slot(i).expires)
    }

    fn schedule(&mut self, at: i64, slot: u32, generation: u32) {
        let seq = self.next_timer;
        self.next_timer += 1;
        self.timers.push(Reverse(Timer {
            at,
            seq,
            slot,
            generation,
        }));
    }

    /// Keys whose deadline the watermark has passed (deadline < watermark), earliest deadline
    /// first. Their deadlines are cleared; the caller removes them or sets new ones.
    pub fn take_due(&mut self, watermark: Watermark) -> Vec<Box<[u8]>> {
        self.take_due_entries(watermark)
            .into_iter()
            .map(|id| self.slot(id.0).key.as_ref().into())
            .collect()
    }

    /// [`take_due`](Self::take_due) as handles (each entry once), for an operator that
    /// changes or removes the entries in place rather than by key.
    pub fn take_due_entries(&mut self, watermark: Watermark) -> Vec<EntryId> {
        let mut due = Vec::new();
        while let Some(&Reverse(timer)) = self.timers.peek() {
            if !watermark.is_late(timer.at) {
                break;
            }
            self.timers.pop();
            let current = self.slots[timer.slot as usize]
                .as_ref()
                .is_some_and(|s| s.generation == timer.generation && s.expires == Some(timer.at));
            if current {
                self.touch(timer.slot).expires = None;
                due.push(EntryId(timer.slot));
            }
        }
        due
    }

    /// Every key and value, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &V)> {
        self.slots.iter().map(|s| (s.key.as_ref(), &s.value))
    }

    /// Every value, mutably, *without* marking anything changed: for reads that need `&mut`
    /// but change nothing a restore would see (evaluating a DataFusion accumulator).
    pub fn values_mut_untracked(&mut self) -> impl Iterator<Item = (&[u8], &mut V)> {
        self.slots
            .iter_mut()
            .map(|s| (s.key.as_ref(), &mut s.value))
    }

    fn schema(&self) -> SchemaRef {
        let mut fields = vec![
            Field::new(KEY, DataType::Binary, false),
            Field::new(DELETED, DataType::Boolean, false),
            Field::new(EXPIRES, DataType::Int64, true),
        ];
        fields.extend(
            self.codec
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true)),
        );
        Arc::new(
            Schema::new(fields)
                .with_metadata([("riffle.table".to_string(), self.name.clone())].into()),
        )
    }

    /// Encodes the deleted keys (first) and the changed slots (each once), and resets change
    /// tracking. Batches hold at most [`CHUNK_ROWS`] rows, so encoding a million keys never
    /// grows (and copies) one huge buffer and no Arrow offset can overflow.
    ///
    /// Slots are visited in slab order, not in the order they changed: a million keys touched
    /// at random are then read front to back (with their values, mostly allocated in the
    /// same order) instead of one cache miss after another.
    fn encode(
        &mut self,
        deleted: Vec<Box<[u8]>>,
        mut changed: Vec<u32>,
    ) -> Result<Vec<RecordBatch>> {
        changed.sort_unstable();
        let schema = self.schema();
        let mut batches = Vec::new();
        let mut chunk = Chunk::new(&*self.codec, deleted.len() + changed.len());
        for key in &deleted {
            chunk.keys.append_value(key);
            chunk.deadlines.push(None);
            chunk.flags.push(true);
            chunk.values.append_null();
            if chunk.flags.len() == CHUNK_ROWS {
                batches.push(chunk.finish(&schema)?);
                chunk = Chunk::new(&*self.codec, CHUNK_ROWS);
            }
        }
        let mut total = 0usize;
        let mut old = 0usize;
        for (n, &i) in changed.iter().enumerate() {
            // The slots a few changes on, fetched while this one is encoded (in slab order but
            // with gaps, which the CPU does not foresee), then what their values own elsewhere
            // (an OVER partition's rows) once they have arrived.
            if let Some(&ahead) = changed.get(n + 2 * ENCODE_PREFETCH) {
                prefetch(&self.slots[ahead as usize]);
            }
            if let Some(Some(ahead)) = changed
                .get(n + ENCODE_PREFETCH)
                .map(|&j| &self.slots[j as usize])
            {
                self.codec.prefetch(&ahead.value);
            }
            let Some(slot) = self.slots[i as usize].as_mut() else {
                continue;
            };
            if !slot.changed {
                continue;
            }
            slot.changed = false;
            let size = slot.key.as_ref().len() + self.codec.size(&slot.value) + ENTRY_OVERHEAD;
            old += slot.size;
            total += size;
            slot.size = size;
            chunk.keys.append_value(slot.key.as_ref());
            chunk.deadlines.push(slot.expires);
            chunk.flags.push(false);
            chunk.values.append(&mut slot.value)?;
            if chunk.flags.len() == CHUNK_ROWS {
                batches.push(chunk.finish(&schema)?);
                chunk = Chunk::new(&*self.codec, CHUNK_ROWS);
            }
        }
        if !chunk.flags.is_empty() || batches.is_empty() {
            batches.push(chunk.finish(&schema)?);
        }
        self.bytes = (self.bytes + total).saturating_sub(old);
        Ok(batches)
    }

    /// Folds the entries of `batch`, a snapshot batch of another table with this one's codec,
    /// into this table: a key it lacks is added with the entry's value and deadline, and a key
    /// it has gets `merge(value, value columns, row)` with the entry's row of the batch's
    /// value columns (laid out as the codec's [`fields`](ValueCodec::fields)), keeping its
    /// deadline. Every key of the batch goes into the next delta. This is how an instance of a
    /// partitioned aggregation takes the partial groups a [`Combiner`](crate::exec::Combiner)
    /// folded from a share of rows.
    ///
    /// # Errors
    /// A batch of other columns, or `merge`'s error.
    pub fn merge_entries(
        &mut self,
        batch: &RecordBatch,
        mut merge: impl FnMut(&mut V, &[ArrayRef], usize) -> Result<()>,
    ) -> Result<()> {
        self.check_columns(batch)?;
        let keys = batch.column(0).as_binary::<i32>();
        let deadlines = batch.column(2).as_primitive::<Int64Type>();
        let values = &batch.columns()[3..];
        for row in 0..batch.num_rows() {
            let key = keys.value(row);
            let hash = self.hash(key);
            match self.find_hashed(key, hash) {
                Some(i) => merge(&mut self.touch(i).value, values, row)?,
                None => {
                    let value = self.codec.decode(values, row)?;
                    let i = self.add(key, value, hash);
                    self.touch(i);
                    if deadlines.is_valid(row) {
                        self.set_deadline_of(EntryId(i), Some(deadlines.value(row)));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that `batch` has this table's columns, as a snapshot or delta of it would.
    fn check_columns(&self, batch: &RecordBatch) -> Result<()> {
        let expected = self.schema();
        if batch.schema().fields() != expected.fields() {
            return Err(RiffleError::Checkpoint(format!(
                "state table {}: the checkpoint's columns ({}) are not this query's ({}); the \
                 query or a UDF changed",
                self.name,
                describe(batch.schema().fields()),
                describe(expected.fields())
            )));
        }
        Ok(())
    }

    /// Applies one batch of a snapshot or delta.
    fn restore_one(&mut self, batch: &RecordBatch) -> Result<()> {
        self.check_columns(batch)?;
        let keys = batch.column(0).as_binary::<i32>();
        let deleted = batch.column(1).as_boolean();
        let deadlines = batch.column(2).as_primitive::<Int64Type>();
        let values = &batch.columns()[3..];
        for row in 0..batch.num_rows() {
            let key = keys.value(row);
            if deleted.value(row) {
                self.remove(key);
                continue;
            }
            let value = self.codec.decode(values, row)?;
            let expires = deadlines.is_valid(row).then(|| deadlines.value(row));
            let hash = self.hash(key);
            let i = match self.find_hashed(key, hash) {
                Some(i) => {
                    let size = key.len() + self.codec.size(&value) + ENTRY_OVERHEAD;
                    let slot = self.slots[i as usize].as_mut().expect("an occupied slot");
                    self.bytes = (self.bytes + size).saturating_sub(slot.size);
                    slot.size = size;
                    slot.value = value;
                    i
                }
                None => self.add(key, value, hash),
            };
            let slot = self.slots[i as usize].as_mut().expect("an occupied slot");
            slot.expires = expires;
            if let Some(at) = expires {
                let generation = slot.generation;
                self.schedule(at, i, generation);
            }
        }
        Ok(())
    }
}

/// The keys of a [`KeyedTable`]'s delta or snapshot batch, one per entry (what a partitioned
/// operator routes its entries by).
///
/// # Errors
/// [`RiffleError::Checkpoint`] for a batch no keyed table wrote.
pub fn entry_keys(batch: &RecordBatch) -> Result<&BinaryArray> {
    match batch.schema().fields().first() {
        Some(f) if f.name() == KEY && f.data_type() == &DataType::Binary => {
            Ok(batch.column(0).as_binary::<i32>())
        }
        _ => Err(RiffleError::Checkpoint(format!(
            "a keyed table's state batch starts with its {KEY} column, not {}",
            describe(batch.schema().fields())
        ))),
    }
}

/// Rows per batch of a delta or snapshot.
const CHUNK_ROWS: usize = 16_384;

/// The columns of one batch of a delta or snapshot, being built.
struct Chunk<'a, V> {
    keys: BinaryBuilder,
    flags: Vec<bool>,
    deadlines: Vec<Option<i64>>,
    values: Box<dyn ValueEncoder<V> + 'a>,
}

impl<'a, V> Chunk<'a, V> {
    fn new(codec: &'a dyn ValueCodec<V>, rows: usize) -> Self {
        let rows = rows.min(CHUNK_ROWS);
        Chunk {
            keys: BinaryBuilder::with_capacity(rows, rows * 16),
            flags: Vec::with_capacity(rows),
            deadlines: Vec::with_capacity(rows),
            values: codec.encoder(rows),
        }
    }

    fn finish(mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.keys.finish()),
            Arc::new(BooleanArray::from(self.flags)),
            Arc::new(Int64Array::from(self.deadlines)),
        ];
        columns.extend(self.values.finish()?);
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }
}

/// Map and bookkeeping bytes per key, beyond the key and value themselves.
const ENTRY_OVERHEAD: usize = 64;

impl<V: Send> StateTable for KeyedTable<V> {
    fn name(&self) -> &str {
        &self.name
    }

    fn take_delta(&mut self) -> Result<Vec<RecordBatch>> {
        if self.changed.is_empty() && self.deleted.is_empty() {
            return Ok(Vec::new());
        }
        let deleted = std::mem::take(&mut self.deleted);
        let changed = std::mem::take(&mut self.changed);
        self.encode(deleted, changed)
    }

    fn forget_changes(&mut self) {
        for i in std::mem::take(&mut self.changed) {
            if let Some(slot) = self.slots[i as usize].as_mut() {
                slot.changed = false;
            }
        }
        self.deleted.clear();
    }

    fn snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        self.deleted.clear();
        self.changed.clear();
        let all: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&i| self.slots[i as usize].is_some())
            .collect();
        for &i in &all {
            if let Some(slot) = self.slots[i as usize].as_mut() {
                slot.changed = true;
            }
        }
        self.encode(Vec::new(), all)
    }

    fn restore(&mut self, batches: &[RecordBatch], snapshot: bool) -> Result<()> {
        if snapshot {
            self.index.clear();
            self.slots.clear();
            self.free.clear();
            self.timers.clear();
            self.bytes = 0;
            self.len = 0;
        }
        for batch in batches {
            self.restore_one(batch)?;
        }
        // Restoring is not a change.
        self.changed.clear();
        self.deleted.clear();
        for slot in self.slots.iter_mut() {
            slot.changed = false;
        }
        Ok(())
    }

    fn size(&self) -> StateSize {
        StateSize {
            rows: self.len as u64,
            bytes: self.bytes as u64,
        }
    }
}

fn describe(fields: &Fields) -> String {
    fields
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::bytes::{BytesCodec, Decode, Encode};

    #[derive(Clone, Debug, PartialEq)]
    struct Count(i64);
    impl Encode for Count {
        fn encode(&self, out: &mut Vec<u8>) {
            self.0.encode(out);
        }
    }
    impl Decode for Count {
        fn decode(input: &mut &[u8]) -> Result<Self> {
            Ok(Count(i64::decode(input)?))
        }
    }

    fn table() -> KeyedTable<Count> {
        KeyedTable::new("counts", Box::new(BytesCodec::<Count>::new()))
    }

    fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(RecordBatch::num_rows).sum()
    }

    #[test]
    fn large_deltas_and_snapshots_come_in_bounded_batches() {
        let mut live = table();
        let n = 2 * CHUNK_ROWS as u32 + 100;
        for k in 0..n {
            live.insert(&k.to_be_bytes(), Count(k as i64));
        }
        let snapshot = live.snapshot().unwrap();
        assert_eq!(snapshot.len(), 3);
        assert!(snapshot.iter().all(|b| b.num_rows() <= CHUNK_ROWS));
        // A delta with more deletions than one batch holds, then changes.
        for k in 0..CHUNK_ROWS as u32 + 10 {
            live.remove(&k.to_be_bytes());
        }
        live.get_mut(&(n - 1).to_be_bytes()).unwrap().0 = -1;
        let delta = live.take_delta().unwrap();
        assert_eq!(delta.len(), 2);
        assert_eq!(rows(&delta), CHUNK_ROWS + 11);
        let mut restored = table();
        restored.restore(&snapshot, true).unwrap();
        restored.restore(&delta, false).unwrap();
        assert_eq!(contents(&restored), contents(&live));
        assert_eq!(restored.size().rows, (n as usize - CHUNK_ROWS - 10) as u64);
        // An empty table's snapshot is one empty batch (its file still names the columns).
        assert_eq!(rows(&table().snapshot().unwrap()), 0);
        assert_eq!(table().snapshot().unwrap().len(), 1);
    }

    fn contents(t: &KeyedTable<Count>) -> Vec<(Vec<u8>, i64, Option<i64>)> {
        let mut v: Vec<_> = t
            .iter()
            .map(|(k, c)| (k.to_vec(), c.0, t.deadline(k)))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn deltas_replayed_on_a_snapshot_rebuild_the_table() {
        let mut live = table();
        let mut files = Vec::new();
        for epoch in 0..30i64 {
            for k in 0..(epoch % 7) {
                let key = [k as u8];
                live.get_or_insert_with(&key, || Count(0)).0 += epoch;
                live.set_deadline(&key, Some(epoch * 10 + k));
            }
            if epoch % 5 == 4 {
                live.remove(&[1]);
                live.remove(&[200]); // never existed
            }
            for key in live.take_due(Watermark(epoch * 10 - 15)) {
                live.remove(&key);
            }
            if epoch == 12 {
                files.clear();
                files.push((live.snapshot().unwrap(), true));
            } else {
                let delta = live.take_delta().unwrap();
                if !delta.is_empty() {
                    files.push((delta, false));
                }
            }
            // Restoring the files written so far gives exactly the live table.
            let mut restored = table();
            for (batch, snapshot) in &files {
                restored.restore(batch, *snapshot).unwrap();
            }
            assert_eq!(contents(&restored), contents(&live), "after epoch {epoch}");
            assert_eq!(restored.size().rows, live.size().rows);
        }
    }

    #[test]
    fn only_changed_keys_are_in_a_delta() {
        let mut t = table();
        for k in 0..100u8 {
            t.insert(&[k], Count(k as i64));
        }
        assert_eq!(rows(&t.take_delta().unwrap()), 100);
        assert!(t.take_delta().unwrap().is_empty(), "nothing changed");
        t.get_mut(&[3]).unwrap().0 = 33;
        t.remove(&[4]);
        t.insert(&[4], Count(44)); // removed and re-added: a deletion, then the new value
        t.remove(&[5]);
        let delta = t.take_delta().unwrap();
        assert_eq!(rows(&delta), 4);
        let deleted = delta[0].column(1).as_boolean();
        assert_eq!(deleted.true_count(), 2);
        assert!(deleted.value(0) && deleted.value(1), "deletions come first");
        assert!(t.get(&[3]).is_some() && t.get(&[5]).is_none());
        // Applied to the table before the changes, the delta gives the table after them.
        let mut before = table();
        for k in 0..100u8 {
            before.insert(&[k], Count(k as i64));
        }
        before.restore(&delta, false).unwrap();
        assert_eq!(contents(&before), contents(&t));
    }

    #[test]
    fn deadlines_fire_once_the_watermark_passes_them() {
        let mut t = table();
        t.insert(b"a", Count(1));
        t.insert(b"b", Count(2));
        t.set_deadline(b"a", Some(100));
        t.set_deadline(b"b", Some(50));
        t.set_deadline(b"b", Some(200)); // moved: the old timer is stale
        assert!(
            t.take_due(Watermark(100)).is_empty(),
            "100 is not late at 100"
        );
        assert_eq!(t.take_due(Watermark(101)), vec![Box::from(&b"a"[..])]);
        assert!(t.take_due(Watermark(150)).is_empty());
        assert_eq!(t.take_due(Watermark::END).len(), 1);
    }

    #[test]
    fn a_batch_of_another_shape_is_refused() {
        let mut t = table();
        t.insert(b"a", Count(1));
        let batch = t.snapshot().unwrap();
        let other = batch[0].project(&[0, 1, 2]).unwrap();
        let error = table().restore(&[other], true).unwrap_err();
        assert!(error.to_string().contains("counts"), "{error}");
    }
}
