//! The `riffle` command line.
//!
//! ```text
//! riffle udf inspect fraud.wasm [--json]
//! riffle udf test fraud.wasm --input sample.parquet "risk_score(amount, country)"
//! riffle udf new my_udfs && cd my_udfs && cargo test && riffle udf build
//! riffle sql --table tx=data/tx.parquet --udf fraud.wasm "SELECT risk_score(amount, country) FROM tx"
//! riffle sql --config riffle.toml --file report.sql --output out.parquet
//! riffle generate fraud --rows 1000000 --out data/tx.parquet
//! riffle run pipeline.toml --mode stream      # SIGTERM/Ctrl-C: commit the epoch, stop
//! riffle run pipeline.toml --mode stream --http 127.0.0.1:9464   # metrics, API, dashboard
//! riffle status pipeline.toml                 # or a checkpoint directory; --json
//! riffle verify pipeline.toml --from 2026-11-01T00:00:00Z --to 2026-11-02T00:00:00Z --key tx_id
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

mod udf_project;
mod udf_test;

use crate::connectors::files::{pretty, write_file};
use crate::connectors::generate::{ClickConfig, SalesConfig};
use crate::connectors::generate::{FraudConfig, GeneratorConfig};
use crate::error::{Blame, Result, RiffleError};
use crate::session::{RiffleSession, SessionOptions, read_udf_config};
use crate::udf::{EngineOptions, RowErrorPolicy, UdfEngine};

/// Riffle: SQL pipelines with sandboxed WebAssembly UDFs.
#[derive(Parser, Debug)]
#[command(name = "riffle", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work with UDF modules.
    #[command(subcommand)]
    Udf(UdfCommand),
    /// Run SQL over Parquet/CSV/JSON files, with Wasm UDFs.
    Sql(SqlArgs),
    /// Generate demo data.
    #[command(subcommand)]
    Generate(GenerateCommand),
    /// Run a pipeline file in batch or stream mode.
    Run(RunArgs),
    /// Show a streaming query's state from its checkpoint without running anything: the last
    /// committed epoch, offsets and watermark per source, state size, UDF module hashes and
    /// the last progress line.
    Status(StatusArgs),
    /// Produce generated fraud transactions, or a file's rows, to a Kafka topic as JSON (demo
    /// and benchmark input); creates the topic if missing.
    Produce(ProduceArgs),
    /// Check a stream's output against batch mode: recompute the pipeline in batch mode from
    /// its sources' batch inputs and compare with what its stream wrote (a Parquet directory,
    /// a Delta table or a Kafka topic), reporting matched, mismatched, missing and extra rows
    /// and the largest difference per column. Exits 0 when they agree, 3 when they differ.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// The pipeline file (TOML); its stream must have run.
    pipeline: PathBuf,
    /// Compare only rows whose time column is at or after this time (RFC 3339, or
    /// "2026-11-01 08:00:00" in UTC).
    #[arg(long, value_name = "TIME")]
    from: Option<String>,
    /// ... and before this time.
    #[arg(long, value_name = "TIME")]
    to: Option<String>,
    /// The output column --from and --to apply to (default: a source's event-time column,
    /// window_start or window, whichever the output has; a window by its start).
    #[arg(long, value_name = "COLUMN")]
    time_column: Option<String>,
    /// A column that identifies a result row; repeat for several. Rows then pair by key, and
    /// a row whose values differ counts as mismatched, with the largest difference per
    /// column. Default: a Delta sink's merge keys; without any, rows are compared whole.
    #[arg(long, value_name = "COLUMN")]
    key: Vec<String>,
    /// Float values count as equal when they differ by at most X times the larger (X when
    /// both are below 1), e.g. 1e-12 for sums of floats, which batch and stream add in another
    /// order (default: exact).
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    tolerance: f64,
    /// Recompute windows (hopping, session and OVER) with plain DataFusion plans instead of the
    /// streaming operators batch mode shares with the stream, so the check does not rest on the
    /// code it checks (slower, and hungrier for hopping windows).
    #[arg(long)]
    reference: bool,
    /// Recompute from this file or Delta table instead of the source's `batch` input, e.g.
    /// the rows a stream read when the pipeline's batch input is the history a backfill
    /// reads; repeat for several sources.
    #[arg(long, value_name = "SOURCE=PATH")]
    input: Vec<String>,
    /// Recompute from each source's rows before its watermark at the stream's last commit:
    /// what an OVER window has released so far, for an update-mode aggregation over OVER
    /// features (whose rows only cover the rows the OVER window let through). The default for
    /// an update- or complete-mode query with an OVER window.
    #[arg(long, conflicts_with = "all_events")]
    until_watermark: bool,
    /// Recompute from every row of the inputs, even for an update-mode query with an OVER
    /// window (see --until-watermark).
    #[arg(long)]
    all_events: bool,
    /// Rows of each kind (mismatched, missing, extra) to show.
    #[arg(long, value_name = "N", default_value_t = 5)]
    examples: usize,
    /// Directory for compiled UDF artifacts (default: ~/.cache/riffle/wasm).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ProduceArgs {
    /// Topic to write.
    #[arg(long)]
    topic: String,
    /// Brokers (default: $RIFFLE_KAFKA_BOOTSTRAP).
    #[arg(long, env = "RIFFLE_KAFKA_BOOTSTRAP")]
    bootstrap: String,
    /// Send this file's rows (Parquet, CSV or NDJSON) instead of generated transactions, in
    /// the file's order, e.g. the events `riffle generate sales` wrote.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["skip", "cards", "start", "events_per_second", "seed"])]
    file: Option<PathBuf>,
    /// The column whose value keys each record (default: card_id for transactions, none for
    /// a file).
    #[arg(long, value_name = "COLUMN")]
    key: Option<String>,
    /// Number of transactions (with --file: the file's first rows; default all of them).
    #[arg(long)]
    rows: Option<u64>,
    /// Skip this many transactions of the generated sequence first (to continue a stream).
    #[arg(long, default_value_t = 0)]
    skip: u64,
    /// Partitions of a newly created topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Records per second (default: as fast as the broker takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Random seed; the same seed gives the same rows.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of distinct cards (as `riffle generate fraud --cards`).
    #[arg(long, default_value_t = 10_000)]
    cards: u64,
    /// Event time of the first transaction: "now" for payments in real time (with --rate
    /// equal to --events-per-second, each payment's `ts` is when it is sent, so a consumer
    /// can measure latency from it), or a time (default: the generator's, 2026-01-01).
    #[arg(long, value_name = "TIME")]
    start: Option<String>,
    /// Transactions per second of event time.
    #[arg(long, default_value_t = 1.0)]
    events_per_second: f64,
    /// Retention of a newly created topic (Kafka's `retention.ms`, with segments rolled four
    /// times as often), for long runs whose old records may go (default: the broker's).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    retention: Option<crate::common::time::SqlDuration>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The pipeline file (TOML).
    pipeline: PathBuf,
    /// Batch over the source's files, or incremental streaming with checkpoints.
    #[arg(long, value_enum, default_value = "batch")]
    mode: RunMode,
    /// Directory for compiled UDF artifacts (default: ~/.cache/riffle/wasm).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// No live progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// Stream mode: stop after this many epochs (the next run resumes from the checkpoint).
    #[arg(long, value_name = "N")]
    max_epochs: Option<u64>,
    /// Stream mode: resume a checkpoint written with other UDF code or init configuration on
    /// purpose. The new modules serve from the next epoch; the checkpoint records which
    /// module served which epochs (`riffle status` shows it). Without it such a restart is
    /// refused. An aggregate whose state columns changed is refused either way.
    #[arg(long)]
    upgrade_udfs: bool,
    /// Stream mode: when a UDF module file is replaced while the query runs, swap the new
    /// module in at the next epoch boundary, without restarting, under the rules of
    /// --upgrade-udfs (the same functions and aggregate states; otherwise the old module
    /// keeps serving and a warning says why). The checkpoint, progress and sink stamps name
    /// the module that served each epoch.
    #[arg(long)]
    hot_swap_udfs: bool,
    /// Stream mode: instances of each keyed operator (aggregations, OVER windows,
    /// de-duplication, joins) and of each stage of filters and projections, each on a core
    /// (default: the pipeline's stream.partitions, else the machine's cores). A restart may
    /// change it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    partitions: Option<u16>,
    /// Batch mode into Delta: a rerun of a run whose commit landed (same query, UDFs, inputs
    /// and run name) writes nothing; a new name writes the rows again.
    #[arg(long, value_name = "NAME")]
    run_name: Option<String>,
    /// Stream mode: how long to keep restarting from the checkpoint while a broker or storage
    /// is unreachable or the disk is full (default 5 minutes; "0 seconds": never).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    retry_for: Option<crate::common::time::SqlDuration>,
    /// Serve Prometheus metrics (/metrics), a JSON API (/api/...) and a web dashboard (/) while
    /// the run lasts, on PORT (loopback) or HOST:PORT. Keep it on loopback unless you mean
    /// otherwise: the dashboard shows offsets, UDF hashes and error messages. Port 0 picks a
    /// free port.
    #[arg(long, value_name = "[HOST:]PORT")]
    http: Option<String>,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// A checkpoint directory, or a pipeline file (for the checkpoint its [stream] section
    /// names).
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> std::result::Result<crate::common::time::SqlDuration, String> {
    crate::common::time::SqlDuration::try_from(text.to_string())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RunMode {
    Batch,
    Stream,
}

#[derive(Subcommand, Debug)]
enum UdfCommand {
    /// Show a module's functions, signatures, content hash, ABI version and sandbox mode.
    Inspect {
        /// The `.wasm` component.
        path: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a function or aggregate of a module over a sample file in the sandbox: prints the
    /// results beside their arguments, every row error, and each batch's time next to the
    /// module's limits.
    Test(udf_test::UdfTestArgs),
    /// Create a UDF project (a Rust crate or a Python package with an example function and
    /// aggregate, native tests, a README, and a copy of the guest SDK) in DIR/NAME.
    New {
        /// Project name.
        name: String,
        /// Directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The language the functions are written in.
        #[arg(long, value_enum, default_value = "rust")]
        lang: udf_project::Lang,
    },
    /// Build a UDF project into a wasm32-wasip2 component (cargo for a Rust crate,
    /// componentize-py for a Python one); prints its path, sha256 and functions.
    Build {
        /// The project's directory.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
}

#[derive(Args, Debug, Clone, Default)]
struct UdfOptions {
    /// Register every function of a UDF module (repeatable).
    #[arg(long = "udf", value_name = "PATH")]
    udfs: Vec<PathBuf>,
    /// Init configuration for a module, as MODULE_PATH=FILE (repeatable).
    #[arg(long = "udf-config", value_name = "MODULE=FILE")]
    udf_configs: Vec<String>,
    /// What a row error from a UDF does: fail the query, or set the value to NULL.
    #[arg(long, value_name = "fail|null")]
    on_row_error: Option<RowErrorPolicy>,
    /// CPU deadline of one UDF call (one batch), in milliseconds.
    #[arg(long, value_name = "MS")]
    udf_timeout_ms: Option<u64>,
    /// Memory cap of one UDF instance, in MiB.
    #[arg(long, value_name = "MIB")]
    udf_memory_mb: Option<usize>,
    /// Directory for compiled UDF artifacts (default: ~/.cache/riffle/wasm).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile UDF modules on every run instead of caching them.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Args, Debug)]
struct SqlArgs {
    /// The query (several statements separated by `;` are run in order; the last one's rows
    /// are printed or written).
    query: Option<String>,
    /// Read the query from a file instead.
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with = "query")]
    file: Option<PathBuf>,
    /// A table as NAME=PATH (a file or a directory of .parquet/.csv/.json files; repeatable).
    #[arg(long = "table", value_name = "NAME=PATH")]
    tables: Vec<String>,
    /// A riffle.toml with tables, UDFs and limits.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Write the result to a .parquet, .csv or .json file instead of printing it.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// Rows per batch (one UDF call per batch).
    #[arg(long, value_name = "ROWS")]
    batch_size: Option<usize>,
    /// Memory the query may hold for sorts, aggregations and joins, in MiB; beyond it they
    /// spill to temporary files (default: no limit).
    #[arg(long, value_name = "MIB")]
    query_memory_mb: Option<usize>,
    /// No progress bar (one appears on a terminal for queries that take a while).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    udf: UdfOptions,
}

#[derive(Subcommand, Debug)]
enum GenerateCommand {
    /// Card transactions with fraud labels.
    Fraud {
        /// Number of rows.
        #[arg(long, default_value_t = 100_000)]
        rows: u64,
        /// Output file (.parquet, .csv or .json).
        #[arg(long)]
        out: PathBuf,
        /// Random seed; the same seed gives the same rows.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Skip this many rows of the generated sequence first: the rows that continue a file
        /// made with --rows N are --skip N (what `riffle produce --skip` sends).
        #[arg(long, default_value_t = 0)]
        skip: u64,
        /// Number of distinct cards.
        #[arg(long, default_value_t = 10_000)]
        cards: u64,
        /// Event-time span the rows are spread over, in days.
        #[arg(long, default_value_t = 7.0)]
        days: f64,
        /// Event-time rate instead of --days: rows per second of event time (what a pipeline's
        /// generator source calls `events_per_second`, so both give the same rows).
        #[arg(long)]
        events_per_second: Option<f64>,
        /// Largest event-time disorder: each row's time moves back by up to this much (what
        /// a generator source calls `disorder`, so both give the same rows).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        disorder: Option<crate::common::time::SqlDuration>,
    },
    /// A shop's stock movements (sales and restocks, with a planted demand surge each hour),
    /// and with --products-out the product catalogue they refer to.
    Sales {
        /// Number of rows.
        #[arg(long, default_value_t = 100_000)]
        rows: u64,
        /// Output file (.parquet, .csv or .json).
        #[arg(long)]
        out: PathBuf,
        /// Also write the product catalogue (the dimension table) here.
        #[arg(long, value_name = "PATH")]
        products_out: Option<PathBuf>,
        /// Random seed; the same seed gives the same rows.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Skip this many rows of the generated sequence first: the rows that continue a file
        /// made with --rows N are --skip N.
        #[arg(long, default_value_t = 0)]
        skip: u64,
        /// Number of products.
        #[arg(long, default_value_t = 100)]
        products: u64,
        /// Event-time rate: rows per second of event time (the catalogue's stock levels are
        /// days of sales at this rate).
        #[arg(long, default_value_t = 1.0)]
        events_per_second: f64,
    },
    /// Clickstream events (views, clicks, carts, purchases) in per-user sessions.
    Clickstream {
        /// Number of rows.
        #[arg(long, default_value_t = 100_000)]
        rows: u64,
        /// Output file (.parquet, .csv or .json).
        #[arg(long)]
        out: PathBuf,
        /// Random seed; the same seed gives the same rows.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Number of distinct users.
        #[arg(long, default_value_t = 50_000)]
        users: u64,
        /// Number of distinct items.
        #[arg(long, default_value_t = 5_000)]
        items: u64,
        /// Event-time span the rows are spread over, in days.
        #[arg(long, default_value_t = 1.0)]
        days: f64,
        /// Event-time rate instead of --days: rows per second of event time.
        #[arg(long)]
        events_per_second: Option<f64>,
        /// Skip this many rows of the generated sequence first: the rows that continue a file
        /// made with --rows N are --skip N (with the same --events-per-second).
        #[arg(long, default_value_t = 0)]
        skip: u64,
    },
}

/// Entry point of the `riffle` binary.
pub fn main() -> ExitCode {
    crate::common::memory::disable_transparent_huge_pages();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,riffle=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let whose = match e.blame() {
                Blame::User => "check the input",
                Blame::Udf => "a UDF failed",
                Blame::External => "an external failure",
                Blame::Internal => "a Riffle bug; please report it",
            };
            eprintln!("error: {e}\n  ({whose})");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let done = match cli.command {
        Command::Udf(UdfCommand::Inspect { path, json }) => inspect(&path, json),
        Command::Udf(UdfCommand::Test(args)) => udf_test::run(args).await,
        Command::Udf(UdfCommand::New { name, dir, lang }) => {
            let root = udf_project::new(&name, &dir, lang)?;
            println!("created {}", root.display());
            let test = match lang {
                udf_project::Lang::Rust => "cargo test",
                udf_project::Lang::Python => "python3 -m unittest",
            };
            println!("next: cd {} && {test} && riffle udf build", root.display());
            Ok(())
        }
        Command::Udf(UdfCommand::Build { path }) => udf_project::build_and_report(&path),
        Command::Sql(args) => sql(args).await,
        Command::Generate(GenerateCommand::Fraud {
            rows,
            out,
            seed,
            skip,
            cards,
            days,
            events_per_second,
            disorder,
        }) => {
            let rate = event_rate(events_per_second, rows, days)?;
            if cards == 0 {
                return Err(RiffleError::Config("--cards must be at least 1".into()));
            }
            let config = FraudConfig {
                seed,
                cards,
                rows_per_second: rate,
                max_disorder_micros: disorder.map_or(0, |d| d.micros()),
                ..FraudConfig::default()
            };
            generate(GeneratorConfig::Fraud(config), skip, rows, &out)
        }
        Command::Generate(GenerateCommand::Sales {
            rows,
            out,
            products_out,
            seed,
            skip,
            products,
            events_per_second,
        }) => {
            if products == 0 {
                return Err(RiffleError::Config("--products must be at least 1".into()));
            }
            let config = SalesConfig {
                seed,
                products,
                rows_per_second: positive("--events-per-second", events_per_second)?,
                ..SalesConfig::default()
            };
            if let Some(path) = products_out {
                let catalogue = crate::connectors::generate::sales::products(&config);
                let written = write_file(&path, catalogue.schema(), [catalogue])?;
                eprintln!("wrote {written} products to {}", path.display());
            }
            generate(GeneratorConfig::Sales(config), skip, rows, &out)
        }
        Command::Generate(GenerateCommand::Clickstream {
            rows,
            out,
            seed,
            users,
            items,
            days,
            events_per_second,
            skip,
        }) => {
            let rate = event_rate(events_per_second, rows, days)?;
            let config = ClickConfig {
                seed,
                users: users.max(1),
                items: items.max(1),
                rows_per_second: rate,
                ..ClickConfig::default()
            };
            generate(GeneratorConfig::Clickstream(config), skip, rows, &out)
        }
        Command::Run(args) => run_pipeline(args).await,
        Command::Status(args) => status(&args),
        Command::Produce(args) => produce(args).await,
        Command::Verify(args) => return verify(args).await,
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// The exit status of `riffle verify` when the outputs differ (1 is an error, 2 bad usage).
const INCONSISTENT: u8 = 3;

async fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let mut pipeline = crate::pipeline::Pipeline::load(&args.pipeline)?;
    for input in &args.input {
        let (source, path) = input
            .split_once('=')
            .ok_or_else(|| RiffleError::Config(format!("--input {input}: expected SOURCE=PATH")))?;
        pipeline.set_batch_input(source, PathBuf::from(path))?;
    }
    let time = |t: &Option<String>, flag: &str| {
        t.as_deref()
            .map(crate::common::time::parse_timestamp)
            .transpose()
            .map_err(|e| RiffleError::Config(format!("{flag}: {e}")))
    };
    let options = crate::verify::VerifyOptions {
        run: crate::pipeline::RunOptions {
            cache_dir: args.cache_dir.or_else(EngineOptions::default_cache_dir),
            // The batch run's progress bar (drawn only on a terminal).
            live: true,
            ..Default::default()
        },
        from: time(&args.from, "--from")?,
        to: time(&args.to, "--to")?,
        time_column: args.time_column,
        keys: args.key,
        tolerance: args.tolerance,
        reference: args.reference,
        until_watermark: match (args.until_watermark, args.all_events) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        examples: args.examples,
    };
    if let (Some(from), Some(to)) = (options.from, options.to)
        && from >= to
    {
        return Err(RiffleError::Config(
            "--from must be before --to (the range includes --from and excludes --to)".into(),
        ));
    }
    let report = crate::verify::verify(&pipeline, &options).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serialisable")
        );
    } else {
        println!("{report}");
    }
    Ok(if report.consistent() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(INCONSISTENT)
    })
}

fn status(args: &StatusArgs) -> Result<()> {
    let (root, progress) = if args.path.is_file() {
        let pipeline = crate::pipeline::Pipeline::load(&args.path)?;
        let root = pipeline.checkpoint_dir().ok_or_else(|| {
            RiffleError::Config(format!(
                "{}: stream.checkpoint: missing: the pipeline has no checkpoint directory",
                args.path.display()
            ))
        })?;
        if !root.join("metadata.json").is_file() {
            return Err(RiffleError::Config(format!(
                "no checkpoint yet at {}: {} has not run in stream mode",
                root.display(),
                args.path.display()
            )));
        }
        (
            root.to_path_buf(),
            pipeline.progress_file().map(Path::to_path_buf),
        )
    } else if args.path.is_dir() {
        (args.path.clone(), None)
    } else {
        return Err(RiffleError::Config(format!(
            "{}: no such pipeline file or checkpoint directory",
            args.path.display()
        )));
    };
    let status = crate::checkpoint::status::read(&root, progress.as_deref())?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("serialisable")
        );
    } else {
        print!("{status}");
    }
    Ok(())
}

async fn run_pipeline(args: RunArgs) -> Result<()> {
    let pipeline = crate::pipeline::Pipeline::load(&args.pipeline)?;
    let monitor = args.http.as_ref().map(|_| {
        crate::server::Monitor::new(
            &args.pipeline.display().to_string(),
            match args.mode {
                RunMode::Batch => "batch",
                RunMode::Stream => "stream",
            },
        )
    });
    // Listening comes first: a taken port fails the command before any work starts.
    let _server = match (&args.http, &monitor) {
        (Some(addr), Some(monitor)) => {
            let server = crate::server::HttpServer::start(addr, monitor.clone())?;
            eprintln!(
                "riffle: serving the dashboard at http://{0}/ (metrics at http://{0}/metrics)",
                server.addr()
            );
            Some(server)
        }
        _ => None,
    };
    let options = crate::pipeline::RunOptions {
        cache_dir: args.cache_dir.or_else(EngineOptions::default_cache_dir),
        live: !args.quiet,
        max_epochs: args.max_epochs,
        upgrade_udfs: args.upgrade_udfs,
        hot_swap_udfs: args.hot_swap_udfs,
        run_name: args.run_name,
        monitor: monitor.clone(),
        partitions: args.partitions.map(usize::from),
    };
    let result = run_mode(&pipeline, &options, args.mode, args.retry_for).await;
    if let Some(monitor) = &monitor {
        match &result {
            Ok(status) => monitor.set_status(status),
            Err(e) => {
                monitor.error("failure", &e.to_string());
                monitor.set_status("failed");
            }
        }
    }
    result.map(|_| ())
}

/// Runs the pipeline in `mode`; returns how the run ended (`finished` or `stopped`).
async fn run_mode(
    pipeline: &crate::pipeline::Pipeline,
    options: &crate::pipeline::RunOptions,
    mode: RunMode,
    retry_for: Option<crate::common::time::SqlDuration>,
) -> Result<&'static str> {
    match mode {
        RunMode::Batch => {
            let started = std::time::Instant::now();
            let outcome = pipeline.run_batch(options).await?;
            if !outcome.rows.is_empty() {
                println!("{}", crate::connectors::files::pretty(&outcome.rows)?);
            }
            if let Some(message) = outcome.message {
                eprintln!("{message}");
            }
            eprintln!("batch run done in {:.2} s", started.elapsed().as_secs_f64());
            Ok("finished")
        }
        RunMode::Stream => {
            let stop = crate::stream::stop_on_signals();
            let retry_for = retry_for.map_or(
                std::time::Duration::from_secs(300),
                crate::common::time::SqlDuration::std,
            );
            let summary = run_stream_retrying(pipeline, options, &stop, retry_for).await?;
            eprintln!(
                "stream run {}: {} epochs, {} rows in, {} rows out, {} late",
                if summary.finished {
                    "finished"
                } else {
                    "stopped"
                },
                summary.epochs,
                summary.input_rows,
                summary.output_rows,
                summary.late_rows
            );
            Ok(if summary.finished {
                "finished"
            } else {
                "stopped"
            })
        }
    }
}

/// Runs a streaming pipeline; a failure that may go away by itself (an unreachable broker, a
/// full disk) restarts it from its checkpoint, exactly as a new process would, after a growing
/// pause, for up to `retry_for` of failures in a row. The status goes to stderr while it waits.
async fn run_stream_retrying(
    pipeline: &crate::pipeline::Pipeline,
    options: &crate::pipeline::RunOptions,
    stop: &std::sync::atomic::AtomicBool,
    retry_for: std::time::Duration,
) -> Result<crate::stream::RunSummary> {
    use std::time::{Duration, Instant};
    let mut total = crate::stream::RunSummary::default();
    let mut failing_since: Option<Instant> = None;
    let mut attempt = 0u32;
    loop {
        let started = Instant::now();
        match pipeline.run_stream(options, stop).await {
            Ok(summary) => {
                total.absorb(&summary);
                return Ok(total);
            }
            Err(e) if e.is_transient() && !stop.load(std::sync::atomic::Ordering::Relaxed) => {
                // Only failures in a row count against the limit: a run that went on for a
                // minute before failing starts a new count.
                if started.elapsed() > Duration::from_secs(60) {
                    failing_since = None;
                    attempt = 0;
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= retry_for {
                    eprintln!(
                        "riffle: giving up after {:.0} s of retries (--retry-for)",
                        since.elapsed().as_secs_f64()
                    );
                    return Err(e);
                }
                attempt += 1;
                if let Some(monitor) = &options.monitor {
                    monitor.error("failure", &e.to_string());
                    monitor.set_status("retrying");
                }
                let pause = Duration::from_millis(500 * 2u64.pow(attempt.min(5)));
                eprintln!(
                    "riffle: waiting: {e}\nriffle: restarting from the checkpoint in {:.0} s \
                     (attempt {attempt}; retrying for {:.0} s more)",
                    pause.as_secs_f64(),
                    retry_for.saturating_sub(since.elapsed()).as_secs_f64()
                );
                let until = Instant::now() + pause;
                while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Stopped while waiting: what is committed stays committed; do not reconnect
                // to what was failing just to stop again.
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(total);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn engine_options(udf: &UdfOptions, file: &crate::config::LimitsConfig) -> EngineOptions {
    let limits = file.udf_limits(udf.udf_timeout_ms, udf.udf_memory_mb);
    let cache_dir = if udf.no_cache {
        None
    } else {
        udf.cache_dir
            .clone()
            .or_else(EngineOptions::default_cache_dir)
    };
    EngineOptions { cache_dir, limits }
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let engine = UdfEngine::new(engine_options(&UdfOptions::default(), &Default::default()))?;
    let (hash, spec) = engine.describe(path)?;
    if json {
        let value = serde_json::json!({
            "path": path,
            "sha256": hash,
            "abi_version": spec.abi_version,
            "sdk": spec.sdk,
            "has_init": spec.has_init,
            "deterministic": spec.deterministic,
            "functions": spec.functions,
            "aggregates": spec.aggregates,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("serializable")
        );
        return Ok(());
    }
    println!("module   {}", path.display());
    println!("sha256   {hash}");
    println!("abi      {} ({})", spec.abi_version, spec.sdk);
    println!(
        "init     {}",
        if spec.has_init {
            "yes (takes configuration bytes)"
        } else {
            "no"
        }
    );
    println!(
        "sandbox  {}",
        if spec.deterministic {
            "deterministic: frozen clock (1970-01-01T00:00:00Z), fixed random seed"
        } else {
            "NONDETERMINISTIC: real clock and real randomness (a function declared it)"
        }
    );
    println!("         no files, no environment, no network; stdout/stderr to the log");
    println!("functions ({}):", spec.functions.len());
    for f in &spec.functions {
        let det = if f.deterministic {
            ""
        } else {
            "  [nondeterministic]"
        };
        println!("  {}{det}", f.signature());
        for line in f.doc.lines() {
            println!("      {line}");
        }
    }
    if !spec.aggregates.is_empty() {
        println!("aggregates ({}):", spec.aggregates.len());
        for a in &spec.aggregates {
            let mut notes = String::new();
            if a.retractable {
                notes.push_str("  [retractable]");
            }
            if !a.deterministic {
                notes.push_str("  [nondeterministic]");
            }
            println!("  {}{notes}", a.signature());
            println!("      state: {}", a.state_schema());
            for line in a.doc.lines() {
                println!("      {line}");
            }
        }
    }
    Ok(())
}

/// `NAME=VALUE`, with a clear error naming the flag.
fn split_pair<'a>(flag: &str, pair: &'a str) -> Result<(&'a str, &'a str)> {
    pair.split_once('=')
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .ok_or_else(|| RiffleError::Config(format!("{flag} {pair:?}: expected NAME=VALUE")))
}

async fn sql(args: SqlArgs) -> Result<()> {
    let file_config = match &args.config {
        Some(path) => crate::config::RiffleConfig::load(path)?,
        None => crate::config::RiffleConfig::default(),
    };
    let policy = args
        .udf
        .on_row_error
        .or(file_config.limits.on_row_error)
        .unwrap_or_default();
    let session = RiffleSession::new(SessionOptions {
        engine: engine_options(&args.udf, &file_config.limits),
        row_error_policy: policy,
        batch_size: args.batch_size,
        memory_limit: file_config.limits.query_memory(args.query_memory_mb),
    })?;

    for (name, path) in &file_config.tables {
        session.register_table(name, path).await?;
    }
    for pair in &args.tables {
        let (name, path) = split_pair("--table", pair)?;
        session.register_table(name, Path::new(path)).await?;
    }

    for udf in &file_config.udfs {
        let config = read_udf_config(udf.config.as_deref())?;
        session.load_udfs(&udf.path, config, udf.functions.as_deref())?;
    }
    let mut configs = std::collections::HashMap::new();
    for pair in &args.udf.udf_configs {
        let (module, file) = split_pair("--udf-config", pair)?;
        configs.insert(PathBuf::from(module), PathBuf::from(file));
    }
    for path in &args.udf.udfs {
        let config = read_udf_config(configs.remove(path).as_deref())?;
        session.load_udfs(path, config, None)?;
    }
    if let Some(unused) = configs.keys().next() {
        return Err(RiffleError::Config(format!(
            "--udf-config names {}, which no --udf loads",
            unused.display()
        )));
    }

    let query = match (&args.query, &args.file) {
        (Some(q), _) => q.clone(),
        (None, Some(file)) => {
            std::fs::read_to_string(file).map_err(|e| RiffleError::io("reading", file, e))?
        }
        (None, None) => {
            return Err(RiffleError::Config(
                "no query: pass it as an argument or with --file".into(),
            ));
        }
    };

    let started = Instant::now();
    session.show_progress(!args.quiet);
    let batches = session.sql(&query).await?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    match &args.output {
        Some(path) => {
            let schema = match batches.first() {
                Some(b) => b.schema(),
                None => {
                    return Err(RiffleError::Config(
                        "the last statement returned no result to write".into(),
                    ));
                }
            };
            write_file(path, schema, batches)?;
            eprintln!(
                "wrote {rows} rows to {} in {:.2?}",
                path.display(),
                started.elapsed()
            );
        }
        None => {
            if !batches.is_empty() {
                println!("{}", pretty(&batches)?);
            }
            eprintln!("{rows} rows in {:.2?}", started.elapsed());
        }
    }
    for module in session.modules() {
        for (i, name) in module.counted() {
            let s = module.stats(i);
            if s.calls > 0 {
                tracing::info!(
                    udf = %name,
                    calls = s.calls,
                    rows = s.rows,
                    ms = s.nanos as f64 / 1e6,
                    row_errors = s.row_errors,
                    "UDF usage"
                );
            }
        }
    }
    Ok(())
}

async fn produce(args: ProduceArgs) -> Result<()> {
    use crate::connectors::kafka::admin::ensure_topic_with;
    use crate::connectors::kafka::{KafkaConfig, produce_json};
    // Checked before anything touches the broker: a zero rate would divide by zero.
    if let Some(rate) = args.rate {
        positive("--rate", rate)?;
    }
    positive("--events-per-second", args.events_per_second)?;
    let kafka = KafkaConfig {
        bootstrap: args.bootstrap,
        properties: Default::default(),
    };
    // Retention drops whole segments, never the one being written: segments roll four times
    // per retention period so that old records actually go.
    let retention = args.retention.map(|d| {
        let ms = (d.micros() / 1000).max(4);
        (ms.to_string(), (ms / 4).to_string())
    });
    let config: Vec<(&str, &str)> = retention
        .iter()
        .flat_map(|(ms, segment)| {
            [
                ("retention.ms", ms.as_str()),
                ("segment.ms", segment.as_str()),
            ]
        })
        .collect();
    ensure_topic_with(&kafka, &args.topic, args.partitions, &config).await?;
    let started = Instant::now();
    let (rows, key, what, batches): (
        u64,
        _,
        _,
        Box<dyn Iterator<Item = arrow::record_batch::RecordBatch> + Send>,
    ) = match &args.file {
        Some(path) => {
            let mut batches = crate::connectors::files::read_file(
                path,
                crate::common::format::FileFormat::of(path)?,
                None,
            )?;
            let in_file: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
            let rows = args.rows.unwrap_or(in_file).min(in_file);
            let mut left = rows as usize;
            batches.retain_mut(|b| {
                *b = b.slice(0, left.min(b.num_rows()));
                left -= b.num_rows();
                b.num_rows() > 0
            });
            let what = format!("rows of {}", path.display());
            (rows, args.key.clone(), what, Box::new(batches.into_iter()))
        }
        None => {
            if args.cards == 0 {
                return Err(RiffleError::Config("--cards must be at least 1".into()));
            }
            let start_micros = match args.start.as_deref() {
                None => FraudConfig::default().start_micros,
                Some("now") => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64),
                Some(t) => crate::common::time::parse_timestamp(t)
                    .map_err(|e| RiffleError::Config(format!("--start: {e}")))?,
            };
            let config = GeneratorConfig::Fraud(FraudConfig {
                seed: args.seed,
                cards: args.cards,
                start_micros,
                rows_per_second: args.events_per_second,
                ..FraudConfig::default()
            });
            let mut generator = config.starting_at(args.skip as i64);
            let rows = args.rows.unwrap_or(100_000);
            let mut left = rows;
            let batches = std::iter::from_fn(move || {
                let n = left.min(8192);
                left -= n;
                (n > 0).then(|| generator.next_batch_of_ids(n as usize))
            });
            let key = Some(args.key.clone().unwrap_or_else(|| "card_id".into()));
            (
                rows,
                key,
                String::from("fraud transactions"),
                Box::new(batches),
            )
        }
    };
    let mut last = Instant::now();
    let topic = args.topic.clone();
    let sent = tokio::task::spawn_blocking(move || {
        produce_json(&kafka, &topic, key.as_deref(), args.rate, batches, |n| {
            if last.elapsed() > Duration::from_secs(1) {
                eprintln!("produced {n} / {rows} records");
                last = Instant::now();
            }
        })
    })
    .await
    .map_err(|e| RiffleError::Internal(format!("producer thread: {e}")))??;
    eprintln!(
        "produced {sent} {what} to {} in {:.2?}",
        args.topic,
        started.elapsed()
    );
    Ok(())
}

/// `value` of option `name`, when it is a positive finite number.
fn positive(name: &str, value: f64) -> Result<f64> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(RiffleError::Config(format!(
            "{name} {value}: must be a positive number"
        )))
    }
}

/// The event-time rate: `--events-per-second` if given, else the one that spreads `rows`
/// over `days`.
fn event_rate(events_per_second: Option<f64>, rows: u64, days: f64) -> Result<f64> {
    match events_per_second {
        Some(r) => positive("--events-per-second", r),
        None => rate_over(rows, days),
    }
}

/// The event-time rate that spreads `rows` over `days`.
fn rate_over(rows: u64, days: f64) -> Result<f64> {
    Ok(rows.max(1) as f64 / (positive("--days", days)? * 86_400.0))
}

fn generate(config: GeneratorConfig, skip: u64, rows: u64, out: &Path) -> Result<()> {
    const BATCH: u64 = 8192;
    let mut generator = config.starting_at(skip as i64);
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut done = 0u64;
    let batches = std::iter::from_fn(|| {
        if done >= rows {
            return None;
        }
        let n = BATCH.min(rows - done);
        done += n;
        if last_report.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "generated {done} / {rows} rows ({:.0}%)",
                done as f64 * 100.0 / rows as f64
            );
            last_report = Instant::now();
        }
        Some(generator.next_batch_of_ids(n as usize))
    });
    let written = write_file(out, config.schema(), batches)?;
    let what = match config {
        GeneratorConfig::Fraud(_) => "fraud transactions",
        GeneratorConfig::Clickstream(_) => "clickstream events",
        GeneratorConfig::Sales(_) => "sales and restocks",
    };
    eprintln!(
        "wrote {written} {what} to {} in {:.2?}",
        out.display(),
        started.elapsed()
    );
    Ok(())
}
