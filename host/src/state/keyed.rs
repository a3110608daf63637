//! [`KeyedTable`]: keyed state with change tracking and event-time expiry.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Int64Array, RecordBatch, new_null_array,
};
use arrow::datatypes::{DataType, Field, Fields, Int64Type, Schema, SchemaRef};

use super::{StateSize, StateTable};
use crate::common::Watermark;
use crate::error::{Result, RiffleError};

/// How a table's values become Arrow columns and back.
///
/// Encoding is batched (all values of a delta at once) so codecs can build typed columns, as
/// the aggregate codec does with accumulator states; codecs for structured values usually
/// write one `Binary` column with [`super::bytes`].
pub trait ValueCodec<V>: Send {
    /// The value columns (they are made nullable in the table's schema: deleted keys have no
    /// value).
    fn fields(&self) -> Fields;

    /// Encodes `values`, one row each, into one array per field. Takes `&mut` because some
    /// values (DataFusion accumulators) must be mutated to read their state.
    ///
    /// # Errors
    /// Values that cannot be encoded.
    fn encode(&self, values: Vec<&mut V>) -> Result<Vec<ArrayRef>>;

    /// Decodes row `row` of `columns` (laid out as [`fields`](Self::fields)).
    ///
    /// # Errors
    /// Columns this codec did not write.
    fn decode(&self, columns: &[ArrayRef], row: usize) -> Result<V>;

    /// Approximate bytes a value holds (for the progress's state size).
    fn size(&self, value: &V) -> usize;
}

struct Entry<V> {
    value: V,
    /// The key goes (or its operator is told) once the watermark passes this event time.
    expires: Option<i64>,
    /// Changed since the last delta; the key is then in `changed`.
    changed: bool,
    /// Bytes at the last encode or insert.
    size: usize,
}

/// A map from encoded keys to values, with change tracking for incremental checkpoints and
/// per-key deadlines in event time.
///
/// Keys are byte strings, normally Arrow's row format of the key columns (it orders and
/// compares like the values and is stable for a given Arrow version). Deadlines are event
/// times: [`take_due`](Self::take_due) returns the keys whose deadline the watermark has
/// passed, and the operator decides what that means (emit and remove a window, evict old
/// join rows and set a new deadline).
pub struct KeyedTable<V> {
    name: String,
    entries: HashMap<Box<[u8]>, Entry<V>>,
    /// Keys changed or removed since the last delta (removed keys are no longer in
    /// `entries`; a key may appear twice).
    changed: Vec<Box<[u8]>>,
    /// Deadline -> keys; stale pairs (the key's deadline moved) are skipped.
    timers: BTreeMap<i64, Vec<Box<[u8]>>>,
    codec: Box<dyn ValueCodec<V>>,
    bytes: usize,
}

const KEY: &str = "key";
const DELETED: &str = "deleted";
const EXPIRES: &str = "expires";

impl<V: Send> KeyedTable<V> {
    /// An empty table.
    pub fn new(name: impl Into<String>, codec: Box<dyn ValueCodec<V>>) -> Self {
        KeyedTable {
            name: name.into(),
            entries: HashMap::new(),
            changed: Vec::new(),
            timers: BTreeMap::new(),
            codec,
            bytes: 0,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&V> {
        self.entries.get(key).map(|e| &e.value)
    }

    /// The value of `key`, to change (the key goes into the next delta).
    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let entry = self.entries.get_mut(key)?;
        if !entry.changed {
            entry.changed = true;
            self.changed.push(key.into());
        }
        Some(&mut entry.value)
    }

    /// The value of `key`, created with `new` if missing, to change.
    pub fn get_or_insert_with(&mut self, key: &[u8], new: impl FnOnce() -> V) -> &mut V {
        if !self.entries.contains_key(key) {
            let value = new();
            let size = key.len() + self.codec.size(&value) + ENTRY_OVERHEAD;
            self.bytes += size;
            self.entries.insert(
                key.into(),
                Entry {
                    value,
                    expires: None,
                    changed: false,
                    size,
                },
            );
        }
        self.get_mut(key).expect("inserted above")
    }

    /// Sets `key`'s value (keeping its deadline).
    pub fn insert(&mut self, key: &[u8], value: V) {
        match self.get_mut(key) {
            Some(slot) => *slot = value,
            None => {
                self.get_or_insert_with(key, || value);
            }
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        let entry = self.entries.remove(key)?;
        self.bytes = self.bytes.saturating_sub(entry.size);
        if !entry.changed {
            self.changed.push(key.into());
        }
        Some(entry.value)
    }

    /// Sets (or clears) the event time after which `key` is due (see
    /// [`take_due`](Self::take_due)). The deadline is part of the checkpointed state.
    pub fn set_deadline(&mut self, key: &[u8], at: Option<i64>) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.expires == at {
            return;
        }
        entry.expires = at;
        if !entry.changed {
            entry.changed = true;
            self.changed.push(key.into());
        }
        if let Some(at) = at {
            self.timers.entry(at).or_default().push(key.into());
        }
    }

    /// The deadline of `key`.
    pub fn deadline(&self, key: &[u8]) -> Option<i64> {
        self.entries.get(key).and_then(|e| e.expires)
    }

    /// Keys whose deadline the watermark has passed (deadline < watermark), earliest deadline
    /// first. Their deadlines are cleared; the caller removes them or sets new ones.
    pub fn take_due(&mut self, watermark: Watermark) -> Vec<Box<[u8]>> {
        let mut due = Vec::new();
        while let Some(entry) = self.timers.first_entry() {
            if !watermark.is_late(*entry.key()) {
                break;
            }
            let (at, keys) = entry.remove_entry();
            for key in keys {
                if let Some(e) = self.entries.get_mut(&key)
                    && e.expires == Some(at)
                {
                    e.expires = None;
                    if !e.changed {
                        e.changed = true;
                        self.changed.push(key.clone());
                    }
                    due.push(key);
                }
            }
        }
        due
    }

    /// Every key and value, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &V)> {
        self.entries.iter().map(|(k, e)| (k.as_ref(), &e.value))
    }

    /// Every value, mutably, *without* marking anything changed: for reads that need `&mut`
    /// but change nothing a restore would see (evaluating a DataFusion accumulator).
    pub fn values_mut_untracked(&mut self) -> impl Iterator<Item = (&[u8], &mut V)> {
        self.entries
            .iter_mut()
            .map(|(k, e)| (k.as_ref(), &mut e.value))
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

    /// Encodes `keys` (present ones as values, absent ones as deletions).
    fn encode(&mut self, keys: Vec<Box<[u8]>>) -> Result<RecordBatch> {
        let schema = self.schema();
        // Take the encoded entries out of the map while the codec borrows their values (it
        // needs them all at once, mutably), then put them back: this costs two hash operations
        // per changed key, where borrowing through the map would mean a scan of every key.
        let mut present = Vec::with_capacity(keys.len());
        let mut absent = Vec::new();
        for key in keys {
            match self.entries.remove_entry(&key) {
                Some(pair) => present.push(pair),
                None => absent.push(key),
            }
        }
        let mut deadlines = Vec::with_capacity(present.len() + absent.len());
        let mut total = 0usize;
        let mut old = 0usize;
        for (key, entry) in present.iter_mut() {
            entry.changed = false;
            let size = key.len() + self.codec.size(&entry.value) + ENTRY_OVERHEAD;
            old += entry.size;
            total += size;
            entry.size = size;
            deadlines.push(entry.expires);
        }
        let encoded = self
            .codec
            .encode(present.iter_mut().map(|(_, e)| &mut e.value).collect());
        let keys = BinaryArray::from_iter_values(
            present
                .iter()
                .map(|(k, _)| k.as_ref())
                .chain(absent.iter().map(|k| k.as_ref())),
        );
        let n_present = present.len();
        for (key, entry) in present {
            self.entries.insert(key, entry);
        }
        let mut columns = encoded?;
        self.bytes = (self.bytes + total).saturating_sub(old);
        deadlines.extend(absent.iter().map(|_| None));
        if !absent.is_empty() {
            columns = columns
                .iter()
                .map(|c| {
                    arrow::compute::concat(&[
                        c.as_ref(),
                        new_null_array(c.data_type(), absent.len()).as_ref(),
                    ])
                })
                .collect::<std::result::Result<_, _>>()?;
        }
        let deleted = BooleanArray::from(
            (0..n_present)
                .map(|_| false)
                .chain(absent.iter().map(|_| true))
                .collect::<Vec<_>>(),
        );
        let mut all: Vec<ArrayRef> = vec![
            Arc::new(keys),
            Arc::new(deleted),
            Arc::new(Int64Array::from(deadlines)),
        ];
        all.extend(columns);
        Ok(RecordBatch::try_new(schema, all)?)
    }
}

/// Map and bookkeeping bytes per key, beyond the key and value themselves.
const ENTRY_OVERHEAD: usize = 64;

impl<V: Send> StateTable for KeyedTable<V> {
    fn name(&self) -> &str {
        &self.name
    }

    fn take_delta(&mut self) -> Result<Option<RecordBatch>> {
        if self.changed.is_empty() {
            return Ok(None);
        }
        let mut keys = std::mem::take(&mut self.changed);
        keys.sort_unstable();
        keys.dedup();
        Ok(Some(self.encode(keys)?))
    }

    fn snapshot(&mut self) -> Result<RecordBatch> {
        self.changed.clear();
        for e in self.entries.values_mut() {
            e.changed = true;
        }
        let mut keys: Vec<Box<[u8]>> = self.entries.keys().cloned().collect();
        keys.sort_unstable();
        self.encode(keys)
    }

    fn restore(&mut self, batch: &RecordBatch, snapshot: bool) -> Result<()> {
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
        if snapshot {
            self.entries.clear();
            self.timers.clear();
            self.changed.clear();
            self.bytes = 0;
        }
        let keys = batch.column(0).as_binary::<i32>();
        let deleted = batch.column(1).as_boolean();
        let deadlines = batch.column(2).as_primitive::<Int64Type>();
        let values = &batch.columns()[3..];
        for row in 0..batch.num_rows() {
            let key = keys.value(row);
            if deleted.value(row) {
                if let Some(e) = self.entries.remove(key) {
                    self.bytes = self.bytes.saturating_sub(e.size);
                }
                continue;
            }
            let value = self.codec.decode(values, row)?;
            let expires = deadlines.is_valid(row).then(|| deadlines.value(row));
            let size = key.len() + self.codec.size(&value) + ENTRY_OVERHEAD;
            if let Some(at) = expires {
                self.timers.entry(at).or_default().push(key.into());
            }
            if let Some(old) = self.entries.insert(
                key.into(),
                Entry {
                    value,
                    expires,
                    changed: false,
                    size,
                },
            ) {
                self.bytes = self.bytes.saturating_sub(old.size);
            }
            self.bytes += size;
        }
        Ok(())
    }

    fn size(&self) -> StateSize {
        StateSize {
            rows: self.entries.len() as u64,
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
            } else if let Some(delta) = live.take_delta().unwrap() {
                files.push((delta, false));
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
        assert_eq!(t.take_delta().unwrap().unwrap().num_rows(), 100);
        assert!(t.take_delta().unwrap().is_none(), "nothing changed");
        t.get_mut(&[3]).unwrap().0 = 33;
        t.remove(&[4]);
        t.insert(&[4], Count(44)); // removed and re-added: one upsert
        t.remove(&[5]);
        let delta = t.take_delta().unwrap().unwrap();
        assert_eq!(delta.num_rows(), 3);
        let deleted = delta.column(1).as_boolean();
        assert_eq!(deleted.true_count(), 1);
        assert!(t.get(&[3]).is_some() && t.get(&[5]).is_none());
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
        let other = batch.project(&[0, 1, 2]).unwrap();
        let error = table().restore(&other, true).unwrap_err();
        assert!(error.to_string().contains("counts"), "{error}");
    }
}
