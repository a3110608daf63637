//! Streaming inputs beyond the golden set: the directory source picking up new files (across a
//! restart and while running), static tables reloaded when their file changes, queries built
//! with the DataFrame API, and the clickstream generator as a live source.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::execution::FunctionRegistry;
use datafusion::prelude::{col, lit};
use riffle::common::OutputMode;
use riffle::connectors::files::DirectorySource;
use riffle::connectors::files::StaticTable;
use riffle::connectors::files::write_file;
use riffle::connectors::generate::ClickConfig;
use riffle::connectors::generate::GeneratorSource;
use riffle::connectors::generate::{FraudConfig, FraudGenerator, GeneratorConfig};
use riffle::connectors::memory::MemorySink;
use riffle::connectors::memory::ReplaySource;
use riffle::connectors::source::{Input, StreamSource};
use riffle::session::RiffleSession;
use riffle::stream::{StreamInput, StreamOptions, StreamingQuery, Trigger};
use riffle::udf::RowErrorPolicy;
use serde_json::Value;

fn session() -> RiffleSession {
    let session = common::session(RowErrorPolicy::Null);
    session
        .load_udfs(&common::udf("fraud"), Vec::new(), None)
        .unwrap();
    session
}

fn transactions(rows: usize) -> RecordBatch {
    FraudGenerator::new(FraudConfig {
        rows_per_second: 50.0,
        merchants: 20,
        ..FraudConfig::default()
    })
    .next_batch(rows)
}

/// Rows as sorted lines of text: stateless queries compute each row the same way in every
/// mode, so their output must match exactly.
fn lines(batches: &[RecordBatch]) -> Vec<String> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for b in batches {
        let formatters: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for row in 0..b.num_rows() {
            let cells: Vec<String> = formatters
                .iter()
                .map(|f| f.value(row).to_string())
                .collect();
            out.push(cells.join("|"));
        }
    }
    out.sort();
    out
}

fn options(checkpoint: &Path, trigger: Trigger) -> StreamOptions {
    StreamOptions {
        output_mode: OutputMode::Append,
        trigger,
        checkpoint: checkpoint.to_path_buf(),
        ..StreamOptions::default()
    }
}

async fn stream(
    session: &RiffleSession,
    source: Box<dyn StreamSource>,
    sql: &str,
    sink: &MemorySink,
    options: StreamOptions,
    stop: &AtomicBool,
) -> riffle::stream::RunSummary {
    let input = StreamInput::register(session, "transactions", source)
        .unwrap()
        .with_event_time("ts", 10_000_000)
        .unwrap();
    let plan = session
        .context()
        .state()
        .create_logical_plan(sql)
        .await
        .unwrap();
    let mut query =
        StreamingQuery::new(session, vec![input], plan, Box::new(sink.clone()), options)
            .await
            .unwrap();
    query.run(stop).await.unwrap()
}

async fn batch(all: &RecordBatch, sql: &str) -> Vec<String> {
    let session = session();
    common::register_batch(&session, "transactions", all);
    lines(
        &session
            .dataframe(sql)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap(),
    )
}

const STATELESS: &str = "SELECT tx_id, country, risk_score(amount, country) AS risk \
                         FROM transactions WHERE amount > 100";

#[test]
fn directory_source_reads_new_files_once_across_restarts() {
    let rt = common::runtime();
    let all = transactions(3_000);
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    let part = |i: usize| all.slice(i * 1_000, 1_000);
    write_file(&incoming.join("a.parquet"), all.schema(), [part(0)]).unwrap();
    write_file(&incoming.join("b.parquet"), all.schema(), [part(1)]).unwrap();
    let sink = MemorySink::default();
    let checkpoint = dir.path().join("checkpoint");
    let never = AtomicBool::new(false);

    rt.block_on(async {
        let source = DirectorySource::new(&incoming, 1, false).unwrap();
        let summary = stream(
            &session(),
            Box::new(source),
            STATELESS,
            &sink,
            options(&checkpoint, Trigger::AvailableNow),
            &never,
        )
        .await;
        assert_eq!((summary.epochs, summary.input_rows), (2, 2_000));

        // A file being written (hidden name) is skipped; the finished file is read, once.
        write_file(&incoming.join(".c.parquet"), all.schema(), [part(2)]).unwrap();
        std::fs::rename(incoming.join(".c.parquet"), incoming.join("c.parquet")).unwrap();
        write_file(&incoming.join("_partial.parquet"), all.schema(), [part(0)]).unwrap();
        let source = DirectorySource::new(&incoming, 1, false).unwrap();
        let summary = stream(
            &session(),
            Box::new(source),
            STATELESS,
            &sink,
            options(&checkpoint, Trigger::AvailableNow),
            &never,
        )
        .await;
        assert_eq!(
            (summary.epochs, summary.input_rows),
            (1, 1_000),
            "only c.parquet is new"
        );
        assert_eq!(lines(&sink.batches()), batch(&all, STATELESS).await);
    });
}

/// Runs `sql` over the CSV directory `incoming` (bounded: it ends when nothing is new) into
/// `sink`, with progress written to `progress`.
fn run_csv_directory(
    incoming: &Path,
    sql: &str,
    sink: &MemorySink,
    options: StreamOptions,
) -> riffle::Result<riffle::stream::RunSummary> {
    common::runtime().block_on(async {
        let session = session();
        let source = DirectorySource::new(incoming, 10, true)?;
        let input = StreamInput::register(&session, "transactions", Box::new(source))?;
        let plan = session.context().state().create_logical_plan(sql).await?;
        let mut query =
            StreamingQuery::new(&session, vec![input], plan, Box::new(sink.clone()), options)
                .await?;
        query.run(&AtomicBool::new(false)).await
    })
}

#[test]
fn directory_source_quarantines_bad_files_matches_columns_by_name_and_rereads_rewritten_files() {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    let put = |name: &str, text: &str| std::fs::write(incoming.join(name), text).unwrap();
    put("a.csv", "tx_id,amount,country\n1,10.5,DE\n2,20.0,FR\n");
    // Columns in another order, and one the schema does not have.
    put(
        "b.csv",
        "country,note,tx_id,amount\nUS,x,3,30.0\nGB,y,4,40.25\n",
    );
    // A nullable column missing.
    put("c.csv", "tx_id,amount\n5,50.0\n");
    // Not a number where the schema has one.
    put("bad.csv", "tx_id,amount,country\nseven,1.0,DE\n");
    let sql = "SELECT tx_id, country, amount * 2 AS twice FROM transactions";
    let sink = MemorySink::default();
    let checkpoint = dir.path().join("checkpoint");
    let progress = dir.path().join("progress.jsonl");
    let opts = || StreamOptions {
        progress_file: Some(progress.clone()),
        ..options(&checkpoint, Trigger::AvailableNow)
    };
    let summary = run_csv_directory(&incoming, sql, &sink, opts()).unwrap();
    assert!(summary.finished);
    // Hand-computed: columns by name, NULL for the missing one.
    assert_eq!(
        lines(&sink.batches()),
        [
            "1|DE|21.0",
            "2|FR|40.0",
            "3|US|60.0",
            "4|GB|80.5",
            "5|NULL|100.0"
        ]
    );
    let quarantine = incoming.join("_quarantine");
    assert!(!incoming.join("bad.csv").exists());
    assert_eq!(
        std::fs::read_to_string(quarantine.join("bad.csv")).unwrap(),
        "tx_id,amount,country\nseven,1.0,DE\n",
        "kept as it was"
    );
    let reason = std::fs::read_to_string(quarantine.join("bad.csv.reason.txt")).unwrap();
    assert!(reason.contains("seven"), "{reason}");
    let warnings = std::fs::read_to_string(&progress).unwrap();
    assert!(warnings.contains("bad.csv moved to"), "{warnings}");

    // Offsets stay small: a change time and the names of that instant, not every file.
    let offsets: Vec<Value> = std::fs::read_dir(checkpoint.join("offsets"))
        .unwrap()
        .map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
        .collect();
    for o in &offsets {
        let text = o.to_string();
        assert!(!text.contains("\"files\""), "{text}");
        assert!(text.contains("\"changed\""), "{text}");
    }

    // A file rewritten in place under the same name is a new file; the finished stateless
    // query takes it on the next run.
    put("a.csv", "tx_id,amount,country\n6,60.0,IT\n");
    let summary = run_csv_directory(&incoming, sql, &sink, opts()).unwrap();
    assert_eq!(summary.input_rows, 1);
    assert!(lines(&sink.batches()).contains(&"6|IT|120.0".to_string()));

    // A stateful query that finished cannot take input behind its end: a clear error.
    let grouped = "SELECT country, count(*) AS n FROM transactions GROUP BY country";
    let checkpoint = dir.path().join("grouped");
    let complete = || StreamOptions {
        output_mode: OutputMode::Complete,
        ..options(&checkpoint, Trigger::AvailableNow)
    };
    run_csv_directory(&incoming, grouped, &MemorySink::default(), complete()).unwrap();
    put("d.csv", "tx_id,amount,country\n7,70.0,DE\n");
    let e = run_csv_directory(&incoming, grouped, &MemorySink::default(), complete())
        .unwrap_err()
        .to_string();
    assert!(e.contains("finished at epoch"), "{e}");
    assert!(e.contains("new checkpoint directory"), "{e}");
}

#[test]
fn directory_source_picks_up_files_while_the_query_runs() {
    let rt = common::runtime();
    let all = transactions(2_000);
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    write_file(
        &incoming.join("0001.parquet"),
        all.schema(),
        [all.slice(0, 1_000)],
    )
    .unwrap();
    let sink = MemorySink::default();
    let stop = Arc::new(AtomicBool::new(false));

    // A writer drops the second file once the first epoch is out, then stops the query once
    // the second is. The deadline only keeps a broken build from hanging the test run.
    let writer = {
        let (sink, stop, incoming, rest) = (
            sink.clone(),
            stop.clone(),
            incoming.clone(),
            all.slice(1_000, 1_000),
        );
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let wait_for = |epochs: usize| {
                while sink.epochs().len() < epochs && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            wait_for(1);
            let tmp = incoming.join(".0002.parquet");
            write_file(&tmp, rest.schema(), [rest]).unwrap();
            std::fs::rename(&tmp, incoming.join("0002.parquet")).unwrap();
            wait_for(2);
            stop.store(true, Ordering::Relaxed);
        })
    };
    rt.block_on(async {
        let source = DirectorySource::new(&incoming, 10, false).unwrap();
        let summary = stream(
            &session(),
            Box::new(source),
            STATELESS,
            &sink,
            options(
                &dir.path().join("checkpoint"),
                Trigger::ProcessingTime(Duration::from_millis(10)),
            ),
            &stop,
        )
        .await;
        assert_eq!(summary.input_rows, 2_000);
        assert!(!summary.finished, "an unbounded directory never finishes");
    });
    writer.join().unwrap();
    assert_eq!(sink.epochs().len(), 2);
    rt.block_on(async { assert_eq!(lines(&sink.batches()), batch(&all, STATELESS).await) });
}

/// Replays batches and runs hooks when asked for what follows batch `at`: lets a test change
/// the world between two epochs of one run.
struct Hooked {
    inner: ReplaySource,
    hooks: Vec<(i64, Box<dyn FnOnce() + Send>)>,
}

impl StreamSource for Hooked {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.inner.schema()
    }
    fn initial(&mut self) -> riffle::Result<Value> {
        self.inner.initial()
    }
    fn available(&mut self, from: &Value, max_rows: usize) -> riffle::Result<Value> {
        if let Some(i) = self
            .hooks
            .iter()
            .position(|(at, _)| from["batch"].as_i64() == Some(*at))
        {
            (self.hooks.remove(i).1)();
        }
        self.inner.available(from, max_rows)
    }
    fn read(&mut self, from: &Value, to: &Value) -> riffle::Result<Input> {
        self.inner.read(from, to)
    }
    fn finished(&self, at: &Value) -> bool {
        self.inner.finished(at)
    }
}

fn merchants_csv(label: &str) -> String {
    let mut csv = String::from("merchant_id,category\n");
    for id in 0..20 {
        csv.push_str(&format!("{id},{label}-{}\n", id % 3));
    }
    csv
}

/// Writes `text` in place (the file keeps its inode) and sets its modification time: two writes
/// within the file system's clock tick would otherwise carry the same time.
fn write_in_place(path: &Path, text: &str, mtime_secs: u64) {
    std::fs::write(path, text).unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(mtime_secs))
        .unwrap();
}

/// Replaces the file the documented way: a complete file renamed over the path.
fn replace(path: &Path, text: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[test]
fn static_tables_reload_complete_files_and_keep_their_rows_when_a_file_is_bad() {
    let rt = common::runtime();
    let all = transactions(1_400);
    let dir = tempfile::tempdir().unwrap();
    let merchants = dir.path().join("merchants.csv");
    write_in_place(&merchants, &merchants_csv("old"), 1_000_000);
    let session = session();
    let table = Arc::new(StaticTable::load(&merchants).unwrap());
    session
        .context()
        .register_table("merchants", table.clone())
        .unwrap();
    let path = merchants.clone();
    let before = move |epoch: i64, change: fn(&Path)| {
        let path = path.clone();
        // Epoch `epoch` is planned from batch `epoch - 1` (batches count from 0).
        (
            epoch - 1,
            Box::new(move || change(&path)) as Box<dyn FnOnce() + Send>,
        )
    };
    let hooks = vec![
        // Renamed over the path: loaded at once.
        before(2, |p| replace(p, &merchants_csv("v2"))),
        // Written in place and caught half-way (a cut line): not loaded while it may still be
        // written, and not loaded once settled either, since it does not end in a line break.
        before(3, |p| {
            let full = merchants_csv("v3");
            write_in_place(p, &full[..full.len() - 7], 3_000_000);
        }),
        // Written in place completely: loaded once it stayed the same for an epoch.
        before(5, |p| write_in_place(p, &merchants_csv("v5"), 5_000_000)),
        // A wrong file renamed over the path: the query goes on with the rows it has.
        before(7, |p| replace(p, "merchant_id,category\nnot-a-number,x\n")),
    ];
    let source = Hooked {
        inner: ReplaySource::new(
            all.schema(),
            (0..7).map(|i| all.slice(i * 200, 200)).collect(),
        ),
        hooks,
    };
    let sink = MemorySink::default();
    let progress = dir.path().join("progress.jsonl");
    rt.block_on(async {
        let input = StreamInput::register(&session, "transactions", Box::new(source))
            .unwrap()
            .with_event_time("ts", 10_000_000)
            .unwrap();
        let plan = session
            .context()
            .state()
            .create_logical_plan(
                "SELECT t.tx_id, m.category FROM transactions t \
                 JOIN merchants m ON t.merchant_id = m.merchant_id",
            )
            .await
            .unwrap();
        let mut query = StreamingQuery::new(
            &session,
            vec![input],
            plan,
            Box::new(sink.clone()),
            StreamOptions {
                progress_file: Some(progress.clone()),
                ..options(&dir.path().join("checkpoint"), Trigger::AvailableNow)
            },
        )
        .await
        .unwrap()
        .with_static_tables(vec![table]);
        query.run(&AtomicBool::new(false)).await.unwrap();
    });
    let epochs = sink.epochs();
    let seen: Vec<String> = (1..=7)
        .map(|epoch| {
            let rows = &epochs[&epoch];
            let n: usize = rows.iter().map(|b| b.num_rows()).sum();
            assert_eq!(
                n, 200,
                "every transaction of epoch {epoch} has its merchant"
            );
            let mut labels: Vec<String> = rows
                .iter()
                .flat_map(|b| b.column(1).as_string::<i32>().iter())
                .map(|c| c.unwrap().split('-').next().unwrap().to_string())
                .collect();
            labels.dedup();
            assert_eq!(
                labels.len(),
                1,
                "epoch {epoch} joined one version: {labels:?}"
            );
            labels.pop().unwrap()
        })
        .collect();
    assert_eq!(seen, ["old", "v2", "v2", "v2", "v2", "v5", "v5"]);

    let warnings: Vec<(u64, String)> = std::fs::read_to_string(&progress)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .flat_map(|p| {
            let epoch = p["epoch"].as_u64().unwrap();
            p["warnings"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |w| (epoch, w.as_str().unwrap().to_string()))
        })
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert_eq!(warnings[0].0, 4, "the half-written file, once settled");
    assert!(
        warnings[0].1.contains("does not end with a line break"),
        "{warnings:?}"
    );
    assert_eq!(warnings[1].0, 7, "the wrong file, at once");
    assert!(
        warnings[1].1.contains("previous rows stay in use"),
        "{warnings:?}"
    );
}

#[test]
fn a_dataframe_api_query_streams_like_its_batch_run() {
    let rt = common::runtime();
    let all = transactions(4_000);
    rt.block_on(async {
        // Built with the DataFrame API, not SQL: a tumbling window per channel with a UDF
        // inside the aggregate.
        let build = |session: &RiffleSession| {
            let context = session.context().clone();
            async move {
                let window = context.udf("window").unwrap();
                let risk = context.udf("risk_score").unwrap();
                context
                    .table("transactions")
                    .await
                    .unwrap()
                    .filter(col("amount").gt(lit(0.0)))
                    .unwrap()
                    .aggregate(
                        vec![
                            window.call(vec![col("ts"), lit("10 seconds")]).alias("w"),
                            col("channel"),
                        ],
                        vec![
                            datafusion::functions_aggregate::expr_fn::count(lit(1)).alias("n"),
                            datafusion::functions_aggregate::expr_fn::max(
                                risk.call(vec![col("amount"), col("country")]),
                            )
                            .alias("worst"),
                        ],
                    )
                    .unwrap()
            }
        };

        let batch_session = session();
        common::register_batch(&batch_session, "transactions", &all);
        let df = build(&batch_session).await;
        let expected = lines(&df.collect().await.unwrap());
        assert!(expected.len() > 10);

        let stream_session = session();
        let batches = (0..8).map(|i| all.slice(i * 500, 500)).collect();
        let input = StreamInput::register(
            &stream_session,
            "transactions",
            Box::new(ReplaySource::new(all.schema(), batches)),
        )
        .unwrap()
        .with_event_time("ts", 10_000_000)
        .unwrap();
        let plan = build(&stream_session).await.logical_plan().clone();
        let sink = MemorySink::default();
        let dir = tempfile::tempdir().unwrap();
        let mut query = StreamingQuery::new(
            &stream_session,
            vec![input],
            plan,
            Box::new(sink.clone()),
            options(dir.path(), Trigger::AvailableNow),
        )
        .await
        .unwrap();
        query.run(&AtomicBool::new(false)).await.unwrap();
        assert_eq!(lines(&sink.batches()), expected);
    });
}

#[test]
fn clickstream_generator_streams_like_its_batch_file() {
    let rt = common::runtime();
    let config = GeneratorConfig::Clickstream(ClickConfig {
        users: 500,
        items: 50,
        rows_per_second: 200.0,
        max_disorder_micros: 2_000_000,
        ..ClickConfig::default()
    });
    let all = config.starting_at(0).next_batch_of_ids(20_000);
    let sql = "SELECT window(ts, '30 seconds') AS w, action, count(*) AS n, \
               count(DISTINCT user_id) AS users, sum(price_cents) AS cents \
               FROM transactions GROUP BY window(ts, '30 seconds'), action";
    rt.block_on(async {
        let expected = batch(&all, sql).await;
        let dir = tempfile::tempdir().unwrap();
        let sink = MemorySink::default();
        let mut opts = options(dir.path(), Trigger::AvailableNow);
        opts.max_rows_per_epoch = 3_000;
        let summary = stream(
            &session(),
            Box::new(GeneratorSource::new(config, None, Some(20_000))),
            sql,
            &sink,
            opts,
            &AtomicBool::new(false),
        )
        .await;
        assert_eq!(summary.input_rows, 20_000);
        assert_eq!(summary.late_rows, 0);
        assert!(summary.epochs >= 7);
        assert_eq!(lines(&sink.batches()), expected);
    });
}

/// On two partitions the generator makes each large epoch on two threads (a range of row ids
/// each, with duplicated deliveries): the stream's result is the batch result over one
/// generator's rows.
#[test]
fn generator_on_two_threads_streams_like_its_batch_file() {
    let rt = common::runtime();
    let config = GeneratorConfig::Fraud(FraudConfig {
        rows_per_second: 1_000.0,
        duplicate_rate: 0.01,
        max_disorder_micros: 2_000_000,
        ..FraudConfig::default()
    });
    let rows = 250_000;
    let all = config.starting_at(0).next_batch_of_ids(rows);
    let sql = "SELECT window(ts, '1 minute') AS w, country, count(*) AS n, \
               count(DISTINCT card_id) AS cards, max(risk_score(amount, country)) AS worst \
               FROM transactions GROUP BY window(ts, '1 minute'), country";
    rt.block_on(async {
        let expected = batch(&all, sql).await;
        let dir = tempfile::tempdir().unwrap();
        let sink = MemorySink::default();
        let mut opts = options(dir.path(), Trigger::AvailableNow);
        // Epochs of two parts and more (a part is at least 32,768 rows).
        opts.max_rows_per_epoch = 100_000;
        opts.partitions = 2;
        let summary = stream(
            &session(),
            Box::new(GeneratorSource::new(config, None, Some(rows as i64))),
            sql,
            &sink,
            opts,
            &AtomicBool::new(false),
        )
        .await;
        assert_eq!(summary.input_rows, all.num_rows() as u64);
        assert!(all.num_rows() > rows, "some rows are delivered twice");
        assert_eq!(summary.late_rows, 0);
        assert_eq!(lines(&sink.batches()), expected);
    });
}
