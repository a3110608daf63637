//! The identity of a streaming query's state.
//!
//! A checkpoint may only be resumed by the query that wrote it: the same sources with the same
//! event time and watermark, the same operators with the same schemas, the same output mode and
//! the same UDF code and configuration. The fingerprint lists exactly those, so a restart that
//! changes any of them is refused with a message naming what changed, instead of silently
//! feeding old state to new code. It is built from the plan's structure, not from its printed
//! text, so a DataFusion upgrade that prints plans differently does not invalidate checkpoints.

use arrow::datatypes::Schema;
use serde::{Deserialize, Serialize};

/// Version of the state encoding; bump when a table's layout changes.
pub const STATE_FORMAT: u32 = 5;

/// A streaming source's part of the fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePrint {
    /// Table name.
    pub name: String,
    /// Source kind.
    pub kind: String,
    /// Column names and types.
    pub schema: String,
    /// Event-time column.
    pub event_time: Option<String>,
    /// Watermark delay, microseconds.
    pub watermark_delay_us: i64,
}

/// An operator's part of the fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorPrint {
    /// Stable id.
    pub id: String,
    /// Its inputs (source names or operator ids).
    pub inputs: Vec<String>,
    /// Output column names and types.
    pub schema: String,
}

/// A UDF module's part of the fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdfPrint {
    /// Module file name.
    pub module: String,
    /// sha256 of the module.
    pub sha256: String,
    /// sha256 of its init configuration.
    pub config_sha256: String,
    /// The functions and aggregates it exports, for messages (absent in checkpoints written
    /// before they were recorded).
    #[serde(default)]
    pub functions: Vec<String>,
    /// Each aggregate's state columns, as `name(col TYPE, ...)`: state a module checkpointed
    /// can only be restored by a module that declares the same columns. `None` in
    /// checkpoints written before they were recorded: unknown, so not assumed unchanged.
    #[serde(default)]
    pub aggregate_states: Option<Vec<String>>,
}

impl UdfPrint {
    /// What a checkpoint pins of `module`.
    pub fn of(module: &crate::udf::UdfModule) -> Self {
        UdfPrint {
            module: module.file_name().to_string(),
            sha256: module.hash().to_string(),
            config_sha256: module.config_hash(),
            functions: module.counted().map(|(_, name)| name.to_string()).collect(),
            aggregate_states: Some(
                module
                    .spec()
                    .aggregates
                    .iter()
                    .map(|a| format!("{}({})", a.name, a.state_schema()))
                    .collect(),
            ),
        }
    }

    /// `fraud.wasm (risk_score, is_night)`.
    fn named(&self) -> String {
        if self.functions.is_empty() {
            self.module.clone()
        } else {
            format!("{} ({})", self.module, self.functions.join(", "))
        }
    }
}

/// What identifies a streaming query's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// [`STATE_FORMAT`] of the writer.
    pub state_format: u32,
    /// Output mode.
    pub output_mode: String,
    /// Streaming sources.
    pub sources: Vec<SourcePrint>,
    /// Operators, in graph order.
    pub operators: Vec<OperatorPrint>,
    /// UDF modules loaded by the session.
    pub udfs: Vec<UdfPrint>,
}

/// `name: type` pairs of a schema, `?` marking nullable columns.
pub fn describe_schema(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| {
            format!(
                "{}: {}{}",
                f.name(),
                f.data_type(),
                if f.is_nullable() { "?" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

impl Fingerprint {
    /// What changed from `old` (a checkpoint's) to `self` (this run's), one sentence each;
    /// empty when they match.
    pub fn changes_since(&self, old: &Fingerprint) -> Vec<String> {
        let mut out = self.query_changes_since(old);
        out.extend(self.udf_changes_since(old));
        out
    }

    /// What changed apart from UDF code and configuration: none of it can be resumed.
    pub fn query_changes_since(&self, old: &Fingerprint) -> Vec<String> {
        let mut out = Vec::new();
        if self.state_format != old.state_format {
            out.push(format!(
                "the state format changed ({} -> {}): this Riffle cannot read the checkpoint",
                old.state_format, self.state_format
            ));
        }
        if self.output_mode != old.output_mode {
            out.push(format!(
                "output mode {} -> {}",
                old.output_mode, self.output_mode
            ));
        }
        for s in &old.sources {
            match self.sources.iter().find(|n| n.name == s.name) {
                None => out.push(format!("source `{}` was removed", s.name)),
                Some(n) => {
                    if n.kind != s.kind {
                        out.push(format!(
                            "source `{}`: kind {} -> {}",
                            s.name, s.kind, n.kind
                        ));
                    }
                    if n.schema != s.schema {
                        out.push(format!(
                            "source `{}`: columns ({}) -> ({})",
                            s.name, s.schema, n.schema
                        ));
                    }
                    if n.event_time != s.event_time {
                        out.push(format!(
                            "source `{}`: event time {:?} -> {:?}",
                            s.name, s.event_time, n.event_time
                        ));
                    }
                    if n.watermark_delay_us != s.watermark_delay_us {
                        out.push(format!(
                            "source `{}`: watermark delay {} µs -> {} µs",
                            s.name, s.watermark_delay_us, n.watermark_delay_us
                        ));
                    }
                }
            }
        }
        for n in &self.sources {
            if !old.sources.iter().any(|s| s.name == n.name) {
                out.push(format!("source `{}` was added", n.name));
            }
        }
        if self.operators != old.operators {
            let ids = |ops: &[OperatorPrint]| {
                ops.iter()
                    .map(|o| o.id.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if self.operators.len() != old.operators.len()
                || self
                    .operators
                    .iter()
                    .zip(&old.operators)
                    .any(|(a, b)| a.id != b.id)
            {
                out.push(format!(
                    "the query's operators changed ({} -> {})",
                    ids(&old.operators),
                    ids(&self.operators)
                ));
            } else {
                for (n, o) in self.operators.iter().zip(&old.operators) {
                    if n.schema != o.schema {
                        out.push(format!(
                            "operator {}: output columns ({}) -> ({})",
                            n.id, o.schema, n.schema
                        ));
                    }
                    if n.inputs != o.inputs {
                        out.push(format!(
                            "operator {}: inputs {:?} -> {:?}",
                            n.id, o.inputs, n.inputs
                        ));
                    }
                }
            }
        }
        out
    }

    /// Which UDF modules changed code or configuration, were removed or were added: what
    /// `--upgrade-udfs` may accept.
    pub fn udf_changes_since(&self, old: &Fingerprint) -> Vec<String> {
        let mut out = Vec::new();
        for u in &old.udfs {
            match self.udfs.iter().find(|n| n.module == u.module) {
                None => out.push(format!("UDF module {} is no longer loaded", u.named())),
                Some(n) => {
                    if n.sha256 != u.sha256 {
                        out.push(format!(
                            "UDF module {} changed (sha256 {} -> {})",
                            n.named(),
                            short(&u.sha256),
                            short(&n.sha256)
                        ));
                    }
                    if n.config_sha256 != u.config_sha256 {
                        out.push(format!(
                            "UDF module {}: its init configuration changed (sha256 {} -> {})",
                            n.named(),
                            short(&u.config_sha256),
                            short(&n.config_sha256)
                        ));
                    }
                }
            }
        }
        for n in &self.udfs {
            if !old.udfs.iter().any(|u| u.module == n.module) {
                out.push(format!("UDF module {} was added", n.named()));
            }
        }
        out
    }

    /// Why the UDF changes since `old` cannot be accepted even on purpose: an aggregate whose
    /// state columns changed could not read the state its old version checkpointed.
    pub fn upgrade_blockers(&self, old: &Fingerprint) -> Vec<String> {
        let name = |s: &str| s.split('(').next().unwrap_or(s).to_string();
        let mut out = Vec::new();
        for u in &old.udfs {
            let Some(states) = &u.aggregate_states else {
                let has_aggregates = self
                    .udfs
                    .iter()
                    .find(|n| n.module == u.module)
                    .and_then(|n| n.aggregate_states.as_ref())
                    .is_some_and(|a| !a.is_empty());
                if has_aggregates {
                    out.push(format!(
                        "the checkpoint predates recorded aggregate states, so whether {}'s \
                         aggregates can read their old state is unknown",
                        u.module
                    ));
                }
                continue;
            };
            for before in states {
                let after = self
                    .udfs
                    .iter()
                    .flat_map(|n| n.aggregate_states.iter().flatten())
                    .find(|a| name(a) == name(before));
                if let Some(after) = after.filter(|a| *a != before) {
                    out.push(format!(
                        "aggregate {}'s state changed ({before} -> {after}): the new module \
                         cannot read the state the old one checkpointed",
                        name(before)
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print() -> Fingerprint {
        Fingerprint {
            state_format: STATE_FORMAT,
            output_mode: "append".into(),
            sources: vec![SourcePrint {
                name: "tx".into(),
                kind: "generator".into(),
                schema: "ts: Timestamp(µs)".into(),
                event_time: Some("ts".into()),
                watermark_delay_us: 10_000_000,
            }],
            operators: vec![OperatorPrint {
                id: "0-aggregate".into(),
                inputs: vec!["tx".into()],
                schema: "n: Int64".into(),
            }],
            udfs: vec![UdfPrint {
                functions: vec!["risk_score".into()],
                aggregate_states: Some(vec![
                    "decayed_avg(at TIMESTAMP NULL, weight DOUBLE)".into(),
                ]),
                module: "fraud.wasm".into(),
                sha256: "1b1b0b5d0c8e0000".into(),
                config_sha256: "e3b0c44298fc".into(),
            }],
        }
    }

    #[test]
    fn only_a_changed_aggregate_state_blocks_an_upgrade() {
        let old = print();
        let mut new = print();
        new.udfs[0].sha256 = "9994ce5a251f0000".into();
        assert!(new.query_changes_since(&old).is_empty());
        assert_eq!(new.udf_changes_since(&old).len(), 1);
        assert!(
            new.upgrade_blockers(&old).is_empty(),
            "new code, same state"
        );
        new.udfs[0].aggregate_states = Some(vec!["decayed_avg(weight DOUBLE)".into()]);
        let blockers = new.upgrade_blockers(&old);
        assert_eq!(blockers.len(), 1);
        assert!(
            blockers[0].starts_with("aggregate decayed_avg's state changed"),
            "{blockers:?}"
        );
        // A checkpoint that did not record states cannot vouch for them.
        let mut unknown = print();
        unknown.udfs[0].aggregate_states = None;
        assert_eq!(new.upgrade_blockers(&unknown).len(), 1);
    }

    #[test]
    fn every_change_is_named() {
        let old = print();
        assert!(old.changes_since(&old).is_empty());
        let mut new = print();
        new.udfs[0].sha256 = "9994ce5a251f0000".into();
        new.sources[0].watermark_delay_us = 5_000_000;
        new.output_mode = "update".into();
        let changes = new.changes_since(&old).join("; ");
        assert!(
            changes.contains(
                "UDF module fraud.wasm (risk_score) changed (sha256 1b1b0b5d0c8e -> 9994ce5a251f)"
            ),
            "{changes}"
        );
        assert!(
            changes.contains("watermark delay 10000000 µs -> 5000000 µs"),
            "{changes}"
        );
        assert!(
            changes.contains("output mode append -> update"),
            "{changes}"
        );
        let mut new = print();
        new.operators[0].id = "0-dedup".into();
        assert!(new.changes_since(&old)[0].contains("operators changed (0-aggregate -> 0-dedup)"));
    }
}
