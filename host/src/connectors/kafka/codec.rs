//! Kafka record values to Arrow rows and back: JSON, CSV, or raw bytes with the record's
//! metadata.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::error::{Result, RiffleError};

/// How record values are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// One JSON object per record.
    #[default]
    Json,
    /// One CSV line per record, columns in schema order, no header.
    Csv,
    /// No decoding: the key and value bytes plus the record's metadata.
    Raw,
}

impl RecordFormat {
    /// Parses `json`, `csv` or `raw`.
    ///
    /// # Errors
    /// [`RiffleError::Config`] for other names.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "json" => Ok(RecordFormat::Json),
            "csv" => Ok(RecordFormat::Csv),
            "raw" => Ok(RecordFormat::Raw),
            other => Err(RiffleError::Config(format!(
                "format {other:?}: expected json, csv or raw"
            ))),
        }
    }
}

pub(crate) struct Record {
    pub(crate) offset: i64,
    pub(crate) timestamp_ms: Option<i64>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
}

/// The schema of raw records.
pub fn raw_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Binary, true),
        Field::new("value", DataType::Binary, true),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            true,
        ),
    ]))
}

/// A decoded batch plus the timestamps of its rows.
pub(crate) type Decoded = (RecordBatch, Vec<Option<i64>>);

pub(crate) fn raw_batch(partition: i32, records: &[Record]) -> Result<Decoded> {
    let n = records.len();
    let mut key = BinaryBuilder::with_capacity(n, 0);
    let mut value = BinaryBuilder::with_capacity(n, 0);
    let mut part = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut ts = TimestampMicrosecondBuilder::with_capacity(n);
    for r in records {
        key.append_option(r.key.as_deref());
        value.append_option(r.value.as_deref());
        part.append_value(partition);
        offset.append_value(r.offset);
        ts.append_option(r.timestamp_ms.map(|ms| ms * 1000));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(key.finish()),
        Arc::new(value.finish()),
        Arc::new(part.finish()),
        Arc::new(offset.finish()),
        Arc::new(ts.finish()),
    ];
    Ok((
        RecordBatch::try_new(raw_schema(), columns)?,
        records.iter().map(|r| r.timestamp_ms).collect(),
    ))
}

/// Decodes the values of `records` in one pass; if that fails, record by record, so that
/// only the bad ones are rejected (index, reason).
///
/// A CSV record may hold a line break inside a quoted field (RFC 4180; the sink writes such
/// values that way). Records with line breaks are decoded one by one, where each must give
/// exactly one row: joined with others, a record with an unclosed quote and one with an
/// unquoted line break could cancel out in the row count and shift values between rows.
pub(crate) fn decode_values(
    format: RecordFormat,
    schema: &SchemaRef,
    records: &[Record],
) -> Result<(Decoded, Vec<(usize, String)>)> {
    let all: Vec<&[u8]> = records
        .iter()
        .map(|r| r.value.as_deref().unwrap_or_default())
        .collect();
    let multiline = format == RecordFormat::Csv && all.iter().any(|v| v.contains(&b'\n'));
    if !multiline
        && let Ok(batch) = decode_many(format, schema, &all)
        && batch.num_rows() == records.len()
    {
        let ts = records.iter().map(|r| r.timestamp_ms).collect();
        return Ok(((batch, ts), Vec::new()));
    }
    let mut good = Vec::new();
    let mut ts = Vec::new();
    let mut bad = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let value = r.value.as_deref().unwrap_or_default();
        match decode_many(format, schema, &[value]) {
            Ok(b) if b.num_rows() == 1 => {
                good.push(b);
                ts.push(r.timestamp_ms);
            }
            Ok(b) => bad.push((
                i,
                format!("expected one row per record, decoded {}", b.num_rows()),
            )),
            Err(e) => bad.push((i, e.to_string())),
        }
    }
    let batch = arrow::compute::concat_batches(schema, &good)?;
    Ok(((batch, ts), bad))
}

fn decode_many(
    format: RecordFormat,
    schema: &SchemaRef,
    values: &[&[u8]],
) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let mut text = Vec::with_capacity(values.iter().map(|v| v.len() + 1).sum());
    for v in values {
        if v.iter().all(u8::is_ascii_whitespace) {
            return Err(arrow::error::ArrowError::ParseError("empty record".into()));
        }
        text.extend_from_slice(v);
        text.push(b'\n');
    }
    let batches: Vec<RecordBatch> = match format {
        RecordFormat::Json => arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(values.len().max(1))
            .build(std::io::Cursor::new(text))?
            .collect::<std::result::Result<_, _>>()?,
        RecordFormat::Csv => arrow::csv::ReaderBuilder::new(schema.clone())
            .with_header(false)
            .with_batch_size(values.len().max(1))
            .build(std::io::Cursor::new(text))?
            .collect::<std::result::Result<_, _>>()?,
        RecordFormat::Raw => unreachable!("raw records are not decoded"),
    };
    arrow::compute::concat_batches(schema, &batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::generate::{FraudConfig, FraudGenerator};
    use crate::connectors::kafka::{Delivery, KafkaConfig, KafkaSink, KafkaSinkOptions};
    use arrow::array::{Int64Array, StringArray};
    use proptest::prelude::*;

    fn sink(format: RecordFormat) -> KafkaSink {
        KafkaSink::new(KafkaSinkOptions {
            kafka: KafkaConfig::default(),
            topic: "t".into(),
            format,
            key: None,
            header_columns: Vec::new(),
            headers: Vec::new(),
            delivery: Delivery::AtLeastOnce,
            marker_topic: crate::connectors::kafka::sink::MARKER_TOPIC.into(),
        })
        .unwrap()
    }

    fn records(values: Vec<Vec<u8>>) -> Vec<Record> {
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| Record {
                offset: i as i64,
                timestamp_ms: Some(1_000 + i as i64),
                key: None,
                value: Some(v),
            })
            .collect()
    }

    #[test]
    fn json_and_csv_round_trip_rows_bit_for_bit() {
        let batch = FraudGenerator::new(FraudConfig::default()).next_batch(2_000);
        for format in [RecordFormat::Json, RecordFormat::Csv] {
            let encoded = sink(format).encode(&batch).unwrap();
            let ((decoded, ts), bad) =
                decode_values(format, &batch.schema(), &records(encoded)).unwrap();
            assert!(bad.is_empty(), "{format:?}: {bad:?}");
            assert_eq!(ts.len(), 2_000);
            assert_eq!(decoded, batch, "{format:?}");
        }
    }

    #[test]
    fn csv_values_with_line_breaks_round_trip_and_unquoted_ones_are_rejected() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("note", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(StringArray::from(vec![
                    Some("plain"),
                    Some("two\nlines"),
                    Some("a, \"quoted\"\r\nvalue"),
                    None,
                ])),
            ],
        )
        .unwrap();
        let mut values = sink(RecordFormat::Csv).encode(&batch).unwrap();
        assert_eq!(values.len(), 4, "one record per row");
        let ((decoded, _), bad) =
            decode_values(RecordFormat::Csv, &schema, &records(values.clone())).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(decoded, batch);
        // Two rows in one record, without quotes: rejected, the others kept.
        values.insert(1, b"5,x\n6,y".to_vec());
        let ((decoded, _), bad) =
            decode_values(RecordFormat::Csv, &schema, &records(values)).unwrap();
        assert_eq!(decoded, batch);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 1);
        assert!(bad[0].1.contains("one row per record"), "{}", bad[0].1);
    }

    #[test]
    fn bad_records_are_singled_out_with_a_reason() {
        let batch = FraudGenerator::new(FraudConfig::default()).next_batch(10);
        let mut values = sink(RecordFormat::Json).encode(&batch).unwrap();
        values.insert(3, b"{\"tx_id\": \"x\"}".to_vec());
        values.insert(7, b"not json".to_vec());
        values.push(Vec::new());
        let ((decoded, ts), bad) =
            decode_values(RecordFormat::Json, &batch.schema(), &records(values)).unwrap();
        assert_eq!(decoded, batch);
        assert_eq!(ts.len(), 10);
        let rejected: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
        assert_eq!(rejected, vec![3, 7, 12]);
        assert!(bad.iter().all(|(_, reason)| !reason.is_empty()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any bytes: every record is decoded or rejected with a reason, never a panic, and the
        /// rows decoded are the records not rejected.
        #[test]
        fn decoders_account_for_every_record_whatever_the_bytes(
            csv in any::<bool>(),
            picks in proptest::collection::vec((0usize..40, any::<usize>(), any::<u8>(), 0u8..4), 0..40),
            garbage in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 40),
        ) {
            let format = if csv { RecordFormat::Csv } else { RecordFormat::Json };
            let batch = FraudGenerator::new(FraudConfig::default()).next_batch(40);
            let valid = sink(format).encode(&batch).unwrap();
            let values: Vec<Vec<u8>> = picks
                .iter()
                .map(|&(i, at, byte, how)| match how {
                    // A valid row as it is.
                    0 => valid[i].clone(),
                    // One byte changed.
                    1 => {
                        let mut v = valid[i].clone();
                        let at = at % v.len();
                        v[at] = byte;
                        v
                    }
                    // Cut short.
                    2 => valid[i][..at % valid[i].len()].to_vec(),
                    _ => garbage[i].clone(),
                })
                .collect();
            let n = values.len();
            let ((decoded, ts), bad) = decode_values(format, &batch.schema(), &records(values)).unwrap();
            prop_assert_eq!(decoded.num_rows() + bad.len(), n);
            prop_assert_eq!(ts.len(), decoded.num_rows());
            prop_assert!(bad.windows(2).all(|w| w[0].0 < w[1].0));
            prop_assert!(bad.iter().all(|(i, reason)| *i < n && !reason.is_empty()));
            for column in decoded.columns() {
                prop_assert!(column.to_data().validate_full().is_ok());
            }
        }
    }
}
