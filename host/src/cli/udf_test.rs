//! `riffle udf test`: run one function of a module over a sample file, in the sandbox, the
//! way a query would, and show what an author needs before deploying: the results beside their
//! arguments, every row error, and the time of each batch next to the module's limits.
//!
//! The arguments are SQL expressions over the sample (`risk_score(amount * 100, country)`),
//! evaluated by DataFusion; the function itself is called directly on the module, batch by
//! batch, so row errors are listed in full (a query would stop at the first, or turn them into
//! NULLs) and each call is timed on its own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{Field, Schema};
use clap::Args;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, FunctionArguments,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::{UdfOptions, engine_options};
use crate::connectors::files::pretty;
use crate::error::{Result, RiffleError};
use crate::session::{RiffleSession, SessionOptions, read_udf_config};
use crate::udf::{AggregateStep, RowErrorPolicy, UdfType};

/// `riffle udf test MODULE --input SAMPLE "f(a, b)"`.
#[derive(Args, Debug)]
pub(super) struct UdfTestArgs {
    /// The `.wasm` component.
    module: PathBuf,
    /// The call to run, with SQL expressions over the sample's columns as arguments:
    /// `"risk_score(amount, country)"`; an aggregate is run over the whole sample.
    call: String,
    /// A sample to run it over: a .parquet, .csv (with a header row) or .json file.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Init configuration bytes for the module.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Result rows to print.
    #[arg(long, default_value_t = 20)]
    rows: usize,
    /// Row errors to print.
    #[arg(long, default_value_t = 20)]
    errors: usize,
    /// CPU deadline of one call (one batch), in milliseconds.
    #[arg(long, value_name = "MS")]
    udf_timeout_ms: Option<u64>,
    /// Memory cap of the module's instance, in MiB.
    #[arg(long, value_name = "MIB")]
    udf_memory_mb: Option<usize>,
}

/// The function name and argument expressions of `f(a, b)`.
fn parse_call(call: &str) -> Result<(String, Vec<String>)> {
    let bad = |why: &str| {
        RiffleError::Config(format!(
            "{call:?}: {why}; expected a call such as \"risk_score(amount, country)\""
        ))
    };
    let expr = Parser::new(&GenericDialect)
        .try_with_sql(call)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| bad(&e.to_string()))?;
    let SqlExpr::Function(f) = expr else {
        return Err(bad("not a function call"));
    };
    if f.over.is_some() || f.filter.is_some() || !f.within_group.is_empty() {
        return Err(bad(
            "OVER, FILTER and WITHIN GROUP are for queries (riffle sql)",
        ));
    }
    if let FunctionArguments::List(list) = &f.args
        && (list.duplicate_treatment.is_some() || !list.clauses.is_empty())
    {
        return Err(bad("DISTINCT and ORDER BY are for queries (riffle sql)"));
    }
    let args = match &f.args {
        FunctionArguments::List(list) => list
            .args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e.to_string()),
                other => Err(bad(&format!("unsupported argument {other}"))),
            })
            .collect::<Result<Vec<_>>>()?,
        FunctionArguments::None => Vec::new(),
        FunctionArguments::Subquery(_) => return Err(bad("a subquery is not an argument list")),
    };
    // As SQL does: unquoted names are case-insensitive.
    let name = f
        .name
        .0
        .last()
        .and_then(|part| part.as_ident())
        .map(|id| {
            if id.quote_style.is_some() {
                id.value.clone()
            } else {
                id.value.to_lowercase()
            }
        })
        .unwrap_or_else(|| f.name.to_string());
    Ok((name, args))
}

/// Casts evaluated arguments to the types the function declares, as the SQL adapter does.
fn cast_args(arrays: &[ArrayRef], declared: &[UdfType]) -> Result<Vec<ArrayRef>> {
    arrays
        .iter()
        .zip(declared)
        .map(|(a, t)| Ok(cast(a, &t.arrow_for_arg(a.data_type()))?))
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

pub(super) async fn run(args: UdfTestArgs) -> Result<()> {
    let (name, arg_sql) = parse_call(&args.call)?;
    let session = RiffleSession::new(SessionOptions {
        engine: engine_options(
            &UdfOptions {
                udf_timeout_ms: args.udf_timeout_ms,
                udf_memory_mb: args.udf_memory_mb,
                ..UdfOptions::default()
            },
            &Default::default(),
        ),
        row_error_policy: RowErrorPolicy::Null,
        batch_size: None,
        memory_limit: None,
    })?;
    let config = read_udf_config(args.config.as_deref())?;
    let module = session.load_udfs(&args.module, config, None)?;
    session.register_table("input", &args.input).await?;
    let spec = module.spec();
    let (scalar, aggregate) = (module.function_index(&name), module.aggregate_index(&name));
    let declared: Vec<UdfType> = match (scalar, aggregate) {
        (Some(i), _) => spec.functions[i].args.iter().map(|a| a.data_type).collect(),
        (None, Some(i)) => spec.aggregates[i]
            .args
            .iter()
            .map(|a| a.data_type)
            .collect(),
        (None, None) => {
            let names: Vec<&str> = module.counted().map(|(_, n)| n).collect();
            return Err(RiffleError::Config(format!(
                "{} exports no function {name} (it has: {})",
                args.module.display(),
                names.join(", ")
            )));
        }
    };
    if declared.len() != arg_sql.len() {
        let signature = match scalar {
            Some(i) => spec.functions[i].signature(),
            None => spec.aggregates[aggregate.expect("one of the two")].signature(),
        };
        return Err(RiffleError::Config(format!(
            "{name} takes {} arguments, the call passes {}: {signature}",
            declared.len(),
            arg_sql.len()
        )));
    }
    let select = if arg_sql.is_empty() {
        // A function without arguments still gets one value per row.
        "SELECT 1 AS no_arguments FROM input".to_string()
    } else {
        // Aliased: the same expression may be passed twice (`haversine_km(lat, lon, lat, lon)`).
        let columns: Vec<String> = arg_sql
            .iter()
            .enumerate()
            .map(|(i, sql)| format!("{sql} AS arg{i}"))
            .collect();
        format!("SELECT {} FROM input", columns.join(", "))
    };
    let batches = session.sql(&select).await?;

    let limits = session.engine().limits().clone();
    let mut times: Vec<(usize, Duration)> = Vec::new();
    let mut shown: Vec<RecordBatch> = Vec::new();
    let mut shown_rows = 0;
    let mut row_errors: Vec<(usize, String)> = Vec::new();
    let mut offset = 0;
    let mut state: Vec<ArrayRef> = Vec::new();
    for batch in &batches {
        let rows = batch.num_rows();
        if rows == 0 {
            continue;
        }
        let arrays = if arg_sql.is_empty() {
            Vec::new()
        } else {
            cast_args(batch.columns(), &declared)?
        };
        let started = Instant::now();
        match (scalar, aggregate) {
            (Some(i), _) => {
                let out = module.call(i, rows, &arrays)?;
                times.push((rows, started.elapsed()));
                row_errors.extend(out.row_errors.into_iter().map(|(r, m)| (offset + r, m)));
                if shown_rows < args.rows {
                    let take = (args.rows - shown_rows).min(rows);
                    let mut fields: Vec<Field> = Vec::new();
                    let mut columns: Vec<ArrayRef> = Vec::new();
                    if !arg_sql.is_empty() {
                        for (sql, column) in arg_sql.iter().zip(batch.columns()) {
                            fields.push(Field::new(sql, column.data_type().clone(), true));
                            columns.push(column.slice(0, take));
                        }
                    }
                    fields.push(Field::new(&args.call, out.array.data_type().clone(), true));
                    columns.push(out.array.slice(0, take));
                    shown.push(RecordBatch::try_new(
                        Arc::new(Schema::new(fields)),
                        columns,
                    )?);
                    shown_rows += take;
                }
            }
            (None, Some(i)) => {
                state = module.aggregate(
                    i,
                    AggregateStep::Update,
                    1,
                    &state,
                    &vec![0; rows],
                    &arrays,
                )?;
                times.push((rows, started.elapsed()));
            }
            (None, None) => unreachable!("checked above"),
        }
        offset += rows;
    }

    if let Some(i) = aggregate.filter(|_| scalar.is_none()) {
        let started = Instant::now();
        let out = module.finish(i, 1, &state)?;
        let finish = started.elapsed();
        row_errors.extend(out.row_errors);
        let field = Field::new(&args.call, out.array.data_type().clone(), true);
        shown.push(RecordBatch::try_new(
            Arc::new(Schema::new(vec![field])),
            vec![out.array],
        )?);
        println!("{}", pretty(&shown)?);
        let fields: Vec<Field> = spec.aggregates[i]
            .state
            .iter()
            .zip(&state)
            .map(|(f, a)| Field::new(&f.name, a.data_type().clone(), true))
            .collect();
        println!(
            "state after {offset} rows: {}",
            spec.aggregates[i].state_schema()
        );
        if !state.is_empty() {
            let state = RecordBatch::try_new(Arc::new(Schema::new(fields)), state.clone())?;
            println!("{}", pretty(&[state])?);
        }
        println!("finish: {}", ms(finish));
    } else {
        if !shown.is_empty() {
            println!("{}", pretty(&shown)?);
        }
        println!("{offset} rows ({shown_rows} shown)");
    }

    if row_errors.is_empty() {
        println!("row errors: none");
    } else {
        println!("row errors: {}", row_errors.len());
        for (row, message) in row_errors.iter().take(args.errors) {
            println!("  row {row}: {message}");
        }
        if row_errors.len() > args.errors {
            println!("  ... {} more", row_errors.len() - args.errors);
        }
    }
    if let Some(&(rows, slowest)) = times.iter().max_by_key(|(_, t)| *t) {
        let mut sorted: Vec<Duration> = times.iter().map(|(_, t)| *t).collect();
        sorted.sort();
        let total: Duration = sorted.iter().sum();
        println!(
            "batches: {}; per batch median {}, slowest {} ({rows} rows), total {}",
            times.len(),
            ms(sorted[sorted.len() / 2]),
            ms(slowest),
            ms(total)
        );
        println!(
            "limits: {} per call (the slowest batch used {:.3} % of it), {} MiB of memory \
             per instance",
            ms(limits.call_timeout),
            100.0 * slowest.as_secs_f64() / limits.call_timeout.as_secs_f64(),
            limits.memory_bytes >> 20
        );
    } else {
        println!("batches: none (the sample has no rows)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_call;

    #[test]
    fn calls_are_parsed_into_a_name_and_sql_arguments() {
        assert_eq!(
            parse_call("risk_score(amount * 100, upper(country))").unwrap(),
            (
                "risk_score".to_string(),
                vec!["amount * 100".to_string(), "upper(country)".to_string()]
            )
        );
        assert_eq!(parse_call("now()").unwrap(), ("now".to_string(), vec![]));
        assert_eq!(parse_call("RISK_SCORE(x)").unwrap().0, "risk_score");
        assert!(parse_call("amount + 1").is_err());
        assert!(parse_call("count(DISTINCT x)").is_err());
        assert!(parse_call("sum(x) OVER ()").is_err());
        assert!(parse_call("f(").is_err());
    }
}
