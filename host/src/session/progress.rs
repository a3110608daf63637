//! A progress bar for batch queries on a terminal.
//!
//! A batch run over a large history can take minutes with nothing to show. DataFusion's scan
//! operators count the rows they produce in their metrics while the query runs, and their
//! statistics know how many rows the input files hold (Parquet footers), so the bar needs no
//! hook inside the plan: a ticker reads the scans' counters a few times a second. Queries that
//! finish within half a second never draw it, and nothing is drawn unless stderr is a
//! terminal: piped output and logs stay clean.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use datafusion::physical_plan::{ExecutionPlan, StatisticsArgs, StatisticsContext};
use datafusion::prelude::DataFrame;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::Result;

/// How long a query runs before its bar appears.
const QUIET_START: Duration = Duration::from_millis(500);

/// Whether a bar would be seen: stderr is a terminal.
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Runs `df` to completion, showing a bar of input rows read (out of the inputs' row count
/// where the scans know it) when `show` is set.
///
/// # Errors
/// Planning and execution errors, as `DataFrame::collect` gives them.
pub async fn collect(df: DataFrame, show: bool) -> Result<Vec<RecordBatch>> {
    if !show {
        return Ok(df.collect().await?);
    }
    let task = Arc::new(df.task_ctx());
    let plan = df.create_physical_plan().await?;
    let scans = leaves(&plan);
    let total = input_rows(&scans);
    let bar = match total {
        Some(n) => ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::hidden())
            .with_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {percent:>3}% of {human_len} rows read, \
                     {eta} left",
                )
                .expect("valid template")
                .progress_chars("=> "),
            ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden()).with_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {human_pos} rows read")
                .expect("valid template"),
        ),
    };
    let ticking = bar.clone();
    let _ticker = AbortOnDrop(tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut shown = false;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if !shown && started.elapsed() >= QUIET_START {
                ticking.set_draw_target(ProgressDrawTarget::stderr_with_hz(10));
                shown = true;
            }
            ticking.set_position(rows_read(&scans) as u64);
        }
    }));
    let result = datafusion::physical_plan::collect(plan, task).await;
    bar.finish_and_clear();
    Ok(result?)
}

/// Stops the ticker when the query ends, also when its future is dropped half way.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The plan's leaves: its scans.
fn leaves(plan: &Arc<dyn ExecutionPlan>) -> Vec<Arc<dyn ExecutionPlan>> {
    let children = plan.children();
    if children.is_empty() {
        return vec![plan.clone()];
    }
    children.into_iter().flat_map(leaves).collect()
}

/// Rows the scans will read, if every one of them knows.
fn input_rows(scans: &[Arc<dyn ExecutionPlan>]) -> Option<usize> {
    let stats = StatisticsContext::new();
    scans
        .iter()
        .map(|s| {
            stats
                .compute(s.as_ref(), &StatisticsArgs::new())
                .ok()
                .and_then(|st| st.num_rows.get_value().copied())
        })
        .sum()
}

/// Rows the scans have produced so far (their live `output_rows` metric).
fn rows_read(scans: &[Arc<dyn ExecutionPlan>]) -> usize {
    scans
        .iter()
        .filter_map(|s| s.metrics()?.output_rows())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    #[tokio::test]
    async fn the_bar_counts_the_rows_the_scans_read_out_of_the_files_rows() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = SessionContext::new();
        let path = dir.path().join("t.parquet");
        let df = ctx
            .sql("SELECT * FROM generate_series(1, 30000) AS t(x)")
            .await
            .unwrap();
        df.write_parquet(path.to_str().unwrap(), Default::default(), None)
            .await
            .unwrap();
        ctx.register_parquet("t", path.to_str().unwrap(), ParquetReadOptions::default())
            .await
            .unwrap();
        let df = ctx
            .sql("SELECT sum(x) FROM t WHERE x % 2 = 0")
            .await
            .unwrap();
        let task = Arc::new(df.task_ctx());
        let plan = df.create_physical_plan().await.unwrap();
        let scans = leaves(&plan);
        assert_eq!(input_rows(&scans), Some(30000));
        assert_eq!(rows_read(&scans), 0);
        datafusion::physical_plan::collect(plan, task)
            .await
            .unwrap();
        assert_eq!(rows_read(&scans), 30000);

        // With the bar on (no terminal here, so nothing is drawn) the rows are the same.
        let df = ctx
            .sql("SELECT sum(x) FROM t WHERE x % 2 = 0")
            .await
            .unwrap();
        let rows = collect(df, true).await.unwrap();
        assert_eq!(
            arrow::util::pretty::pretty_format_batches(&rows)
                .unwrap()
                .to_string(),
            "+-----------+\n| sum(t.x)  |\n+-----------+\n| 225015000 |\n+-----------+"
        );
    }
}
