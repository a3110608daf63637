//! A batch SQL session: DataFusion over files, with Wasm UDFs registered from `.wasm` modules.
//!
//! Besides DataFusion's SQL, a session understands one statement of its own that registers UDFs
//! from a module (DataFusion's `CREATE FUNCTION` wants the signature spelled out, which a Riffle
//! module already describes):
//!
//! ```sql
//! CREATE FUNCTIONS FROM 'udfs/fraud.wasm';                     -- every function in the module
//! CREATE FUNCTION risk_score, haversine_km FROM 'fraud.wasm';  -- only these
//! CREATE FUNCTIONS FROM 'fraud.wasm' WITH CONFIG 'model.txt';  -- bytes for the init hook
//! ```

pub mod progress;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::SessionContext;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{
    CsvReadOptions, DataFrame, JsonReadOptions, ParquetReadOptions, SessionConfig,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::common::FileFormat;
use crate::error::{Result, RiffleError};
use crate::udf::{EngineOptions, ModuleSlot, RowErrorPolicy, UdfEngine, UdfModule, WasmScalarUdf};

/// Settings of a [`RiffleSession`].
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// UDF engine settings (cache, limits).
    pub engine: EngineOptions,
    /// What a row error from a UDF does.
    pub row_error_policy: RowErrorPolicy,
    /// Rows per batch (one UDF call each); DataFusion's default (8192) when `None`.
    pub batch_size: Option<usize>,
    /// Bytes DataFusion's operators may hold for sorts, aggregations and joins (all of a batch
    /// query; a stream's stateless stages), shared fairly among those that can spill: beyond
    /// it sorts (the event-time sort under batch hopping and session windows too) and
    /// aggregations spill to temporary files, and an operator that cannot spill fails the
    /// query with "resources exhausted". Operator state of streams is not counted. `None`: no
    /// limit.
    pub memory_limit: Option<usize>,
}

/// DataFusion plus Riffle's UDF runtime.
pub struct RiffleSession {
    ctx: SessionContext,
    engine: UdfEngine,
    policy: RowErrorPolicy,
    /// One slot per loaded module: what its registered functions call into.
    modules: Mutex<Vec<Arc<ModuleSlot>>>,
    progress_bar: AtomicBool,
}

impl RiffleSession {
    /// A session with no tables and no UDFs.
    ///
    /// # Errors
    /// Only if the Wasm engine cannot start (a Riffle bug).
    pub fn new(options: SessionOptions) -> Result<Self> {
        let mut config = SessionConfig::new()
            // Plain Utf8 strings cross into UDFs without a cast; views would be copied anyway.
            .set_bool(
                "datafusion.execution.parquet.schema_force_view_types",
                false,
            );
        if let Some(rows) = options.batch_size {
            config = config.with_batch_size(rows);
        }
        let mut runtime = RuntimeEnvBuilder::new();
        if let Some(bytes) = options.memory_limit {
            runtime = runtime.with_memory_pool(Arc::new(FairSpillPool::new(bytes)));
        }
        // Hopping and session windows run with the streaming operators (`exec::bounded`).
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime.build_arc()?)
            .with_default_features()
            .with_analyzer_rule(Arc::new(crate::exec::bounded::BoundedWindows))
            .with_query_planner(Arc::new(crate::exec::bounded::BatchQueryPlanner))
            .with_physical_optimizer_rule(Arc::new(crate::exec::file_order::KeepFileOrder))
            .build();
        let ctx = SessionContext::new_with_state(state);
        for f in crate::window::functions() {
            ctx.register_udf(f);
        }
        Ok(RiffleSession {
            ctx,
            engine: UdfEngine::new(options.engine)?,
            policy: options.row_error_policy,
            modules: Mutex::new(Vec::new()),
            progress_bar: AtomicBool::new(false),
        })
    }

    /// The DataFusion context, for the DataFrame API.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The UDF engine.
    pub fn engine(&self) -> &UdfEngine {
        &self.engine
    }

    /// Modules loaded so far (those serving now, after any hot swap).
    pub fn modules(&self) -> Vec<Arc<UdfModule>> {
        self.slots().iter().map(|s| s.get()).collect()
    }

    /// The slot of each module loaded so far, in load order: a running query swaps modules
    /// through them.
    pub fn slots(&self) -> Vec<Arc<ModuleSlot>> {
        self.modules.lock().expect("modules lock").clone()
    }

    /// Registers a file, a directory of files, or a Delta table (a directory with `_delta_log`,
    /// read at its newest version) as table `name`.
    ///
    /// # Errors
    /// [`RiffleError::Config`] for a missing path or unknown format; query errors for files
    /// DataFusion cannot read.
    pub async fn register_table(&self, name: &str, path: &Path) -> Result<()> {
        if !path.exists() {
            return Err(RiffleError::Config(format!(
                "table {name}: {} does not exist",
                path.display()
            )));
        }
        if crate::connectors::delta::is_delta_table(path) {
            let as_of = crate::connectors::delta::AsOf::Latest;
            crate::connectors::delta::register(&self.ctx, name, path, &as_of).await?;
            return Ok(());
        }
        let format = FileFormat::of(path)?;
        let location = path.to_string_lossy();
        match format {
            FileFormat::Parquet => {
                self.ctx
                    .register_parquet(name, location.as_ref(), ParquetReadOptions::default())
                    .await?
            }
            FileFormat::Csv => {
                let options = CsvReadOptions::new().file_extension(format.extension());
                self.ctx
                    .register_csv(name, location.as_ref(), options)
                    .await?
            }
            FileFormat::Json => {
                let ext = path
                    .extension()
                    .map(|e| format!(".{}", e.to_string_lossy()))
                    .unwrap_or_else(|| ".json".into());
                let options = JsonReadOptions::default().file_extension(&ext);
                self.ctx
                    .register_json(name, location.as_ref(), options)
                    .await?
            }
        }
        Ok(())
    }

    /// Loads a module and registers its functions (all, or those named in `only`).
    ///
    /// # Errors
    /// Module errors from [`UdfEngine::load_with_config`]; [`RiffleError::Config`] when `only`
    /// names a function the module does not export.
    pub fn load_udfs(
        &self,
        path: &Path,
        config: Vec<u8>,
        only: Option<&[String]>,
    ) -> Result<Arc<UdfModule>> {
        let module = self.engine.load_with_config(path, config)?;
        if let Some(names) = only {
            for name in names {
                if module.function_index(name).is_none() && module.aggregate_index(name).is_none() {
                    let spec = module.spec();
                    let available: Vec<&str> = spec
                        .functions
                        .iter()
                        .map(|f| f.name.as_str())
                        .chain(spec.aggregates.iter().map(|a| a.name.as_str()))
                        .collect();
                    return Err(RiffleError::Config(format!(
                        "{} exports no function {name} (it has: {})",
                        path.display(),
                        available.join(", ")
                    )));
                }
            }
        }
        let slot = ModuleSlot::new(module.clone());
        for (i, _) in module
            .spec()
            .functions
            .iter()
            .enumerate()
            .filter(|(_, f)| only.is_none_or(|names| names.contains(&f.name)))
        {
            self.ctx
                .register_udf(datafusion::logical_expr::ScalarUDF::new_from_impl(
                    WasmScalarUdf::new(slot.clone(), i, self.policy),
                ));
        }
        for (i, _) in module
            .spec()
            .aggregates
            .iter()
            .enumerate()
            .filter(|(_, f)| only.is_none_or(|names| names.contains(&f.name)))
        {
            self.ctx
                .register_udaf(datafusion::logical_expr::AggregateUDF::new_from_impl(
                    crate::udf::WasmAggregateUdf::new(slot.clone(), i, self.policy),
                ));
        }
        tracing::info!(
            module = %path.display(),
            sha256 = module.hash(),
            functions = module.spec().functions.len(),
            aggregates = module.spec().aggregates.len(),
            "loaded UDF module"
        );
        self.modules.lock().expect("modules lock").push(slot);
        Ok(module)
    }

    /// Runs every statement in `sql` and returns the rows of the last one.
    ///
    /// # Errors
    /// The first statement that fails stops the run.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let mut last = Vec::new();
        for statement in split_statements(sql)? {
            last = match statement {
                Statement::CreateFunctions { only, path, config } => {
                    let config = read_udf_config(config.as_deref())?;
                    self.load_udfs(&path, config, only.as_deref())?;
                    Vec::new()
                }
                Statement::Sql(text) => self.collect(self.dataframe(&text).await?).await?,
            };
        }
        Ok(last)
    }

    /// Shows a progress bar on stderr while queries run (only where stderr is a terminal).
    pub fn show_progress(&self, on: bool) {
        self.progress_bar
            .store(on && progress::on_terminal(), Ordering::Relaxed);
    }

    /// Runs `df` and returns its rows, with a progress bar if [`show_progress`] is on.
    ///
    /// [`show_progress`]: Self::show_progress
    ///
    /// # Errors
    /// Planning and execution errors.
    pub async fn collect(&self, df: DataFrame) -> Result<Vec<RecordBatch>> {
        progress::collect(df, self.progress_bar.load(Ordering::Relaxed)).await
    }

    /// Plans one SQL statement as a DataFrame (for streaming results or writing them out).
    ///
    /// # Errors
    /// Planning errors.
    pub async fn dataframe(&self, sql: &str) -> Result<DataFrame> {
        Ok(self.ctx.sql(sql).await?)
    }

    /// `df` with hopping and session windows written as plain DataFusion plans (see
    /// [`crate::window::reference_rewrite`]) and OVER windows left to DataFusion's window
    /// operators, instead of run by the streaming operators: slower and hungrier, but sharing
    /// no code with the streams it is compared with, which is what tests want of an oracle.
    ///
    /// # Errors
    /// Planning errors for unsupported window use.
    pub fn reference(&self, df: DataFrame) -> Result<DataFrame> {
        let (state, plan) = df.into_parts();
        let plan = crate::window::reference_rewrite(plan)?;
        // Without the batch rule, OVER windows are DataFusion's own operators.
        use datafusion::optimizer::AnalyzerRule as _;
        let mut builder = SessionStateBuilder::new_from_existing(state);
        if let Some(analyzer) = builder.analyzer() {
            let batch_only = crate::exec::bounded::BoundedWindows.name().to_string();
            analyzer.rules.retain(|r| r.name() != batch_only);
        }
        Ok(DataFrame::new(builder.build(), plan))
    }
}

/// The init configuration bytes in `file`, or none.
///
/// # Errors
/// [`RiffleError::Io`] when the file cannot be read.
pub fn read_udf_config(file: Option<&Path>) -> Result<Vec<u8>> {
    match file {
        Some(file) => {
            std::fs::read(file).map_err(|e| RiffleError::io("reading UDF config", file, e))
        }
        None => Ok(Vec::new()),
    }
}

/// A statement of a SQL script.
#[derive(Debug, PartialEq, Eq)]
enum Statement {
    /// Riffle's `CREATE FUNCTION[S] ... FROM 'module.wasm' [WITH CONFIG 'file']`.
    CreateFunctions {
        only: Option<Vec<String>>,
        path: PathBuf,
        config: Option<PathBuf>,
    },
    /// Anything else, for DataFusion.
    Sql(String),
}

/// Splits a script on `;` (outside strings and comments) and recognises Riffle's statements.
fn split_statements(sql: &str) -> Result<Vec<Statement>> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| RiffleError::Config(format!("SQL: {e}")))?;
    let mut statements = Vec::new();
    for group in tokens.split(|t| *t == Token::SemiColon) {
        let words: Vec<&Token> = group
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        if words.is_empty() {
            continue;
        }
        match parse_create_functions(&words)? {
            Some(statement) => statements.push(statement),
            None => {
                let text: String = group.iter().map(|t| t.to_string()).collect();
                statements.push(Statement::Sql(text.trim().to_string()));
            }
        }
    }
    Ok(statements)
}

fn keyword(token: &Token, kw: Keyword) -> bool {
    matches!(token, Token::Word(w) if w.keyword == kw)
}

fn parse_create_functions(words: &[&Token]) -> Result<Option<Statement>> {
    let is_functions =
        |t: &Token| matches!(t, Token::Word(w) if w.value.eq_ignore_ascii_case("functions"));
    let mut i = 0;
    if !words.first().is_some_and(|t| keyword(t, Keyword::CREATE)) {
        return Ok(None);
    }
    i += 1;
    if words.get(i).is_some_and(|t| keyword(t, Keyword::OR))
        && words
            .get(i + 1)
            .is_some_and(|t| keyword(t, Keyword::REPLACE))
    {
        i += 2;
    }
    let Some(kind) = words.get(i) else {
        return Ok(None);
    };
    let plural = is_functions(kind);
    if !plural && !keyword(kind, Keyword::FUNCTION) {
        return Ok(None);
    }
    i += 1;
    // Names up to FROM; without FROM this is DataFusion's own CREATE FUNCTION.
    let Some(from) = words.iter().position(|t| keyword(t, Keyword::FROM)) else {
        return Ok(None);
    };
    let bad = |what: &str| {
        RiffleError::Config(format!(
            "CREATE FUNCTION ... FROM: {what}; expected CREATE FUNCTION name[, name...] FROM \
             'module.wasm' [WITH CONFIG 'file'] or CREATE FUNCTIONS FROM 'module.wasm'"
        ))
    };
    let mut names = Vec::new();
    for (n, t) in words[i..from].iter().enumerate() {
        match (n % 2, t) {
            (0, Token::Word(w)) => names.push(w.value.clone()),
            (1, Token::Comma) => {}
            _ => return Err(bad(&format!("unexpected {t}"))),
        }
    }
    if names.is_empty() && !plural {
        return Err(bad("no function named"));
    }
    let string = |t: Option<&&Token>| match t {
        Some(Token::SingleQuotedString(s)) => Ok(PathBuf::from(s)),
        _ => Err(bad("the module path must be a single-quoted string")),
    };
    let path = string(words.get(from + 1))?;
    let rest = &words[from + 2..];
    let config = match rest {
        [] => None,
        [with, cfg, file]
            if keyword(with, Keyword::WITH)
                && matches!(cfg, Token::Word(w) if w.value.eq_ignore_ascii_case("config")) =>
        {
            Some(string(Some(file))?)
        }
        _ => return Err(bad("unexpected text after the module path")),
    };
    Ok(Some(Statement::CreateFunctions {
        only: (!names.is_empty()).then_some(names),
        path,
        config,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_scripts_and_recognises_create_functions() {
        let script = "create functions from 'a.wasm'; \
                      CREATE FUNCTION f, g FROM 'b;c.wasm' WITH CONFIG 'm.txt';\n\
                      SELECT ';' AS x -- ; comment\n;;";
        let statements = split_statements(script).unwrap();
        assert_eq!(
            statements,
            vec![
                Statement::CreateFunctions {
                    only: None,
                    path: "a.wasm".into(),
                    config: None
                },
                Statement::CreateFunctions {
                    only: Some(vec!["f".into(), "g".into()]),
                    path: "b;c.wasm".into(),
                    config: Some("m.txt".into())
                },
                Statement::Sql("SELECT ';' AS x -- ; comment".into()),
            ]
        );
    }

    #[test]
    fn rejects_malformed_create_functions_clearly() {
        for bad in [
            "CREATE FUNCTION FROM 'a.wasm'",
            "CREATE FUNCTION f FROM a.wasm",
            "CREATE FUNCTION f g FROM 'a.wasm'",
            "CREATE FUNCTIONS FROM 'a.wasm' WITH 'x'",
        ] {
            let err = split_statements(bad).unwrap_err().to_string();
            assert!(err.contains("expected CREATE FUNCTION"), "{bad}: {err}");
        }
        // DataFusion's own CREATE FUNCTION passes through untouched.
        let s = split_statements("CREATE FUNCTION f(x INT) RETURNS INT RETURN x").unwrap();
        assert!(matches!(&s[0], Statement::Sql(_)));
    }
}
