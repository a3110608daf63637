//! Which event time a source's watermark follows when the source reads several splits (Kafka
//! partitions).
//!
//! Within a partition, events arrive roughly in event-time order; across partitions they do
//! not, because a consumer reads whatever it has fetched, one partition further ahead than
//! another. Following the largest event time read across all partitions then declares the
//! slower partitions' next rows late: reading a 6-partition topic unevenly once made 213 of
//! 20,000 rows late in one epoch. So, as Flink does, the watermark follows the *slowest*
//! partition, with two rules that keep a quiet partition from stopping it forever:
//!
//! - a partition that is caught up (no backlog) and gave no rows this epoch is idle and does
//!   not count: whatever it receives next was produced after what the others have given;
//! - a partition that has never given a row does not count either, unless it has a backlog:
//!   then its first rows are still to come, and the watermark waits for them.
//!
//! When no partition counts (all caught up), the source has given everything there is, and
//! the watermark follows the largest event time read, as for a source without splits.

use std::collections::{BTreeMap, BTreeSet};

/// The event time a source's watermark follows (before its delay), or `None` to hold the
/// watermark where it is: a split with rows still to read has given none yet.
///
/// - `max_event_time`: the largest event time the source has given;
/// - `splits`: the largest event time each split has given (empty for a source without
///   splits);
/// - `gave`: the splits that gave rows this epoch;
/// - `backlog`: rows beyond this epoch's end per split, where known.
pub(crate) fn frontier(
    max_event_time: i64,
    splits: &BTreeMap<String, i64>,
    gave: &BTreeSet<String>,
    backlog: &BTreeMap<String, i64>,
) -> Option<i64> {
    let behind = backlog.iter().filter(|(_, n)| **n > 0).map(|(s, _)| s);
    let counting: BTreeSet<&String> = gave.iter().chain(behind).collect();
    if splits.is_empty() && gave.is_empty() {
        // A source without splits, or one that has given no rows yet (no watermark either way).
        return Some(max_event_time);
    }
    let mut slowest: Option<i64> = None;
    for split in counting {
        let t = *splits.get(split)?;
        slowest = Some(slowest.map_or(t, |s| s.min(t)));
    }
    Some(slowest.unwrap_or(max_event_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_source_without_splits_follows_its_largest_event_time() {
        assert_eq!(frontier(50, &map(&[]), &set(&[]), &map(&[])), Some(50));
        assert_eq!(
            frontier(i64::MIN, &map(&[]), &set(&[]), &map(&[])),
            Some(i64::MIN)
        );
    }

    #[test]
    fn the_slowest_split_with_rows_to_give_leads() {
        let splits = map(&[("0", 100), ("1", 40), ("2", 70)]);
        // All gave rows this epoch: the slowest.
        assert_eq!(
            frontier(100, &splits, &set(&["0", "1", "2"]), &map(&[])),
            Some(40)
        );
        // Split 1 is behind without giving rows this epoch: it still counts.
        assert_eq!(
            frontier(100, &splits, &set(&["0", "2"]), &map(&[("1", 5)])),
            Some(40)
        );
        // Split 1 is caught up and gave nothing: idle, it does not count.
        assert_eq!(
            frontier(100, &splits, &set(&["0", "2"]), &map(&[("1", 0)])),
            Some(70)
        );
        // Everything read: the largest event time.
        assert_eq!(
            frontier(100, &splits, &set(&[]), &map(&[("0", 0), ("1", 0)])),
            Some(100)
        );
    }

    #[test]
    fn a_split_behind_that_never_gave_rows_holds_the_watermark() {
        // Split 0 read ahead; split 1 has rows waiting and has given none.
        let splits = map(&[("0", 100)]);
        assert_eq!(
            frontier(100, &splits, &set(&["0"]), &map(&[("1", 30)])),
            None
        );
        // Before any split gave rows there is no watermark to hold.
        assert_eq!(
            frontier(i64::MIN, &map(&[]), &set(&[]), &map(&[("1", 3)])),
            Some(i64::MIN)
        );
        // An empty split (no backlog, never gave rows) does not hold it.
        assert_eq!(
            frontier(100, &splits, &set(&["0"]), &map(&[("1", 0)])),
            Some(100)
        );
    }
}
