//! Which module serves the functions a session registered, and how a running query swaps it.
//!
//! A registered Wasm function reaches its module through a [`ModuleSlot`] rather than holding
//! the module itself, so that a streaming query can replace a module between two epochs (a hot
//! swap) without planning the query again: every physical plan, accumulator and streaming
//! operator built from the session keeps working and makes its next call into the new module.
//! That is only sound when the new module exports every function of the old one with the same
//! signature, and every aggregate with the same state columns (its groups' checkpointed states
//! are read by the new code): [`swap_blockers`] says what stands in the way.

use std::sync::{Arc, RwLock};

use super::module::{ModuleSpec, UdfModule};

/// The module currently serving one loaded module file's functions.
#[derive(Debug)]
pub struct ModuleSlot {
    current: RwLock<Arc<UdfModule>>,
}

impl ModuleSlot {
    /// A slot served by `module`.
    pub fn new(module: Arc<UdfModule>) -> Arc<Self> {
        Arc::new(ModuleSlot {
            current: RwLock::new(module),
        })
    }

    /// The module serving now. Callers keep the `Arc` for one call, so a swap never pulls a
    /// module out from under a call in progress.
    pub fn get(&self) -> Arc<UdfModule> {
        self.current.read().expect("module slot lock").clone()
    }

    /// Serves from `module` from the next call on. The caller has checked
    /// [`swap_blockers`].
    pub fn replace(&self, module: Arc<UdfModule>) {
        *self.current.write().expect("module slot lock") = module;
    }
}

/// Why `new` cannot take over from `old` in a running query: a function or aggregate it no
/// longer exports, or exports with another signature, determinism or state. Empty when the
/// swap is safe. (A new module may add functions; the running query does not use them.)
pub fn swap_blockers(old: &ModuleSpec, new: &ModuleSpec) -> Vec<String> {
    let mut out = Vec::new();
    for f in &old.functions {
        match new.functions.iter().find(|n| n.name == f.name) {
            None => out.push(format!("it no longer exports {}", f.signature())),
            Some(n) if n.signature() != f.signature() => {
                out.push(format!("{} became {}", f.signature(), n.signature()))
            }
            Some(n) if n.deterministic != f.deterministic => {
                out.push(format!("{} changed whether it is deterministic", f.name))
            }
            Some(_) => {}
        }
    }
    for a in &old.aggregates {
        match new.aggregates.iter().find(|n| n.name == a.name) {
            None => out.push(format!("it no longer exports aggregate {}", a.signature())),
            Some(n) if n.signature() != a.signature() => out.push(format!(
                "aggregate {} became {}",
                a.signature(),
                n.signature()
            )),
            Some(n) if n.state_schema() != a.state_schema() => out.push(format!(
                "aggregate {}'s state changed ({} -> {}): the new module cannot read the \
                 states the old one keeps",
                a.name,
                a.state_schema(),
                n.state_schema()
            )),
            Some(n) if a.retractable && !n.retractable => {
                out.push(format!("aggregate {} can no longer retract", a.name))
            }
            Some(n) if n.deterministic != a.deterministic => out.push(format!(
                "aggregate {} changed whether it is deterministic",
                a.name
            )),
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udf::UdfType;
    use crate::udf::module::{AggregateSpec, ArgSpec, FunctionSpec, StateFieldSpec};

    fn arg(name: &str, data_type: UdfType) -> ArgSpec {
        ArgSpec {
            name: name.into(),
            data_type,
            nullable: false,
        }
    }

    fn spec() -> ModuleSpec {
        ModuleSpec {
            abi_version: 2,
            sdk: "test".into(),
            has_init: false,
            deterministic: true,
            functions: vec![FunctionSpec {
                name: "score".into(),
                args: vec![arg("amount", UdfType::Float64)],
                returns: UdfType::Float64,
                returns_null: false,
                fallible: false,
                deterministic: true,
                doc: String::new(),
            }],
            aggregates: vec![AggregateSpec {
                name: "avg_of".into(),
                args: vec![arg("x", UdfType::Float64)],
                returns: UdfType::Float64,
                returns_null: true,
                fallible: false,
                state: vec![StateFieldSpec {
                    name: "sum".into(),
                    data_type: UdfType::Float64,
                    nullable: false,
                }],
                retractable: true,
                deterministic: true,
                doc: String::new(),
            }],
        }
    }

    #[test]
    fn a_rebuild_with_the_same_exports_and_more_may_swap() {
        let mut new = spec();
        new.functions[0].doc = "now documented".into();
        new.functions.push(FunctionSpec {
            name: "extra".into(),
            ..spec().functions[0].clone()
        });
        assert!(swap_blockers(&spec(), &new).is_empty());
    }

    #[test]
    fn changed_signatures_missing_functions_and_states_block_a_swap() {
        let mut new = spec();
        new.functions[0].args[0].data_type = UdfType::Int64;
        new.aggregates[0].state[0].data_type = UdfType::Int64;
        assert_eq!(
            swap_blockers(&spec(), &new),
            [
                "score(amount DOUBLE) -> DOUBLE became score(amount BIGINT) -> DOUBLE",
                "aggregate avg_of's state changed (sum DOUBLE -> sum BIGINT): the new module \
                 cannot read the states the old one keeps",
            ]
        );
        let mut new = spec();
        new.functions.clear();
        new.aggregates[0].retractable = false;
        assert_eq!(
            swap_blockers(&spec(), &new),
            [
                "it no longer exports score(amount DOUBLE) -> DOUBLE",
                "aggregate avg_of can no longer retract",
            ]
        );
    }
}
